"""Text corpora for pretraining: the standard library (alone or with site-packages), a folder, a glob, or `datasets`.

A corpus is a list of named documents, sorted by name so that every later step
(tokenizer training, the train/validation split, packing) is deterministic.
Files that are not valid UTF-8 are skipped and counted rather than fatal: the
CPython standard library itself ships four of them (encoding tests).

``python-site`` is the larger offline corpus for runs longer than one pass over
the standard library (~10.5M tokens): the standard library plus every ``.py``
file of the installed site-packages. Packages vendor each other's files (pip,
setuptools, ...), so files whose bytes were already seen are dropped and counted.
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Document", "Corpus", "load_corpus", "python_site_files"]

SOURCE_HINT = "give 'stdlib', 'python-site', a folder, a glob or hf:NAME[:CONFIG]"
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
    duplicates: int = 0
    """Files dropped because an earlier file (in name order) had the same bytes (``python-site`` only)."""

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
      (without ``site-packages``/``dist-packages``), named by their path inside it;
    - ``"python-site"``: those plus the ``.py`` files of the interpreter's site-packages
      (``sysconfig`` purelib and platlib), named ``stdlib/...`` and ``site-packages/...``,
      deduplicated by content hash (a standard-library file wins over a vendored copy);
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
    dedupe = False
    if source == "stdlib":
        named = _stdlib_files(Path(sysconfig.get_paths()["stdlib"]))
    elif source == "python-site":
        paths = sysconfig.get_paths()
        named = python_site_files(Path(paths["stdlib"]), [Path(paths["purelib"]), Path(paths["platlib"])])
        dedupe = True
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
    if dedupe:
        # Deduplicate in priority order (stdlib first), then sort: by name alone "site-packages/"
        # sorts before "stdlib/" and a vendored copy would win. Hence the limit comes last, too.
        documents, skipped, examined, duplicates = _read_files(named, None, dedupe=True)
        documents = sorted(documents, key=lambda doc: doc.name)[:max_documents]
    else:
        named.sort(key=lambda item: item[0])
        documents, skipped, examined, duplicates = _read_files(named, max_documents)
    if not documents:
        if skipped == examined:
            raise ValueError(
                f"none of the {examined} files of {source!r} could be read as UTF-8 text "
                f"({skipped} skipped); give a source with UTF-8 files"
            )
        raise ValueError(f"all {examined} files of {source!r} are empty; give a source with text in it")
    return Corpus(documents=documents, skipped=skipped, source=source, duplicates=duplicates)


def _stdlib_files(root: Path) -> list[tuple[str, Path]]:
    """(name inside the standard library, path) of its ``.py`` files, third-party packages left out."""
    return [
        (path.relative_to(root).as_posix(), path)
        for path in root.rglob("*.py")
        if not EXCLUDED_STDLIB_DIRS.intersection(path.relative_to(root).parts) and path.is_file()
    ]


def python_site_files(stdlib_root: Path, site_roots: Iterable[Path]) -> list[tuple[str, Path]]:
    """Named ``.py`` files of the ``python-site`` corpus: ``stdlib/...`` then ``site-packages/...``.

    In priority order for deduplication: the standard library (sorted), then each site folder
    (sorted); ``site_roots`` that are the same folder (purelib is platlib on most installs) count once.
    """
    named = sorted((f"stdlib/{name}", path) for name, path in _stdlib_files(stdlib_root))
    seen: set[Path] = set()
    for root in site_roots:
        root = root.resolve()
        if root in seen or not root.is_dir():
            continue
        seen.add(root)
        named += sorted((f"site-packages/{path.relative_to(root).as_posix()}", path)
                        for path in root.rglob("*.py") if path.is_file())
    return named


def _read_files(named: Iterable[tuple[str, Path]], max_documents: int | None,
                dedupe: bool = False) -> tuple[list[Document], int, int, int]:
    """Read files in order with strict UTF-8; return (documents, skipped, files examined, duplicates)."""
    documents: list[Document] = []
    skipped = examined = duplicates = 0
    hashes: set[bytes] = set()
    for name, path in named:
        if max_documents is not None and len(documents) >= max_documents:
            break
        examined += 1
        try:
            raw = path.read_bytes()
            # Decode ourselves (strict): a lenient reader would smuggle replacement characters into training.
            text = raw.decode("utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if dedupe and text:
            digest = hashlib.sha256(raw).digest()
            if digest in hashes:
                duplicates += 1
                continue
            hashes.add(digest)
        if text:
            documents.append(Document(name=name, text=text))
    return documents, skipped, examined, duplicates


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
