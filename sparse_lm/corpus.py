"""Text corpora for pretraining: the standard library, a folder, a glob or a `datasets` dataset.

A corpus is a list of named documents, sorted by name so that every later step
(tokenizer training, the train/validation split, packing) is deterministic.
Files that are not valid UTF-8 are skipped and counted rather than fatal: the
CPython standard library itself ships four of them (encoding tests).
"""

from __future__ import annotations

import glob
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Document", "Corpus", "load_corpus"]

SOURCE_HINT = "give 'stdlib', a folder, a glob or hf:NAME[:CONFIG]"
# Third-party packages installed into the interpreter are not part of its standard library.
EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages"})


@dataclass
class Document:
    """One text file (or dataset row)."""

    name: str
    """Path relative to the corpus root, or the zero-padded row index for `hf:` sources."""
    text: str


@dataclass
class Corpus:
    """Documents sorted by name, with a count of the files that could not be used."""

    documents: list[Document]
    skipped: int
    """Files that were not UTF-8 or could not be read (counted, not fatal)."""
    source: str
    """The source string as given to `load_corpus`."""

    def __len__(self) -> int:
        return len(self.documents)

    def num_bytes(self) -> int:
        """Total size of the documents in UTF-8 bytes."""
        return sum(len(doc.text.encode("utf-8")) for doc in self.documents)


def load_corpus(
    source: str = "stdlib",
    *,
    pattern: str = "**/*.py",
    text_column: str = "text",
    split: str = "train",
    max_documents: int | None = None,
) -> Corpus:
    """Load a corpus from `source`.

    - ``"stdlib"``: the ``.py`` files of the running interpreter's standard library
      (without ``site-packages``/``dist-packages``);
    - a folder: every file matching `pattern` under it;
    - a single file;
    - a glob (contains ``*`` or ``?``): the matching files;
    - ``"hf:NAME"`` or ``"hf:NAME:CONFIG"``: ``datasets.load_dataset(NAME, CONFIG, split=split)``,
      one document per row of `text_column`.

    Empty documents are dropped. `max_documents` keeps the first N documents in name order.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be >= 1 or None, got {max_documents}")
    if source.startswith("hf:"):
        return _load_hf(source, text_column=text_column, split=split, max_documents=max_documents)
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [
            path
            for path in root.rglob("*.py")
            if not EXCLUDED_STDLIB_DIRS.intersection(path.relative_to(root).parts) and path.is_file()
        ]
        named = [(path.relative_to(root).as_posix(), path) for path in files]
    elif any(ch in source for ch in "*?"):
        matches = [Path(p) for p in glob.glob(source, recursive=True)]
        named = [(path.as_posix(), path) for path in matches if path.is_file()]
        if not named:
            raise ValueError(f"the glob {source!r} matches no files; {SOURCE_HINT}")
    else:
        root = Path(source)
        if not root.exists():
            raise FileNotFoundError(f"corpus source {source!r} does not exist; {SOURCE_HINT}")
        if root.is_file():
            named = [(root.name, root)]
        else:
            named = [(path.relative_to(root).as_posix(), path) for path in root.glob(pattern) if path.is_file()]
            if not named:
                raise ValueError(
                    f"the folder {str(root)!r} has no files matching pattern {pattern!r}; "
                    "check the folder or pass another pattern"
                )
    named.sort(key=lambda item: item[0])
    documents, skipped, examined = _read_files(named, max_documents)
    if not documents:
        if skipped == examined:
            raise ValueError(
                f"none of the {examined} files of {source!r} could be read as UTF-8 text "
                f"({skipped} skipped); give a source with UTF-8 files"
            )
        raise ValueError(f"all {examined} files of {source!r} are empty; give a source with text in it")
    return Corpus(documents=documents, skipped=skipped, source=source)


def _read_files(named: Iterable[tuple[str, Path]], max_documents: int | None) -> tuple[list[Document], int, int]:
    """Read files in order with strict UTF-8; return (documents, skipped, files examined)."""
    documents: list[Document] = []
    skipped = examined = 0
    for name, path in named:
        if max_documents is not None and len(documents) >= max_documents:
            break
        examined += 1
        try:
            # Decode ourselves (strict): a lenient reader would smuggle replacement characters into training.
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if text:
            documents.append(Document(name=name, text=text))
    return documents, skipped, examined


def _load_hf(source: str, *, text_column: str, split: str, max_documents: int | None) -> Corpus:
    """Load ``hf:NAME[:CONFIG]`` with `datasets`; documents are named by zero-padded row index."""
    import datasets  # imported here: the file sources must not pay for it

    name, _, config = source[len("hf:") :].partition(":")
    if not name:
        raise ValueError(f"{source!r} names no dataset; write hf:NAME or hf:NAME:CONFIG")
    dataset = datasets.load_dataset(name, config or None, split=split)
    if text_column not in dataset.column_names:
        raise ValueError(
            f"dataset {name!r} (split {split!r}) has no column {text_column!r}; "
            f"its columns are {dataset.column_names}: pass text_column=one of them"
        )
    # Batched iteration reads only as many rows as needed when max_documents is small.
    texts: Iterator[str | None] = (
        text for batch in dataset.select_columns([text_column]).iter(batch_size=1024) for text in batch[text_column]
    )
    width = len(str(max(len(dataset) - 1, 0)))  # zero-padded so that name order is row order
    documents: list[Document] = []
    for row, text in enumerate(texts):
        if max_documents is not None and len(documents) >= max_documents:
            break
        if text is not None and not isinstance(text, str):
            raise ValueError(f"column {text_column!r} of {name!r} holds {type(text).__name__}, not text")
        if text:
            documents.append(Document(name=f"{row:0{width}d}", text=text))
    if not documents:
        raise ValueError(f"column {text_column!r} of {name!r} (split {split!r}) has no non-empty text")
    return Corpus(documents=documents, skipped=0, source=source)
