"""``sparse-lm``: one entry point, one subcommand per job.

The commands are listed here explicitly. Their modules import only argparse at the
top (the libraries load inside each ``run_*``), so ``sparse-lm --help`` does not
pay for torch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

from sparse_lm_app.commands import (bridge, circuit_eval, circuit_html, eval_tasks, groundtruth, intervene, official,
                                     prune, sweep, train)


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "tokenizer": Command("train the byte-level BPE tokenizer on a corpus",
                         train.add_tokenizer_arguments, train.run_tokenizer),
    "data": Command("tokenize and pack a corpus into train/validation blocks", train.add_data_arguments,
                    train.run_data),
    "pretrain": Command("train a weight-sparse SparseGPT (DeepSpeed)", train.add_pretrain_arguments,
                        train.run_pretrain),
    "train-dense": Command("train a dense GPT-2 baseline on the same corpus (DeepSpeed)",
                           train.add_train_dense_arguments, train.run_train_dense),
    "info": Command("describe the environment, presets, or a model / run folder", train.add_info_arguments,
                    train.run_info),
    "import-official": Command("convert a released checkpoint (beeg_config.json + final_model.pt)",
                               official.add_import_official_arguments, official.run_import_official),
    "export-official": Command("write a model in the released checkpoint format",
                               official.add_export_official_arguments, official.run_export_official),
    "eval-tasks": Command("evaluate a model on the binary next-token tasks", eval_tasks.add_eval_tasks_arguments,
                          eval_tasks.run_eval_tasks),
    "prune": Command("find the smallest circuit of a model for a task (learned masks or attribution)",
                     prune.add_prune_arguments, prune.run_prune),
    "sweep": Command("tune the pruner's hyperparameters with CARBS for the smallest circuit",
                     sweep.add_sweep_arguments, sweep.run_sweep),
    "circuit-eval": Command("score a saved circuit on a task's prompts and on string literals of real code",
                            circuit_eval.add_circuit_eval_arguments, circuit_eval.run_circuit_eval),
    "circuit-html": Command("render a circuit.json as a self-contained HTML page",
                            circuit_html.add_circuit_html_arguments, circuit_html.run_circuit_html),
    "bridge": Command("train bridges between a dense transformers model and a sparse model",
                      bridge.add_bridge_arguments, bridge.run_bridge),
    "intervene": Command("edit a sparse circuit channel and carry the change into the dense model",
                         intervene.add_intervene_arguments, intervene.run_intervene),
    "groundtruth": Command("prune tracr-compiled RASP programs and score the circuits against the known ones",
                           groundtruth.add_groundtruth_arguments, groundtruth.run_groundtruth),
}

# Errors the toolkit raises say what to fix; a traceback would bury that line (--traceback shows it).
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, KeyError,
               RuntimeError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="sparse-lm", description="weight-sparse GPTs, their circuits, and bridges to dense models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"sparse-lm: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    command = COMMANDS[name]
    cmd = argparse.ArgumentParser(prog=f"sparse-lm {name}", description=command.help)
    command.add_arguments(cmd)
    # KEY=VALUE overrides may stand before, between or after the flags.
    args = cmd.parse_intermixed_args(argv[1:])
    try:
        return int(command.run(args) or 0)
    except USER_ERRORS as e:
        if getattr(args, "traceback", False):
            raise
        print(f"sparse-lm {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
