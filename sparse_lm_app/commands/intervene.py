"""``sparse-lm intervene``: edit a sparse circuit channel and carry the change into the dense model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparse_lm_app.commands.eval_tasks import add_code_arguments


def add_intervene_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bridge", required=True, metavar="DIR", help="bridge folder (from `sparse-lm bridge`)")
    p.add_argument("--circuit", required=True, metavar="DIR", help="circuit folder with circuit.json (from the pruner)")
    p.add_argument("--task", required=True, help="the circuit's task (e.g. single_double_quote)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: the circuit folder)")
    p.add_argument("--alphas", default=None,
                   help="strengths: 0 = no change, 1 = the other family's mean (comma list; default "
                        "0,0.25,0.5,1,1.5,2)")
    p.add_argument("--channels", type=int, default=8,
                   help="circuit channels at the chosen site moved together (the best by --select-by; fewer when "
                        "the circuit has fewer there)")
    p.add_argument("--select-by", default="effect", choices=["effect", "dense", "separation"],
                   help="how the site and channels are chosen on the --select-split prompts: effect = each circuit "
                        "channel moved alone inside the sparse model, by how much it raises the sparse model's "
                        "P(other family's completion); dense = the same move carried through the decoder, by how "
                        "much it raises the dense model's; separation = by how far its two family means lie apart")
    p.add_argument("--controls", type=int, default=8, help="random-channel control draws")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="task split of the prompts the change of P is measured on")
    p.add_argument("--select-split", default="train", choices=["train", "val", "test"],
                   help="task split of the prompts that pick the site, the channels and the family means (keep it "
                        "apart from --split: choosing on the evaluation prompts inflates the effect)")
    p.add_argument("--code", default=None, metavar="DIR",
                   help="measure on string literals of real .py files under DIR instead (their --split, split by "
                        "file; 'site-packages': this interpreter's installed packages); the site, channels and "
                        "family means are still chosen on the synthetic task's --select-split prompts "
                        "(single_double_quote only)")
    add_code_arguments(p)
    p.add_argument("--examples", type=int, default=256, help="prompts (balanced over the two families)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the control draws")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")


def run_intervene(args) -> int:
    import torch

    from bridges.intervene import DEFAULT_ALPHAS, format_result, intervene, plot_intervention, read_circuit
    from bridges.train import load_bridge
    from sparse_lm.io import atomic_write_text
    from tasks import get_task

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    circuit = read_circuit(args.circuit)  # before the models load: a wrong path fails at once
    task = get_task(args.task)
    pair, tokenizer, _ = load_bridge(args.bridge, dev)
    eval_task = None
    if args.code:
        from sparse_lm_app.commands.eval_tasks import code_task

        if task.name != "single_double_quote":
            raise ValueError(f"--code measures single_double_quote on real code; the task is {task.name!r}")
        eval_task = code_task(args, tokenizer)
    alphas = [float(a) for a in str(args.alphas).split(",") if a.strip()] if args.alphas else DEFAULT_ALPHAS
    result = intervene(pair, tokenizer, task, circuit, alphas=alphas, n_channels=args.channels,
                       n_controls=args.controls, split=args.split, select_split=args.select_split,
                       n_examples=args.examples, seed=args.seed, eval_task=eval_task,
                       select_by=args.select_by)
    if eval_task is not None:
        result["code_sample"] = eval_task.sample(args.split, args.examples, args.seed).stats.as_dict()
    result["bridge"] = str(Path(args.bridge).resolve())
    result["circuit"] = str(Path(args.circuit).resolve())
    out = Path(args.out) if args.out else Path(args.circuit)
    if out.suffix == ".json":
        out = out.parent
    atomic_write_text(out / "intervention.json", json.dumps(result, indent=2) + "\n")
    plot_intervention(result, out / "intervention.png")
    if result["circuit_failed"]:
        print(f"warning: the pruner marked this circuit as failed ({result['circuit_failed']}); its channels may "
              f"not carry the task", file=sys.stderr)
    print(format_result(result))
    print(f"   -> {out / 'intervention.json'}, {out / 'intervention.png'}")
    return 0
