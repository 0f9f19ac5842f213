"""Seconds per mask step, per mean-activation pass, per pruning run and per CARBS suggestion.

    .venv/bin/python benchmarks/prune.py [--shapes tiny] [--precisions bf16 fp32 bf16-autocast]
                                         [--paths today fast fast-torchgate] [--batch 64] [--threads N] [--no-means]
                                         [--full --steps 100] [--model DIR --steps 150 --batch 32]
                                         [--tokenizer DIR] [--json out.json]

Models are SparseGPTs of the preset shapes with random weights, each block
matrix cut to the preset's kept fraction (the cost of a pruning run depends on
the shape, not on what the model learned). The mask step is the pruner's: a
minibatch of `single_double_quote` prompts (batch 64, ~80 tokens) forward with
every node site hooked, the task loss, backward to the mask logits; it is
timed for every precision and forward path (`PATHS`: "today", the plain pass
before issue 14, and "fast", the pruner's default now) in the same process,
interleaved, in wall and process-CPU milliseconds, so the ratios hold on a
shared machine (the load average is printed before and after; under load read
the CPU column). The mean activation pass is timed over 64 blocks of 256 tokens. With --full the whole
search runs too (mask training, bisection, calibration, faithfulness curves,
verification), and CARBS suggestions are timed with 30 observations in the
sweep's 6-D search space. The tokenizer is a BPE 2048 trained on the standard
library (~5 s on an idle machine), or the one in --tokenizer DIR.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting threads distort timings

import argparse
import functools
import json
import statistics
import tempfile
import time

import numpy as np
import torch


def sparse_model(shape: str, tok):
    """A SparseGPT of the preset `shape`, random weights, each block matrix at the preset's kept fraction."""
    from sparse_lm import config as configlib
    from sparse_lm.jobs import PretrainConfig, build_model

    cfg = configlib.resolve(PretrainConfig, "pretrain", shape)
    torch.manual_seed(0)
    model = build_model(cfg, "pretrain", len(tok), tok).eval()
    with torch.no_grad():
        for name, p in model.weight_matrices().items():
            if name.startswith("transformer.h."):
                k = max(1, int(p.numel() * cfg.sparsity.target_fraction))
                flat = p.view(-1)
                keep = torch.zeros_like(flat, dtype=torch.bool)
                keep[flat.abs().topk(k).indices] = True
                flat.mul_(keep)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# The mask step's forward pass before and after the fast path (pruning.forward, pruning.pruner.Ablation):
# "today" is the plain pass of before (greedy length groups, the whole last block, autograd's addcmul),
# "fast" the default now (least-padding chunks, the last block trimmed to the last positions, the other blocks
# with flash attention for the frozen sink and unstrided bf16 q/k/v casts, fused ablation with the closed
# part made once per mask and all-open sites passed through).
# "fast-torchgate" is "fast" with the ablation's backward in four torch passes instead of the compiled
# one-pass op (`sparse_lm.topk.gate_backward`), the default before 2026-12-03.
PATHS = {"today": {"fused": False, "trim": False, "min_padding": False},
         "fast": {"fused": True, "trim": True, "min_padding": True},
         "fast-torchgate": {"fused": True, "trim": True, "min_padding": True, "torch_gate": True}}


