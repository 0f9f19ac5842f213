"""The tokenization contract: a task's two completions must be the real next tokens.

For a tokenizer, each completion must be exactly one token, and for every
example

    tokenize(prompt + completion) == tokenize(prompt) + [that token]

for the target and for the distractor alike (so the two logits compared at
the last prompt position are the two real alternatives). A completion's
token is the one it adds after the prompts; for byte-level BPE that is also
its tokenization alone, while tokenizers that mark the start of every text
(sentencepiece's leading space) spell a lone completion differently. When the generator
wrote the code that follows the prompt (`Example.continuation`), the target
must also be the first token after the prompt in ``tokenize(prompt +
continuation)``: byte-level BPE merges a closing quote with what follows it
(``')``) and a newline with the next line's indentation (``Ċ`` vs ``ĊĠĠĠ``),
so a completion that passes on a bare prompt can still be the wrong token
in real code.

When none of a task's pairs keeps the contract, the pair the written code
itself starts with is tried (a tokenizer that joins a closing bracket to its
newline, as the paper's does, compares ``]\n``, not ``]``), and then the prompt
ends the task declares in `Task.boundary_shifts`.

Examples that break the contract are dropped and counted. A task fails with
`TaskTokenizationError` when no completion pair of the task is single tokens,
or when more than `max_drop_fraction` of either family would be dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tasks.task import Example, Task

__all__ = ["TaskTokenizationError", "ResolvedTask", "resolve_task", "tokenizer_label", "encode_plain", "next_token"]

# How many examples resolve_task checks when none are given.
DEFAULT_CHECK_EXAMPLES = 256


class TaskTokenizationError(ValueError):
    """A task's completions are not single next tokens for a tokenizer."""


@dataclass
class ResolvedTask:
    """A task bound to one tokenizer: its completion token ids and the examples that keep the contract."""

    task: Task
    tokenizer_name: str
    completions: tuple[str, str]
    """The completion pair chosen for this tokenizer (family 0, family 1)."""
    token_ids: tuple[int, int]
    token_strings: tuple[str, str]
    """The tokenizer's own spelling of the two tokens (``Ġ+=``, ``ĊĠĠĠ``, ...)."""
    examples: list[Example]
    """Kept examples, with target/distractor set to the chosen pair."""
    dropped_by_family: tuple[int, int]
    checked: int
    """How many examples were checked (kept + dropped)."""
    prompt_shift: int = 0
    """Characters the prompts were moved from where the generator ended them (`Task.boundary_shifts`)."""

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_family)

    @property
    def drop_fraction(self) -> float:
        return self.dropped / self.checked if self.checked else 0.0


def tokenizer_label(tokenizer: PreTrainedTokenizerBase) -> str:
    """Name and vocab size, for messages: ``'runs/tok' (vocab size 2048)``."""
    name = getattr(tokenizer, "name_or_path", "") or "<in-memory tokenizer>"
    return f"{name!r} (vocab size {len(tokenizer)})"


