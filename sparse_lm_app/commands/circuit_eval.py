"""``sparse-lm circuit-eval``: score a saved circuit (a `sparse-lm prune` folder) on other prompts.

    sparse-lm circuit-eval circ/ --code site-packages [--model runs/x/model] [--split test --n 512]

The circuit is re-applied the way the pruner measured it: every node outside
it mean-ablated (the same node sites and the same corpus means, from the
model's mean cache when it has them), at the pruner's precision. Rows, for the
circuit's task on its synthetic ``--split`` and, with ``--code DIR``, for
`single_double_quote` on string literals of real code (`tasks.real_code`,
split by file): the full model, the circuit (raw, and with the scale and
shift fitted by the pruner), and the circuit ablated (its own nodes mean-ablated).
A circuit that only holds on the generated prompts keeps its loss there and
loses it on real code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparse_lm_app.commands.eval_tasks import add_code_arguments

__all__ = ["add_circuit_eval_arguments", "run_circuit_eval"]


def add_circuit_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("circuit", metavar="DIR", help="circuit folder (circuit.json, from `sparse-lm prune`) or the file")
    p.add_argument("--model", default=None,
                   help="the model the circuit was pruned from (default: the path recorded in circuit.json)")
    p.add_argument("--code", default=None, metavar="DIR",
                   help="also score on string literals of real .py files under DIR (split by file; 'site-packages': "
                        "this interpreter's installed packages). single_double_quote circuits only")
    add_code_arguments(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--n", type=int, default=512, help="examples per row (half per family)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: the circuit's pruning device setting)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--traceback", action="store_true")


def circuit_mask(circuit: dict, index):
    """(N,) float mask: 1 on the circuit's nodes, 0 elsewhere; checks the ids against (site, channel)."""
    import torch

    mask = torch.zeros(index.total)
    for node in circuit.get("nodes", []):
        site, channel = index.node(int(node["id"]))
        if (site.name, channel) != (node["site"], int(node["channel"])):
            raise ValueError(f"circuit node {node['id']} is {node['site']}:{node['channel']} in circuit.json but "
                             f"{site.name}:{channel} in this model's node index: the circuit is from another model "
                             f"or other node sites")
        mask[int(node["id"])] = 1.0
    return mask


def score_rows(model, tokenizer, circuit: dict, means, tasks_and_examples, *, precision: str, chunk_tokens: int,
               device) -> list[dict]:
    """One row per (label, examples): full model, circuit (raw, calibrated) and circuit ablated."""
    import torch

    from pruning.forward import (
        evaluate,
        fast_head_ok,
        loss_and_accuracy,
        orientation,
        precision_context,
    )
    from pruning.graph import NodeIndex
    from pruning.pruner import Ablation, frozen
    from tasks import encode_examples

    index = NodeIndex.build(model, circuit["node_sites"])
    mask = circuit_mask(circuit, index).to(device)
    mean_vec = index.join(means.values).to(device).float()
    ablation = Ablation(model, index, mean_vec)
    scale, shift = (float(circuit.get("calibration", {}).get(k, d)) for k, d in (("scale", 1.0), ("shift", 0.0)))
    rows = []
    with frozen(model), torch.no_grad():
        for label, examples, dropped in tasks_and_examples:
            batch = encode_examples(tokenizer, examples).to(device)
            fast = fast_head_ok(model, batch)

            def margins(m, batch=batch, fast=fast):  # bound now: called only in this iteration
                with ablation.installed(m), precision_context(precision, device, model):
                    return evaluate(model, batch, chunk_tokens=chunk_tokens, fast=fast)[0]

            fam = batch.family
            sign = orientation(fam)
            full = loss_and_accuracy(margins(torch.ones_like(mask)), fam)
            circ_margin = margins(mask)
            circ = loss_and_accuracy(circ_margin, fam)
            calibrated = loss_and_accuracy(sign * (scale * (sign * circ_margin) + shift), fam)
            ablated = loss_and_accuracy(margins(1.0 - mask), fam)
            rows.append({"prompts": label, "examples": len(examples), "dropped": dropped,
                         "full_loss": full["loss"], "full_acc": full["accuracy"],
                         "circuit_loss": circ["loss"], "circuit_acc": circ["accuracy"],
                         "calibrated_loss": calibrated["loss"], "ablated_loss": ablated["loss"],
                         "ablated_acc": ablated["accuracy"]})
    return rows


