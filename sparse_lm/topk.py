"""Exact row-wise top-k selection, fast on CPU: the selection inside AbsTopK.

Three paths keep the k largest |x| of every row; ``SPARSE_LM_ABSTOPK`` picks one:

* ``cpp`` (the default on CPU, ``auto``): a small C++ op (``csrc/abstopk.cpp``)
  compiled on first use with ``torch.utils.cpp_extension`` into torch's
  extension cache: a bit-by-bit search for the k-th largest key by vectorized
  counting, one fused pass writing mask and output, rows on torch's threads.
  ~5x faster than ``torch.topk`` at the model's widths (benchmarks/README.md).
  If it cannot be built (no compiler, not x86/GCC-compatible), ``auto`` warns
  once and uses ``histogram``; ``cpp`` raises.
* ``histogram``: pure torch, a per-row histogram finds the bucket of the k-th
  largest and only that bucket is ranked exactly (rows of >= 512), else
  ``torch.topk`` on the bits of |x| read as integers.
* ``torch``: ``torch.topk`` + scatter, the reference the others are tested against.

Tie rule: ``cpp`` keeps, of several equal |x| at the k-th value, those in the
lowest columns (-0.0 and +0.0 are equal), and so does ``histogram`` on rows of
>= 512; ``torch`` (and ``histogram`` on narrower rows) keeps whichever
``torch.topk`` returns. Apart from ties all paths keep the same set.
Non-CPU tensors always use ``torch.topk``.

The compiled library also carries :func:`gate_backward`, the backward of a
per-channel gate ``x * m + c`` in one pass (the pruner's mean ablation); it runs
where the compiled AbsTopK does, in float32, and falls back to four torch ops.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

# ---------------------------------------------------------------------------
# exact top-k selection along rows, fast on CPU (AbsTopK)


_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _topk_by_torch(score: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 0/1 mask of the k largest entries of each row of ``score >= 0`` by torch.topk."""
    if score.dtype in _INT_VIEW:  # a non-negative float's bits sort like its value; ints compare faster
        score = score.contiguous().view(_INT_VIEW[score.dtype])
    idx = score.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(score, dtype=torch.uint8).scatter_(-1, idx, 1)


