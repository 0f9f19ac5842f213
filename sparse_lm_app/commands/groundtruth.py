"""``sparse-lm groundtruth``: prune tracr-compiled programs and score the circuits against their known circuit.

    sparse-lm groundtruth --program hist --out gt/hist                      # learned masks
    sparse-lm groundtruth --program hist --method attribution --out gt/hist-attr
    sparse-lm groundtruth --program all --method both --rotated both --out gt/all steps=500
    sparse-lm groundtruth --list

Prints node and edge precision and recall and the node ROC-AUC (over the pruner's
node order) per run. Writes into ``--out``: ``groundtruth.json`` (every run: scores,
test metrics, the ground truth) and, per run, the usual ``circuit.json``,
``config.json`` and ``circuit.html``: directly in ``--out`` for a single run, else
in ``--out/PROGRAM[-rotated]/METHOD/``. KEY=VALUE arguments override the
pruner's settings (`pruning.config.PruneConfig` fields, over
`pruning.groundtruth.PRUNE_DEFAULTS`). Needs the ``groundtruth`` extra (tracr).
"""

from __future__ import annotations

import argparse

__all__ = ["add_groundtruth_arguments", "run_groundtruth"]


def add_groundtruth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--program", nargs="+", default=None, metavar="NAME",
                   help="registered program(s), or all (see --list)")
    p.add_argument("--method", choices=["learned", "attribution", "both"], default="learned",
                   help="learned masks, the attribution baseline, or both")
    p.add_argument("--rotated", choices=["no", "yes", "both"], default="no",
                   help="also (both) or only (yes) the basis-free variant: the residual stream turned by a random "
                        "orthogonal matrix, scored over heads' q/k/v channels and MLP neurons")
    p.add_argument("--out", default=None, help="output folder for groundtruth.json and the circuits")
    p.add_argument("--list", action="store_true", help="list the registered programs and exit")
    p.add_argument("--seed", type=int, default=0, help="seed of the rotation")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="pruner settings, e.g. steps=500 k_coef=1e-3")


def _fmt(x) -> str:
    return "  -  " if x is None else f"{x:5.3f}"


def run_groundtruth(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from pruning.groundtruth import PRUNE_DEFAULTS
    from pruning.groundtruth.programs import PROGRAMS
    from pruning.groundtruth.suite import run_suite
    from sparse_lm.config import merge, parse_override
    from sparse_lm.io import write_json

    if args.list:
        for name, spec in PROGRAMS.items():
            print(f"{name:12s} vocab {{{', '.join(map(str, spec.vocab))}}}, up to {spec.max_seq_len} tokens: "
                  f"{spec.description}")
        return 0
    if not args.program or not args.out:
        raise ValueError("give --program NAME (or all) and --out FOLDER (or --list)")
    overrides: dict = {}
    for o in args.overrides or []:
        overrides = merge(overrides, parse_override(o))
    methods = ["learned", "attribution"] if args.method == "both" else [args.method]
    variants = {"no": ["plain"], "yes": ["rotated"], "both": ["plain", "rotated"]}[args.rotated]
    out = Path(args.out)
    single = len(args.program) == 1 and args.program != ["all"] and len(methods) == 1 and len(variants) == 1
    print(f"{'program':22s} {'method':11s} {'node P':>6s} {'node R':>6s} {'edge P':>6s} {'edge R':>6s} "
          f"{'ROC':>5s}  nodes (found/truth/all)   seconds", flush=True)
    results, t0 = [], time.perf_counter()
    for r in run_suite(args.program, methods, variants, overrides=overrides, seed=args.seed):
        s, c = r.scores, r.circuit
        folder = out if single else out / f"{r.program}{'-rotated' if r.variant == 'rotated' else ''}" / r.method
        c.write(folder, {**PRUNE_DEFAULTS, **overrides, **c.hyperparameters}, f"tracr:{r.program}")
        results.append(r.to_json() | {"circuit": str(folder / "circuit.json")})
        name = r.program + ("-rotated" if r.variant == "rotated" else "")
        if c.failed:
            print(f"{name:22s} {r.method:11s} failed: {c.reason}", flush=True)
            continue
        print(f"{name:22s} {r.method:11s} {_fmt(s['node_precision']):>6s} {_fmt(s['node_recall']):>6s} "
              f"{_fmt(s['edge_precision']):>6s} {_fmt(s['edge_recall']):>6s} {_fmt(s['roc_auc'])}  "
              f"{s['num_nodes']:5d}/{s['num_truth_nodes']:4d}/{s['total_nodes']:5d}      "
              f"{r.compile_seconds:5.1f}+{r.prune_seconds:.1f}", flush=True)
    write_json(out / "groundtruth.json", {"format": "sparse-lm-groundtruth/1", "runs": results,
                                          "overrides": overrides,
                                          "seconds": round(time.perf_counter() - t0, 3)})
    print(f"{time.perf_counter() - t0:.1f}s; wrote groundtruth.json and {len(results)} circuit folder(s) to {out}")
    return 0
