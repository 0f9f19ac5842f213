"""Closing-quote examples from real Python source: `single_double_quote` on code nobody generated.

The built-in `single_double_quote` task writes its prompts with a generator.
This module takes them from a folder of ``.py`` files instead (a user's own
code, or the interpreter's site-packages: code outside the standard-library
training corpus), so a model, a circuit or a bridge intervention can be
measured on string literals as people really write them::

    from tasks.real_code import code_quote_task
    task = code_quote_task("path/to/code", tokenizer=tok)   # a Task: evaluate_task, resolve_task accept it
    evaluate_task(model, tok, task, split="test", n=512)

What counts as a literal. The stdlib `tokenize` module finds the STRING
tokens; a literal is used when it is on one line, quoted with ``'`` or ``"``
(not triple-quoted), has at least one character of content, and has no
prefix, or, with ``prefixes="rbu"``, only the prefix letters given (any
case and order: ``r``, ``b``, ``rb``, ``Br``, ...). f-strings are never
used: on Python 3.12+ they are FSTRING_START/MIDDLE/END tokens, not STRING
tokens, and on 3.11 their ``{...}`` placeholders are code, not text, so the
same folder gives the same examples on every version. Empty literals
(``''``) are skipped: the prompt would end with the opening quote, and
``''`` is often one BPE token. A literal whose content holds the other quote
(``"it's"``) is kept: the model must still close it with the quote that
opened it, which is exactly the task (escaped quotes, ``'it\\'s'``, too).

An example's prompt is the source from the first line start at most
`context_chars` characters before the closing quote up to the literal's
content (everything before the closing quote); a literal whose own line is
longer than that is skipped. The target is the closing quote (family 0:
``'``, family 1: ``"``, as in `single_double_quote`), the distractor the
other quote, and the continuation the real text after it to the end of its
line, so the tokenization contract (`tasks.contract`) drops a literal whose
closing quote a byte-level BPE merges with what follows (``')``, ``',``).
For a tokenizer whose synthetic quote task resolves to the quote and its
newline (the paper's tokenizer writes ``'\n`` as one token), the target is
``'\n`` or ``"\n`` and only literals that end their line are used
(`code_quote_pair`), so real code asks the synthetic task's question.

Splits are by file: a file belongs to train, val or test by a hash of its
path relative to the root (the same 80/10/10 shares as prompt-hash splits),
so examples of two splits never come from the same file. Sampling is
deterministic in (folder, split, n, seed): the split's files in a seeded
order, at most `max_per_file` literals per family from each (so a sample
spreads over many files), identical prompts once. Families are balanced by
default; a folder with fewer literals of one family gives what it has, and
`CodeSampleStats` says so. Files that are not UTF-8 or do not parse (Python 2
code in site-packages) are skipped and counted.
"""

from __future__ import annotations

import ast
import io
import os
import random
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.task import (
    DEFAULT_SIZES,
    MAX_PROMPT_CHARS,
    SPLITS,
    Example,
    Split,
    Task,
    _interleave,
    split_of,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CODE_TASK_NAME",
    "QUOTES",
    "LINE_END_QUOTES",
    "code_quote_pair",
    "CodeLiteral",
    "CodeQuoteTask",
    "CodeSample",
    "CodeSampleStats",
    "code_quote_examples",
    "code_quote_task",
    "file_split",
    "python_files",
    "read_literals",
    "sample_code_quotes",
    "site_packages",
]

QUOTES = ("'", '"')
"""Family 0 closes with ``'``, family 1 with ``"`` (the order of `single_double_quote`)."""
CODE_TASK_NAME = "single_double_quote@code"
# The closing quotes as a tokenizer that joins punctuation to the newline after it writes them at a line's end
# (the paper's tokenizer: `'\n` is one token, so a bare `'` is never the next token there).
LINE_END_QUOTES = ("'\n", '"\n')


