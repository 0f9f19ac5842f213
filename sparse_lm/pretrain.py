"""The ``pretrain`` and ``train-dense`` jobs: data, model, :class:`Trainer`, export.

A run folder holds everything a run made::

    runs/<name>/config.json      resolved config (for reading; a resume takes it from the checkpoint)
    runs/<name>/tokenizer/       BPE tokenizer (AutoTokenizer-loadable)
    runs/<name>/data/            packed train/validation blocks + data_meta.json
    runs/<name>/checkpoints/     DeepSpeed checkpoints (exact resume; each carries the resolved config)
    runs/<name>/metrics.jsonl    one JSON line per logged step
    runs/<name>/model/           final save_pretrained model + tokenizer
    runs/<name>/curves.png       training curves
    runs/<name>/summary.json     final numbers
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sparse_lm import config as configlib
from sparse_lm.data import prepare
from sparse_lm.io import remove_stale_temporaries, set_aside, unlock_run_folder, write_json
from sparse_lm.jobs import DenseConfig, PretrainConfig, build_model
from sparse_lm.trainer import (
    Trainer,
    TrainingError,
    checkpoint_job_config,
    device,
    export_model,
    init_distributed,
    lock_run,
    save_job_config,
    shutdown_distributed,
)

# What a run leaves in its folder besides its inputs (tokenizer/, data/, which a fresh run reuses).
RUN_OUTPUTS = ["checkpoints", "metrics.jsonl", "model", "summary.json", "curves.png", "config.json"]


def run(cfg: PretrainConfig | DenseConfig, job: str, *, resume: bool = True, progress: bool = True) -> dict:
    """Run a training job to completion and export it; returns the summary (on every rank)."""
    rank, world = init_distributed()
    ok = False
    run_dir = Path(cfg.out_dir) / cfg.run_name
    try:
        # One run per folder: a second one fails here, naming the first one's PID, before it writes anything.
        lock_run(run_dir, rank)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(run_dir)  # safe: the lock says nobody else writes here
            if (run_dir / "model").is_dir():
                remove_stale_temporaries(run_dir / "model")
            if not resume:
                moved = set_aside(run_dir, RUN_OUTPUTS)
                if moved is not None:
                    print(f"--fresh: the earlier run's outputs were moved to {moved}", flush=True)
            old = _saved_config(run_dir, type(cfg)) if resume else None
            if old is not None:
                if configlib.to_dict(old)["model"] != configlib.to_dict(cfg)["model"]:
                    raise TrainingError(
                        f"{run_dir} holds a run of another architecture (its checkpoint); resume with "
                        f"`--resume {run_dir}` (which takes the architecture from the checkpoint) or pick another "
                        f"run_name"
                    )
            save_job_config(cfg, job, run_dir)
        dist.barrier()
        tokenizer, train, val, meta = prepare(cfg, run_dir, rank)
        vocab = len(tokenizer)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, job, vocab, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        if rank == 0:
            print(f"{job}: {type(model).__name__} {n_params / 1e6:.2f}M parameters, {world} rank(s), "
                  f"{len(train)} train blocks x {cfg.data.block_size} tokens, {cfg.train.steps} steps of "
                  f"{cfg.train.global_batch} sequences, precision {cfg.train.precision}, ZeRO-{cfg.train.zero_stage}",
                  flush=True)
        trainer = Trainer(model=model, run_dir=run_dir, train_cfg=cfg.train, optim_cfg=cfg.optim,
                          train_tokens=train, val_tokens=val, sparsity=getattr(cfg, "sparsity", None),
                          job_config=cfg, job=job)
        t0 = time.perf_counter()
        factory = lambda: build_model(cfg, job, vocab, tokenizer)  # noqa: E731

        def snapshot(step: int) -> None:
            export_model(trainer, factory, run_dir / "snapshots" / f"step{step:07d}", tokenizer)

        last = trainer.fit(resume=resume, progress=progress, on_snapshot=snapshot)
        seconds = time.perf_counter() - t0
        finished = _finished_summary(run_dir, rank) if trainer.step == trainer.start_step else None
        if finished is not None:  # nothing was trained: the run's results stand as they are
            if rank == 0:
                print(f"{run_dir} already finished at step {trainer.step}; its model and summary are unchanged "
                      f"(raise train.steps to train on)", flush=True)
            ok = True
            return finished
        out = export_model(trainer, factory, run_dir / "model", tokenizer)
        summary = {"job": job, "run_dir": str(run_dir), "model_dir": str(run_dir / "model"), "steps": trainer.step,
                   "world_size": world, "parameters": n_params, "train_seconds": seconds,
                   "unigram_entropy_nats": meta.get("unigram_entropy_nats"),
                   **{k: v for k, v in last.items() if k != "kept_fraction"}}
        if trainer.sparse:
            summary["kept_fraction"] = last.get("kept_fraction")
        if rank == 0 and out is not None:
            write_json(run_dir / "summary.json", summary)
            from sparse_lm.plots import plot_training

            plot_training(run_dir / "metrics.jsonl", run_dir / "curves.png",
                          title=f"{job} {cfg.run_name}", unigram_entropy=meta.get("unigram_entropy_nats"))
            print(format_summary(summary), flush=True)
        ok = True
        return summary
    finally:
        unlock_run_folder(run_dir)  # a no-op on ranks that do not hold it; process exit would release it too
        shutdown_distributed(clean=ok)


def _finished_summary(run_dir: Path, rank: int) -> dict | None:
    """The summary of a run whose model and summary are already written (decided on rank 0 for all ranks)."""
    summary = None
    if rank == 0 and (run_dir / "model").is_dir() and (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except json.JSONDecodeError:
            summary = None  # a damaged summary is rewritten
    # A tensor flag, not broadcast_object_list: that one needs each rank's CUDA device set under NCCL.
    flag = torch.tensor([0 if summary is None else 1], device=device())
    dist.broadcast(flag, 0)
    if not int(flag):
        return None
    if summary is None:  # another rank: its copy of the summary (the same file on one machine)
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            summary = {"run_dir": str(run_dir)}
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"== {s['job']} finished: {s['run_dir']}",
             f"   steps {s['steps']} on {s['world_size']} rank(s) in {s['train_seconds']:.0f}s, "
             f"{s.get('tokens_per_s', 0):.0f} tokens/s (last interval)",
             f"   train loss {s.get('loss', float('nan')):.3f}, validation loss {s.get('val_loss', float('nan')):.3f} nats "
             f"(unigram entropy of the corpus: {s.get('unigram_entropy_nats') or float('nan'):.3f})"]
    if "kept_fraction_blocks" in s:
        lines.append(f"   kept fraction of block weights {s['kept_fraction_blocks']:.4f} "
                     f"(target {s.get('kept_fraction_target', float('nan')):.4f}), "
                     f"dead neurons {100 * s.get('dead_neuron_share', 0):.1f}%")
    lines.append(f"   model: {s['model_dir']}  (AutoModelForCausalLM.from_pretrained)")
    return "\n".join(lines)


def _saved_config(run_dir: Path, cls):
    """The config a run folder's checkpoints were trained with; None when it has no checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints" / "latest").is_file():
        return None
    found = checkpoint_job_config(run_dir / "checkpoints")
    if found is not None:
        return configlib.from_dict(cls, found[1], legacy=True)
    if (run_dir / "config.json").is_file():  # a checkpoint written before the config rode along
        return configlib.load(cls, run_dir / "config.json")
    return None


def load_run_config(run_dir: Path):
    """Config of an existing run (for ``--resume``): the job and its resolved config.

    Taken from the newest checkpoint (which carries it); from ``config.json`` only for a run without
    checkpoints or with checkpoints written before they carried their config.
    """
    run_dir = Path(run_dir)
    found = checkpoint_job_config(run_dir / "checkpoints")
    if found is not None:
        job, data = found
        cls = PretrainConfig if job == "pretrain" else DenseConfig
        return job, configlib.from_dict(cls, data, legacy=True)
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no checkpoint with a config, no config.json)")
    job = json.loads(path.read_text()).get("job", "pretrain")
    cls = PretrainConfig if job == "pretrain" else DenseConfig
    return job, configlib.load(cls, path)
