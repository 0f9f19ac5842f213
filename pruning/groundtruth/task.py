"""A compiled program's task: every input (or a sample), and the class the program outputs at each position.

Unlike the two-completion tasks of `tasks.loss.TaskBatch` (one decision at the
last prompt position), a RASP program answers at every position after BOS with
one of its C output values. `SequenceTask` holds those answers as class indices
aligned with the input positions (``-100``: no answer there: BOS, padding, or a
``None`` output), and `sequence_task_loss` is the multi-class counterpart of
`tasks.loss.binary_task_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class SequenceTask:
    """Right-padded inputs (BOS first) and per-position class targets."""

    input_ids: torch.Tensor  # (B, T) long, BOS at 0, right-padded with the pad id
    lengths: torch.Tensor  # (B,) long: real positions per row, BOS included
    targets: torch.Tensor  # (B, T) long: class index, or IGNORE where the program gives no answer
    classes: list[Any] = field(default_factory=list)  # class index -> the program's output value
    tokens: list[list[Any]] = field(default_factory=list)  # the inputs as the program sees them (no BOS)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def answered(self) -> torch.Tensor:
        """(B, T) bool: the positions that carry a target."""
        return self.targets != IGNORE

    def to(self, device: str | torch.device) -> SequenceTask:
        return SequenceTask(self.input_ids.to(device), self.lengths.to(device), self.targets.to(device),
                            self.classes, self.tokens)

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> SequenceTask:
        """A sub-task (a minibatch, a split), padding trimmed to its longest row."""
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        else:
            rows = torch.as_tensor(index, dtype=torch.long).tolist()
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        lengths = self.lengths[idx]
        width = int(lengths.max()) if len(rows) else 0
        return SequenceTask(self.input_ids[idx][:, :width], lengths, self.targets[idx][:, :width], self.classes,
                            [self.tokens[i] for i in rows] if self.tokens else [])

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if f.name not in ("classes", "tokens")]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys():
            raise KeyError(f"SequenceTask has no field {key!r}; fields: {self.keys()}")
        return getattr(self, key)


def sequence_task_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) over the answered positions: (B, T, C) logits, (B, T) targets.

    loss: mean cross-entropy over every answered position (float32).
    accuracy: share of rows whose every answered position is argmax-correct (a program's output
    is right only when the whole sequence is).
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits (B, T, C) and targets (B, T) disagree: {tuple(logits.shape)} vs "
                         f"{tuple(targets.shape)}")
    targets = targets.to(logits.device)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    answered = targets != IGNORE
    right = (logits.argmax(-1) == targets) | ~answered  # (B, T)
    accuracy = right.all(dim=1).float().mean()
    return loss, accuracy