def encode_plain(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (no BOS/EOS): what the contract compares."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _describe_tokens(tokenizer: PreTrainedTokenizerBase, text: str, ids: list[int]) -> str:
    pieces = tokenizer.convert_ids_to_tokens(ids)
    count = f"{len(ids)} token" + ("" if len(ids) == 1 else "s")
    return f"{text!r} -> {pieces} ({count})"


def resolve_task(
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example] | None = None,
    *,
    max_drop_fraction: float = 0.5,
) -> ResolvedTask:
    """Bind `task` to `tokenizer`: choose the first completion pair that keeps the contract, trying
    the task's pairs in order and then the pair its written code starts with (`_written_pair`), at the
    written prompt end and then at each of `Task.boundary_shifts` (`ResolvedTask.prompt_shift` says which).

    `examples` default to ``DEFAULT_CHECK_EXAMPLES`` validation examples. Raises
    `TaskTokenizationError` naming the task, the completions, their tokens and the
    tokenizer when no pair works.
    """
    if examples is None:
        examples = task.examples("val", DEFAULT_CHECK_EXAMPLES)
    failures: list[str] = []
    for pair in task.completion_options:
        resolved, failure = _try_pair(task, tokenizer, examples, pair, max_drop_fraction)
        if resolved is not None:
            return resolved
        failures.append(failure)
    for shift in (0, *task.boundary_shifts):
        rows = [cut for ex in examples if (cut := _shift_end(ex, shift)) is not None]
        written = _written_pair(tokenizer, rows)
        if written is None or (shift == 0 and written in task.completion_options):
            continue
        resolved, failure = _try_pair(task, tokenizer, rows, written, max_drop_fraction)
        if resolved is not None:
            return replace(resolved, prompt_shift=shift)
        failures.append(f"{failure} (the pair as written" + (f", prompts ending {shift:+d} characters)" if shift else ")"))
    header = f"task {task.name!r} cannot be resolved for tokenizer {tokenizer_label(tokenizer)}"
    if len(failures) == 1:
        raise TaskTokenizationError(f"{header}: {failures[0]}")
    tried = "\n".join(f"  - {f}" for f in failures)
    raise TaskTokenizationError(f"{header}; every completion pair failed:\n{tried}")


def _shift_end(ex: Example, shift: int) -> Example | None:
    """`ex` with its prompt ending `shift` characters later (earlier when negative), the characters moved
    between prompt and continuation; None when the written continuation is too short for it."""
    if shift == 0:
        return ex
    if shift < 0:
        if len(ex.prompt) <= -shift:
            return None
        return replace(ex, prompt=ex.prompt[:shift], continuation=ex.prompt[shift:] + ex.continuation)
    if len(ex.continuation) <= shift:
        return None
    return replace(ex, prompt=ex.prompt + ex.continuation[:shift], continuation=ex.continuation[shift:])


