"""Weight sparsity: top-|w| projection after every step, L0 annealing, sharkfin LR.

After every optimizer step each weight matrix keeps only its largest-|w|
entries (its target count of nonzeros) and the rest are set to zero; a zeroed
entry may come back later if its gradient grows it. Before the global top-k,
each MLP neuron keeps at least ``min_fan`` inputs and outputs, each q/k/v
channel ``min_fan`` inputs and each attention output channel ``min_fan``
outputs, so that no unit dies of the projection.

The kept fraction anneals linearly from 1 (dense) to the target, and the
learning rate follows the paper's "sharkfin": warmup, linear decay, times
``1 / sqrt(current fraction)``, so it rises as the model gets sparser and the
base lr is the lr at the dense start (the paper's learning rates transfer).

DeepSpeed keeps its own fp32 master weights (ZeRO-1/2, bf16) and optimizer
moments; zeroing the module alone would be undone at the next step.
:func:`apply_masks` therefore zeroes, on each rank, the module weights and the
rank's own fragment of the master weights (and, with ``zero_moments``, of the
Adam moments; the paper projects the weights only). The masks are
computed from the module weights, which are identical on every rank, so every
rank makes the same choice without any communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparse_lm.config import field


@dataclass
class SparsityConfig:
    enabled: bool = field(True, "project weights to their target L0 after every step (false: dense training)")
    target_fraction: float = field(1 / 16, "kept fraction of nonzeros of each block matrix at the end of annealing")
    embed_fraction: float | None = field(None, "kept fraction of wte and wpe (None: same as target_fraction)")
    unembed_fraction: float | None = field(None, "kept fraction of lm_head (None: same as target_fraction)")
    anneal_start: float = field(0.01, "fraction of training at which the L0 annealing starts (dense before)")
    anneal_end: float = field(0.5, "fraction of training at which the target fraction is reached")
    min_fan: int = field(4, "nonzero inputs/outputs every neuron and q/k/v/attn-out channel keeps (0: none)")
    zero_moments: bool = field(False, "also zero the Adam moments of pruned entries at each projection "
                                      "(paper: weights only)")

    def validate(self) -> None:
        for name in ("target_fraction", "embed_fraction", "unembed_fraction"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise ValueError(f"sparsity.{name} must be in (0, 1], got {v}")
        if not 0 <= self.anneal_start <= self.anneal_end <= 1:
            raise ValueError(
                f"need 0 <= sparsity.anneal_start ({self.anneal_start}) <= anneal_end ({self.anneal_end}) <= 1"
            )
        if self.min_fan < 0:
            raise ValueError(f"sparsity.min_fan must be >= 0, got {self.min_fan}")


# ---------------------------------------------------------------------------
# schedules (pure functions of the step: a resumed run needs only the step)


def anneal_progress(step: int, total_steps: int, start: float, end: float) -> float:
    """0 before ``start``, 1 after ``end`` (fractions of training), linear between."""
    t = step / max(total_steps, 1)
    if end <= start:
        return 1.0 if t >= end else 0.0
    return min(max((t - start) / (end - start), 0.0), 1.0)


def kept_fraction(target: float, progress: float) -> float:
    """Kept fraction at annealing progress ``progress``: linear from 1 to ``target``."""
    return 1.0 + (target - 1.0) * progress


def sharkfin_lr(step: int, total_steps: int, base_lr: float, warmup: float = 0.01,
                current_fraction: float = 1.0) -> float:
    """Linear warmup over ``warmup`` of training, linear decay to 0, times 1/sqrt(current kept fraction).

    The paper's normalisation: the factor is 1 while the model is dense, so ``base_lr``
    is the dense-start lr; at kept fraction f it is 1/sqrt(f) (4x at f = 1/16).
    """
    warm = max(int(warmup * total_steps), 1)
    if step < warm:
        shape = (step + 1) / warm
    else:
        shape = max(total_steps - step, 0) / max(total_steps - warm, 1)
    return base_lr * shape / math.sqrt(current_fraction)


# ---------------------------------------------------------------------------
# which units need a minimum fan-in/fan-out, from the parameter name


def fan_constraints(name: str, min_fan: int) -> list[int]:
    """Dims along which every slice keeps >= min_fan nonzeros (1: per row, 0: per column).

    nn.Linear weights are (out, in): a row is one output unit's inputs, a
    column is one input unit's outputs.
    """
    if min_fan <= 0:
        return []
    if name.endswith("attn.c_attn.weight"):
        return [1]  # every q/k/v channel keeps min_fan inputs
    if name.endswith("attn.c_proj.weight"):
        return [0]  # every attention output channel (head dim) keeps min_fan outputs
    if name.endswith("mlp.c_fc.weight"):
        return [1]  # every neuron keeps min_fan inputs
    if name.endswith("mlp.c_proj.weight"):
        return [0]  # ... and min_fan outputs
    return []


def matrix_fraction(name: str, cfg: SparsityConfig, fraction: float, progress: float) -> float:
    """The kept fraction of one matrix now (embeddings may anneal to their own target)."""
    if name.endswith(("wte.weight", "wpe.weight")) and cfg.embed_fraction is not None:
        return kept_fraction(cfg.embed_fraction, progress)
    if name.endswith("lm_head.weight") and cfg.unembed_fraction is not None:
        return kept_fraction(cfg.unembed_fraction, progress)
    return fraction


def target_count(numel: int, fraction: float) -> int:
    return max(1, min(numel, round(fraction * numel)))


@torch.no_grad()
def topk_mask(w: torch.Tensor, k: int, fan_dims: list[int] = (), min_fan: int = 0) -> torch.Tensor:
    """Bool mask of the k largest |w|, after forcing in the top ``min_fan`` of every slice.

    If the forced entries alone exceed k, they are all kept (L0 = forced count);
    :func:`check_fan_budget` rejects such configs up front.
    """
    score = w.detach().abs().float().contiguous()
    fast = _topk_mask_compiled(score, k, fan_dims, min_fan)
    if fast is not None:
        return fast
    # |w| >= 0, so its float32 bits as int32 sort like its value (inf above every finite
    # value): torch.topk on the integers is ~1.4x faster on CPU than on the floats.
    keys = score.view(torch.int32)
    if fan_dims and min_fan > 0:
        forced = []
        for dim in fan_dims:
            # each slice as a contiguous row: topk along the last dim is ~1.6x faster than a strided one
            idx = keys.movedim(dim, -1).contiguous().topk(min(min_fan, score.shape[dim]), sorted=False).indices
            forced.append(_flat_index(score, dim, idx.movedim(-1, dim)).reshape(-1))
        forced = torch.cat(forced)
        score.view(-1).index_fill_(0, forced, float("inf"))  # forced entries rank above all others
        k = max(k, int(torch.unique(forced).numel()))
    if k >= score.numel():
        return torch.ones_like(score, dtype=torch.bool)
    idx = keys.view(-1).topk(k, sorted=False).indices
    return torch.zeros(score.numel(), dtype=torch.bool, device=w.device).scatter_(0, idx, True).view(w.shape)


def _topk_mask_compiled(score: torch.Tensor, k: int, fan_dims, min_fan: int) -> torch.Tensor | None:
    """:func:`topk_mask` by the compiled AbsTopK op (~2x faster on CPU), or None where it is not in use.

    Same kept set as the torch.topk path; of equal |w| at the k-th value the lowest flat index is kept.
    """
    from sparse_lm.topk import topk_rows_mask_fast

    if fan_dims and min_fan > 0:
        forced, most = None, 0
        for dim in fan_dims:
            m = min(min_fan, score.shape[dim])
            if m >= score.shape[dim]:
                return None  # a slice kept whole: the torch path handles it
            slice_mask = topk_rows_mask_fast(score.movedim(dim, -1), m)  # (..., slice) rows
            if slice_mask is None:
                return None
            slice_mask = slice_mask.movedim(-1, dim)
            forced = slice_mask if forced is None else forced | slice_mask
            most += m * (score.numel() // score.shape[dim])  # m per slice
        # Over budget (check_fan_budget rejects it): L0 depends on ties, use torch's. Counted only
        # when the bound allows it: the count of a whole bool matrix costs as much as its selection.
        if most > k and int(forced.count_nonzero()) > k:
            return None
        score.masked_fill_(forced, float("inf"))  # forced entries rank above all others (score is our copy)
    if k >= score.numel():
        return torch.ones_like(score, dtype=torch.bool)
    mask = topk_rows_mask_fast(score.view(1, -1), k)  # one row: the whole matrix
    return None if mask is None else mask.view(score.shape)


def _flat_index(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """Flat indices into contiguous ``t`` of ``idx``, positions along ``dim`` (as ``t.topk(dim=dim)`` gives)."""
    flat = idx * t.stride(dim)
    for d in range(t.dim()):
        if d != dim % t.dim():
            shape = [1] * t.dim()
            shape[d] = t.shape[d]
            flat = flat + torch.arange(t.shape[d], device=t.device).view(shape) * t.stride(d)
    return flat


def check_fan_budget(matrices: dict[str, nn.Parameter], cfg: SparsityConfig) -> None:
    """Fail early when min_fan forces more nonzeros than a matrix's target allows."""
    if not cfg.enabled:
        return
    for name, p in matrices.items():
        dims = fan_constraints(name, cfg.min_fan)
        if not dims:
            continue
        frac = matrix_fraction(name, cfg, cfg.target_fraction, 1.0)
        k = target_count(p.numel(), frac)
        forced = sum(cfg.min_fan * p.shape[1 - d] for d in dims)
        if forced > k:
            raise ValueError(
                f"sparsity.min_fan={cfg.min_fan} forces up to {forced} nonzeros in {name} {tuple(p.shape)}, "
                f"but target_fraction {frac:g} keeps only {k}: raise target_fraction to >= "
                f"{forced / p.numel():.4g} or lower min_fan"
            )


