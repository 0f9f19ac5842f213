"""Atomic file output: a crash or a bad input never leaves a half-written result."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """`obj` as JSON (``indent`` spaces, a final newline), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """The object rows of a JSONL file that parse, and how many non-blank lines did not (a line torn by a
    kill); a missing file has none."""
    path = Path(path)
    rows: list[dict] = []
    torn = 0
    if not path.exists():
        return rows, torn
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            torn += 1
    return rows, torn


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` whole.

    An existing ``path`` is kept until the new one is complete, so an error
    half-way through leaves the earlier result untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------
# run folders: one writer at a time, old results set aside, stale temporaries removed


class RunFolderBusy(RuntimeError):
    """Another live process is writing into this run folder."""


LOCK_NAME = ".lock"
# flock locks belong to an open file; a second open in this process would lock against itself.
_held: dict[Path, int] = {}


def lock_run_folder(folder: str | Path) -> Path:
    """Hold an exclusive OS lock on ``folder`` for the life of this process; raises :class:`RunFolderBusy`.

    ``flock`` dies with its process, so a run killed by SIGKILL leaves no stale lock behind.
    The lock file holds the owner's PID for the error message. Re-locking a folder this
    process already holds is a no-op.
    """
    import fcntl

    folder = Path(folder).resolve()
    if folder in _held:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderBusy(
            f"{folder} is in use by another run (PID {owner}): wait for it to finish or stop it, or use "
            f"another run_name"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[folder] = fd
    return folder


def unlock_run_folder(folder: str | Path) -> None:
    """Release the lock :func:`lock_run_folder` took (process exit releases it too)."""
    import fcntl

    fd = _held.pop(Path(folder).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def set_aside(folder: str | Path, names: list[str]) -> Path | None:
    """Move the entries ``names`` of ``folder`` that exist into ``<folder>.before-<time>/``; returns it (or None).

    Used by ``--fresh``: an earlier run's checkpoints, metrics and model are kept, never deleted or
    mixed with the new run's.
    """
    import time

    folder = Path(folder)
    present = [n for n in names if (folder / n).exists()]
    if not present:
        return None
    dest = folder.with_name(f"{folder.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():  # two --fresh runs within a second
        n += 1
        dest = folder.with_name(f"{folder.name}.before-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    dest.mkdir(parents=True)
    for name in present:
        os.replace(folder / name, dest / name)
    return dest


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete what interrupted atomic writes left in ``folder`` (``.NAME.*.tmp``, ``.NAME.old``).

    Only safe while nobody writes into ``folder``: call it with the run folder's lock held.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