def _sparse_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices, in no particular order, of the ones of a sparse uint8 0/1 tensor.

    ``nonzero`` costs ~1 ns per element. Read as 8-byte words it scans 8x fewer;
    each nonzero word is then peeled one set byte at a time (lowest set bit,
    ``w & -w``, is bit 8b of byte b on a little-endian machine).
    """
    flat = mask.reshape(-1)
    if flat.numel() % 8 or sys.byteorder != "little":
        return flat.nonzero().squeeze(1)
    words = flat.view(torch.int64)
    at = words.nonzero().squeeze(1)  # words holding a one
    w = words.index_select(0, at)
    found = []
    while w.numel():
        low = w & -w  # 2**(8b): its float64 exponent field is exactly 1023 + 8b
        found.append(at * 8 + ((low.double().view(torch.int64) >> 52) - 1023 >> 3))
        w = w ^ low
        more = (w != 0).nonzero().squeeze(1)
        w, at = w.index_select(0, more), at.index_select(0, more)
    return torch.cat(found) if found else at


# Row offsets are added in float32 while exact (below 2**24 buckets in all), else in int64.
_FLOAT_OFFSETS_LIMIT = 2**24
_MIN_HISTOGRAM_WIDTH = 512


def _buckets(rows: int, n: int) -> int:
    # More buckets: a bigger histogram (rows x buckets); fewer: more entries to rank in the
    # k-th bucket (about n / buckets per row). A single long row affords many buckets.
    return min(max(n // 2, 64), max(256, 2**16 // rows))


def _rank_order(score: torch.Tensor, sf: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
    """Order of the flat positions ``pos`` by (row, score descending, column)."""
    rows = score.shape[0]
    r = pos.div(n, rounding_mode="floor")
    vb, cb = 31, max(n - 1, 1).bit_length()
    if score.dtype in (torch.float32, torch.bfloat16, torch.float16) and rows.bit_length() + vb + cb <= 63:
        # One int64 key, unique per entry: the float32 bits of a score >= 0 sort like its value.
        desc = 2**vb - 1 - sf.view(-1).index_select(0, pos).view(torch.int32).to(torch.int64)
        return ((r << (vb + cb)) | (desc << cb) | (pos - r * n)).sort().indices
    pos_order = pos.sort().indices  # stable sorts below then keep the column order among equal scores
    order = score.reshape(-1).index_select(0, pos.index_select(0, pos_order)).sort(descending=True, stable=True).indices
    order = pos_order.index_select(0, order)
    return order.index_select(0, r.index_select(0, order).sort(stable=True).indices)


@torch.no_grad()
def _topk_rows_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 0/1 mask of the ``k`` largest entries of each row of ``score`` (rows, n), ``score >= 0``.

    Exactly ``k`` ones per row. On CPU, torch.topk costs ~12 ns per element (a
    selection on (value, index) pairs per row), about as much as the matmuls
    around an AbsTopK. Instead:

    1. bucket every entry, ``q = floor(score * B / rowmax)`` in [0, B]: monotone in
       the score within a row;
    2. one ``bincount`` over all rows and a cumulative sum give, per row, the
       bucket ``j`` holding the k-th largest and how many entries ``need`` to take
       from it; every entry above bucket ``j`` is kept;
    3. the entries of bucket ``j`` (a few per row) are sorted by (row, score
       descending, column) and the first ``need`` of each row kept.

    That is torch.topk's set exactly, up to ties at the k-th value, which go to
    the lowest column. Rows with inf or nan, inputs whose k-th bucket is crowded
    (rows of mostly exact zeros) and non-CPU tensors use torch.topk instead.
    """
    rows, n = score.shape
    # torch.topk is fast on accelerators, and on CPU it wins for narrow rows (measured, 8192 rows, 2 threads:
    # width 16: 0.7 vs 2.1 ms; 128: 4.3 vs 8.1 ms; 256: 8.2 vs 14.4 ms); the histogram wins from ~1024.
    if not 0 < k < n or score.device.type != "cpu" or rows == 0 or n < _MIN_HISTOGRAM_WIDTH:
        return _topk_by_torch(score, min(max(k, 0), n))
    with torch.autocast("cpu", enabled=False):
        score = score.contiguous()
        sf = score.float()  # bf16/fp16 exactly; float64 only to bucket (monotone rounding)
        top = sf.amax(-1, keepdim=True)  # (rows, 1)
        if not math.isfinite(float(top.sum())):  # inf or nan entries: torch.topk's order for them
            return _topk_by_torch(score, k)
        m = _buckets(rows, n)
        nb = m + 1  # buckets per row
        scale = m / top.clamp_min(m * 2.0**-100)  # finite; an all-zero row is one bucket
        # Bucket of each entry offset by its row (row r owns r*nb + [0, nb)), in float while
        # that is exact: rounding is monotone, so the order within a row holds.
        if rows * nb < _FLOAT_OFFSETS_LIMIT:
            off = torch.arange(0, rows * nb, nb, dtype=torch.float32, device=sf.device).unsqueeze(1)
            q = (sf * scale).add_(off).to(torch.int32)  # (rows, n); 2x faster than addcmul
            off = off.to(torch.int32)
        else:
            off = torch.arange(0, rows * nb, nb, dtype=torch.int64, device=sf.device).unsqueeze(1)
            q = (sf * scale).to(torch.int64).add_(off)
        hist = torch.bincount(q.view(-1), minlength=rows * nb).view(rows, nb)
        cum = hist.cumsum(-1)  # (rows, nb): entries in buckets <= b
        j = torch.searchsorted(cum, cum.new_full((rows, 1), n - k), right=True)  # bucket of the k-th largest
        need = (k - n + cum.gather(1, j)).squeeze(1)  # (rows,) entries to take from bucket j, >= 1
        count = hist.gather(1, j).squeeze(1)  # (rows,) entries in bucket j
        if int(count.sum()) * 8 > score.numel():  # crowded (mostly-zero rows): ranking them all is slower
            return _topk_by_torch(score, k)
        # 0 below bucket j, 1 in it, 2 above (a compare to bool is slow on CPU; this is not)
        s = q.sub_((off + j - 1).to(q.dtype)).clamp_(0, 2).to(torch.uint8)
        keep = s >> 1
        pos = _sparse_nonzero(s & 1)  # flat positions of the entries of bucket j
        order = _rank_order(score, sf, pos, n)  # by row, score descending, column
        pos = pos.index_select(0, order)
        r = pos.div(n, rounding_mode="floor")
        rank = torch.arange(pos.numel(), device=pos.device) - (count.cumsum(0) - count).index_select(0, r)
        keep.view(-1).scatter_(0, pos, (rank < need.index_select(0, r)).to(torch.uint8))
        return keep


