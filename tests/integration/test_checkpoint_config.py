"""A checkpoint carries its resolved job config: a resume needs no config.json beside it."""

from __future__ import annotations

import json

import pytest

from sparse_lm import config as configlib
from sparse_lm.jobs import PretrainConfig
from sparse_lm.trainer import TrainingError, checkpoint_job_config


def _cfg(small_data, tmp_path, *extra: str) -> PretrainConfig:
    # A shape far from the defaults (1 layer, no sink, LayerNorm): a resume that fell back to the
    # defaults would build another model and fail to load the checkpoint.
    return configlib.resolve(PretrainConfig, "pretrain", None, [
        f"out_dir={tmp_path}", "run_name=run", f"data.data_dir={small_data}", "data.block_size=64",
        "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_head=8", "model.d_mlp=64",
        "model.sink=false", "model.rms_norm=false", "model.enable_bigram_table=false",
        "sparsity.target_fraction=0.25", "sparsity.min_fan=2", "train.steps=2", "train.micro_batch=2",
        "train.global_batch=2", "train.precision=fp32", "train.eval_every=0", "train.eval_batches=1",
        "train.log_every=1", "train.threads=1", *extra])


def test_resume_without_config_json_takes_the_config_from_the_checkpoint(small_data, tmp_path, single_rank):
    from sparse_lm.pretrain import load_run_config, run

    cfg = _cfg(small_data, tmp_path)
    run(cfg, "pretrain", progress=False)
    run_dir = tmp_path / "run"
    job, saved = checkpoint_job_config(run_dir / "checkpoints")
    assert job == "pretrain" and saved == json.loads(json.dumps(configlib.to_dict(cfg)))

    (run_dir / "config.json").unlink()
    job, resumed = load_run_config(run_dir)
    assert job == "pretrain" and resumed == cfg
    resumed.train.steps = 4
    summary = run(resumed, job, progress=False)
    assert summary["steps"] == 4
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps[:4] == [1, 2, 3, 4]  # steps 1-2 from the first run, 3-4 after the resume: nothing redone

    # another architecture in the same folder: refused by the checkpoint's config, config.json or not
    (run_dir / "config.json").unlink()
    with pytest.raises(TrainingError, match="another architecture"):
        run(_cfg(small_data, tmp_path, "model.d_mlp=128", "train.steps=6"), "pretrain", progress=False)


def test_run_without_checkpoints_reads_config_json_and_old_key_names(tmp_path):
    from sparse_lm.pretrain import load_run_config

    data = configlib.to_dict(PretrainConfig())
    data["model"]["bigram_table"] = data["model"].pop("enable_bigram_table") and False
    (tmp_path / "config.json").write_text(json.dumps({"job": "pretrain", **data}))
    with pytest.warns(DeprecationWarning, match=r"model\.bigram_table -> model\.enable_bigram_table"):
        job, cfg = load_run_config(tmp_path)
    assert job == "pretrain" and cfg.model.enable_bigram_table is False
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run_config(tmp_path / "nothing")
