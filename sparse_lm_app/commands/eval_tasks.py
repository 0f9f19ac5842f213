"""``sparse-lm eval-tasks``: the task table for any model (sparse or dense)."""

from __future__ import annotations

import argparse
import json


def add_eval_tasks_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder (save_pretrained, with its tokenizer) or run folder")
    p.add_argument("--task", nargs="*", default=None, metavar="NAME",
                   help="task names or JSONL task files (default: every registered task)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--n", type=int, default=512, help="examples per task (half per family)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--list", action="store_true", help="list the tasks (with their tokens for --model) and exit")
    p.add_argument("--traceback", action="store_true")


def run_eval_tasks(args) -> int:
    import torch

    from tasks import describe_tasks, evaluate_tasks_or_report, format_table, list_tasks

    names = args.task or list_tasks()
    if args.list:
        tok = None
        if args.model:
            from sparse_lm.loading import load_model_and_tokenizer

            _, tok = load_model_and_tokenizer(args.model)
        rows = describe_tasks(tok, names, args.split, args.n)
        print(json.dumps(rows, indent=2) if args.json else format_table(rows))
        return 0
    if not args.model:
        raise ValueError("--model is required (a model folder or a run folder)")
    from sparse_lm.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model)
    with torch.no_grad():
        rows = evaluate_tasks_or_report(model, tok, names, args.split, n=args.n, batch_size=args.batch_size,
                                        seed=args.seed)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    failed = [r["task"] for r in rows if r.get("error")]
    if failed:
        import sys

        # The table still shows every row; the exit code says a requested result is missing.
        print(f"sparse-lm eval-tasks: error: {len(failed)} of {len(rows)} task(s) could not be evaluated: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