def _abs_topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 0/1 mask of the k largest |x| along the last dim (exactly k ones per row)."""
    n = x.shape[-1]
    with torch.autocast(x.device.type, enabled=False):
        a = x.detach().abs().reshape(-1, n)  # (rows, n)
    return _topk_rows_mask(a, k).view(x.shape)


def _apply_mask(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t`` on the kept entries, exactly 0 elsewhere (also where ``t`` is inf or nan)."""
    if t.device.type != "cpu":
        return t.masked_fill(keep == 0, 0)
    out = t * keep  # on CPU ~3x faster than t * bool and ~7x faster than masked_fill or where
    if not bool(torch.isfinite(out.sum())):  # inf * 0 is nan: redo exactly (a diverged step only)
        out = t.masked_fill(keep == 0, 0)
    return out


# ---------------------------------------------------------------------------
# path choice and the compiled op

PATH_ENV = "SPARSE_LM_ABSTOPK"
PATHS = ("auto", "cpp", "histogram", "torch")
_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPP_SOURCE = Path(__file__).resolve().parent / "csrc" / "abstopk.cpp"
_cpp_state: dict[str, object] = {}  # "ops" once built, "error" once a build failed
_cpp_lock = threading.Lock()


def selection_path() -> str:
    """The AbsTopK path asked for by ``SPARSE_LM_ABSTOPK`` (default ``auto``)."""
    path = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if path not in PATHS:
        raise ValueError(f"{PATH_ENV}={path!r}: choose one of {', '.join(PATHS)}")
    return path