def _projected(matrices: dict[str, nn.Parameter], cfg: SparsityConfig, step: int, total_steps: int):
    """(name, matrix, kept count, fan dims) of every matrix projected at ``step`` (not those still dense)."""
    progress = anneal_progress(step, total_steps, cfg.anneal_start, cfg.anneal_end)
    fraction = kept_fraction(cfg.target_fraction, progress)
    for name, p in matrices.items():
        frac = matrix_fraction(name, cfg, fraction, progress)
        if frac < 1.0:
            yield name, p, target_count(p.numel(), frac), fan_constraints(name, cfg.min_fan)


@torch.no_grad()
def compute_masks(matrices: dict[str, nn.Parameter], cfg: SparsityConfig, step: int,
                  total_steps: int) -> dict[str, torch.Tensor]:
    return {name: topk_mask(p, k, dims, cfg.min_fan)
            for name, p, k, dims in _projected(matrices, cfg, step, total_steps)}


@torch.no_grad()
def project(matrices: dict[str, nn.Parameter], cfg: SparsityConfig, step: int, total_steps: int,
            optimizer=None, *, zero_moments: bool = False) -> None:
    """The projection after an optimizer step: :func:`compute_masks` then :func:`apply_masks`, the same kept sets.

    A plain float32 matrix (no DeepSpeed master fragment, moments left alone) is projected in place by one
    compiled call (:func:`sparse_lm.topk.project_topk_`, ~2x faster than the masks); any other matrix, or one
    the op declines, takes the mask path.
    """
    from sparse_lm.topk import project_topk_

    masks = {}
    for name, p, k, dims in _projected(matrices, cfg, step, total_steps):
        fused = not zero_moments and getattr(p, "_hp_mapping", None) is None
        if not (fused and project_topk_(p.data, k, dims, cfg.min_fan)):
            masks[name] = topk_mask(p, k, dims, cfg.min_fan)
    apply_masks(matrices, masks, optimizer, zero_moments=zero_moments)


