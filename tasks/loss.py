"""Task batches and the binary task loss, shared by evaluation, pruning and bridges.

The task loss (SPEC §4) is the cross-entropy of a softmax restricted to the
two completion tokens at the last prompt position:
``-log(e^t / (e^t + e^d)) = softplus(d - t)`` for target logit t and
distractor logit d. It is averaged within each family, then over the two
families, so a model cannot lower it by favouring the larger family.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from tasks.contract import TaskTokenizationError, encode_plain, next_token, tokenizer_label

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tasks.task import Example

__all__ = ["TaskBatch", "encode_examples", "task_logits_last", "binary_task_loss", "family_mean", "margins"]


@dataclass
class TaskBatch:
    """Right-padded prompts and their two completion ids. Also usable as a mapping (``batch["lengths"]``)."""

    input_ids: torch.Tensor  # (B, T) long, right-padded
    lengths: torch.Tensor  # (B,) long: prompt lengths; the decision is made at position lengths - 1
    target_ids: torch.Tensor  # (B,) long
    distractor_ids: torch.Tensor  # (B,) long
    family: torch.Tensor  # (B,) long, 0 or 1

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: str | torch.device) -> TaskBatch:
        return TaskBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> TaskBatch:
        """A sub-batch (e.g. a random minibatch for pruning), with padding trimmed to its longest prompt."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        lengths = self.lengths[index]
        width = int(lengths.max()) if lengths.numel() else 0
        return TaskBatch(
            input_ids=self.input_ids[index][:, :width],
            lengths=lengths,
            target_ids=self.target_ids[index],
            distractor_ids=self.distractor_ids[index],
            family=self.family[index],
        )

    # Mapping-style access, so that code written against the dict form keeps working.
    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys():
            raise KeyError(f"TaskBatch has no field {key!r}; fields: {self.keys()}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_length: int | None = None,
    pad_id: int | None = None,
) -> TaskBatch:
    """Tokenize examples (no special tokens) into a right-padded `TaskBatch`.

    The examples should come from `tasks.contract.resolve_task(task, tokenizer)`, which guarantees that
    each completion is the prompt's real next token; here each completion is only
    checked to add exactly one token to its prompt (that token is its id).
    `max_length` (e.g. the model's context) is a hard limit: a longer prompt is an
    error, since cutting it could remove the cue.
    """
    if not examples:
        raise ValueError("encode_examples got no examples")
    prompts = encode_plain(tokenizer, [ex.prompt for ex in examples])
    # Each completion's id is the token it adds after its prompt (see tasks.contract).
    target_ids = _completion_ids(tokenizer, examples, prompts, [ex.target for ex in examples])
    distractor_ids = _completion_ids(tokenizer, examples, prompts, [ex.distractor for ex in examples])
    longest = max(len(p) for p in prompts)
    if max_length is not None and longest > max_length:
        worst = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        raise ValueError(
            f"prompt {worst} is {longest} tokens, longer than max_length {max_length}; "
            "use a model with a longer context or shorter prompts"
        )
    if pad_id is None:
        # Any id works: right padding sits after the decision position, which causal attention never lets it reach.
        pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)  # (B, T)
    for row, ids in enumerate(prompts):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return TaskBatch(
        input_ids=input_ids,
        lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        distractor_ids=torch.tensor(distractor_ids, dtype=torch.long),
        family=torch.tensor([ex.family for ex in examples], dtype=torch.long),
    )


def _completion_ids(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], prompts: list[list[int]], completions: list[str]
) -> list[int]:
    """The token each completion adds after its prompt; an error if it adds anything but one token."""
    extended = encode_plain(tokenizer, [ex.prompt + c for ex, c in zip(examples, completions)])
    ids = [next_token(p, e) for p, e in zip(prompts, extended)]
    for row, token in enumerate(ids):
        if token is None:
            raise TaskTokenizationError(
                f"example {row}: completion {completions[row]!r} does not add exactly one token to its prompt for "
                f"tokenizer {tokenizer_label(tokenizer)} (it ends as "
                f"{tokenizer.convert_ids_to_tokens(extended[row][len(prompts[row]) - 1 :])}); "
                "resolve the task for this tokenizer first (Task.resolve) and encode the examples it keeps"
            )
    return ids  # type: ignore[return-value]


def length_chunks(lengths: torch.Tensor, chunk_tokens: int, max_rows: int | None = None) -> list[torch.Tensor]:
    """Row indices grouped by prompt length, each group at most ``chunk_tokens`` padded tokens (and
    ``max_rows`` rows): a task's prompts range from ~20 to ~200 tokens, and one right-padded batch would
    spend most of its work on padding. Indices are on the CPU; every row is in exactly one group."""
    lengths = lengths.cpu()
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()
    chunks, start = [], 0
    for i in range(1, len(order) + 1):
        # the group [start, i) is padded to sorted_lengths[i - 1] (ascending); adding row i pads to sorted_lengths[i]
        if (i == len(order) or (i + 1 - start) * sorted_lengths[i] > chunk_tokens
                or (max_rows is not None and i - start >= max_rows)):
            chunks.append(order[start:i])
            start = i
    return chunks