def code_quote_pair(tokenizer: PreTrainedTokenizerBase | None) -> tuple[str, str]:
    """The completions scored for `tokenizer`: the pair `single_double_quote` resolves to, `QUOTES` or
    `LINE_END_QUOTES`, so that real literals ask the synthetic task's question (`QUOTES` without one)."""
    if tokenizer is None:
        return QUOTES
    from tasks.contract import TaskTokenizationError, resolve_task
    from tasks.registry import get_task

    try:
        pair = resolve_task(get_task("single_double_quote"), tokenizer).completions
    except TaskTokenizationError:
        return QUOTES
    return LINE_END_QUOTES if pair == LINE_END_QUOTES else QUOTES


# Folders that hold no source worth reading (caches, VCS data); skipped while walking.
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".tox", ".mypy_cache", ".pytest_cache", "node_modules"}


def site_packages() -> Path:
    """The running interpreter's pure-Python site-packages: installed code outside the standard library."""
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


@dataclass(frozen=True)
class CodeLiteral:
    """One usable string literal of a file."""

    family: int
    prompt: str
    """Source text up to and including the literal's content (ends just before the closing quote)."""
    continuation: str
    """The closing quote and the rest of its line (with the newline when there is one)."""


@dataclass
class CodeSampleStats:
    """What a sample read and why it has the examples it has."""

    root: str
    split: str
    files_total: int = 0
    """.py files found (all splits)."""
    files_in_split: int = 0
    files_read: int = 0
    """Files of the split opened before the sample was full."""
    skipped_not_utf8: int = 0
    skipped_unparsable: int = 0
    literals_by_family: list[int] = field(default_factory=lambda: [0, 0])
    """Usable literals in the files read."""
    skipped_line_too_long: int = 0
    """Literals whose line does not fit in `context_chars`."""
    duplicates: int = 0
    contract_dropped_by_family: list[int] = field(default_factory=lambda: [0, 0])
    """Candidates the tokenization contract dropped (only when a tokenizer was given)."""
    precheck_dropped_by_family: list[int] = field(default_factory=lambda: [0, 0])
    """Literals of the files read that failed the contract on their own line (only with a tokenizer)."""
    too_many_tokens: int = 0
    """Candidates longer than `max_prompt_tokens` (only when a tokenizer was given)."""
    examples_by_family: list[int] = field(default_factory=lambda: [0, 0])

    @property
    def dropped_by_family(self) -> list[int]:
        """Literals of the files read that break the contract (on their line, or checked in full)."""
        return [a + b for a, b in zip(self.precheck_dropped_by_family, self.contract_dropped_by_family)]

    def as_dict(self) -> dict[str, Any]:
        out = {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}
        return {**out, "dropped_by_family": self.dropped_by_family}


@dataclass
class CodeSample:
    examples: list[Example]
    stats: CodeSampleStats


def python_files(source: str | Path | Sequence[str | Path]) -> tuple[Path, list[Path]]:
    """(root, the .py files under it, sorted) for a folder, one file, or a list of files.

    The root is what file paths are made relative to for the split hash: the
    folder itself, or the common folder of the files given.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file():
            return path.parent, [path]
        if not path.is_dir():
            raise FileNotFoundError(f"no folder or file at {str(path)!r} (give a folder of .py files)")
        found: list[Path] = []
        for folder, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            found.extend(Path(folder) / name for name in names if name.endswith(".py"))
        return path, sorted(found)
    files = sorted(Path(f) for f in source)
    if not files:
        raise ValueError("no files given")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"not a file: {missing[:5]}")
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    return root, [f.resolve() for f in files]


def file_split(relative_path: str) -> Split:
    """The split of a file: the prompt-hash split (`tasks.task.split_of`) of its path relative to the root
    (forward slashes)."""
    return split_of(relative_path)


class _Unusable(Exception):
    """A file that is not UTF-8 (`reason` "not_utf8") or does not parse ("unparsable")."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _plain_quote(token: str, prefixes: str) -> tuple[str, str] | None:
    """(quote, content) of a one-line ' or " literal with an allowed prefix, else None."""
    i = 0
    while i < len(token) and token[i] not in QUOTES:
        i += 1
    prefix, body = token[:i].lower(), token[i:]
    if any(c not in prefixes.lower() or c == "f" for c in prefix):
        return None
    if len(body) < 3 or body[0] != body[-1] or body.startswith(body[0] * 3):
        return None  # empty (''), triple-quoted, or not a closed literal
    return body[0], body[1:-1]