def _base_optimizer(optimizer) -> torch.optim.Optimizer | None:
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


@torch.no_grad()
def apply_masks(matrices: dict[str, nn.Parameter], masks: dict[str, torch.Tensor], optimizer=None, *,
                zero_moments: bool = False) -> None:
    """Zero the masked-off entries in the module and the master weights (and Adam moments if ``zero_moments``).

    Works for a plain torch optimizer, DeepSpeed ZeRO-0 (fp32 and bf16) and ZeRO-1/2:
    where a parameter has a DeepSpeed ``_hp_mapping``, only this rank's fragment
    of the flat fp32 partition (and of each optimizer state) is touched.
    """
    base = _base_optimizer(optimizer)
    for name, mask in masks.items():
        p = matrices[name]
        p.data.masked_fill_(~mask, 0)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            addr = mapping.lp_fragment_address
            frag = mask.reshape(-1).narrow(0, addr.start, addr.numel)
            mapping.get_hp_fragment().masked_fill_(~frag, 0)
            for state in (mapping.optim_fragment or {}).values() if zero_moments else ():
                state.masked_fill_(~frag, 0)
        elif zero_moments and base is not None and p in base.state:
            for value in base.state[p].values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.masked_fill_(~mask, 0)


@torch.no_grad()
def nonzero_fractions(matrices: dict[str, nn.Parameter]) -> dict[str, float]:
    return {name: float((p != 0).float().mean()) for name, p in matrices.items()}
