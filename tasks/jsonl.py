"""Tasks brought as JSONL files: one ``{"prompt", "target", "distractor"}`` object per line.

The file must use exactly two distinct target strings; each row's distractor
must be the other one. Family 0 is the target string that appears first in
the file. An optional ``"continuation"`` (the code that follows the prompt,
starting with the target) lets the tokenization contract check the target
against the written code too. Rows are split into train/val/test by the hash
of their prompt, like generated tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.task import Example, Task

__all__ = ["load_jsonl_task"]

REQUIRED_KEYS = ("prompt", "target", "distractor")


def load_jsonl_task(path: str | Path, name: str | None = None, description: str | None = None) -> Task:
    """Read a JSONL task file; the task is named after the file unless `name` is given (not registered)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSONL task file at {str(path)!r}")
    raw: list[tuple[int, dict[str, str]]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}:{lineno}: expected an object with keys {list(REQUIRED_KEYS)}, got {type(row).__name__}"
            )
        missing = [key for key in REQUIRED_KEYS if key not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing key(s) {missing}; each row needs {list(REQUIRED_KEYS)}")
        for key in (*REQUIRED_KEYS, "continuation"):
            if key in row and not (isinstance(row[key], str) and row[key]):
                raise ValueError(f"{path}:{lineno}: {key!r} must be a non-empty string, got {row[key]!r}")
        raw.append((lineno, row))
    if not raw:
        raise ValueError(f"{path} has no rows")

    targets = list(dict.fromkeys(row["target"] for _, row in raw))  # first-seen order
    if len(targets) != 2:
        shown = targets[:10] + (["..."] if len(targets) > 10 else [])
        raise ValueError(f"{path} uses {len(targets)} distinct target string(s) {shown}; a task needs exactly two")

    examples: dict[str, Example] = {}
    for lineno, row in raw:
        family = targets.index(row["target"])
        if row["distractor"] != targets[1 - family]:
            raise ValueError(
                f"{path}:{lineno}: distractor {row['distractor']!r} is not the other target string "
                f"{targets[1 - family]!r}"
            )
        example = Example(row["prompt"], row["target"], row["distractor"], family, row.get("continuation", ""))
        earlier = examples.get(example.prompt)
        if earlier is not None and earlier.target != example.target:
            raise ValueError(
                f"{path}:{lineno}: this prompt already appeared with target {earlier.target!r}, now {example.target!r}"
            )
        examples.setdefault(example.prompt, example)  # exact duplicates count once
    return Task(
        name=name or path.stem,
        description=description or f"loaded from {path}",
        completion_options=((targets[0], targets[1]),),
        rows=tuple(examples.values()),
        source=str(path),
    )
