"""``runs/<name>/results.json``: the main job's machine-readable summary (format ``sparse-lm-results/1``).

Rewritten atomically after every stage from what the stages measured in this run folder, so a
partial run has a partial file. Keys a stage did not produce are absent, never placeholders.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparse_lm_app.main_job.curves import CURVE_SPLIT, tokens_per_step
from sparse_lm_app.main_job.curves import finite as _finite

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
        entry["tokens_per_step"] = tokens_per_step(cfg)  # the curve's tokens are step x this
        optim = {"lr": cfg.optim.lr, "eps": cfg.optim.eps, "schedule": cfg.optim.schedule,
                 "grad_rms_bound": cfg.optim.grad_rms_bound}
        if hasattr(cfg.optim, "grad_rms_mode"):
            optim["grad_rms_mode"] = cfg.optim.grad_rms_mode
        entry["optimizer"] = optim
    if s.get("train_seconds") and s.get("steps"):
        entry["seconds_per_step"] = s["train_seconds"] / s["steps"]
    evals = p.results.get("eval", {}).get(key)
    if evals:
        entry["tasks"] = _task_entries(evals, "test", examples=False)
    curve = p.results.get("eval", {}).get("curves", {}).get(key)
    if curve:  # the showcase tasks on every snapshot of the run and the final model (curves.build_curve)
        entry["curve"] = curve
        entry["curve_split"] = p.results["eval"].get("curve_split", CURVE_SPLIT)
        if p.results["eval"].get("curve_examples"):
            entry["curve_examples"] = p.results["eval"]["curve_examples"]
    return entry


def _bridged_models(p: Pipeline) -> dict[str, Any]:
    """The bridged pipeline's two models: the sparse model as bridged (trained with its bridges) and the dense model
    it was bridged to, with their task numbers from the eval stage."""
    ev = p.results["eval"]
    bridge = p.results.get("bridge") or {}
    models: dict[str, Any] = {}
    for key in ("sparse", "dense"):
        entry: dict[str, Any] = {"path": ev["models"][key]}
        if key == "sparse":
            entry["trained_with_bridges"] = True
            summary = Path(bridge.get("bridge_dir", "")) / "summary.json"
            if bridge.get("bridge_dir") and summary.is_file():
                entry["steps"] = json.loads(summary.read_text()).get("steps")
        entry["tasks"] = _task_entries(ev.get(key, []), ev["split"])
        models[key] = entry
    return models


def _task_entries(rows: list[dict], split: str, examples: bool = True) -> dict[str, Any]:
    """One model's eval rows as results.json task entries; a task without numbers (the tokenizer cannot express it)
    is absent, not NaN, and so is an undefined auc."""
    return {row["task"]: {"accuracy": row["accuracy"], "loss": row["loss"], "split": split,
                          **({"examples": row["examples"]} if examples else {}),
                          **({"tokens": list(row["tokens"])} if row.get("tokens") else {}),
                          **({"auc": row["auc"]} if _finite(row.get("auc")) else {})}
            for row in rows if _finite(row.get("accuracy")) and _finite(row.get("loss"))}


def _circuit_entry(row: dict[str, Any]) -> dict[str, Any]:
    entry = {"model": row["model"], "task": row["task"], "method": row["method"], "tuned_by": row.get("tuned_by"),
             "target_loss": row.get("target_loss"), "failed": bool(row.get("failed"))}
    if "sweep_iterations" in row:
        entry["sweep_iterations"] = row["sweep_iterations"]
    if row.get("failed"):
        entry["reason"] = row.get("reason")
        return entry
    entry.update(nodes=row["nodes"], edges=row["edges"], loss={"test": row["loss"]},
                 loss_calibrated={"test": row["calibrated_loss"]}, ablated_loss={"test": row["ablated_loss"]},
                 path=row.get("circuit_dir"))
    for key in ("edges_by_type", "faithfulness", "model_val_loss"):
        if row.get(key) is not None:
            entry[key] = row[key]
    if "val_loss" in row:
        entry["loss"]["val"] = row["val_loss"]
    if "calibrated_val_loss" in row:
        entry["loss_calibrated"]["val"] = row["calibrated_val_loss"]
    return entry


def build_results(p: Pipeline) -> dict[str, Any]:
    from sparse_lm_app.main_job.context import ROOT

    out: dict[str, Any] = {"format": FORMAT, "preset": p.args.preset, "git_commit": _git_commit(ROOT),
                           "machine": _machine(), "stages": dict(p.timings)}
    models = {k: _model_entry(p, k) for k in ("sparse", "dense") if k in p.results}
    if "models" in p.results.get("eval", {}):  # the bridged pipeline: the sparse model as bridged, the given dense
        pretrained = models.get("sparse")
        models = _bridged_models(p)
        if pretrained:  # the sparse stage's run the bridge started from, with its own task numbers (same examples)
            models["sparse"]["pretrained"] = {k: v for k, v in pretrained.items() if k not in ("tasks", "curve")}
            rows = p.results["eval"].get("pretrained", [])
            if rows:
                models["sparse"]["pretrained"]["tasks"] = _task_entries(rows, p.results["eval"]["split"])
    if models:
        out["models"] = models
    resolution = p.results.get("eval", {}).get("resolution")
    if resolution:  # which tasks resolve against the (dense model's) tokenizer, and what each drops
        ev = p.results["eval"]
        out["task_resolution"] = {"tokenizer": ev.get("tokenizer"), "split": ev.get("split"),
                                  "context": ev.get("context"), "tasks": {
                                      r["task"]: {k: v for k, v in r.items() if k != "task"} for r in resolution}}
    if "circuit" in p.results:  # the bridged pipeline's quote circuit, pruned from the sparse model as bridged
        out["circuits"] = [{**_circuit_entry(p.results["circuit"]), "bridged": True}]
    if "prune" in p.results:
        pr = p.results["prune"]
        out["circuits"] = [_circuit_entry(r) for r in pr["circuits"]]
        if pr.get("random_control"):
            out["random_control"] = pr["random_control"]
        eq = pr.get("equal_loss") or {}
        if "dense" in models and eq.get("path"):
            # the dense model the circuits were pruned from: the checkpoint closest to the sparse model's loss
            models["dense"]["pruned_checkpoint"] = {"path": eq["path"], "step": eq["step"],
                                                    "val_loss": eq["dense_val_loss"]}
        for entry, row in zip(out["circuits"], pr["circuits"]):
            model_loss = eq.get("dense_val_loss") if row["model"] == "dense" else eq.get("sparse_val_loss")
            if model_loss is not None:
                entry["model_val_loss"] = model_loss
    bridge = p.results.get("bridge")
    if bridge and "losses" in bridge:
        cfg = p.configs.get("bridge")
        gate = bridge.get("gate") or {}
        entry = {"mode": bridge.get("mode") or getattr(cfg, "mode", None), "dense": getattr(cfg, "dense", None),
                 "sparse": getattr(cfg, "sparse", None), "trained": bool(bridge.get("trained"))}
        for key in ("kl_d2s", "kl_s2d", "kl_no_bridge", "nmse_enc", "nmse_dec", "passed", "reasons"):
            if key in gate:
                entry[key if key != "passed" else "gate_passed"] = gate[key]
        if "nmse_enc" in gate and "nmse_dec" in gate:
            entry["nmse"] = max(gate["nmse_enc"], gate["nmse_dec"])
        entry["split"] = "val"
        out["bridge"] = entry
        inter = p.results.get("intervene") or bridge  # the bridged pipeline runs it as a stage of its own
        if inter.get("interventions"):
            out["interventions"] = [
                {"task": "single_double_quote", "kind": name, "channels": len(part["channels"]), "site": part["site"],
                 "selection_split": inter["select_split"], "eval_split": inter["eval_split"],
                 "alpha": inter["alphas"], "effect": part["effect"], "control_mean": part["control_mean"],
                 "control_sd": part["control_sd"], "effect_sd": part["effect_sd"],
                 "effect_alpha": part["effect_alpha"], "sign_ok": part["sign_ok"]}
                for name, part in inter["interventions"].items()]
            if inter.get("dense_precision"):
                for entry in out["interventions"]:
                    entry["dense_precision"] = inter["dense_precision"]
    return out


def write_results(p: Pipeline) -> Path:
    from sparse_lm.io import write_json

    path = p.run_dir / "results.json"
    write_json(path, build_results(p))
    return path
