"""Forward passes for task scoring: a task's batches, last-position logits, margins, loss and accuracy.

Shared by the learned pruner (`pruning.pruner`), the attribution baseline
(`pruning.attribution`) and whoever measures a model on a task before
pruning it.

Speed: a task needs the logits of one position per prompt, so the forward
pass stops at the ``final_resid`` site and only the last positions are
unembedded (the architecture's fast head, `sparse_lm.arch`; checked against
the full forward pass by `fast_head_ok` before use). For a SparseGPT the last
block also computes only what the last positions need (`_sparse_gpt_last_resid`:
keys and values at every position, the query, attention output and MLP at the
last one; about a fifth of a 4-layer model's work), and the other blocks run
as `_block`: the model's block with every site called as there, but, in bf16,
the query, key and value cast from bf16 one by one (`_qkv`), so no AbsTopK
copies a strided view (a frozen model's sink attention takes SDPA's flash
kernel in the model itself). Examples are grouped by
length into the chunks that pad least (`min_padding_chunks`: a minibatch of 64
quote prompts, ~5.2k real tokens, pads to ~6.1k instead of ~7.5k with greedy
groups). Each of these gives the loss and mask gradients of the plain forward
pass up to float rounding (tests/unit/test_prune_fast_path.py; ``trim=False``,
``min_padding=False`` give the plain pass). With ``precision="bf16-autocast"``
the matrix products run in bfloat16 (AMX on recent CPUs, tensor cores on a
GPU) while margins, losses and every mask stay float32 (`precision_context`);
with ``precision="bf16"`` their rows are padded to one of few sizes
(`bucket_rows`), so oneDNN compiles each product's shape once, not at every
step's new chunk shapes (1.29x per mask step on a trained model, benchmarks/README.md).

The task loss of a batch of margins is computed in one place, `task_loss`,
so an objective other than the binary one can be swapped in there.

    data = load_task_data(tokenizer, cfg, max_length=context_length(model))
    margin, _ = evaluate(model, data.test)
    loss_and_accuracy(margin, data.test.family)     # {"loss": nats, "accuracy": share}
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pruning.circuit import _metric
from pruning.config import PruneConfig
from sparse_lm.adapters import sites_of
from sparse_lm.arch import ARCHS
from sparse_lm.model import SparseGPT
from tasks.contract import encode_plain, resolve_task
from tasks.loss import (
    TaskBatch,
    encode_examples,
    family_mean,
    length_chunks,
    margins,
    task_logits_last,
)
from tasks.registry import get_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["PruneError", "TaskData", "load_task_data", "last_logits", "fast_head_ok", "device_chunks",
           "min_padding_chunks",
           "batch_margins", "evaluate", "task_loss", "loss_and_accuracy", "orientation", "precision_context",
           "PRECISIONS"]

# How the forward and backward passes of pruning compute (`PruneConfig.precision`).
PRECISIONS = ("fp32", "bf16", "bf16-autocast")


class PruneError(ValueError):
    """Pruning cannot produce a circuit (the message says why and what to change)."""


# ---------------------------------------------------------------------------- task data


@dataclass
class TaskData:
    """A task's train / val / test batches for one tokenizer."""

    task: str
    train: TaskBatch
    val: TaskBatch
    test: TaskBatch
    completions: tuple[str, str]
    token_strings: tuple[str, str]
    token_ids: tuple[int, int]

    def to(self, device: torch.device | str) -> "TaskData":
        return TaskData(self.task, self.train.to(device), self.val.to(device), self.test.to(device),
                        self.completions, self.token_strings, self.token_ids)


