"""The registry of RASP programs with a known circuit (`sparse-lm groundtruth --program NAME`).

Every program has a categorical output (one class per output value at every
position after BOS), a vocabulary and a length small enough that its whole
input space is enumerated (or sampled: `compile.input_space`), and compiles
in seconds. Programs are built inside functions: tracr is imported only when
one is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProgramSpec:
    name: str
    build: Callable[[], Any]  # () -> rasp.SOp
    vocab: tuple[Any, ...]
    max_seq_len: int
    description: str
    min_len: int = 1
    accept: Callable[[list[Any]], bool] | None = None  # inputs the program is defined on (e.g. distinct tokens)


def _lib():
    from pruning.groundtruth.compile import _tracr

    _tracr()  # the clear install error, before tracr.compiler.lib is imported
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib, rasp


def _length():
    lib, _ = _lib()
    return lib.make_length()


def _reverse():
    lib, rasp = _lib()
    return lib.make_reverse(rasp.tokens)


def _hist():
    lib, _ = _lib()
    return lib.make_hist()


def _sort():
    lib, rasp = _lib()
    return lib.make_sort_unique(rasp.tokens, rasp.tokens)


def _sort_freq():
    lib, _ = _lib()
    return lib.make_sort_freq(max_seq_len=4)


def _prev_token():
    lib, rasp = _lib()
    return lib.shift_by(1, rasp.tokens).named("prev_token")


def _detect_ab():
    lib, rasp = _lib()
    return lib.detect_pattern(rasp.tokens, "ab").named("detect_ab")


def _count_a():
    lib, rasp = _lib()
    return lib.make_count(rasp.tokens, "a").named("count_a")


def _distinct(x: list[Any]) -> bool:
    return len(set(x)) == len(x)


PROGRAMS: dict[str, ProgramSpec] = {p.name: p for p in [
    ProgramSpec("length", _length, ("a", "b", "c"), 5, "the sequence length at every position (SelectorWidth)"),
    ProgramSpec("reverse", _reverse, ("a", "b", "c"), 4, "the input reversed (length, opp_index, Aggregate)"),
    ProgramSpec("hist", _hist, ("a", "b", "c"), 5, "how often each position's token occurs (SelectorWidth)"),
    ProgramSpec("sort", _sort, (1, 2, 3, 4, 5), 4, "distinct tokens sorted ascending (SelectorWidth + Aggregate)",
                accept=_distinct),
    ProgramSpec("sort_freq", _sort_freq, ("a", "b", "c"), 4, "tokens sorted by descending frequency (hist, sort)"),
    ProgramSpec("prev_token", _prev_token, ("a", "b", "c"), 5, "the previous token (None at the first)"),
    ProgramSpec("detect_ab", _detect_ab, ("a", "b", "c"), 5, "True where 'ab' ends (shift, two Maps, And)"),
    ProgramSpec("count_a", _count_a, ("a", "b", "c"), 5, "how many 'a' the input holds (SelectorWidth)"),
]}


def get_program(name: str) -> ProgramSpec:
    if name not in PROGRAMS:
        raise KeyError(f"no registered program {name!r}; registered: {', '.join(PROGRAMS)}")
    return PROGRAMS[name]
