"""Evaluate a model on tasks: task loss and accuracy on a split, and a text table of the results."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tasks.contract import TaskTokenizationError, resolve_task
from tasks.loss import encode_examples, length_chunks, margins, task_logits_last
from tasks.registry import get_task, list_tasks
from tasks.task import Split, Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["evaluate_task", "evaluate_tasks", "format_table", "describe_tasks"]


@torch.no_grad()
def evaluate_task(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    task: Task | str,
    split: Split = "test",
    n: int = 512,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    seed: int = 0,
    max_length: int | None = None,
    max_drop_fraction: float = 0.5,
) -> dict[str, Any]:
    """Task loss and accuracy of `model` on `n` examples of `split`.

    Returns ``{"task", "tokens", "loss", "accuracy", "auc", "examples", "dropped"}``: tokens are the two
    compared tokens as this tokenizer spells them (family 0, family 1), examples is
    the number scored, dropped the number that broke the tokenization contract. ``auc`` is `separation_auc`:
    whether the model tells the families apart at all, which accuracy hides when a bias always picks one
    completion (accuracy 0.5, auc well above 0.5).
    The averages are over the whole split (per family, then over families), not
    means of batch means. The model must already be on `device` (default: the
    device of its first parameter); it is put in eval mode and restored after.
    """
    task = get_task(task) if isinstance(task, str) else task
    resolved = resolve_task(task, tokenizer, task.examples(split, n, seed), max_drop_fraction=max_drop_fraction)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = getattr(model, "training", False)
    model.eval()
    losses: list[torch.Tensor] = []
    corrects: list[torch.Tensor] = []
    margin_list: list[torch.Tensor] = []
    families: list[torch.Tensor] = []
    try:
        everything = encode_examples(tokenizer, resolved.examples, max_length=max_length)
        # groups of similar length (at most batch_size prompts): little of the work goes to padding
        for idx in length_chunks(everything.lengths, chunk_tokens=batch_size * 256, max_rows=batch_size):
            batch = everything.select(idx).to(device)
            last = task_logits_last(model, batch.input_ids, batch.lengths)  # (B, V)
            margin = margins(last, batch.target_ids, batch.distractor_ids)  # (B,)
            losses.append(F.softplus(-margin).cpu())
            corrects.append((margin > 0).float().cpu())
            margin_list.append(margin.float().cpu())
            families.append(batch.family.cpu())
    finally:
        model.train(was_training)
    family = torch.cat(families)
    return {
        "task": task.name,
        "tokens": resolved.token_strings,
        "loss": _family_average(torch.cat(losses), family),
        "accuracy": _family_average(torch.cat(corrects), family),
        "auc": separation_auc(torch.cat(margin_list), family),
        "examples": len(resolved.examples),
        "dropped": resolved.dropped,
    }


def separation_auc(margin: torch.Tensor, family: torch.Tensor) -> float:
    """How well the model's logit difference ranks the two families: the probability that a random family-0 prompt
    has a larger logit(completion 0) - logit(completion 1) than a random family-1 prompt (ties count half).

    0.5 is no separation, 1.0 a perfect ranking. Unlike accuracy it ignores a constant bias toward one
    completion, so a model that always answers the common token (accuracy 0.5) but is less sure of it on the
    other family shows up as auc > 0.5. `margin` is (target - distractor) per prompt; NaN when a family is missing.
    """
    diff = torch.where(family == 0, margin, -margin).double()  # logit(c0) - logit(c1)
    a, b = diff[family == 0], diff[family == 1]
    if a.numel() == 0 or b.numel() == 0:
        return float("nan")
    # Mann-Whitney U from ranks (average ranks for ties): O(n log n), no (n0, n1) matrix.
    values = torch.cat([a, b])
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, values.numel() + 1, dtype=values.dtype)
    uniq, inverse = values.unique(return_inverse=True)
    ranks = torch.zeros(uniq.numel(), dtype=values.dtype).index_add_(0, inverse, ranks)[inverse] / torch.bincount(
        inverse, minlength=uniq.numel()).to(values.dtype)[inverse]
    u = ranks[: a.numel()].sum() - a.numel() * (a.numel() + 1) / 2
    return float(u / (a.numel() * b.numel()))


def _family_average(values: torch.Tensor, family: torch.Tensor) -> float:
    means = [values[family == f].double().mean().item() for f in (0, 1) if bool((family == f).any())]
    return sum(means) / len(means)


def evaluate_tasks(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    names: Iterable[str] | None = None,
    split: Split = "test",
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """`evaluate_task` for each named task (default: all registered), in order."""
    names = list_tasks() if names is None else names
    return [evaluate_task(model, tokenizer, name, split, **kwargs) for name in names]


def evaluate_tasks_or_report(
    model: Any, tokenizer: PreTrainedTokenizerBase, names: Iterable[str] | None = None, split: Split = "test",
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """`evaluate_tasks`, except that a task this tokenizer cannot express is a row with its error, not a crash."""
    rows: list[dict[str, Any]] = []
    for name in list_tasks() if names is None else names:
        try:
            rows.append(evaluate_task(model, tokenizer, name, split, **kwargs))
        except TaskTokenizationError as err:
            rows.append({"task": get_task(name).name, "loss": float("nan"), "accuracy": float("nan"), "examples": 0,
                         "dropped": "-", "error": str(err).splitlines()[0]})
    return rows


def describe_tasks(
    tokenizer: PreTrainedTokenizerBase | None = None,
    names: Iterable[str] | None = None,
    split: Split = "val",
    n: int = 256,
) -> list[dict[str, Any]]:
    """One row per task (default: all): its completions and description; with a tokenizer, also the
    token strings the completions resolve to and how many of `n` examples of `split` are dropped.

    A task that does not resolve gets its error in the "tokens" column instead of failing the listing.
    """
    rows: list[dict[str, Any]] = []
    for name in list_tasks() if names is None else names:
        task = get_task(name)
        row: dict[str, Any] = {"task": task.name, "completions": task.completions}
        if tokenizer is not None:
            try:
                resolved = resolve_task(task, tokenizer, task.examples(split, n))
                row.update(completions=resolved.completions, tokens=resolved.token_strings,
                           dropped=f"{resolved.dropped}/{resolved.checked}")
            except TaskTokenizationError as err:
                row.update(tokens=f"ERROR: {str(err).splitlines()[0]}", dropped="-")
        row["description"] = task.description
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of dicts (columns from the first row; floats to 4 decimals)."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(col for row in rows for col in row))  # a later row may add a column (an error)

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return value if isinstance(value, str) else repr(value) if isinstance(value, tuple) else str(value)

    cells = [[cell(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    # Numbers right-aligned, text left-aligned, as a reader scans them.
    numeric = [all(isinstance(row.get(col), (int, float)) for row in rows) for col in columns]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])