def load_task_data(tokenizer: PreTrainedTokenizerBase, cfg: PruneConfig, max_length: int | None = None) -> TaskData:
    """Resolve `cfg.task` for `tokenizer` and encode n_train / n_val / n_test examples of its splits."""
    task = get_task(cfg.task)
    batches = {}
    resolved = None
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
        resolved = resolve_task(task, tokenizer, task.examples(split, n, seed=0))
        examples = resolved.examples
        if max_length is not None:  # a prompt longer than the context cannot be scored: drop it
            lengths = [len(ids) for ids in encode_plain(tokenizer, [ex.prompt for ex in examples])]
            examples = [ex for ex, length in zip(examples, lengths) if length <= max_length]
            if len(examples) < len(resolved.examples) / 2 or len({ex.family for ex in examples}) < 2:
                raise PruneError(f"most {split} prompts of {task.name} are longer than the model's context "
                                 f"{max_length}: {len(resolved.examples) - len(examples)} of {len(resolved.examples)}")
        batches[split] = encode_examples(tokenizer, examples, max_length=max_length)
    assert resolved is not None
    return TaskData(task.name, batches["train"], batches["val"], batches["test"], tuple(resolved.completions),
                    tuple(resolved.token_strings), tuple(resolved.token_ids))


# ---------------------------------------------------------------------------- forward passes


class _Stop(Exception):
    """Raised from the final_resid site to end a forward pass once the residual stream is known."""


def _fast_head(model: nn.Module):
    arch = ARCHS.get(getattr(model.config, "model_type", None))
    return None if arch is None else arch.head


def last_logits(model: nn.Module, batch: TaskBatch, *, fast: bool = True, trim: bool = True) -> torch.Tensor:
    """Logits at each prompt's last position, (B, V). With `fast`, the forward pass stops at the
    ``final_resid`` site and only the last positions are unembedded, and with `trim` a SparseGPT's
    last block computes only the last positions' query, attention and MLP (`_sparse_gpt_last_resid`;
    its last-block sites then see (B, 1, width) values). Both are checked against the full forward
    pass by `fast_head_ok`."""
    head = _fast_head(model) if fast else None
    if head is None:
        return task_logits_last(model, batch.input_ids, batch.lengths)
    width = int(batch.lengths.max())
    rows = torch.arange(len(batch), device=batch.input_ids.device)
    last = batch.lengths - 1
    if trim and type(model) is SparseGPT:
        x = _sparse_gpt_last_resid(model, batch.input_ids[:, :width], last)  # (B, d_model)
        return head(model, x, batch.input_ids[rows, last])  # (B, V)
    box: dict[str, torch.Tensor] = {}

    def grab(site, x: torch.Tensor) -> None:
        box["x"] = x
        raise _Stop

    try:
        with sites_of(model).hooked({"final_resid": grab}):
            model(input_ids=batch.input_ids[:, :width])
    except _Stop:
        pass
    return head(model, box["x"][rows, last], batch.input_ids[rows, last])  # (B, V)


def _sparse_gpt_last_resid(model: SparseGPT, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The ``final_resid`` value at position `last` of each row, (B, d_model), by `SparseGPT.forward`
    with its last block cut to what those positions need.

    Every block but the last runs as the model's own (`_block`, which differs only in how it casts the
    bf16 query, key and value, `_qkv`). In the last block the keys and values are
    needed at every position (the last query reads them), but the query, the attention output and
    the MLP only at the last one: nothing after them reads another position. Every site is called
    as in the model (AbsTopK and hooks act per position, so a site sees the same values at the
    positions kept); a mask hook on a last-block site only ever saw a zero gradient at the others.
    """
    B, T = input_ids.shape  # (B, T), right-padded
    if T > model.config.block_size:
        raise ValueError(f"sequence of length {T} is longer than block_size {model.config.block_size}")
    tr = model.transformer
    x = tr.wte(input_ids) + tr.wpe.weight[:T].unsqueeze(0)  # (B, T, d_model)
    for block in tr.h[:-1]:
        x = _block(block, x)
    block = tr.h[-1]
    attn = block.attn
    rows = torch.arange(B, device=input_ids.device)
    x = block.resid_in(x)
    h = attn.act_in(block.ln_1(x))  # (B, T, d_model)
    d_attn, H, D = attn.n_head * attn.d_head, attn.n_head, attn.d_head
    q, k, v = _qkv(attn, h)  # 3 x (B, T, d_attn)
    q = attn.q(q[rows, last].unsqueeze(1)).view(B, 1, H, D).transpose(1, 2)  # (B, nh, 1, hs)
    k = attn.k(k).view(B, T, H, D).transpose(1, 2)  # (B, nh, T, hs)
    v = attn.v(v).view(B, T, H, D).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D))  # (B, nh, 1, T)
    future = torch.arange(T, device=input_ids.device)[None, :] > last[:, None]  # (B, T): after the row's last
    scores = scores.masked_fill(future[:, None, None, :], float("-inf"))
    if attn.sink_logit is not None:  # a key of zeros with logit sink_logit and a value of zeros (slot 0)
        sink = attn.sink_logit.to(scores.dtype).view(1, H, 1, 1).expand(B, H, 1, 1)
        p = torch.cat([sink, scores], dim=-1).softmax(-1)[..., 1:]  # (B, nh, 1, T)
    else:
        p = scores.softmax(-1)
    y = attn.y((p.to(v.dtype) @ v).transpose(1, 2).reshape(B, 1, d_attn))  # (B, 1, d_attn)
    x = x[rows, last].unsqueeze(1) + attn.resid_delta(attn.c_proj(y))  # (B, 1, d_model)
    x = block.resid_mid(F.relu(x) if block.relu_resid else x)
    x = x + block.mlp(block.ln_2(x))
    x = F.relu(x) if block.relu_resid else x
    return model.final_resid(x).squeeze(1)  # (B, d_model)


def _qkv(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value of a SparseGPT attention, 3 x (B, T, d_attn), before their sites, as
    ``attn.c_attn(h).split(d_attn, dim=2)``. Inside precision bf16 the bf16 product is split first and
    each third cast to float32 alone: the same values, but each one contiguous, so the AbsTopK of
    its site copies nothing (a split of the float32 product gives strided views, which it copies)."""
    d_attn = attn.n_head * attn.d_head
    weights = _BF16_WEIGHTS.get(attn.c_attn)
    if weights is None:
        return attn.c_attn(h).split(d_attn, dim=2)
    return bf16_linear(h, *weights, parts=3)