def task_logits_last(model: Any, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Logits at each prompt's last position: (B, T) right-padded ids, (B,) lengths -> (B, V).

    Works for any model called as ``model(input_ids=...)`` that returns ``.logits``
    (our SparseGPT, `GPT2LMHeadModel`, `LlamaForCausalLM`), a tuple whose first item
    is the logits, or the logits tensor. No attention mask is passed: with right
    padding and causal attention, no real position can see a pad token.

    A model whose forward names a ``logits_to_keep`` argument (transformers' causal
    LMs, SparseGPT) unembeds only the last positions (see `_logits_to_keep_mode`):
    the full (B, T, V) logits of a large-vocabulary model are GBs per batch and a
    fifth of its forward.
    """
    if input_ids.dim() != 2 or lengths.shape != input_ids.shape[:1]:
        raise ValueError(
            f"input_ids must be (B, T) and lengths (B,), got {tuple(input_ids.shape)} and {tuple(lengths.shape)}"
        )
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > input_ids.shape[1]):
        low, high = int(lengths.min()), int(lengths.max())
        raise ValueError(f"lengths must lie in [1, {input_ids.shape[1]}], got [{low}, {high}]")
    width = int(lengths.max())
    input_ids = input_ids[:, :width]  # columns past the longest prompt are padding only
    last = lengths.to(input_ids.device) - 1  # (B,)
    keep_mode = _logits_to_keep_mode(model)
    if keep_mode is None:
        logits = _logits_of(model(input_ids=input_ids))  # (B, T, V)
        column, kept, what = last, width, f"T={width}"
    else:
        if keep_mode == "rows":
            # (B, 1) positions: row b keeps only its own last position, which is then its column 0.
            keep, column = last[:, None], torch.zeros_like(last)
        else:
            # The sorted distinct last positions, kept in every row; row b reads the column of its own.
            keep, column = torch.unique(last, sorted=True, return_inverse=True)  # (U,), (B,)
        logits = _logits_of(model(input_ids=input_ids, logits_to_keep=keep))  # (B, kept, V)
        kept = keep.shape[-1]
        what = f"kept={kept} for logits_to_keep of shape {tuple(keep.shape)}"
    if logits.dim() != 3 or logits.shape[:2] != (input_ids.shape[0], kept):
        raise ValueError(f"{type(model).__name__}: expected logits (B={input_ids.shape[0]}, {what}, V), "
                         f"got {tuple(logits.shape)}")
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, column.to(logits.device)]  # (B, V)


def _logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: ``.logits``, a tuple's first item, or the tensor itself."""
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits


KeepMode = Literal["rows", "positions"] | None
# nn.Module class -> how its forward takes `logits_to_keep` (a signature lookup per call is not free).
_KEEP_MODE: dict[type, KeepMode] = {}


def _logits_to_keep_mode(model: Any) -> KeepMode:
    """How ``model`` takes ``logits_to_keep``: None when its forward does not name it (a bare ``**kwargs``
    does not count: a catch-all may drop it); "positions" for a 1-D tensor of positions kept in every
    row (transformers' documented form; SparseGPT's); "rows" for a (B, 1) tensor, each row its own
    position, when the model's module slices with transformers' shared helper and that helper takes
    2-D positions (transformers 5.x). A model that slices by itself (transformers 4.x, remote code)
    may read a 2-D tensor as positions for every row and return (B, B, 1, V) logits, so "rows" needs
    that exact helper, checked on a small tensor."""
    if not isinstance(model, torch.nn.Module):
        return "positions" if _names_logits_to_keep(model) else None  # a plain callable: not cached by class
    cls = type(model)
    if cls not in _KEEP_MODE:
        mode: KeepMode = None
        if _names_logits_to_keep(model.forward):
            module = sys.modules.get(cls.__module__)
            helper = getattr(module, "slice_logits_to_keep", None)
            mode = "rows" if helper is not None and _slices_rows(helper) else "positions"
        _KEEP_MODE[cls] = mode
    return _KEEP_MODE[cls]


def _names_logits_to_keep(fn: Any) -> bool:
    try:
        parameter = inspect.signature(fn).parameters.get("logits_to_keep")
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def _slices_rows(helper: Any) -> bool:
    """Whether transformers' ``slice_logits_to_keep(hidden, keep)`` keeps position keep[b, 0] of row b."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    if helper is not slice_logits_to_keep:  # a model's own slicing: its 2-D semantics are unknown
        return False
    hidden = torch.arange(6.0).view(2, 3, 1)  # (B=2, T=3, H=1): value = 3 * row + position
    try:
        out = helper(hidden, torch.tensor([[2], [0]]))
    except (IndexError, RuntimeError, TypeError, ValueError):
        return False
    return out.shape == (2, 1, 1) and out.flatten().tolist() == [2.0, 3.0]


def margins(last_logits: torch.Tensor, target_ids: torch.Tensor, distractor_ids: torch.Tensor) -> torch.Tensor:
    """Target logit minus distractor logit, in float32: (B, V) -> (B,)."""
    device = last_logits.device
    target = last_logits.gather(1, target_ids.to(device)[:, None]).squeeze(1)
    distractor = last_logits.gather(1, distractor_ids.to(device)[:, None]).squeeze(1)
    return target.float() - distractor.float()


def family_mean(values: torch.Tensor, family: torch.Tensor) -> torch.Tensor:
    """Mean within each family present, then the mean over those families (differentiable)."""
    family = family.to(values.device)
    sums = torch.zeros(2, dtype=values.dtype, device=values.device).index_add(0, family, values)
    counts = torch.bincount(family, minlength=2)[:2]
    present = counts > 0
    return (sums[present] / counts[present].to(values.dtype)).mean()


def binary_task_loss(
    last_logits: torch.Tensor,
    target_ids: torch.Tensor,
    distractor_ids: torch.Tensor,
    family: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy), both scalars averaged per family then over families.

    loss: cross-entropy of the two-way softmax [target, distractor] = softplus(d - t).
    accuracy: share of examples whose target logit is strictly above the distractor's.
    """
    margin = margins(last_logits, target_ids, distractor_ids)  # (B,)
    loss = family_mean(F.softplus(-margin), family)
    accuracy = family_mean((margin > 0).float(), family)
    return loss, accuracy