def read_literals(path: Path, *, context_chars: int = MAX_PROMPT_CHARS, prefixes: str = "") -> tuple[list[CodeLiteral], int]:
    """(usable literals of the file in source order, literals skipped for a line longer than `context_chars`).

    Raises `_Unusable` for a file that is not UTF-8 or does not parse.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise _Unusable("not_utf8") from None
    # Universal newlines, as Python reads source; a BOM is not code.
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    try:
        ast.parse(text)
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, ValueError, tokenize.TokenError, RecursionError, MemoryError):
        raise _Unusable("unparsable") from None
    line_starts = [0]
    for line in text.split("\n")[:-1]:
        line_starts.append(line_starts[-1] + len(line) + 1)
    found: list[CodeLiteral] = []
    too_long = 0
    for tok in tokens:
        if tok.type != tokenize.STRING or tok.start[0] != tok.end[0]:
            continue
        parsed = _plain_quote(tok.string, prefixes)
        if parsed is None:
            continue
        quote, _ = parsed
        line_start = line_starts[tok.end[0] - 1]
        close = line_start + tok.end[1] - 1  # offset of the closing quote
        if text[close] != quote:  # offsets disagree (an odd line separator): skip rather than guess
            continue
        if close - line_start > context_chars:
            too_long += 1
            continue
        # The first line start at most context_chars before the closing quote: the literal's line at the latest.
        earliest = close - context_chars
        row = tok.end[0] - 1
        while row > 0 and line_starts[row - 1] >= earliest:
            row -= 1
        start = line_starts[row]
        line_end = text.find("\n", close)
        end = len(text) if line_end < 0 else line_end + 1
        found.append(CodeLiteral(QUOTES.index(quote), text[start:close], text[close:end]))
    return found, too_long


def _candidates(
    files: list[Path], root: Path, split: Split, rng: random.Random, stats: CodeSampleStats, *,
    context_chars: int, prefixes: str, max_per_file: int, tokenizer: PreTrainedTokenizerBase | None,
    pair: tuple[str, str] = QUOTES,
) -> Iterator[tuple[CodeLiteral, str]]:
    """Literals of the split's files in a seeded order: (literal, file) with at most `max_per_file` per family a file."""
    in_split = [f for f in files if file_split(f.relative_to(root).as_posix()) == split]
    stats.files_in_split = len(in_split)
    rng.shuffle(in_split)
    for path in in_split:
        stats.files_read += 1
        try:
            literals, too_long = read_literals(path, context_chars=context_chars, prefixes=prefixes)
        except _Unusable as why:
            setattr(stats, f"skipped_{why.reason}", getattr(stats, f"skipped_{why.reason}") + 1)
            continue
        stats.skipped_line_too_long += too_long
        for lit in literals:
            stats.literals_by_family[lit.family] += 1
        if tokenizer is not None and literals:
            # Most closing quotes in real code merge with what follows (`')`, `',`): sample among the
            # literals likely to survive the contract, or a file's few draws would mostly be dropped later.
            passed = _line_precheck(literals, tokenizer, pair)
            for lit, ok in zip(literals, passed):
                stats.precheck_dropped_by_family[lit.family] += not ok
            literals = [lit for lit, ok in zip(literals, passed) if ok]
        for family in (0, 1):
            mine = [lit for lit in literals if lit.family == family]
            for lit in rng.sample(mine, min(max_per_file, len(mine))):
                yield lit, str(path)


def _line_precheck(literals: list[CodeLiteral], tokenizer: PreTrainedTokenizerBase, pair: tuple[str, str]) -> list[bool]:
    """Whether each literal passes the contract's conditions on its own line (a cheap filter, not the contract).

    BPE merges are local, so a closing quote that merges with the text after it
    (or a completion that is not one token there) is visible on the literal's line
    alone; `tasks.contract.resolve_task` on the whole prompt still decides.
    """
    from tasks.contract import encode_plain, next_token

    heads = [lit.prompt[lit.prompt.rfind("\n") + 1 :] for lit in literals]
    prompts = encode_plain(tokenizer, heads)
    with_target = encode_plain(tokenizer, [h + pair[lit.family] for h, lit in zip(heads, literals)])
    with_other = encode_plain(tokenizer, [h + pair[1 - lit.family] for h, lit in zip(heads, literals)])
    written = encode_plain(tokenizer, [h + lit.continuation for h, lit in zip(heads, literals)])
    passed = []
    for lit, p, t, o, w in zip(literals, prompts, with_target, with_other, written):
        target = next_token(p, t)
        passed.append(lit.continuation.startswith(pair[lit.family]) and target is not None
                      and next_token(p, o) is not None and w[: len(p) + 1] == p + [target])
    return passed