def run_circuit_eval(args) -> int:
    from pruning.means import load_or_compute_means
    from pruning.pruner import resolve_device
    from sparse_lm import loading
    from tasks import format_table, get_task, resolve_task

    path = Path(args.circuit)
    path = path / "circuit.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no circuit.json at {str(path)!r} (give a `sparse-lm prune --out` folder)")
    circuit = json.loads(path.read_text(encoding="utf-8"))
    if circuit.get("failed"):
        raise ValueError(f"{path} records a failed search ({circuit.get('reason')}); there is no circuit to score")
    hp = circuit.get("hyperparameters", {})
    model_ref = args.model or circuit.get("model")
    if not model_ref or not Path(model_ref).exists():
        raise FileNotFoundError(f"the circuit's model {model_ref!r} is not here; pass --model FOLDER")
    model_dir = loading.model_dir(model_ref)
    model, tok = loading.load_model_and_tokenizer(model_dir)
    fingerprint = circuit.get("model_fingerprint")
    if fingerprint and fingerprint != loading.model_fingerprint(model):
        raise ValueError(f"the circuit was pruned from another model (fingerprint {fingerprint}) than {model_dir}")
    device = resolve_device(args.device or hp.get("device", "cpu"))
    model.to(device)

    from pruning.graph import NodeIndex

    index = NodeIndex.build(model, circuit["node_sites"])
    means = load_or_compute_means(model, index.names, tokenizer=tok, n_blocks=int(hp.get("mean_blocks", 64)),
                                  model_dir=str(model_dir), cache_dir=hp.get("cache_dir"), fallback_dir=str(path.parent))
    task = get_task(circuit["task"])
    resolved = resolve_task(task, tok, task.examples(args.split, args.n, args.seed))
    # as the pruner does (`load_task_data`): a prompt longer than the model's context cannot be scored, leave it out
    from sparse_lm.arch import context_length
    from tasks.contract import encode_plain

    lengths = [len(ids) for ids in encode_plain(tok, [ex.prompt for ex in resolved.examples])]
    fits = [ex for ex, n in zip(resolved.examples, lengths) if n <= context_length(model)]
    prompts = [(f"{task.name} ({args.split})", fits, resolved.dropped + len(resolved.examples) - len(fits))]
    stats = None
    if args.code:
        from sparse_lm_app.commands.eval_tasks import code_task, describe_code_sample

        if task.name != "single_double_quote":
            raise ValueError(f"--code scores single_double_quote on real code; this circuit is for {task.name!r}")
        code = code_task(args, tok, model)
        sample = code.sample(args.split, args.n, args.seed)
        stats = sample.stats
        prompts.append((f"{code.name} ({args.split})", sample.examples, sum(stats.dropped_by_family)))
    rows = score_rows(model, tok, circuit, means, prompts, precision=hp.get("precision", "fp32"),
                      chunk_tokens=int(hp.get("chunk_tokens", 4096)), device=device)
    if args.json:
        print(json.dumps({"circuit": str(path), "num_nodes": len(circuit.get("nodes", [])), "rows": rows,
                          "code_sample": stats.as_dict() if stats else None}, indent=2))
    else:
        print(f"circuit {path} ({len(circuit.get('nodes', []))} of {index.total} nodes, task {task.name})")
        print(format_table(rows))
        if stats is not None:
            print(describe_code_sample(stats))
    return 0
