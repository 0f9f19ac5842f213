"""``sparse-lm sweep``: CARBS over the pruner's hyperparameters (see `pruning.sweep`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. prune.steps=300 objective=edges")
    p.add_argument("--model", required=True, help="model folder (with tokenizer) or run folder")
    p.add_argument("--task", default=None, help="task name or .jsonl file (sets prune.task)")
    p.add_argument("--target-loss", type=float, default=None, help="sets prune.target_loss")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--preset", default=None, help="a sweep preset (job 'sweep') or a JSON path")
    p.add_argument("--out", required=True, help="folder for the state, the best circuit and the plot")
    p.add_argument("--print-config", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--traceback", action="store_true")


def run_sweep(args) -> int:
    from pruning.sweep import STATE_FILE, Sweep, SweepConfig
    from sparse_lm import config as configlib
    from sparse_lm.loading import model_dir

    over = list(args.overrides)
    for key, value in (("prune.task", args.task), ("prune.target_loss", args.target_loss),
                       ("iterations", args.iterations), ("workers", args.workers)):
        if value is not None:
            over.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    cfg = configlib.resolve(SweepConfig, "sweep", args.preset, over)
    if args.print_config:
        print(configlib.describe(cfg))
        return 0
    sweep = Sweep(cfg, str(model_dir(args.model)), Path(args.out))
    best = sweep.run(progress=not args.no_progress)
    n_fail = sum(r["failed"] for r in sweep.results)
    n_collapsed = sum(bool(r.get("collapsed")) for r in sweep.results)
    n_settled = sum(bool(r.get("settled_above")) for r in sweep.results)
    if best is None:
        print(f"sweep: no run reached the target loss in {len(sweep.results)} iterations ({n_fail} failures); "
              f"see {args.out}/sweep.png and the reasons in {STATE_FILE}", file=sys.stderr)
        return 1
    print(f"sweep: best circuit {best['num_nodes']} nodes, {best['num_edges']} edges at iteration "
          f"{best['iteration']} ({n_fail} of {len(sweep.results)} runs failed, {n_collapsed} of them stopped at a "
          f"collapse and {n_settled} once their circuit settled far above their open nodes, all {n_collapsed + n_settled} "
          f"seen by CARBS as the whole model); hyperparameters "
          f"{json.dumps({k: round(v, 6) for k, v in best['params'].items()})}")
    print(f"sweep: wrote circuit.json, circuit.html, config.json, sweep.png, {STATE_FILE} to {args.out}")
    return 0