def bench_mask_step(shape: str, tok, precisions: list[str], paths: tuple[str, ...] = tuple(PATHS), batch: int = 64,
                    repeats: int = 3, rounds: int = 2) -> dict:
    """ms per mask step (wall and process CPU) for each precision x forward path, best of `rounds`
    interleaved rounds of `repeats` steps; the first precision on the first path is the baseline."""
    from pruning.config import PruneConfig
    from pruning.forward import batch_margins, load_task_data, precision_context, task_loss
    from pruning.graph import NodeIndex
    from pruning import pruner
    from pruning.pruner import Ablation, heaviside_ste

    model = sparse_model(shape, tok)
    cfg = PruneConfig(n_train=batch, n_val=8, n_test=8)
    data = load_task_data(tok, cfg, max_length=model.config.block_size)
    index = NodeIndex.build(model, cfg.node_sites)
    gen = torch.Generator().manual_seed(0)
    mean_vec = 0.1 * torch.randn(index.total, generator=gen)
    # some nodes closed, as during training, so that the gradients compared below mean something
    tau = (0.3 + torch.randn(index.total, generator=gen)).clamp(-1, 1).requires_grad_(True)
    mb = data.train.select(torch.arange(min(batch, len(data.train))))
    variants = [f"{p}/{path}" for path in paths for p in precisions]
    ablations = {path: Ablation(model, index, mean_vec, fused=PATHS[path]["fused"]) for path in paths}

    def step(path: str) -> torch.Tensor:
        mask = heaviside_ste(tau, 1.0)
        ablation = ablations[path]
        ablation.set(mask)
        compiled_gate = pruner.gate_backward
        if PATHS[path].get("torch_gate"):
            pruner.gate_backward = functools.partial(compiled_gate, compiled=False)
        try:
            with ablation.installed(all_sites=True):
                margin = batch_margins(model, mb, chunk_tokens=cfg.chunk_tokens, trim=PATHS[path]["trim"],
                                       min_padding=PATHS[path]["min_padding"])[0]
            (task_loss(margin, mb.family) + 1e-3 * mask.sum()).backward()
        finally:
            pruner.gate_backward = compiled_gate
        grad, tau.grad = tau.grad, None
        return grad

    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    grads: dict[str, torch.Tensor] = {}
    for _ in range(rounds):
        for v in variants:
            precision, path = v.split("/")
            with precision_context(precision, "cpu", model):
                grads[v] = step(path)  # warm-up (and the gradient compared below)
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(repeats):
                    step(path)
                wall[v].append(1000 * (time.perf_counter() - t0) / repeats)
                cpu[v].append(1000 * (time.process_time() - c0) / repeats)
    ms = {v: min(t) for v, t in wall.items()}
    cpu_ms = {v: min(t) for v, t in cpu.items()}
    base = variants[0]
    cos = {v: float(torch.nn.functional.cosine_similarity(grads[v], grads[base], dim=0)) for v in variants}
    fast_vs_today = {}
    if "today" in paths and "fast" in paths:
        fast_vs_today = {p: {"wall": ms[f"{p}/today"] / ms[f"{p}/fast"], "cpu": cpu_ms[f"{p}/today"] / cpu_ms[f"{p}/fast"]}
                         for p in precisions}
    return {"shape": shape, "batch": len(mb), "mean_prompt_tokens": float(mb.lengths.float().mean()),
            "ms_per_mask_step": ms, "cpu_ms_per_mask_step": cpu_ms, "speedup_vs_" + base: {v: ms[base] / ms[v] for v in variants},
            "fast_vs_today": fast_vs_today, "mask_grad_cosine_vs_" + base: cos}


def bench_means(shape: str, tok, n_blocks: int = 64, block_len: int = 256) -> dict:
    """Seconds of the mean-activation pass (every node site, `n_blocks` x `block_len` tokens)."""
    from pruning.config import PruneConfig
    from pruning.graph import NodeIndex
    from pruning.means import compute_means

    model = sparse_model(shape, tok)
    index = NodeIndex.build(model, PruneConfig().node_sites)
    blocks = torch.randint(0, len(tok), (n_blocks, min(block_len, model.config.block_size)),
                           generator=torch.Generator().manual_seed(0))
    t0, c0 = time.perf_counter(), time.process_time()
    compute_means(model, index.names, blocks)
    return {"shape": shape, "blocks": n_blocks, "block_len": blocks.shape[1], "means_s": time.perf_counter() - t0,
            "means_cpu_s": time.process_time() - c0}


def bench_prune(shape: str, steps: int, tok, workdir: str) -> dict:
    from pruning.config import PruneConfig
    from pruning import pruner
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
    # A random model does not solve the task, and prune stops there; for timing, let it search anyway.
    check = pruner._check_full_model
    lenient = lambda s: None if (r := check(s)) and r.startswith("the model does not solve") else r  # noqa: E731
    pruner._check_full_model = lenient
    try:
        for _ in range(2):  # the first run also computes the means; the second finds them cached
            t0 = time.perf_counter()
            circuit = prune(model, tok, pc, progress=False, fallback_dir=workdir)
            times.append(time.perf_counter() - t0)
    finally:
        pruner._check_full_model = check
    secs = circuit.search.get("seconds", {})
    return {"shape": shape, "steps": steps, "first_run_s": times[0], "cached_run_s": times[1],
            "per_mask_step_ms": 1000 * secs.get("optimise", float("nan")) / steps, "phases_s": secs,
            "failed": circuit.failed, "nodes": circuit.num_nodes, "total_nodes": circuit.total_nodes}


