"""Accuracy against training tokens: the showcase tasks scored on every model snapshot a training run saved.

A run with ``train.snapshot_every`` exports a model folder ``snapshots/step<N>/`` every N steps (never at the
last step: that is the run's final ``model/``). The eval stage scores the three tasks of the circuits on each
snapshot, in step order, with `tasks.evaluate_task` on the split and prompt count of its task table, so the
curve's last point, the final model, is the table's own row (reused, not scored twice).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparse_lm_app.main_job.context import Pipeline

CURVE_TASKS = ("single_double_quote", "bracket_counting", "set_or_string")  # the prune stage's tasks
CURVE_SPLIT = "test"  # the split of the eval stage's table: a point is comparable with the table's row
TASK_CURVES_PNG = "task_curves.png"  # in the run folder, shown by the report


def tokens_per_step(cfg: Any) -> int:
    """Training tokens per optimizer step of a pretraining config (what results.json records)."""
    return cfg.train.global_batch * cfg.data.block_size


def snapshot_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete model snapshot of a training run, in step order."""
    found = []
    for folder in Path(run_dir).glob("snapshots/step*"):
        digits = folder.name[len("step"):]
        # an export is written atomically (a temporary folder renamed): config.json marks a complete one
        if digits.isdigit() and (folder / "config.json").is_file():
            found.append((int(digits), folder))
    return sorted(found)


def logged_val_losses(run_dir: str | Path) -> dict[int, float]:
    """The validation loss the run logged at each step that had a validation pass (metrics.jsonl)."""
    from sparse_lm.io import read_jsonl

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return {}
    rows, _ = read_jsonl(path)  # a torn last line of an interrupted run is left out
    # a resumed run logs the steps after its checkpoint again: the later line is the one of the kept run
    return {int(r["step"]): float(r["val_loss"]) for r in rows if "val_loss" in r and "step" in r}


def finite(x: Any) -> bool:
    """A real number that is not NaN or inf (a JSON-safe metric)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _task_numbers(rows: Iterable[dict], names: Iterable[str]) -> dict[str, dict[str, float]]:
    by_task = {r["task"]: r for r in rows}
    # auc (tasks.evaluate.separation_auc) shows a model that ranks the families before its accuracy moves
    return {name: {key: float(by_task[name][key]) for key in ("accuracy", "loss", "auc")
                   if key in by_task[name] and (key != "auc" or finite(by_task[name][key]))}
            for name in names if name in by_task}


def build_curve(run_dir: str | Path, final_step: int, final_rows: list[dict] | None, tokens_per_step: int, n: int,
                tasks: Iterable[str] = CURVE_TASKS, split: str = CURVE_SPLIT,
                log: Callable[[str], None] | None = print, final_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One point per snapshot of the run in `run_dir` (in step order) and one for its final model at
    `final_step`, whose task numbers are taken from `final_rows` (the eval table's rows of that model, when
    the table scored the same `n` prompts) or, when `final_rows` is None, scored on the model in `final_dir`
    like a snapshot, so that every point of a curve counts the same prompts.

    A point: ``{"step", "tokens" (step x tokens_per_step), "val_loss" (absent when the run logged none at
    that step), "tasks": {name: {"accuracy", "loss"}}}``. Only tasks with finite numbers in `final_rows` are
    scored: the snapshots share the final model's tokenizer, so a task it cannot express (or one the table
    left out) is absent from every point. An empty list when the run saved no snapshot: one point is no curve.
    """
    import torch

    from sparse_lm.loading import load_model_and_tokenizer
    from tasks import evaluate_task, evaluate_tasks_or_report

    tasks = tuple(tasks)
    snapshots = [(step, folder) for step, folder in snapshot_folders(run_dir) if step < final_step]
    if not snapshots:
        return []
    if final_rows is None:
        if final_dir is None:
            raise ValueError("build_curve: pass the final model's rows or its folder (final_dir)")
        model, tok = load_model_and_tokenizer(final_dir)
        with torch.no_grad():
            final_rows = evaluate_tasks_or_report(model, tok, tasks, split=split, n=n)
        del model
    scorable = {r["task"] for r in final_rows if finite(r.get("accuracy")) and finite(r.get("loss"))}
    names = [name for name in tasks if name in scorable]
    val = logged_val_losses(run_dir)

    def point(step: int, numbers: dict[str, dict[str, float]]) -> dict[str, Any]:
        p: dict[str, Any] = {"step": step, "tokens": step * tokens_per_step}
        if step in val:
            p["val_loss"] = val[step]
        p["tasks"] = numbers
        return p

    curve = []
    for i, (step, folder) in enumerate(snapshots, 1):
        t0 = time.perf_counter()
        model, tok = load_model_and_tokenizer(folder)
        with torch.no_grad():
            rows = [evaluate_task(model, tok, name, split=split, n=n) for name in names]
        del model
        curve.append(point(step, _task_numbers(rows, names)))
        if log is not None:
            accs = ", ".join(f"{name} {row['accuracy']:.3f}" for name, row in zip(names, rows))
            log(f"   curve {i}/{len(snapshots)}: step {step} ({step * tokens_per_step / 1e6:.2f}M tokens): {accs} "
                f"({time.perf_counter() - t0:.1f}s)")
    curve.append(point(final_step, _task_numbers(final_rows, names)))
    return curve


def model_curve(p: Pipeline, key: str, final_rows: list[dict]) -> list[dict[str, Any]]:
    """`build_curve` for the main job's `key` model ("sparse" or "dense") with the plan's ``curve_examples`` prompts."""
    trained = p.results[key]
    n = p.plan.curve_examples
    same = n == p.plan.eval_examples  # the table's rows are a point of the curve only when they count as many prompts
    return build_curve(trained["run_dir"], int(trained["steps"]), final_rows if same else None,
                       tokens_per_step(p.configs[key]), n=n, log=lambda line: print(line, flush=True),
                       final_dir=trained["model_dir"])


def plot_task_curves(curves: dict[str, list[dict]], out_png: str | Path, n: int | None = None,
                     split: str = CURVE_SPLIT, tasks: Iterable[str] = CURVE_TASKS) -> Path:
    """One panel per task: accuracy against training tokens, one line per model, the chance line at 0.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparse_lm.plots import save_png

    tasks = list(tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    styles = {"sparse": ("o-", "tab:blue"), "dense": ("s-", "tab:orange")}
    for ax, task in zip(axes[0], tasks):
        drawn = False
        for key, curve in curves.items():
            xy = [(pt["tokens"] / 1e6, pt["tasks"][task]["accuracy"]) for pt in curve if task in pt["tasks"]]
            if xy:
                marker, color = styles.get(key, ("^-", None))
                ax.plot(*zip(*xy), marker, color=color, label=key, ms=4)
                drawn = True
        if not drawn:  # an empty panel would read as a plotting bug
            ax.text(0.5, 0.7, "not scored: the tokenizer\ncannot express this task", ha="center", va="center",
                    transform=ax.transAxes)
        ax.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
        ax.set(xlabel="training tokens (millions)", ylabel="accuracy", title=task, ylim=(0.0, 1.02))
        ax.legend(loc="lower right")
    prompts = f", {n} prompts" if n else ""
    fig.suptitle(f"Task accuracy against training tokens ({split} split{prompts})")
    fig.tight_layout()
    return save_png(fig, out_png)
