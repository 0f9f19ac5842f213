"""``sparse-lm``: one entry point, one subcommand per job.

Each subcommand lives in the module that does the work and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only lists them,
so ``sparse-lm --help`` stays fast (modules are imported when chosen).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("sparse_lm.commands", "train the byte-level BPE tokenizer on a corpus"),
    "data": ("sparse_lm.commands", "tokenize and pack a corpus into train/validation blocks"),
    "pretrain": ("sparse_lm.commands", "train a weight-sparse SparseGPT (DeepSpeed)"),
    "train-dense": ("sparse_lm.commands", "train a dense GPT-2 baseline on the same corpus (DeepSpeed)"),
    "info": ("sparse_lm.commands", "describe the environment, presets, or a model / run folder"),
    "import-official": ("sparse_lm.official", "convert a released checkpoint (beeg_config.json + final_model.pt)"),
    "export-official": ("sparse_lm.official", "write a model in the released checkpoint format"),
    "eval-tasks": ("tasks.cli", "evaluate a model on the binary next-token tasks"),
    "prune": ("pruning.cli", "find the smallest circuit of a model for a task (learned masks or attribution)"),
    "sweep": ("pruning.sweep", "tune the pruner's hyperparameters with CARBS for the smallest circuit"),
    "bridge": ("bridges.cli", "train bridges between a dense transformers model and a sparse model"),
    "intervene": ("bridges.intervene", "edit a sparse circuit channel and carry the change into the dense model"),
}


def _handler(name: str):
    module = importlib.import_module(COMMANDS[name][0])
    suffix = name.replace("-", "_")
    return getattr(module, f"add_{suffix}_arguments"), getattr(module, f"run_{suffix}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="sparse-lm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"sparse-lm: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    add, run = _handler(name)
    cmd = argparse.ArgumentParser(prog=f"sparse-lm {name}", description=COMMANDS[name][1])
    add(cmd)
    args = cmd.parse_args(argv[1:])
    try:
        return int(run(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        # Errors we raise say what to fix; a traceback would bury that line.
        if getattr(args, "traceback", False):
            raise
        print(f"sparse-lm {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