def _written_pair(tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> tuple[str, str] | None:
    """The pair the written code itself starts with: for each family, the text of the most common
    first token after the prompt in ``tokenize(prompt + continuation)``, when that text begins the
    continuation. Tokenizers whose pre-tokenizer joins punctuation to the newline after it
    (the paper's ``]\\n``) or a name to the dot before it (``.add``) need it: the nominal ``]`` or
    ``.`` is then never the real next token."""
    written = [ex for ex in examples if ex.continuation]
    if not written:
        return None
    prompts = encode_plain(tokenizer, [ex.prompt for ex in written])
    full = encode_plain(tokenizer, [ex.prompt + ex.continuation for ex in written])
    firsts: list[Counter] = [Counter(), Counter()]
    for ex, p, f in zip(written, prompts, full):
        if len(f) > len(p) and f[: len(p)] == p:
            firsts[ex.family][f[len(p)]] += 1
    pair = []
    for family, counts in enumerate(firsts):
        if not counts:
            return None
        text = tokenizer.decode([counts.most_common(1)[0][0]])
        if not text or not any(ex.continuation.startswith(text) for ex in written if ex.family == family):
            return None
        pair.append(text)
    return (pair[0], pair[1]) if pair[0] != pair[1] else None


def next_token(prompt_ids: list[int], extended_ids: list[int]) -> int | None:
    """The single token that extends `prompt_ids` to `extended_ids`, or None if it is not exactly one."""
    if len(extended_ids) == len(prompt_ids) + 1 and extended_ids[: len(prompt_ids)] == prompt_ids:
        return extended_ids[-1]
    return None


def _try_pair(
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    pair: tuple[str, str],
    max_drop_fraction: float,
) -> tuple[ResolvedTask | None, str]:
    """(resolved, "") when `pair` works, else (None, why it does not)."""
    rows = [replace(ex, target=pair[ex.family], distractor=pair[1 - ex.family]) for ex in examples]
    prompts = encode_plain(tokenizer, [ex.prompt for ex in rows])
    # extension[c][i]: the one token completion c adds after prompt i, or None.
    extension = [
        [next_token(p, pc) for p, pc in zip(prompts, encode_plain(tokenizer, [ex.prompt + c for ex in rows]))]
        for c in pair
    ]
    # A completion's id is the token it adds after the prompts, not the tokenization of the completion alone:
    # tokenizers that prefix a space marker to every text (sentencepiece) spell a lone "'" differently.
    ids: list[int] = []
    for found in extension:
        seen = [i for i in found if i is not None]
        ids.append(Counter(seen).most_common(1)[0][0] if seen else -1)
    if min(ids) < 0 or ids[0] == ids[1]:
        alone = encode_plain(tokenizer, list(pair))
        described = ", ".join(_describe_tokens(tokenizer, text, a) for text, a in zip(pair, alone))
        if ids[0] == ids[1] >= 0:
            why = "both completions are the same token after the prompts"
        elif all(len(a) == 1 for a in alone):
            why = "each is one token alone, but after the prompts it never adds exactly one token"
        else:
            why = "each completion must be exactly one token"
        return None, f"completions {described}; {why}"
    token_ids = (ids[0], ids[1])

    # Only examples with a continuation get the check against the code that was really written.
    written = [i for i, ex in enumerate(rows) if ex.continuation]
    written_ids = encode_plain(tokenizer, [rows[i].prompt + rows[i].continuation for i in written])
    with_continuation = dict(zip(written, written_ids))

    kept: list[Example] = []
    dropped = [0, 0]
    counts = [0, 0]
    first_failure = ""  # one failing example, to show in the error
    for i, ex in enumerate(rows):
        counts[ex.family] += 1
        p = prompts[i]
        target_id = token_ids[ex.family]
        problem = ""
        if ex.continuation and not ex.continuation.startswith(ex.target):
            problem = f"the written continuation {ex.continuation[:20]!r} does not start with {ex.target!r}"
        elif extension[ex.family][i] != target_id:
            ends = _tail(tokenizer, encode_plain(tokenizer, [ex.prompt + ex.target])[0], len(p))
            problem = f"prompt + target ends as {ends}"
        elif extension[1 - ex.family][i] != token_ids[1 - ex.family]:
            ends = _tail(tokenizer, encode_plain(tokenizer, [ex.prompt + ex.distractor])[0], len(p))
            problem = f"prompt + distractor ends as {ends}"
        elif i in with_continuation and with_continuation[i][: len(p) + 1] != p + [target_id]:
            problem = f"in the written code the prompt is followed by {_tail(tokenizer, with_continuation[i], len(p))}"
        if problem:
            dropped[ex.family] += 1
            first_failure = first_failure or f"e.g. prompt ending {ex.prompt[-40:]!r}: {problem}"
            continue
        kept.append(ex)

    worst = max(d / c for d, c in zip(dropped, counts) if c) if any(counts) else 0.0
    if not kept or worst > max_drop_fraction:
        shares = ", ".join(f"family {f} ({pair[f]!r}): {dropped[f]}/{counts[f]} dropped" for f in (0, 1))
        return None, (
            f"completions {pair!r} break the tokenization contract in too many examples ({shares}; "
            f"at most {max_drop_fraction:.0%} of a family may be dropped); {first_failure}"
        )
    return (
        ResolvedTask(
            task=task,
            tokenizer_name=tokenizer_label(tokenizer),
            completions=pair,
            token_ids=token_ids,
            token_strings=tuple(tokenizer.convert_ids_to_tokens(list(token_ids))),  # type: ignore[arg-type]
            examples=kept,
            dropped_by_family=(dropped[0], dropped[1]),
            checked=len(rows),
        ),
        "",
    )


def _tail(tokenizer: PreTrainedTokenizerBase, ids: list[int], prompt_len: int) -> str:
    """The tokens from just before the prompt's end, to show where the merge happened."""
    return str(tokenizer.convert_ids_to_tokens(ids[max(prompt_len - 2, 0) : prompt_len + 2]))
