"""Binary next-token tasks on Python code (SPEC §4).

A task is two contrasting families of prompts; the next token after a
prompt must be the family's completion (e.g. ``'`` after ``x = 'abc``) and
not the other family's (``"``). The task loss is the cross-entropy of the
softmax restricted to the two completion tokens at the last position,
averaged per family, then over the two families.

Using tasks::

    from tasks import get_task, list_tasks, evaluate_task
    task = get_task("single_double_quote")
    examples = task.examples("train", n=1000, seed=0)   # balanced, deterministic
    dataset = task.dataset("test")                       # datasets.Dataset: prompt, target, distractor, family
    resolved = resolve_task(task, tokenizer)             # token ids; raises TaskTokenizationError if impossible
    evaluate_task(model, tokenizer, task, split="test")  # {"task", "loss", "accuracy", "examples", "dropped"}

Adding a task (one small file): put a module in ``tasks/library/`` and add
its import to ``tasks/library/__init__.py``, or anywhere you import before
use, with a generator decorated by `register_task`::

    import random
    from tasks import register_task

    @register_task(description="close a tuple with ) versus a list with ]", completions=(")", "]"))
    def tuple_or_list(rng: random.Random, family: int) -> tuple[str, str]:
        opener, closer = ("(", ")") if family == 0 else ("[", "]")
        name = rng.choice(["a", "b", "c"]) + str(rng.randrange(1000))
        return f"x = {opener}1, {name}", f"{closer}\\n"   # (prompt, the code that follows it)

The generator gets a seeded `random.Random` and a family (0 or 1) and
returns the prompt and its continuation: the code written after the prompt,
starting with that family's completion (return the prompt alone if you have
none). Vary everything but the cue. Make each completion a whole piece of
what a byte-level BPE emits next: a quote before a newline, not before ``)``
(``')`` is one token); check with ``resolve_task(task, tokenizer)``, which reports
how the completions tokenize and how many examples break the contract.

A task can also be a JSONL file of ``{"prompt", "target", "distractor"}``
rows: `load_jsonl_task(path)`, or ``get_task("path/to/file.jsonl")``.
"""

from tasks.contract import ResolvedTask, TaskTokenizationError, resolve_task
from tasks.evaluate import describe_tasks, evaluate_task, evaluate_tasks, evaluate_tasks_or_report, format_table
from tasks.jsonl import load_jsonl_task
from tasks.loss import TaskBatch, binary_task_loss, encode_examples, family_mean, task_logits_last
from tasks.real_code import CodeQuoteTask, code_quote_examples, code_quote_task
from tasks.registry import UnknownTaskError, add_task, get_task, list_tasks, register_task
from tasks.task import DEFAULT_SIZES, SPLITS, Example, Split, Task, split_of

import tasks.library  # noqa: F401  (registers the built-in tasks)

__all__ = [
    "DEFAULT_SIZES",
    "SPLITS",
    "CodeQuoteTask",
    "Example",
    "ResolvedTask",
    "Split",
    "Task",
    "TaskBatch",
    "TaskTokenizationError",
    "UnknownTaskError",
    "add_task",
    "binary_task_loss",
    "code_quote_examples",
    "code_quote_task",
    "describe_tasks",
    "encode_examples",
    "evaluate_task",
    "evaluate_tasks",
    "evaluate_tasks_or_report",
    "family_mean",
    "format_table",
    "get_task",
    "list_tasks",
    "load_jsonl_task",
    "register_task",
    "resolve_task",
    "split_of",
    "task_logits_last",
]
