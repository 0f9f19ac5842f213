"""``runs/<name>/results.json``: the main job's machine-readable summary (format ``sparse-lm-results/1``).

Rewritten atomically after every stage from what the stages measured in this run folder, so a
partial run has a partial file. Keys a stage did not produce are absent, never placeholders.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparse_lm_app.main_job.context import Pipeline

FORMAT = "sparse-lm-results/1"


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "gpus": torch.cuda.device_count(), "torch": torch.__version__}


def _model_entry(p: Pipeline, key: str) -> dict[str, Any]:
    s = p.results[key]
    cfg = p.configs.get(key)
    entry: dict[str, Any] = {"path": s.get("model_dir"), "steps": s.get("steps")}
    if "val_loss" in s:
        entry["val_loss"] = s["val_loss"]
    if cfg is not None:
        entry["tokens_per_step"] = cfg.train.global_batch * cfg.data.block_size
        optim = {"lr": cfg.optim.lr, "eps": cfg.optim.eps, "schedule": cfg.optim.schedule,
                 "grad_rms_bound": cfg.optim.grad_rms_bound}
        if hasattr(cfg.optim, "grad_rms_mode"):
            optim["grad_rms_mode"] = cfg.optim.grad_rms_mode
        entry["optimizer"] = optim
    if s.get("train_seconds") and s.get("steps"):
        entry["seconds_per_step"] = s["train_seconds"] / s["steps"]
    evals = p.results.get("eval", {}).get(key)
    if evals:
        entry["tasks"] = {row["task"]: {"accuracy": row["accuracy"], "loss": row["loss"], "split": "test"}
                          for row in evals if "accuracy" in row and "loss" in row}
    return entry


def _circuit_entry(row: dict[str, Any]) -> dict[str, Any]:
    entry = {"model": row["model"], "task": row["task"], "method": row["method"],
             "tuned_by": row.get("tuned_by", "k_coef-search" if row["method"] == "learned" else "none"),
             "target_loss": row.get("target_loss"), "failed": bool(row.get("failed"))}
    if row.get("failed"):
        entry["reason"] = row.get("reason")
        return entry
    entry.update(nodes=row["nodes"], edges=row["edges"], loss={"test": row["loss"]},
                 loss_calibrated={"test": row["calibrated_loss"]}, ablated_loss={"test": row["ablated_loss"]},
                 path=row.get("circuit_dir"))
    for key in ("edges_by_type", "sweep_iterations"):
        if key in row:
            entry[key] = row[key]
    if "val_loss" in row:
        entry["loss"]["val"] = row["val_loss"]
    return entry


def build_results(p: Pipeline) -> dict[str, Any]:
    from sparse_lm_app.main_job.context import ROOT

    out: dict[str, Any] = {"format": FORMAT, "preset": p.args.preset, "git_commit": _git_commit(ROOT),
                           "machine": _machine(), "stages": dict(p.timings)}
    models = {k: _model_entry(p, k) for k in ("sparse", "dense") if k in p.results}
    if models:
        out["models"] = models
    if "prune" in p.results:
        out["circuits"] = [_circuit_entry(r) for r in p.results["prune"]["circuits"]]
    bridge = p.results.get("bridge")
    if bridge and "losses" in bridge:
        after = {k[: -len(" after")]: v for k, v in bridge["losses"].items() if k.endswith(" after")}
        cfg = p.configs.get("bridge")
        out["bridge"] = {"mode": getattr(cfg, "mode", None), "dense": getattr(cfg, "dense", None),
                         "sparse": getattr(cfg, "sparse", None), **after}
        if "alphas" in bridge:
            out["interventions"] = [{
                "task": "single_double_quote", "channels": len(bridge["channel"].get("channels", [])),
                "site": bridge["channel"].get("bridge_site"), "alpha": bridge["alphas"],
                "effect": bridge["dense_delta_p"], "control_mean": bridge["control_delta_p"],
                "control_sd": bridge["control_std"],
            }]
    return out


def write_results(p: Pipeline) -> Path:
    from sparse_lm.io import write_json

    path = p.run_dir / "results.json"
    write_json(path, build_results(p))
    return path
