"""Subcommands ``bridge`` (train bridges) and ``intervene`` (the paper's intervention experiment).

    sparse-lm bridge --dense runs/tiny-dense --preset bridge-tiny --out runs/bridge-tiny
    sparse-lm bridge --dense runs/tiny-dense --sparse runs/tiny --out runs/bridge-frozen train.steps=200
    sparse-lm intervene --bridge runs/bridge-tiny --circuit runs/circuit-quote --task single_double_quote
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bridges.intervene import add_intervene_arguments, run_intervene

__all__ = ["add_bridge_arguments", "run_bridge", "add_intervene_arguments", "run_intervene", "resolve_config"]


def add_bridge_arguments(p: argparse.ArgumentParser) -> None:
    from sparse_lm.config import list_presets

    presets = ", ".join(list_presets("bridge")) or "none"
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.steps=200 bridge.kl_s2d=0.5 (see --print-config)")
    p.add_argument("--dense", default=None, metavar="DIR",
                   help="dense model: a train-dense run folder, or a save_pretrained causal-LM folder with its "
                        "tokenizer")
    p.add_argument("--sparse", default=None, metavar="DIR",
                   help="trained sparse model: train only the bridges, the sparse model frozen (mode b); without it "
                        "a new sparse model trains with its bridges (mode a, shape from the preset's model section)")
    p.add_argument("--preset", default=None, help=f"named preset in configs/ or a JSON path ({presets})")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: out_dir/run_name)")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints already in the output folder")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")


def resolve_config(args):
    """Preset <- overrides <- --dense/--sparse/--out."""
    from bridges.config import BridgeConfig
    from sparse_lm import config as configlib

    cfg = configlib.resolve(BridgeConfig, "bridge", args.preset, args.overrides)
    if args.dense:
        cfg.dense = args.dense
    if args.sparse:
        cfg.sparse = args.sparse
    if args.out:
        out = Path(args.out)
        cfg.out_dir, cfg.run_name = str(out.parent), out.name
    return cfg


def run_bridge(args) -> int:
    from bridges.train import run
    from sparse_lm import config as configlib

    cfg = resolve_config(args)
    if args.print_config:
        print(configlib.describe(cfg))
        return 0
    run(cfg, resume=not args.fresh, progress=not args.no_progress)
    return 0
