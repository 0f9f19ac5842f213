"""Typed configs: presets, overrides, unknown keys and wrong types are errors."""

from __future__ import annotations

import json

import pytest

from sparse_lm import config as configlib
from sparse_lm.jobs import DenseConfig, PretrainConfig


def test_every_preset_resolves():
    for job, cls in (("pretrain", PretrainConfig), ("dense", DenseConfig)):
        names = configlib.list_presets(job)
        assert names, job
        for name in names:
            cfg = configlib.resolve(cls, job, name)
            assert cfg.train.global_batch % cfg.train.micro_batch == 0


def test_paper_1x_preset_is_the_paper_shape():
    cfg = configlib.resolve(PretrainConfig, "pretrain", "paper-1x")
    m = cfg.model
    assert (m.n_layer, m.d_model, m.n_head, m.d_head, m.d_mlp, m.afrac) == (8, 256, 16, 16, 1024, 0.25)
    assert (cfg.data.block_size, cfg.data.vocab_size) == (256, 2048)
    assert cfg.optim.eps == 0.1


def test_overrides_are_typed():
    cfg = configlib.resolve(PretrainConfig, "pretrain", "tiny",
                            ["train.steps=7", "optim.lr=0.5", "model.afrac=null", "model.afrac_loctypes=attn_in,mlp_in"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.5 and cfg.model.afrac is None
    assert cfg.model.afrac_loctypes == ["attn_in", "mlp_in"]


@pytest.mark.parametrize("override, message", [
    ("model.foo=1", r"unknown config key model\.foo; known keys of model\.: activation_type"),
    ("trian.steps=3", r"unknown config key trian"),
    ("train.steps=abc", r"train\.steps: expected an integer, got 'abc'"),
    ("train.precision=fp8", r"train\.precision: 'fp8' is not one of 'fp32', 'bf16', 'bf16-autocast'"),
    ("train.global_batch=33", r"not a multiple of train\.micro_batch"),
    ("sparsity.target_fraction=2", r"sparsity\.target_fraction must be in \(0, 1\]"),
    ("steps", r"is not of the form key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):  # ConfigError is a ValueError
        configlib.resolve(PretrainConfig, "pretrain", "tiny", [override])


def test_wrong_job_preset_and_missing_preset():
    with pytest.raises(configlib.ConfigError, match="is a 'dense' preset"):
        configlib.resolve(PretrainConfig, "pretrain", "tiny-dense")
    with pytest.raises(configlib.ConfigError, match="no preset 'nope'"):
        configlib.resolve(PretrainConfig, "pretrain", "nope")


def test_saved_config_round_trips(tmp_path):
    cfg = configlib.resolve(PretrainConfig, "pretrain", "tiny", ["train.steps=9"])
    configlib.save(cfg, tmp_path / "config.json", job="pretrain")
    assert json.loads((tmp_path / "config.json").read_text())["job"] == "pretrain"
    assert configlib.load(PretrainConfig, tmp_path / "config.json") == cfg
    assert "train.steps = 9" in configlib.describe(cfg)