def bench_trained_run(model_dir: str, steps: int, batch: int, workdir: str, rounds: int = 1) -> dict:
    """Seconds of mask training (a fresh minibatch every step, as a sweep run) and bisection of one
    learned-mask run on a trained model, with the bf16 products' rows bucketed (the default) and not
    (`pruning.forward.bucket_rows` patched to the identity), alternated in one process."""
    from pruning import forward
    from pruning.config import PruneConfig
    from pruning.pruner import prune
    from sparse_lm import config as configlib
    from sparse_lm.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    cfg = configlib.from_dict(PruneConfig, {"task": "single_double_quote", "steps": steps, "batch_size": batch,
                                            "relative_margin": 0.05, "collapse_retries": 0})
    bucketed = forward.bucket_rows
    times: dict[str, list[dict]] = {"bucketed": [], "unbucketed": []}
    nodes = {}
    for _ in range(rounds):
        for variant in times:
            forward.bucket_rows = bucketed if variant == "bucketed" else (lambda m: m)
            try:
                c = prune(model, tok, cfg, progress=False, model_dir=model_dir, fallback_dir=workdir,
                          faithfulness=False, measure=False)
            finally:
                forward.bucket_rows = bucketed
            times[variant].append(c.search["seconds"])
            nodes[variant] = c.num_nodes
    best = {v: min(t, key=lambda x: x["optimise"]) for v, t in times.items()}
    return {"model": model_dir, "steps": steps, "batch": batch, "nodes": nodes,
            "optimise_ms_per_step": {v: 1000 * b["optimise"] / steps for v, b in best.items()},
            "bisection_s": {v: b["bisection"] for v, b in best.items()}}


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
    ap.add_argument("--shapes", nargs="+", default=["tiny"])
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"],
                    help="mask-step precisions (the pruner's default bf16 first: the baseline of the ratios)")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS),
                    help="forward paths of the mask step: the plain pass (today), the fast one, and the fast one with the ablation backward in torch ops")
    ap.add_argument("--full", action="store_true", help="also whole pruning runs and CARBS suggestions")
    ap.add_argument("--steps", type=int, default=100,
                    help="mask-training steps per --full or --model run (default config: 200; a sweep: 150)")
    ap.add_argument("--tokenizer", default=None, help="a saved tokenizer folder instead of training one")
    ap.add_argument("--batch", type=int, default=64, help="prompts per mask step (the pruner's default 64; a sweep: 32)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-means", action="store_true", help="skip the mean-activation pass")
    ap.add_argument("--model", default=None,
                    help="also time one learned-mask run (--steps, --batch) on this trained model, bf16 products' "
                         "rows bucketed and not")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from sparse_lm.corpus import load_corpus
        from sparse_lm.tokenizer import train_tokenizer

        tok = train_tokenizer(load_corpus("stdlib"), vocab_size=2048)
    out: dict = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    out["mask_step"] = [bench_mask_step(shape, tok, args.precisions, args.paths, batch=args.batch)
                        for shape in args.shapes]
    out["means"] = [] if args.no_means else [bench_means(shape, tok) for shape in args.shapes]
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1), flush=True)
    print(f"\nload average before {out['load_before'][0]:.1f}, after {out['load_after'][0]:.1f} "
          f"({os.cpu_count()} cores, {out['threads']} threads)")
    variants = list(out["mask_step"][0]["ms_per_mask_step"])
    print("\n| shape | " + " | ".join(f"{v} ms/step (CPU ms)" for v in variants) + " | " +
          " | ".join(f"{p} fast vs today (wall, CPU)" for p in out["mask_step"][0]["fast_vs_today"]) +
          " | means s (CPU s) |")
    print("|---" * (len(variants) + len(out["mask_step"][0]["fast_vs_today"]) + 2) + "|")
    for r, m in zip(out["mask_step"], out["means"] or [None] * len(out["mask_step"])):
        print(f"| {r['shape']} | " + " | ".join(f"{r['ms_per_mask_step'][v]:.0f} ({r['cpu_ms_per_mask_step'][v]:.0f})"
                                                for v in variants) + " | "
              + " | ".join(f"{x['wall']:.2f}x, {x['cpu']:.2f}x" for x in r["fast_vs_today"].values())
              + (" | - |" if m is None else f" | {m['means_s']:.1f} ({m['means_cpu_s']:.1f}) |"))
    if args.full:
        rows = []
        with tempfile.TemporaryDirectory() as work:
            for shape in args.shapes:
                rows.append(bench_prune(shape, args.steps, tok, work))
                print(json.dumps(rows[-1]), flush=True)
        carbs = bench_carbs()
        out.update(prune=rows, carbs=carbs)
        print("\n| shape | mask steps | first run (s) | cached run (s) | ms per mask step |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['shape']} | {r['steps']} | {r['first_run_s']:.1f} | {r['cached_run_s']:.1f} | "
                  f"{r['per_mask_step_ms']:.0f} |")
        print(f"\nCARBS: {1000 * carbs['suggest_s_median']:.0f} ms per suggestion with {carbs['observations']} "
              "observations")
    if args.model:
        with tempfile.TemporaryDirectory() as work:
            r = bench_trained_run(args.model, args.steps, args.batch, work)
        out["trained_run"] = r
        print(json.dumps(r), flush=True)
        ms = r["optimise_ms_per_step"]
        print(f"\n| trained model, batch {r['batch']}, {r['steps']} steps | bucketed rows (default) | unbucketed | ratio |")
        print("|---|---|---|---|")
        print(f"| mask step, ms | {ms['bucketed']:.0f} | {ms['unbucketed']:.0f} | {ms['unbucketed'] / ms['bucketed']:.2f}x |")
        b = r["bisection_s"]
        print(f"| bisection, s | {b['bucketed']:.1f} | {b['unbucketed']:.1f} | {b['unbucketed'] / b['bucketed']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