def _block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A SparseGPT `Block.forward` (its attention's forward inlined, every site called as there),
    with the query, key and value from `_qkv`."""
    attn = block.attn
    B, T, _ = x.shape
    H, D = attn.n_head, attn.d_head
    x = block.resid_in(x)
    q, k, v = _qkv(attn, attn.act_in(block.ln_1(x)))  # 3 x (B, T, nh*hs)
    q = attn.q(q).view(B, T, H, D).transpose(1, 2)  # (B, nh, T, hs)
    k = attn.k(k).view(B, T, H, D).transpose(1, 2)
    v = attn.v(v).view(B, T, H, D).transpose(1, 2)
    y = attn.attend(q, k, v)  # (B, nh, T, hs)
    y = attn.y(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, nh*hs)
    x = x + attn.resid_delta(attn.c_proj(y))
    x = block.resid_mid(F.relu(x) if block.relu_resid else x)
    x = x + block.mlp(block.ln_2(x))
    return F.relu(x) if block.relu_resid else x


@torch.no_grad()
def fast_head_ok(model: nn.Module, batch: TaskBatch, n: int = 4) -> bool:
    """Whether the last-position shortcut (and a SparseGPT's trimmed last block) gives the logits of
    the full forward pass."""
    if _fast_head(model) is None:
        return False
    mb = batch.select(slice(0, n))
    full = task_logits_last(model, mb.input_ids, mb.lengths)
    fast = last_logits(model, mb)
    return fast.shape == full.shape and torch.allclose(fast, full, rtol=1e-4, atol=1e-4)


def min_padding_chunks(lengths: torch.Tensor, chunk_tokens: int, overhead_tokens: int = 256) -> list[torch.Tensor]:
    """Row indices grouped by length so that the padded tokens plus `overhead_tokens` per chunk are fewest.

    Each chunk is a run of the rows sorted by length, padded to its longest row, of at most
    `chunk_tokens` padded tokens (a row longer than that is a chunk alone), as in
    `tasks.loss.length_chunks`, which fills each chunk greedily; here a dynamic programme over the
    sorted rows picks the runs, with a fixed cost per chunk for the work a forward pass spends
    whatever its size (Python, one call per op and site). The greedy grouping is one of the
    candidates, so this never costs more. Indices are on the CPU; every row is in exactly one chunk.
    """
    lengths = lengths.cpu()
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].numpy().astype(np.int64)
    n = len(sorted_lengths)
    best = np.zeros(n + 1)  # best[j]: the cost of the first j sorted rows
    cut = np.zeros(n + 1, dtype=np.int64)  # the start of the last chunk of that best grouping
    for j in range(1, n + 1):
        length = int(sorted_lengths[j - 1])
        lo = j - max(1, chunk_tokens // length)  # the longest run padded to `length` that fits
        starts = np.arange(max(lo, 0), j)
        cost = best[starts] + (j - starts) * length + overhead_tokens
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], starts[k]
    chunks: list[torch.Tensor] = []
    j = n
    while j > 0:
        chunks.append(order[int(cut[j]) : j])
        j = int(cut[j])
    return chunks[::-1]


def device_chunks(batch: TaskBatch, chunk_tokens: int, *, min_padding: bool = True) -> list[torch.Tensor]:
    """The batch's rows grouped by length (index tensors on the batch's device): `min_padding_chunks`,
    or with ``min_padding=False`` the greedy `tasks.loss.length_chunks`."""
    group = min_padding_chunks if min_padding else length_chunks
    return [c.to(batch.input_ids.device) for c in group(batch.lengths, chunk_tokens)]


def batch_margins(model: nn.Module, batch: TaskBatch, *, chunk_tokens: int = 8192, fast: bool = True,
                  record: list[str] | None = None, trim: bool = True,
                  min_padding: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Target-minus-distractor margins (B,) in batch order (differentiable under grad) and, for `record`
    sites, their values at the last prompt position ({name: (B, width)}).

    `trim` and `min_padding`: see `last_logits` and `device_chunks` (False: the plain passes, to compare
    against); a `record` turns `trim` off (it reads every site at full length)."""
    sites = sites_of(model)
    chunks = device_chunks(batch, chunk_tokens, min_padding=min_padding)
    values: list[torch.Tensor] = []
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in record or []}
    for idx in chunks:
        mb = batch.select(idx)
        with sites.record(record or []) as rec:
            last = last_logits(model, mb, fast=fast, trim=trim and not record)  # (b, V)
        values.append(margins(last, mb.target_ids, mb.distractor_ids))
        rows = torch.arange(len(mb), device=mb.lengths.device)
        for n in acts:
            acts[n].append(rec[n][rows, mb.lengths - 1].float())  # (b, width)
    inverse = torch.argsort(torch.cat(chunks))  # chunk order -> batch order
    return torch.cat(values)[inverse], {n: torch.cat(v)[inverse] for n, v in acts.items()}


