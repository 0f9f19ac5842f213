"""Training study: validation loss and task accuracy against tokens and wall time, per optimizer recipe.

Each recipe is one ``pretrain`` run of a preset (default ``tiny``) with a few config overrides,
all with the same steps, batch and data, run one at a time. During training the run logs the
validation loss every ``--eval-every`` steps and exports a model every ``--snapshot-every`` steps
(``train.snapshot_every``: ``snapshots/step<N>/``); after the run every snapshot and the final
model are scored on the test split of the tasks (``tasks.evaluate_tasks_or_report``).

Outputs in ``--out``::

    data/                      the packed corpus and tokenizer, prepared once (or --data)
    runs/<recipe>/             the run folders (metrics.jsonl, snapshots/, model/, summary.json)
    runs/<recipe>/study.json   wall clock and load average around the run, task scores per step
    results.json               everything the table and the plot are made from
    sample_efficiency.png      val loss vs tokens, val loss vs wall seconds, each task's accuracy vs tokens

Resumable: a recipe whose ``summary.json`` exists is not trained again, a step whose task scores
are in ``study.json`` is not scored again, so a second call (or ``--report-only``) only re-reads.

    python benchmarks/sample_efficiency.py --out runs/study --steps 400 --snapshot-every 100
    python benchmarks/sample_efficiency.py --out runs/study --recipe tiny= \\
        --recipe paper-lr0.02=optim.grad_rms_mode=normalize,optim.eps=0.1,optim.lr=0.02 \\
        --recipe batch32=train.global_batch=32,train.steps=200
    python benchmarks/sample_efficiency.py --out runs/study --report-only
"""

from __future__ import annotations

import os

# Set before torch starts OpenMP: busy-waiting threads slow a shared machine down several times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

TASKS = ["single_double_quote", "bracket_counting", "set_or_string"]

# The recipes compared by default: the former `tiny` recipe (a gradient clip at RMS 1 that never fires at
# the measured gradient RMS ~3e-4, Adam eps 1e-8), and the paper's optimizer (the whole gradient
# rescaled to RMS 1 before every step, Adam eps 0.1; `tiny` since 2026-12-04) at half the preset's lr,
# the preset's, and the paper's ~1e-2. All lrs are dense-start lrs: the sharkfin schedule multiplies them
# by 1/sqrt(kept fraction). Every recipe names its optimizer, so it does not change with the preset.
FORMER = ["optim.grad_rms_mode=clip", "optim.eps=1e-8"]
PAPER = ["optim.grad_rms_mode=normalize", "optim.eps=0.1"]
DEFAULT_RECIPES = {
    "former": FORMER + ["optim.lr=0.005"],
    "paper-lr0.0025": PAPER + ["optim.lr=0.0025"],
    "paper-lr0.005": PAPER + ["optim.lr=0.005"],
    "paper-lr0.01": PAPER + ["optim.lr=0.01"],
}


