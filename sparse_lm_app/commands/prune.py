"""``sparse-lm prune``: find a task's circuit in a model folder and write it to an output folder.

    sparse-lm prune --model runs/tiny/model --task single_double_quote --out circuits/quote
    sparse-lm prune --model runs/dense/model --task single_double_quote --target-loss relative:+0.05 --out ...
    sparse-lm prune --model M --task T --method attribution --out D steps=200 k_coef=3e-3

Writes, atomically, into ``--out``: ``circuit.json`` (see `pruning.circuit`),
``config.json`` (the resolved PruneConfig plus ``"job": "prune"`` and
``"model"``: drop those two keys to rebuild the config with
`sparse_lm.config.from_dict`) and, when the HTML viewer is available,
``circuit.html``. Prints a summary. A model that misses the target (or any
other failure) is an error that says why; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pruning.config import PruneConfig

__all__ = ["add_prune_arguments", "run_prune", "resolve_config"]


def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    from sparse_lm.config import list_presets

    presets = ", ".join(list_presets("prune")) or "none"
    p.add_argument("--model", required=True,
                   help="model folder (AutoModelForCausalLM.from_pretrained) with its tokenizer, or a run folder")
    p.add_argument("--task", default=None, help="task name or .jsonl file (default: the config's task)")
    p.add_argument("--target-loss", default=None,
                   help="target task loss in nats (0.15), or relative:+MARGIN (the model's own loss + MARGIN; its own "
                        "loss is its validation loss)")
    p.add_argument("--relative-margin", type=float, default=None,
                   help="target = the model's own loss + this margin (same as --target-loss relative:+M)")
    p.add_argument("--method", choices=["learned", "attribution"], default=None, help="pruning method")
    p.add_argument("--out", required=True, help="output folder for circuit.json, config.json, circuit.html")
    p.add_argument("--preset", default=None, help=f"named preset or a JSON path ({presets})")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: the config's)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. steps=200 k_coef=3e-3")


def resolve_config(args: argparse.Namespace) -> PruneConfig:
    """Defaults <- preset <- KEY=VALUE overrides <- the explicit flags."""
    from pruning.config import PruneConfig, parse_target
    from sparse_lm import config as configlib

    overrides = []
    for o in args.overrides or []:
        key, _, value = o.partition("=")
        if key.strip() == "target_loss" and value.strip().startswith("relative:"):
            overrides.append(f"relative_margin={parse_target(value)[1]}")
        else:
            overrides.append(o)
    if args.task is not None:
        overrides.append(f"task={json.dumps(args.task)}")
    if args.method is not None:
        overrides.append(f"method={args.method}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.target_loss is not None:
        absolute, margin = parse_target(args.target_loss)
        overrides.append(f"target_loss={absolute}" if absolute is not None else f"relative_margin={margin}")
    if args.relative_margin is not None:
        overrides.append(f"relative_margin={args.relative_margin}")
    return configlib.resolve(PruneConfig, "prune", args.preset, overrides)


def run_prune(args: argparse.Namespace) -> int:
    from sparse_lm import config as configlib
    from pruning.forward import PruneError
    from pruning.pruner import prune
    from sparse_lm import loading

    cfg = resolve_config(args)
    if args.print_config:
        print(configlib.describe(cfg))
        return 0
    out = Path(args.out)
    model_dir = loading.model_dir(args.model)  # a run folder resolves to its model/
    model, tokenizer = loading.load_model_and_tokenizer(model_dir)
    circuit = prune(model, tokenizer, cfg, progress=not args.no_progress, model_dir=str(model_dir),
                    fallback_dir=str(out))
    if circuit.failed:
        raise PruneError(circuit.reason)
    circuit.write(out, configlib.to_dict(cfg), str(model_dir))
    written = ["circuit.json", "config.json", "circuit.html"]
    print(circuit.summary())
    secs = circuit.search.get("seconds", {})
    print(f"   {secs.get('total', float('nan')):.1f}s; wrote {', '.join(written)} to {out}", file=sys.stdout)
    return 0