@torch.no_grad()
def evaluate(model: nn.Module, batch: TaskBatch, *, chunk_tokens: int = 8192, fast: bool = True,
             record: list[str] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`batch_margins` without gradients."""
    return batch_margins(model, batch, chunk_tokens=chunk_tokens, fast=fast, record=record)


def precision_context(precision: str, device: torch.device | str, model: nn.Module | None = None) -> ContextManager:
    """The region in which `model` computes at `precision` (a no-op for fp32).

    ``bf16``: every ``nn.Linear`` of the (frozen) model multiplies in bfloat16 with a bf16
    copy of its weights made once on entry, and returns float32; attention, norms, AbsTopK,
    the mask arithmetic, margins and losses stay float32. This beats autocast on CPUs: the
    weights are not cast again at every call, and autocast also runs attention in bf16,
    whose backward pass is several times slower than float32's on CPU.
    ``bf16-autocast``: torch.autocast (every listed op in bf16, attention included).
    """
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16-autocast":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    if precision == "bf16":
        if model is None:
            raise ValueError("precision bf16 needs the model whose linear layers it converts")
        return _bf16_linears(model)
    raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def bucket_rows(m: int) -> int:
    """`m` rounded up to one of few sizes: a multiple of 32 up to 256, then 8 sizes per doubling (at most 12.5%
    more rows). oneDNN builds (JIT-compiles) a bf16 matrix product for each new shape, ~4 ms a shape on this
    CPU against ~1 ms for the product itself at ~2,000 rows, and the pruner's length chunks have new shapes at
    nearly every step; rounded, the shapes recur and oneDNN's primitive cache serves them."""
    if m <= 256:
        return max(32, -(-m // 32) * 32)
    step = 1 << (m.bit_length() - 4)  # m in [2^(L-1), 2^L): 8 sizes of 2^(L-4) each
    return -(-m // step) * step


class _Bf16Linear(torch.autograd.Function):
    """``F.linear(x.to(bf16), w, b).float()`` for frozen bf16 `w` and `b`, with the rows of x (all but the last
    dimension, flattened) zero-padded to `bucket_rows` inside the bf16 cast, so the product has one of few
    shapes; the padding rows are dropped in the cast back. `parts` > 1 splits the output features into that
    many equal float32 parts, each contiguous (q, k and v of one product). The backward gives x's gradient
    the same way (the weights take none). Same casts as the plain expression, no more copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, parts: int):  # type: ignore[override]
        k = x.shape[-1]
        lead, m = x.shape[:-1], x.numel() // max(k, 1)
        rows = bucket_rows(m)
        padded = x.new_empty((rows, k), dtype=torch.bfloat16)
        padded[:m].copy_(x.reshape(m, k))  # the cast to bf16
        padded[m:].zero_()  # rows are independent, but uninitialised ones may hold denormals or NaN: slow, noisy
        out = F.linear(padded, w, b)[:m]  # (m, n) bf16
        ctx.save_for_backward(w)
        ctx.lead, ctx.m, ctx.rows = lead, m, rows
        if parts == 1:
            return out.float().reshape(*lead, -1)
        return tuple(o.float().reshape(*lead, -1) for o in out.split(out.shape[1] // parts, dim=1))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        m, rows, n = ctx.m, ctx.rows, w.shape[0]
        padded = grads[0].new_empty((rows, n), dtype=torch.bfloat16)
        width = n // len(grads)
        for i, g in enumerate(grads):
            padded[:m, i * width : (i + 1) * width].copy_(g.reshape(m, width))
        padded[m:].zero_()
        grad_x = (padded @ w)[:m].float()  # (m, k)
        return grad_x.reshape(*ctx.lead, -1), None, None, None


def bf16_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, parts: int = 1):
    """float32 x times frozen bf16 weights (`_Bf16Linear`): float32 output, or `parts` float32 parts."""
    return _Bf16Linear.apply(x, w, b, parts)


# The bf16 copies (weight, bias) of each nn.Linear inside `_bf16_linears`, for forward passes here that
# multiply with them directly (`_qkv`).
_BF16_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = \
    weakref.WeakKeyDictionary()


@contextmanager
def _bf16_linears(model: nn.Module) -> Iterator[None]:
    """Each nn.Linear of `model` computes in bf16 (weights cast once, frozen) and returns float32."""
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("precision bf16 casts the weights once: freeze the model first (pruning.pruner.frozen)")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and "forward" not in vars(m)]

    try:
        for lin in linears:
            w = lin.weight.detach().to(torch.bfloat16)
            b = None if lin.bias is None else lin.bias.detach().to(torch.bfloat16)
            lin.forward = lambda x, w=w, b=b: bf16_linear(x, w, b)  # an instance attribute shadows the method
            _BF16_WEIGHTS[lin] = (w, b)
        yield
    finally:
        for lin in linears:
            vars(lin).pop("forward", None)
            _BF16_WEIGHTS.pop(lin, None)


def task_loss(margin: torch.Tensor, family: torch.Tensor) -> torch.Tensor:
    """The task loss of target-minus-distractor margins (B,): family-averaged softplus(-margin), differentiable.

    The one place the pruner's objective is defined: mask training, the bisection, the
    calibration fit and every reported loss go through it.
    """
    return family_mean(F.softplus(-margin), family)


def loss_and_accuracy(margin: torch.Tensor, family: torch.Tensor) -> dict[str, float]:
    """Family-averaged task loss (nats) and accuracy of target-minus-distractor margins."""
    loss = task_loss(margin.double(), family)
    acc = family_mean((margin > 0).double(), family)
    return _metric(loss.item(), acc.item())


def orientation(family: torch.Tensor) -> torch.Tensor:
    """+1 for family 0, -1 for family 1: margin = orientation x (logit(c0) - logit(c1))."""
    return 1.0 - 2.0 * family.float()