def parse_recipe(text: str) -> tuple[str, list[str]]:
    """``"NAME=key=value,key=value"`` -> (NAME, [overrides]); ``"NAME="`` is the preset unchanged."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--recipe {text!r}: expected NAME=key=value,key=value (or NAME= for the preset as is)")
    return name, [o for o in rest.split(",") if o]


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, obj) -> None:
    # Atomic: a killed study never leaves half a file that the next call would trip over.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def prepare_data(data_dir: Path, args) -> None:
    if (data_dir / "data_meta.json").is_file():
        return
    cmd = [sys.executable, "-m", "sparse_lm_app", "data", "--out", str(data_dir),
           "--block-size", str(args.block_size), "--vocab-size", str(args.vocab_size)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(name: str, overrides: list[str], run_dir: Path, data_dir: Path, args) -> None:
    """One pretrain run in a subprocess (one rank), with the wall clock and load average around it."""
    cmd = [sys.executable, "-m", "sparse_lm_app", "pretrain", "--preset", args.preset,
           f"out_dir={run_dir.parent}", f"run_name={name}", f"data.data_dir={data_dir}",
           f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
           f"train.snapshot_every={args.snapshot_every}", "train.checkpoint_every=0", *args.common, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    run_dir.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), flush=True)
    start, load_start = time.time(), loadavg()
    with open(run_dir.parent / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    study = read_json(run_dir / "study.json")
    study.update({"command": cmd, "overrides": overrides, "wall_seconds": time.time() - start,
                  "load_start": load_start, "load_end": loadavg()})
    write_json(run_dir / "study.json", study)


def curve(run_dir: Path) -> list[dict]:
    """(step, tokens, wall seconds, val loss) at every validation pass, from metrics.jsonl.

    The wall time is the sum of the logged intervals (tokens / tokens_per_s): each interval
    includes the validation passes and snapshot exports inside it, as the run saw them.
    """
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out, wall, prev_tokens = [], 0.0, 0
    for r in rows:
        if "tokens" in r and r.get("tokens_per_s"):
            wall += (r["tokens"] - prev_tokens) / r["tokens_per_s"]
            prev_tokens = r["tokens"]
        if "val_loss" in r:
            out.append({"step": r["step"], "tokens": r.get("tokens", prev_tokens), "wall_s": wall,
                        "val_loss": r["val_loss"]})
    return out


def score_snapshots(run_dir: Path, args) -> dict[str, dict]:
    """Task accuracy (test split) of every snapshot and the final model, cached in study.json."""
    import torch

    from sparse_lm.loading import load_model_and_tokenizer
    from tasks import evaluate_tasks_or_report

    summary = read_json(run_dir / "summary.json")
    folders = {int(p.name.removeprefix("step")): p for p in sorted((run_dir / "snapshots").glob("step*"))}
    folders[int(summary["steps"])] = run_dir / "model"
    study = read_json(run_dir / "study.json")
    scores = study.setdefault("tasks", {})
    key = f"test/n={args.n}"  # scores of another split or size are kept apart, never mixed
    for step, folder in sorted(folders.items()):
        if str(step) in scores.get(key, {}):
            continue
        model, tok = load_model_and_tokenizer(folder)
        with torch.no_grad():
            rows = evaluate_tasks_or_report(model, tok, TASKS, split="test", n=args.n)
        scores.setdefault(key, {})[str(step)] = {r["task"]: r["accuracy"] for r in rows}
        write_json(run_dir / "study.json", study)
        print(f"{run_dir.name} step {step}: " + ", ".join(f"{r['task']} {r['accuracy']:.3f}" for r in rows), flush=True)
    return scores[key]


def collect(name: str, run_dir: Path, args) -> dict:
    summary = read_json(run_dir / "summary.json")
    study = read_json(run_dir / "study.json")
    config = read_json(run_dir / "config.json")
    cfg = config.get("config", config)
    tokens_per_step = cfg["train"]["global_batch"] * cfg["data"]["block_size"]
    scores = score_snapshots(run_dir, args)
    return {
        "recipe": name,
        "overrides": study.get("overrides"),
        "optim": cfg["optim"],
        "steps": summary["steps"],
        "global_batch": cfg["train"]["global_batch"],
        "tokens": summary["steps"] * tokens_per_step,
        "train_seconds": summary.get("train_seconds"),
        "wall_seconds": study.get("wall_seconds"),
        "load_start": study.get("load_start"),
        "load_end": study.get("load_end"),
        "val_loss": summary.get("val_loss"),
        "curve": curve(run_dir),
        "tasks": [{"step": int(s), "tokens": int(s) * tokens_per_step, **acc}
                  for s, acc in sorted(scores.items(), key=lambda kv: int(kv[0]))],
    }


def optimizer(r: dict) -> str:
    """The optimizer a run trained with, from its saved config (not from the recipe's overrides)."""
    o = r["optim"]
    return f"{o['grad_rms_mode']}, eps {o['eps']:g}, lr {o['lr']:g}"


def describe(r: dict) -> str:
    other = [o for o in r["overrides"] or [] if not o.startswith("optim.")]
    return ", ".join([optimizer(r), f"{r['steps']} steps", *other])


def table(results: list[dict]) -> str:
    head = ("| recipe | optimizer | steps x batch | tokens | train wall (s) | load 1-min (start/end) "
            "| val loss (validation) | " + " | ".join(f"{t} (test)" for t in TASKS) + " |")
    lines = [head, "|" + "---|" * (7 + len(TASKS))]
    for r in results:
        opt = optimizer(r)
        load = "/".join(f"{x[0]:.1f}" for x in (r["load_start"], r["load_end"]) if x) or "-"
        final = r["tasks"][-1] if r["tasks"] else {}
        accs = " | ".join(f"{final[t]:.3f}" if isinstance(final.get(t), float) and not math.isnan(final[t]) else "-"
                          for t in TASKS)
        lines.append(f"| {r['recipe']} | {opt} | {r['steps']} x {r['global_batch']} | {r['tokens'] / 1e6:.2f}M "
                     f"| {r['train_seconds']:.0f} | {load} | {r['val_loss']:.3f} | {accs} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    ax_tok, ax_wall = axes[0][0], axes[0][1]
    for r in results:
        c = r["curve"]
        ax_tok.plot([p["tokens"] / 1e6 for p in c], [p["val_loss"] for p in c], marker=".", label=r["recipe"])
        ax_wall.plot([p["wall_s"] for p in c], [p["val_loss"] for p in c], marker=".", label=r["recipe"])
        for ax, task in zip([axes[0][2], axes[1][0], axes[1][1]], TASKS):
            ax.plot([p["tokens"] / 1e6 for p in r["tasks"]], [p.get(task, float("nan")) for p in r["tasks"]],
                    marker="o", label=r["recipe"])
    ax_tok.set(xlabel="tokens (M)", ylabel="validation loss", title="val loss vs tokens")
    ax_wall.set(xlabel="wall seconds (training)", ylabel="validation loss", title="val loss vs wall time")
    for ax, task in zip([axes[0][2], axes[1][0], axes[1][1]], TASKS):
        ax.set(xlabel="tokens (M)", ylabel="accuracy (test)", title=task, ylim=(0, 1))
        ax.axhline(0.5, color="grey", lw=0.5, ls="--")  # two completions: 0.5 is chance
    axes[1][2].axis("off")
    handles, labels = ax_tok.get_legend_handles_labels()
    axes[1][2].legend(handles, [f"{lab}: {describe(r)}" for lab, r in zip(labels, results)], loc="center", fontsize=8)
    for ax in axes.flat[:5]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/sample_efficiency", help="study folder (data/, runs/, results)")
    p.add_argument("--data", default=None, help="a prepared data folder (default: OUT/data, prepared once)")
    p.add_argument("--preset", default="tiny", help="pretrain preset every recipe starts from")
    p.add_argument("--recipe", action="append", default=None, metavar="NAME=k=v,k=v",
                   help="a recipe (repeatable); default: " + ", ".join(DEFAULT_RECIPES))
    p.add_argument("--common", nargs="*", default=[], metavar="k=v", help="overrides for every recipe")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--snapshot-every", type=int, default=100)
    p.add_argument("--n", type=int, default=256, help="test examples per task")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run (one rank)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--report-only", action="store_true", help="train nothing; read (and score) finished runs")
    args = p.parse_args(argv)

    out = Path(args.out)
    runs = out / "runs"
    recipes = dict(parse_recipe(r) for r in args.recipe) if args.recipe else DEFAULT_RECIPES
    data_dir = Path(args.data) if args.data else out / "data"
    if not args.report_only:
        prepare_data(data_dir, args)
    results = []
    for name, overrides in recipes.items():
        run_dir = runs / name
        if not (run_dir / "summary.json").is_file():
            if args.report_only:
                print(f"{name}: not finished ({run_dir / 'summary.json'} missing), left out", flush=True)
                continue
            train(name, overrides, run_dir, data_dir, args)
        results.append(collect(name, run_dir, args))
    if not results:
        print("no finished runs", file=sys.stderr)
        return 1
    write_json(out / "results.json", {"tasks": TASKS, "split": {"val_loss": "validation", "accuracy": "test"},
                                      "n": args.n, "results": results})
    plot(results, out / "sample_efficiency.png")
    print(table(results))
    print(f"\n{out / 'results.json'}\n{out / 'sample_efficiency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
