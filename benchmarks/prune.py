"""Seconds per pruning run and per CARBS suggestion, at the `tiny` and `paper-1x` shapes.

    .venv/bin/python benchmarks/prune.py [--shapes tiny paper-1x] [--steps 100] [--json out.json]

Models are SparseGPTs of the preset shapes with random weights (the cost of a
pruning run depends on the shape, not on what the model learned), pruned on
`single_double_quote` toward a target relative to the model's own loss, so
the whole search (mask training, bisection, calibration, verification)
runs. The tokenizer is a BPE 2048 trained on the standard library (~5 s).
Phases are timed separately: means (cached after the first run), mask
training, the rest. CARBS suggestions are timed with 30 observations in the
sweep's 6-D search space.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting threads distort timings

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch


def bench_prune(shape: str, steps: int, tok, workdir: str) -> dict:
    from pruning.config import PruneConfig
    from pruning.pruner import prune
    from sparse_lm import config as configlib
    from sparse_lm.jobs import PretrainConfig
    from sparse_lm.jobs import build_model

    cfg = configlib.resolve(PretrainConfig, "pretrain", shape)
    torch.manual_seed(0)
    model = build_model(cfg, "pretrain", len(tok), tok).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pc = configlib.from_dict(PruneConfig, {"task": "single_double_quote", "steps": steps, "relative_margin": 0.05})
    times = []
    circuit = None
    for _ in range(2):  # the first run also computes the means; the second finds them cached
        t0 = time.perf_counter()
        circuit = prune(model, tok, pc, progress=False, fallback_dir=workdir)
        times.append(time.perf_counter() - t0)
    secs = circuit.search.get("seconds", {})
    return {"shape": shape, "steps": steps, "first_run_s": times[0], "cached_run_s": times[1],
            "per_mask_step_ms": 1000 * secs.get("optimise", float("nan")) / steps, "phases_s": secs,
            "failed": circuit.failed, "nodes": circuit.num_nodes, "total_nodes": circuit.total_nodes}


def bench_carbs(n_obs: int = 30, repeats: int = 10) -> dict:
    from pruning.carbs import CARBS, CARBSParams, ObservationInParam
    from pruning.config import PruneConfig
    from pruning.sweep import search_space

    carbs = CARBS(CARBSParams(better_direction_sign=-1, seed=0), search_space(PruneConfig()))
    rng = np.random.default_rng(0)
    for _ in range(n_obs):
        s = carbs.suggest().suggestion
        carbs.observe(ObservationInParam(input=s, output=float(rng.integers(5, 200)), cost=float(rng.uniform(5, 60))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s = carbs.suggest().suggestion
        times.append(time.perf_counter() - t0)
        carbs.forget_suggestion(s)
    return {"observations": n_obs, "suggest_s_median": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["tiny", "paper-1x"])
    ap.add_argument("--steps", type=int, default=100, help="mask-training steps per run (default config: 400)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from sparse_lm.corpus import load_corpus
    from sparse_lm.tokenizer import train_tokenizer

    tok = train_tokenizer(load_corpus("stdlib"), vocab_size=2048)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for shape in args.shapes:
            rows.append(bench_prune(shape, args.steps, tok, work))
            print(json.dumps(rows[-1]), flush=True)
    carbs = bench_carbs()
    print("\n| shape | mask steps | first run (s) | cached run (s) | ms per mask step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['steps']} | {r['first_run_s']:.1f} | {r['cached_run_s']:.1f} | "
              f"{r['per_mask_step_ms']:.0f} |")
    print(f"\nCARBS: {1000 * carbs['suggest_s_median']:.0f} ms per suggestion with {carbs['observations']} observations")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prune": rows, "carbs": carbs}, f, indent=2)


if __name__ == "__main__":
    main()