def sample_code_quotes(
    source: str | Path | Sequence[str | Path],
    *,
    n: int = 512,
    seed: int = 0,
    split: Split = "test",
    context_chars: int = MAX_PROMPT_CHARS,
    prefixes: str = "",
    max_per_file: int = 4,
    balanced: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_prompt_tokens: int | None = None,
) -> CodeSample:
    """`n` closing-quote examples of `split` from the .py files of `source`, with the numbers behind them.

    With a `tokenizer`, candidates are checked against the tokenization contract
    (`tasks.contract.resolve_task`) as they are drawn and only those that keep it
    count, so `n` is the number of usable examples (the drops are in the stats);
    `max_prompt_tokens` (e.g. the model's context) also skips longer prompts.
    Without one, `n` candidates are returned and the contract runs where they are used.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if n < 0 or context_chars < 1 or max_per_file < 1:
        raise ValueError(f"need n >= 0, context_chars >= 1 and max_per_file >= 1; got {n}, {context_chars}, "
                         f"{max_per_file}")
    root, files = python_files(source)
    stats = CodeSampleStats(root=str(root), split=split, files_total=len(files))
    wanted = (n - n // 2, n // 2) if balanced else (n, n)
    found: tuple[list[Example], list[Example]] = ([], [])
    seen: set[str] = set()
    pending: list[Example] = []

    def full() -> bool:
        if balanced:
            return all(len(found[f]) >= wanted[f] for f in (0, 1))
        return len(found[0]) + len(found[1]) >= n

    def accept(batch: list[Example]) -> None:
        if tokenizer is not None and batch:
            batch = _keep_contract(batch, tokenizer, max_prompt_tokens, stats, pair)
        for ex in batch:
            if not full() and (not balanced or len(found[ex.family]) < wanted[ex.family]):
                found[ex.family].append(ex)

    rng = random.Random(f"{CODE_TASK_NAME}:{split}:{seed}")
    pair = code_quote_pair(tokenizer)
    draws = _candidates(files, root, split, rng, stats, context_chars=context_chars, prefixes=prefixes,
                        max_per_file=max_per_file, tokenizer=tokenizer, pair=pair)
    for lit, _path in draws:
        if full():
            break
        if balanced and len(found[lit.family]) >= wanted[lit.family]:
            continue
        if lit.prompt in seen:
            stats.duplicates += 1
            continue
        seen.add(lit.prompt)
        pending.append(Example(lit.prompt, pair[lit.family], pair[1 - lit.family], lit.family, lit.continuation))
        # Checking the contract in chunks keeps tokenizer calls few; a chunk is about what is still missing.
        missing = sum(max(w - len(f), 0) for w, f in zip(wanted, found)) if balanced else n - len(found[0]) - len(found[1])
        if tokenizer is None or len(pending) >= max(32, missing):
            accept(pending)
            pending = []
    accept(pending)
    if balanced:
        examples = _interleave(found[0], found[1])
    else:
        examples = sorted(found[0] + found[1], key=lambda ex: random.Random(ex.prompt).random())
    stats.examples_by_family = [sum(ex.family == f for ex in examples) for f in (0, 1)]
    return CodeSample(examples, stats)


def _keep_contract(batch: list[Example], tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int | None,
                   stats: CodeSampleStats, pair: tuple[str, str]) -> list[Example]:
    """The examples of `batch` that keep the tokenization contract for `pair` (and fit in `max_prompt_tokens`)."""
    from tasks.contract import encode_plain, resolve_task

    probe = Task(name=CODE_TASK_NAME, description="", completion_options=(pair,), rows=tuple(batch))
    # Every drop is acceptable here (real code often closes a literal right before `)`); only the kept ones count.
    resolved = resolve_task(probe, tokenizer, batch, max_drop_fraction=1.0)
    if resolved.completions != pair:  # none kept `pair`, and another pair (as written) was chosen: drop them all
        resolved = replace(resolved, examples=[], dropped_by_family=tuple(
            sum(ex.family == f for ex in batch) for f in (0, 1)))
    for f in (0, 1):
        stats.contract_dropped_by_family[f] += resolved.dropped_by_family[f]
    kept = resolved.examples
    if max_prompt_tokens is not None and kept:
        lengths = [len(ids) for ids in encode_plain(tokenizer, [ex.prompt for ex in kept])]
        stats.too_many_tokens += sum(length > max_prompt_tokens for length in lengths)
        kept = [ex for ex, length in zip(kept, lengths) if length <= max_prompt_tokens]
    return kept


def code_quote_examples(
    source: str | Path | Sequence[str | Path], *, n: int = 512, seed: int = 0, split: Split = "test",
    context_chars: int = MAX_PROMPT_CHARS, **kwargs: Any,
) -> list[Example]:
    """The examples of `sample_code_quotes` (same arguments), without the stats."""
    return sample_code_quotes(source, n=n, seed=seed, split=split, context_chars=context_chars, **kwargs).examples


@dataclass
class CodeQuoteTask(Task):
    """`single_double_quote` on real code: a `Task` whose examples are read from `source`, split by file.

    Anything that takes a task (`evaluate_task`, `resolve_task`, the bridge
    intervention) takes it. With a `tokenizer` the examples already keep the
    contract, so `n` is the number scored. `samples[(split, n, seed)]` holds each
    sample with its stats; copies made with `dataclasses.replace` share it, so
    ``replace(task, family=0)`` (the same sample, family 0 only) reads no file again.
    """

    code_source: Any = None
    """A folder, one .py file, or a list of files."""
    context_chars: int = MAX_PROMPT_CHARS
    prefixes: str = ""
    max_per_file: int = 4
    tokenizer: Any = None
    max_prompt_tokens: int | None = None
    family: int | None = None
    """Only this family's examples of each sample (None: both)."""
    samples: dict[tuple[str, int, int], CodeSample] = field(default_factory=dict, repr=False, compare=False)

    def sample(self, split: Split = "test", n: int | None = None, seed: int = 0) -> CodeSample:
        """The sample behind `examples` (both families), with its stats."""
        n = DEFAULT_SIZES[split] if n is None else n
        key = (split, n, seed)
        if key not in self.samples:
            self.samples[key] = sample_code_quotes(
                self.code_source, n=n, seed=seed, split=split, context_chars=self.context_chars,
                prefixes=self.prefixes, max_per_file=self.max_per_file, tokenizer=self.tokenizer,
                max_prompt_tokens=self.max_prompt_tokens,
            )
        return self.samples[key]

    def examples(self, split: Split = "train", n: int | None = None, seed: int = 0) -> list[Example]:
        made = self.sample(split, n, seed).examples
        return [ex for ex in made if self.family is None or ex.family == self.family]


def code_quote_task(
    source: str | Path | Sequence[str | Path], *, tokenizer: PreTrainedTokenizerBase | None = None,
    context_chars: int = MAX_PROMPT_CHARS, prefixes: str = "", max_per_file: int = 4,
    max_prompt_tokens: int | None = None, name: str = CODE_TASK_NAME,
) -> CodeQuoteTask:
    """A `CodeQuoteTask` over `source` (not registered: it needs a folder). Files are read when examples are asked for."""
    root, _ = python_files(source)  # a wrong path fails here, not at the first evaluation
    return CodeQuoteTask(
        name=name,
        description=f"close a string literal of real code under {root} with the quote that opened it",
        # With a tokenizer the examples were drawn for its pair; without, the pair is chosen where they are scored.
        completion_options=(code_quote_pair(tokenizer),) if tokenizer is not None else (QUOTES, LINE_END_QUOTES),
        rows=(),
        source=str(root),
        code_source=source,
        context_chars=context_chars,
        prefixes=prefixes,
        max_per_file=max_per_file,
        tokenizer=tokenizer,
        max_prompt_tokens=max_prompt_tokens,
    )
