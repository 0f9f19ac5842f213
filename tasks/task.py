"""Tasks and examples: the `Task` type, its deterministic splits, and balanced example lists.

A task is two contrasting families of prompts. Its generator writes one
example at a time: given a seeded `random.Random` and a family (0 or 1) it
returns the prompt and the source text that really follows it (the
*continuation*, which starts with that family's completion). A `Task` turns a
generator (or the rows of a JSONL file) into balanced, deduplicated,
split-stable example lists.

Splits: an example belongs to train, val or test by a hash of its prompt
text alone, so a prompt can never appear in two splits, whatever the seed or
the number of examples asked for.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Union, get_args


if TYPE_CHECKING:
    import datasets


__all__ = ["Split", "SPLITS", "DEFAULT_SIZES", "MAX_PROMPT_CHARS", "Example", "Sample", "Generator", "Task", "split_of"]

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)
# Share of the prompt-hash space given to each split (cumulative upper bounds, out of 100).
_SPLIT_BOUNDS: dict[Split, tuple[int, int]] = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}
DEFAULT_SIZES: dict[Split, int] = {"train": 2048, "val": 256, "test": 512}
"""Examples per split when `Task.examples` is called with ``n=None``."""

# About 3 characters per token on code: this keeps prompts well inside a 256-token context.
MAX_PROMPT_CHARS = 640

# A generator returns (prompt, continuation), or just the prompt when it has no continuation to offer.
Sample = Union[tuple[str, str], str]
Generator = Callable[[random.Random, int], Sample]


@dataclass(frozen=True)
class Example:
    """One prompt whose next token must be `target` rather than `distractor`."""

    prompt: str
    target: str
    """The correct completion (one token under the tokenizer the task resolves for)."""
    distractor: str
    """The other family's completion."""
    family: int
    """0 or 1: which of the task's two completions is the target."""
    continuation: str = ""
    """The source text the generator wrote after the prompt (starts with `target`), or "".

    Used by the tokenization contract to check that the target is the token a
    tokenizer really emits next in the written code, not only after a bare prompt.
    """


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to: a stable hash of its text (not Python's salted `hash`)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 100
    for split, (low, high) in _SPLIT_BOUNDS.items():
        if low <= bucket < high:
            return split
    raise AssertionError(f"bucket {bucket} is outside every split")  # the bounds cover 0..99


def _check_split(split: str) -> Split:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    return split  # type: ignore[return-value]


@dataclass
class Task:
    """A binary next-token task: two prompt families and their two completions.

    Exactly one of `generator` (a built-in or user task) and `rows` (a task
    loaded from JSONL) is set.
    """

    name: str
    description: str
    """One line: what the model must decide."""
    completion_options: tuple[tuple[str, str], ...]
    """Completion pairs (family 0, family 1), in order of preference.

    The first is the task's nominal pair (`completions`). Later pairs are for
    tokenizers that split the written text differently (e.g. ``" enumerate"``
    is one token in some vocabularies and ``" en"`` + ... in others); every
    pair must be a prefix of what the generator writes after the prompt.
    `resolve` uses the first pair that passes the tokenization contract.
    """
    generator: Generator | None = None
    rows: tuple[Example, ...] | None = None
    source: str = "builtin"
    boundary_shifts: tuple[int, ...] = ()
    """Further places to end the prompts, in characters from where the generator ended them (negative:
    earlier), tried in order when no completion pair works at the written end, each with the pair the
    written code starts with there (`tasks.contract`). For tokenizers whose pieces cross the written
    end: the paper's joins ``(`` with the ``self`` after it and ``:`` with the newline after it."""
    """Where the task comes from: "builtin", a module name, or a JSONL path."""
    max_prompt_chars: int | None = MAX_PROMPT_CHARS
    """Generated prompts longer than this are skipped (None: no limit); JSONL rows are never skipped."""
    _cache: dict[tuple[str, int, int], list[Example]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if (self.generator is None) == (self.rows is None):
            raise ValueError(f"task {self.name!r}: give exactly one of generator= and rows=")
        if not self.completion_options:
            raise ValueError(f"task {self.name!r} has no completions")
        for pair in self.completion_options:
            if len(pair) != 2 or pair[0] == pair[1] or not all(isinstance(c, str) and c for c in pair):
                raise ValueError(
                    f"task {self.name!r}: completions must be two distinct non-empty strings, got {pair!r}"
                )

    @property
    def completions(self) -> tuple[str, str]:
        """The nominal completions (family 0, family 1)."""
        return self.completion_options[0]

    def examples(self, split: Split = "train", n: int | None = None, seed: int = 0) -> list[Example]:
        """`n` examples of `split` (default `DEFAULT_SIZES[split]`), half of each family, alternating 0, 1, 0, ...

        Deterministic in (task name, split, n, seed). Prompts are unique within
        the list and belong to `split` by their hash, so splits never share a prompt.
        """
        split = _check_split(split)
        n = DEFAULT_SIZES[split] if n is None else n
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        key = (split, n, seed)
        if key not in self._cache:
            made = self._from_rows(split, n) if self.rows is not None else self._generate(split, n, seed)
            self._cache[key] = made
        return list(self._cache[key])

    def dataset(self, split: Split = "train", n: int | None = None, seed: int = 0) -> datasets.Dataset:
        """`examples` as a `datasets.Dataset` with columns prompt, target, distractor, family."""
        import datasets

        rows = self.examples(split, n, seed)
        return datasets.Dataset.from_dict(
            {
                "prompt": [ex.prompt for ex in rows],
                "target": [ex.target for ex in rows],
                "distractor": [ex.distractor for ex in rows],
                "family": [ex.family for ex in rows],
            },
            features=datasets.Features(
                {
                    "prompt": datasets.Value("string"),
                    "target": datasets.Value("string"),
                    "distractor": datasets.Value("string"),
                    "family": datasets.Value("int64"),
                }
            ),
        )

    # -- internals -------------------------------------------------------------------------------

    def _example(self, prompt: str, continuation: str, family: int) -> Example:
        pair = self.completions
        return Example(prompt, pair[family], pair[1 - family], family, continuation)

    def _generate(self, split: Split, n: int, seed: int) -> list[Example]:
        assert self.generator is not None
        # A string seed is hashed with sha512 by `random`, so the stream is the same in every process.
        rng = random.Random(f"{self.name}:{seed}")
        wanted = (n - n // 2, n // 2)  # family 0 gets the odd one out
        found: tuple[list[Example], list[Example]] = ([], [])
        seen: set[str] = set()
        # Most candidates land in other splits (test and val get 10% of the hash space each),
        # and a generator with little variety repeats itself: give up with numbers, not a hang.
        budget = 40 * n + 2000
        attempts = 0
        while (len(found[0]) < wanted[0] or len(found[1]) < wanted[1]) and attempts < budget:
            attempts += 1
            family = 0 if len(found[0]) - wanted[0] < len(found[1]) - wanted[1] else 1
            prompt, continuation = self._call_generator(rng, family)
            too_long = self.max_prompt_chars is not None and len(prompt) > self.max_prompt_chars
            if too_long or prompt in seen or split_of(prompt) != split:
                continue
            seen.add(prompt)
            found[family].append(self._example(prompt, continuation, family))
        if len(found[0]) < wanted[0] or len(found[1]) < wanted[1]:
            raise ValueError(
                f"task {self.name!r}: after {attempts} generated prompts only {len(found[0])}+{len(found[1])} "
                f"unique {split} examples were found, {wanted[0]}+{wanted[1]} asked for; "
                "ask for fewer or give the generator more variety"
            )
        return _interleave(found[0], found[1])

    def _call_generator(self, rng: random.Random, family: int) -> tuple[str, str]:
        assert self.generator is not None
        sample = self.generator(rng, family)
        prompt, continuation = (sample, "") if isinstance(sample, str) else sample
        completion = self.completions[family]
        if continuation and not continuation.startswith(completion):
            raise ValueError(
                f"task {self.name!r}: the generator's continuation for family {family} must start with "
                f"{completion!r}, got {continuation[:40]!r}"
            )
        if not prompt:
            raise ValueError(f"task {self.name!r}: the generator returned an empty prompt")
        return prompt, continuation

    def _from_rows(self, split: Split, n: int) -> list[Example]:
        assert self.rows is not None
        by_family: tuple[list[Example], list[Example]] = ([], [])
        for row in self.rows:
            if split_of(row.prompt) == split:
                by_family[row.family].append(row)
        # Balance when the file allows it; a lopsided file gives what it has (the loss averages per family).
        take0 = min(len(by_family[0]), max(n - n // 2, n - len(by_family[1])))
        take1 = min(len(by_family[1]), n - take0)
        return _interleave(by_family[0][:take0], by_family[1][:take1])


def _interleave(first: list[Example], second: list[Example]) -> list[Example]:
    out: list[Example] = []
    for i in range(max(len(first), len(second))):
        out.extend(group[i] for group in (first, second) if i < len(group))
    return out
