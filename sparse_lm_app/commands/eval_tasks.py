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
    p.add_argument("--code", default=None, metavar="DIR",
                   help="also score single_double_quote on string literals of real .py files under DIR (split by "
                        "file; 'site-packages': the installed packages of this interpreter, code outside the "
                        "stdlib training corpus). Without --task, only single_double_quote is scored beside it")
    add_code_arguments(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--list", action="store_true", help="list the tasks (with their tokens for --model) and exit")
    p.add_argument("--traceback", action="store_true")


def add_code_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the real-code examples (`tasks.real_code`), shared by the commands that take --code."""
    p.add_argument("--code-context", type=int, default=None, metavar="CHARS",
                   help="characters of source before a closing quote (from a line start; default 640, the "
                        "generated tasks' limit); prompts longer than the model's context are skipped")
    p.add_argument("--code-prefixes", default="", metavar="LETTERS",
                   help="string prefixes also accepted, e.g. 'rbu' (default: prefix-free literals only; "
                        "f-strings never)")


def resolve_code_dir(code: str) -> str:
    """``site-packages`` names this interpreter's purelib folder; anything else is a path."""
    if code == "site-packages":
        from tasks.real_code import site_packages

        return str(site_packages())
    return code


def code_task(args, tokenizer, model=None):
    """The `CodeQuoteTask` of ``--code`` (examples pre-checked against `tokenizer` and the model's context)."""
    from tasks.real_code import code_quote_task
    from tasks.task import MAX_PROMPT_CHARS

    limit = None
    if model is not None:
        from sparse_lm.arch import context_length

        limit = context_length(model)
    return code_quote_task(resolve_code_dir(args.code), tokenizer=tokenizer, prefixes=args.code_prefixes,
                           context_chars=args.code_context or MAX_PROMPT_CHARS, max_prompt_tokens=limit)


def code_rows(model, tokenizer, task, split: str, n: int, seed: int, batch_size: int) -> list[dict]:
    """Rows for the real-code task: both families, then each alone (same sample, same averages).

    The task loss averages per family, so the first row is the mean of the two family rows.
    """
    from dataclasses import replace

    from tasks import TaskTokenizationError, evaluate_task

    sample = task.sample(split, n, seed)
    stats = sample.stats
    rows: list[dict] = []
    per_family: list[dict] = []
    for family, quote in enumerate(task.completions):
        one = replace(task, family=family, name=f"{task.name}:{quote.strip()}")  # `'\n` under the paper's split
        if not one.examples(split, n, seed):
            per_family.append({"task": one.name, "loss": float("nan"), "accuracy": float("nan"), "examples": 0,
                               "dropped": stats.dropped_by_family[family],
                               "error": f"no {quote} literal of the {split} split keeps the tokenization contract"})
            continue
        try:
            row = evaluate_task(model, tokenizer, one, split, n=n, batch_size=batch_size, seed=seed)
        except TaskTokenizationError as err:
            row = {"task": one.name, "loss": float("nan"), "accuracy": float("nan"), "examples": 0, "dropped": "-",
                   "error": str(err).splitlines()[0]}
        else:
            # The examples were checked while sampling; count every literal of the files read that failed.
            row["dropped"] = stats.dropped_by_family[family] + row["dropped"]
        per_family.append(row)
    scored = [r for r in per_family if not r.get("error")]
    both = {"task": task.name, **({"tokens": scored[0]["tokens"]} if scored and "tokens" in scored[0] else {}),
            "loss": sum(r["loss"] for r in scored) / len(scored) if scored else float("nan"),
            "accuracy": sum(r["accuracy"] for r in scored) / len(scored) if scored else float("nan"),
            "examples": sum(r["examples"] for r in per_family),
            "dropped": sum(stats.dropped_by_family) if all(isinstance(r["dropped"], int) for r in per_family)
            else "-"}
    if len(scored) < 2:
        both["error"] = "; ".join(r["error"] for r in per_family if r.get("error"))
    rows.append(both)
    rows.extend(per_family)
    return rows


def describe_code_sample(stats) -> str:
    """One paragraph: where the real-code examples came from and what was left out."""
    lit = stats.literals_by_family
    return (f"real code: {stats.root} ({stats.split} split by file): read {stats.files_read} of its "
            f"{stats.files_in_split} files ({stats.files_total} .py files in all; skipped {stats.skipped_not_utf8} "
            f"not UTF-8, {stats.skipped_unparsable} unparsable); literals ' {lit[0]}, \" {lit[1]}; the compared "
            f"token (the closing quote, with its newline under the paper's split) is not the next one in "
            f"' {stats.dropped_by_family[0]}, \" {stats.dropped_by_family[1]} (dropped); "
            f"{stats.too_many_tokens} longer than the model's context, {stats.skipped_line_too_long} on too long a "
            f"line, {stats.duplicates} duplicates; scored ' {stats.examples_by_family[0]}, "
            f"\" {stats.examples_by_family[1]}")


def run_eval_tasks(args) -> int:
    import torch

    from tasks import describe_tasks, evaluate_tasks_or_report, format_table, list_tasks

    names = args.task or (["single_double_quote"] if args.code else list_tasks())
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
        stats = None
        if args.code:
            task = code_task(args, tok, model)
            rows += code_rows(model, tok, task, args.split, args.n, args.seed, args.batch_size)
            stats = task.sample(args.split, args.n, args.seed).stats
    if args.json:
        if stats is not None:  # the sample's numbers ride on the real-code row
            next(r for r in rows if r["task"] == task.name)["sample"] = stats.as_dict()
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        if stats is not None:
            print(describe_code_sample(stats))
    failed = [r["task"] for r in rows if r.get("error")]
    if failed:
        import sys

        # The table still shows every row; the exit code says a requested result is missing.
        print(f"sparse-lm eval-tasks: error: {len(failed)} of {len(rows)} task(s) could not be evaluated: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