def cpp_ops(required: bool = False):
    """``torch.ops.sparse_lm_abstopk`` (built on first use), or None if it cannot be built.

    The build (~15-40 s, once per machine and torch version) lands in torch's extension
    cache (``TORCH_EXTENSIONS_DIR``); concurrent ranks wait on its lock file. A failed
    build warns once and is not retried in this process; with ``required`` it raises.
    """
    with _cpp_lock:
        if "ops" not in _cpp_state and "error" not in _cpp_state:
            try:
                from torch.utils.cpp_extension import load

                if not _CPP_SOURCE.is_file():
                    raise FileNotFoundError(f"{_CPP_SOURCE} is missing (package data not installed?)")
                load(name="sparse_lm_abstopk", sources=[str(_CPP_SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                     extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
                _cpp_state["ops"] = torch.ops.sparse_lm_abstopk
            except Exception as e:  # no compiler, unsupported platform, broken toolchain: use pure torch
                _cpp_state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                if not required:
                    warnings.warn(f"sparse_lm: the C++ AbsTopK op could not be built ({_cpp_state['error']}); "
                                  f"using the pure-torch selection (slower). Set {PATH_ENV}=histogram to skip the "
                                  "build.", RuntimeWarning, stacklevel=3)
        if required and "error" in _cpp_state:
            raise RuntimeError(f"{PATH_ENV}=cpp but the C++ AbsTopK op could not be built: {_cpp_state['error']}. "
                               f"Install a C++ compiler (g++) or set {PATH_ENV}=histogram.")
        return _cpp_state.get("ops")


def _use_cpp(t: torch.Tensor, path: str):
    if path not in ("auto", "cpp") or t.device.type != "cpu" or t.dtype not in _CPP_DTYPES:
        return None
    return cpp_ops(required=path == "cpp")


def abs_topk_forward(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, keep): y = x on the k largest |x| of each row (last dim), exactly 0 elsewhere; keep the uint8 mask.

    Needs 0 < k < x.shape[-1]. The path follows :func:`selection_path`.
    """
    path = selection_path()
    ops = _use_cpp(x, path)
    if ops is not None:
        return ops.abstopk(x.detach().contiguous(), k)
    if path == "torch":
        n = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            a = x.detach().abs().reshape(-1, n)  # (rows, n)
        keep = _topk_by_torch(a, k).view(x.shape)
    else:
        keep = _abs_topk_mask(x, k)
    return _apply_mask(x, keep), keep


def mask_grad(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``grad`` on the kept entries, exactly 0 elsewhere: the backward of AbsTopK."""
    ops = _use_cpp(grad, selection_path())
    if ops is not None:
        return ops.mask_apply(grad, keep)
    return _apply_mask(grad, keep)


def gate_backward(grad: torch.Tensor, x: torch.Tensor, m: torch.Tensor, mean: torch.Tensor, *,
                  need_grad_x: bool = True, compiled: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(grad of x, grad of m) for ``y = x * m + c`` with one m per channel (x, grad: (..., width);
    m, mean: (width,)): ``grad * m`` (None unless `need_grad_x`) and the sum over rows of
    ``grad * (x - mean)``, which is the gradient of m when c = ``mean * (1 - m)`` (mean ablation).

    The compiled op (float32 on CPU, path as :func:`selection_path`) reads grad and x once; torch
    needs four full-size passes (``compiled=False`` forces them: the reference). Its sums run in
    another order than torch's: equal within float32 rounding, not bit for bit.
    """
    fp32 = grad.dtype == x.dtype == m.dtype == mean.dtype == torch.float32
    ops = _use_cpp(x, selection_path()) if compiled and fp32 else None
    if ops is not None:
        grad_x, grad_m = ops.gate_backward(grad, x, m, mean, need_grad_x)
        return (grad_x if need_grad_x else None), grad_m
    g = grad.reshape(-1, grad.shape[-1])  # (rows, width)
    grad_m = (g * x.reshape(g.shape)).sum(0) - mean * g.sum(0)  # (width,)
    return (grad * m if need_grad_x else None), grad_m


def topk_rows_mask_fast(score: torch.Tensor, k: int) -> torch.Tensor | None:
    """Bool mask of the k largest entries of each row of ``score >= 0`` (rows, n) by the compiled op.

    None when the op is not in use (``SPARSE_LM_ABSTOPK``, device, dtype, or a failed build): the
    caller then selects with torch. Ties at the k-th value keep the lowest columns. Used by the
    weight projection (sparsity.topk_mask), where a row is a whole matrix or one fan slice.
    """
    if not 0 < k < score.shape[-1]:
        return None
    ops = _use_cpp(score, selection_path())
    if ops is None:
        return None
    return ops.abstopk_mask(score.contiguous(), k).view(torch.bool)


def project_topk_(w: torch.Tensor, k: int, fan_dims: list[int], min_fan: int) -> bool:
    """The L0 projection of one matrix in place by the compiled op: the top ``min_fan`` of every slice along
    the one fan dim forced in, then the k largest |w|, the rest zeroed; the kept set of ``sparsity.topk_mask``.

    False, with ``w`` untouched, when the op is not in use (``SPARSE_LM_ABSTOPK``, device, a failed build) or
    declines the case (not a contiguous 2-D float32 matrix, more than one fan dim, a non-finite weight,
    forced entries over k): the caller then projects with masks.
    """
    if w.dtype != torch.float32 or w.dim() != 2 or not w.is_contiguous() or len(fan_dims) > 1:
        return False
    ops = _use_cpp(w, selection_path())
    if ops is None:
        return False
    fan_dim, fan = (fan_dims[0], min_fan) if fan_dims else (-1, 0)
    return ops.project_topk_(w, k, fan_dim, fan) >= 0
