"""Subcommands ``import-official`` and ``export-official``: the released checkpoint format (SPEC)."""

from __future__ import annotations

import argparse

CONFIG_FILE, WEIGHTS_FILE = "beeg_config.json", "final_model.pt"  # named here so --help needs no torch


def add_import_official_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="DIR", help=f"released checkpoint folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write a save_pretrained model folder here (without it: check and describe only)")
    p.add_argument("--verbose", action="store_true",
                   help="also list the training-only fields that were ignored")
    p.add_argument("--allow-unknown-fields", action="store_true",
                   help="ignore config fields this importer does not know (only if they do not change the forward)")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")


def run_import_official(args) -> int:
    from sparse_lm.official import import_official

    import_official(args.src, args.out, verbose=args.verbose, allow_unknown_fields=args.allow_unknown_fields, log=print)
    if args.out is None:
        print("checked only; pass --out DIR to write a model folder")
    return 0


def add_export_official_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a save_pretrained SparseGPT folder (or a run folder)")
    p.add_argument("--out", metavar="DIR", required=True, help=f"folder for {CONFIG_FILE} + {WEIGHTS_FILE}")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")


def run_export_official(args) -> int:
    from sparse_lm.official import export_official

    export_official(args.model_dir, args.out, log=print)
    return 0


