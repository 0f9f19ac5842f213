"""Tokens/s of the weight-sparse training step against the dense step of the same shape.

For each shape (a ``pretrain`` preset) and precision this times, interleaved in
one run so that the noise of a shared machine hits every variant alike:

* ``dense``   the same SparseGPT with ``afrac=None`` and no weight projection:
              forward + backward + grad clip + AdamW step;
* ``sparse``  the preset's SparseGPT (AbsTopK at the preset's loctypes): the same
              step, then the L0 projection (``sparsity.project``);
* ``sparse_no_abstopk``  the same model and optimizer as ``sparse`` with every
              site's AbsTopK switched off for the step (same weights): the
              difference to ``sparse`` is the AbsTopK share;
* ``sparse_torch_abstopk``  ``sparse`` with the pure-torch AbsTopK selection
              (``SPARSE_LM_ABSTOPK=histogram``) instead of the compiled op;
* ``l0``      the L0 projection alone, at the preset's target fraction;
* ``gpt2``    (``--gpt2``) a transformers GPT2LMHeadModel of the same shape.

The model step is measured with a plain ``torch.optim.AdamW`` (what DeepSpeed
wraps on one CPU rank); ``--deepspeed`` times the real ``Trainer.train_step``
on one rank instead (dense = the same Trainer with sparsity off). ``--deepspeed
--dense-preset tiny-dense`` times the main job's own pair: the real Trainer step of
the ``tiny`` SparseGPT against the ``tiny-dense`` GPT2LMHeadModel, by CPU time, split
into forward, backward, engine.step, projection and the rest:

    python benchmarks/train_step.py --deepspeed --shapes tiny --dense-preset tiny-dense --threads 1

    python benchmarks/train_step.py --shapes tiny paper-1x --precisions fp32 bf16 --json out.json
"""

from __future__ import annotations

import os

# Set before torch starts OpenMP: with busy-waiting threads a shared 2-core
# machine runs up to several times slower whenever another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from sparse_lm import config as configlib  # noqa: E402
from sparse_lm import sparsity as sp  # noqa: E402
from sparse_lm import topk as topk_impl  # noqa: E402
from sparse_lm.jobs import PretrainConfig  # noqa: E402
from sparse_lm.model import SparseGPT, SparseGPTConfig  # noqa: E402
from sparse_lm.jobs import sparse_model_config  # noqa: E402

VOCAB = 2048


# ---------------------------------------------------------------------------
# models and steps


def model_config(cfg: PretrainConfig, afrac: float | None) -> SparseGPTConfig:
    """The preset's SparseGPT, exactly as ``pretrain`` builds it, with AbsTopK fraction ``afrac``."""
    model_cfg = sparse_model_config(cfg, VOCAB)
    model_cfg.afrac = afrac  # None: dense activations
    return model_cfg


def gpt2_model(cfg: PretrainConfig, seq: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=max(seq, 1024), n_embd=m.d_model, n_layer=m.n_layer, n_head=m.n_head,
        n_inner=m.d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=False,
    ))


def make_optimizer(model: torch.nn.Module, oc) -> torch.optim.AdamW:
    """AdamW with the trainer's groups: weight decay on the matrices only."""
    mats = set(model.weight_matrices().values()) if hasattr(model, "weight_matrices") else {
        p for p in model.parameters() if p.ndim == 2}
    decay = [p for p in model.parameters() if p in mats]
    rest = [p for p in model.parameters() if p not in mats]
    return torch.optim.AdamW([{"params": decay, "weight_decay": oc.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps)


class Stepper:
    """One model + optimizer; ``step(ids)`` is one training step, ``project()`` the L0 projection."""

    def __init__(self, model: torch.nn.Module, cfg: PretrainConfig, precision: str, sparse: bool):
        self.model = model.train()
        self.opt = make_optimizer(model, cfg.optim)
        self.precision = precision
        n_params = sum(p.numel() for p in model.parameters())
        # The trainer's clip: RMS(grad) <= b  <=>  ||grad||_2 <= sqrt(n) * b.
        self.clip = math.sqrt(n_params) * cfg.optim.grad_rms_bound if cfg.optim.grad_rms_bound else None
        self.sc = cfg.sparsity if sparse else None
        self.matrices = model.weight_matrices() if sparse else {}
        self.total_steps = cfg.train.steps
        if sparse:
            sp.check_fan_budget(self.matrices, self.sc)

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()

    def step(self, ids: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        if self.sc is not None:
            self.project()

    def project(self) -> None:
        # Annealing done (progress 1): every matrix at its target fraction, as for most of a run.
        sp.project(self.matrices, self.sc, self.total_steps, self.total_steps, self.opt)


class abstopk_path:
    """Force one AbsTopK selection path (``SPARSE_LM_ABSTOPK``) for the block."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.saved = os.environ.get(topk_impl.PATH_ENV)
        os.environ[topk_impl.PATH_ENV] = self.path

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop(topk_impl.PATH_ENV, None)
        else:
            os.environ[topk_impl.PATH_ENV] = self.saved


class abstopk_off:
    """Switch every site's AbsTopK off for the block (the weights stay the model's own)."""

    def __init__(self, model: SparseGPT):
        self.model = model

    def __enter__(self):
        self.saved = {s.name: s.k for s in self.model.sites}
        for s in self.model.sites:
            s.k = None

    def __exit__(self, *exc):
        for s in self.model.sites:
            s.k = self.saved[s.name]


# ---------------------------------------------------------------------------
# the measurement


def interleaved(variants: dict[str, Callable[[int], None]], steps: int, warmup: int) -> tuple[dict, dict]:
    """Time every variant once per round, rotating the order; drop the warm-up rounds.

    Returns wall-clock and CPU (process) seconds per call: on a shared machine the
    CPU time is the steadier measure of work, the wall clock what a run would see.
    """
    names = list(variants)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            c0, t0 = time.process_time(), time.perf_counter()
            variants[n](r)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                wall[n].append(dt)
                cpu[n].append(dc)
        print(f"  round {r + 1}/{warmup + steps}" + (" (warm-up)" if r < warmup else "") + ": "
              + ", ".join(f"{n} {wall[n][-1] * 1e3:.0f}ms" if r >= warmup else n for n in names),
              file=sys.stderr, flush=True)
    return wall, cpu


def bench_plain(preset: str, precision: str, args) -> dict:
    cfg = configlib.resolve(PretrainConfig, "pretrain", preset)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen) for _ in range(4)]
    sparse_model = SparseGPT(model_config(cfg, cfg.model.afrac))
    dense_model = SparseGPT(model_config(cfg, None))
    dense_model.load_state_dict(sparse_model.state_dict())
    sparse = Stepper(sparse_model, cfg, precision, sparse=True)
    dense = Stepper(dense_model, cfg, precision, sparse=False)
    sparse.project()  # start from weights at their target L0, as after annealing

    def no_abstopk(r: int) -> None:
        with abstopk_off(sparse_model):
            sparse.step(batches[r % 4])

    def torch_abstopk(r: int) -> None:
        with abstopk_path("histogram"):
            sparse.step(batches[r % 4])

    variants: dict[str, Callable[[int], None]] = {
        "dense": lambda r: dense.step(batches[r % 4]),
        "sparse": lambda r: sparse.step(batches[r % 4]),
        "sparse_no_abstopk": no_abstopk,
        "sparse_torch_abstopk": torch_abstopk,
        "l0": lambda r: sparse.project(),
    }
    if args.gpt2:
        g = Stepper(gpt2_model(cfg, args.seq), cfg, precision, sparse=False)
        variants["gpt2"] = lambda r: g.step(batches[r % 4])
    wall, cpu = interleaved(variants, args.steps, args.warmup)
    return summarize(preset, precision, args, wall, cpu, "plain AdamW")


def bench_deepspeed(preset: str, precision: str, args, tmp: Path) -> dict:
    """The real ``Trainer.train_step`` on one rank (sparse preset vs the same Trainer with sparsity off)."""
    from sparse_lm.trainer import Trainer

    over = [f"train.micro_batch={args.batch}", f"train.global_batch={args.batch}",
            f"train.precision={'fp32' if precision == 'fp32' else 'bf16-autocast'}"]
    cfg = configlib.resolve(PretrainConfig, "pretrain", preset, over)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (64 * args.batch, args.seq), generator=gen, dtype=torch.int32)
    trainers = {}
    for name, afrac, sparsity in (("dense", None, None), ("sparse", cfg.model.afrac, cfg.sparsity)):
        torch.manual_seed(0)
        model = SparseGPT(model_config(cfg, afrac))
        t = Trainer(model=model, run_dir=tmp / f"{preset}-{precision}-{name}", train_cfg=cfg.train,
                    optim_cfg=cfg.optim, train_tokens=tokens, val_tokens=tokens[:args.batch], sparsity=sparsity)
        # Past the annealing: every matrix is projected to its target L0 after each step.
        t.step = int(cfg.sparsity.anneal_end * cfg.train.steps) + 1
        trainers[name] = t
    sparse_t = trainers["sparse"]

    def no_abstopk(r: int) -> None:
        with abstopk_off(sparse_t.module):
            sparse_t.train_step()

    def l0(r: int) -> None:
        sp.project(sparse_t.matrices, sparse_t.sc, sparse_t.step, sparse_t.tc.steps, sparse_t.engine.optimizer)

    variants = {"dense": lambda r: trainers["dense"].train_step(), "sparse": lambda r: sparse_t.train_step(),
                "sparse_no_abstopk": no_abstopk, "l0": l0}
    wall, cpu = interleaved(variants, args.steps, args.warmup)
    return summarize(preset, precision, args, wall, cpu, "DeepSpeed Trainer.train_step (1 rank)")


class PartTimer:
    """CPU (process) seconds per part of one ``Trainer.train_step``, by wrapping its calls on one trainer.

    Parts: ``forward`` (engine forward, incl. loss), ``backward`` (engine.backward), ``engine_step``
    (engine.step: grad RMS bound + AdamW), ``projection`` (``sparsity.project``); ``rest`` is the
    step's total minus these (lr, batch slicing, the loss all-reduce, ...).
    """

    PARTS = ("forward", "backward", "engine_step", "projection")

    def __init__(self, trainer):
        self.t = trainer
        self.acc = dict.fromkeys(self.PARTS, 0.0)
        engine = trainer.engine
        for attr, part in (("forward", "forward"), ("backward", "backward"), ("step", "engine_step")):
            setattr(engine, attr, self._timed(getattr(engine, attr), part))

    def _timed(self, fn, part):
        def wrapped(*a, **k):
            c0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.acc[part] += time.process_time() - c0
        return wrapped

    def step(self) -> dict[str, float]:
        """One real ``train_step``; returns the CPU seconds of each part and ``total``."""
        self.acc = dict.fromkeys(self.PARTS, 0.0)
        saved = sp.project
        sp.project = self._timed(saved, "projection")
        try:
            c0 = time.process_time()
            self.t.train_step()
            total = time.process_time() - c0
        finally:
            sp.project = saved
        out = dict(self.acc)
        out["rest"] = total - sum(out.values())
        out["total"] = total
        return out


def bench_vs_dense(preset: str, dense_preset: str, args, tmp: Path) -> dict:
    """The real ``Trainer.train_step`` of the main job's two models on one rank, interleaved.

    ``sparse``: the ``pretrain`` preset's SparseGPT with weight sparsity (past annealing: every matrix
    projected to its target after each step); ``dense``: the ``dense`` preset's GPT2LMHeadModel, built
    as ``train-dense`` builds it. Both at the presets' own precision and micro-batch (shortened by
    --batch); CPU time per step, split into parts by :class:`PartTimer`.
    """
    from sparse_lm.jobs import DenseConfig, build_model
    from sparse_lm.trainer import Trainer

    over = [f"train.micro_batch={args.batch}", f"train.global_batch={args.batch}"]
    cfgs = {"sparse": ("pretrain", configlib.resolve(PretrainConfig, "pretrain", preset, over)),
            "dense": ("dense", configlib.resolve(DenseConfig, "dense", dense_preset, over))}
    seq = cfgs["sparse"][1].data.block_size
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (64 * args.batch, seq), generator=gen, dtype=torch.int32)
    timers, trainers, n_params = {}, {}, {}
    for name, (job, cfg) in cfgs.items():
        torch.manual_seed(0)
        model = build_model(cfg, job, VOCAB)
        n_params[name] = sum(p.numel() for p in model.parameters())
        t = Trainer(model=model, run_dir=tmp / f"{name}", train_cfg=cfg.train, optim_cfg=cfg.optim,
                    train_tokens=tokens, val_tokens=tokens[:args.batch],
                    sparsity=cfg.sparsity if job == "pretrain" else None, job=job)
        if job == "pretrain":
            t.step = int(cfg.sparsity.anneal_end * cfg.train.steps) + 1  # past the annealing
        else:
            t.step = cfg.train.steps // 2
        trainers[name], timers[name] = t, PartTimer(t)
    if args.threads:
        torch.set_num_threads(args.threads)  # the Trainer set cores / ranks
    parts: dict[str, list[dict]] = {n: [] for n in timers}
    names = list(timers)
    for r in range(args.warmup + args.steps):
        for n in names[r % 2:] + names[:r % 2]:
            p = timers[n].step()
            if r >= args.warmup:
                parts[n].append(p)
        print(f"  round {r + 1}/{args.warmup + args.steps}" + (" (warm-up)" if r < args.warmup else "") + ": "
              + ", ".join(f"{n} {parts[n][-1]['total'] * 1e3:.0f} CPU ms" for n in names if parts[n]),
              file=sys.stderr, flush=True)
    med = {n: {k: statistics.median(p[k] for p in parts[n]) for k in (*PartTimer.PARTS, "rest", "total")}
           for n in names}
    tokens_per_step = args.batch * seq
    return {"shape": f"{preset} vs {dense_preset}", "precision": cfgs["sparse"][1].train.precision,
            "threads": torch.get_num_threads(), "tokens_per_step": tokens_per_step, "params": n_params,
            "cpu_median_s": med, "cpu_parts_s": parts,
            "cpu_ratio_sparse_dense": med["sparse"]["total"] / med["dense"]["total"]}


def vs_dense_table(res: dict) -> str:
    med = res["cpu_median_s"]
    lines = [f"{res['shape']}, {res['precision']}, {res['threads']} thread(s), {res['tokens_per_step']} tokens/step; "
             f"params sparse {res['params']['sparse']:,} dense {res['params']['dense']:,}; "
             f"CPU ms per step (median): sparse/dense = {res['cpu_ratio_sparse_dense']:.2f}x",
             "| part | sparse | dense | sparse - dense |", "|---|---|---|---|"]
    for k in (*PartTimer.PARTS, "rest", "total"):
        s, d = 1e3 * med["sparse"][k], 1e3 * med["dense"][k]
        lines.append(f"| {k} | {s:.1f} | {d:.1f} | {s - d:+.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# --kernels: AbsTopK and L0-projection implementations side by side


class _MaskMul(torch.autograd.Function):
    """y = x * mask with the mask from ``select``; backward multiplies by the same mask."""

    @staticmethod
    def forward(ctx, x, k, select):
        keep = select(x, k)
        ctx.save_for_backward(keep)
        return x * keep

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep, None, None


def abstopk_naive(x: torch.Tensor, k: int) -> torch.Tensor:
    """The textbook version: autograd through topk + gather + scatter."""
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


class _AbsTopKPrevious(torch.autograd.Function):
    """The implementation before this benchmark: topk indices, bool mask, masked_fill both ways."""

    @staticmethod
    def forward(ctx, x, k):
        idx = x.abs().topk(k, dim=-1, sorted=False).indices
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
        ctx.save_for_backward(keep)
        return x.masked_fill(~keep, 0.0)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.masked_fill(~keep, 0.0), None


def _threshold_select(a: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Keep |x| >= the k-th largest value; rows with ties there keep the lowest columns (uint8 mask)."""
    keep = (a >= kth).to(torch.uint8)
    bad = (keep.sum(-1, dtype=torch.int32) != k).nonzero().squeeze(1)
    if bad.numel():  # ties at the threshold: count per row != k
        ab, tb = a.index_select(0, bad), kth.index_select(0, bad)
        gt, eq = ab > tb, ab == tb
        need = k - gt.sum(-1, keepdim=True)
        keep[bad] = (gt | (eq & (eq.cumsum(-1) <= need))).to(torch.uint8)
    return keep


def select_topk_threshold(x, k):
    a = x.detach().abs().reshape(-1, x.shape[-1])
    kth = a.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return _threshold_select(a, kth, k).view(x.shape)


def select_kthvalue_threshold(x, k):
    a = x.detach().abs().reshape(-1, x.shape[-1])
    kth = a.kthvalue(a.shape[-1] - k + 1, dim=-1, keepdim=True).values
    return _threshold_select(a, kth, k).view(x.shape)


def select_topk_bf16(x, k):
    """Selection on a bf16 copy (inexact for fp32 inputs: rounding creates ties)."""
    a = x.detach().abs().reshape(-1, x.shape[-1]).bfloat16()
    idx = a.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(a, dtype=torch.uint8).scatter_(-1, idx, 1).view(x.shape)


def select_topk_int_keys(x, k):
    """torch.topk on the bits of |x| read as integers: the same order, cheaper compares."""
    a = x.detach().abs().reshape(-1, x.shape[-1]).contiguous()
    a = a.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}.get(a.dtype, a.dtype))
    idx = a.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(a, dtype=torch.uint8).scatter_(-1, idx, 1).view(x.shape)


def select_histogram(x, k):
    from sparse_lm.topk import _abs_topk_mask

    return _abs_topk_mask(x, k)


class _AbsTopKCpp(torch.autograd.Function):
    """The compiled op (sparse_lm/csrc/abstopk.cpp): fused select + mask forward, mask backward."""

    @staticmethod
    def forward(ctx, x, k):
        y, keep = topk_impl.cpp_ops(required=True).abstopk(x.contiguous(), k)
        ctx.save_for_backward(keep)
        return y

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return topk_impl.cpp_ops(required=True).mask_apply(grad, keep), None


def select_cpp(x, k):
    return topk_impl.cpp_ops(required=True).abstopk_mask(x.contiguous(), k)


def select_current(x, k):
    """What sparse_lm.sites.abs_topk uses now (SPARSE_LM_ABSTOPK, default: the compiled op)."""
    return topk_impl.abs_topk_forward(x, k)[1]


ABSTOPK_VARIANTS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "naive topk+gather/scatter (autograd)": abstopk_naive,
    "previous: topk, bool mask, masked_fill": _AbsTopKPrevious.apply,
    "topk values -> threshold + tie fix-up": lambda x, k: _MaskMul.apply(x, k, select_topk_threshold),
    "kthvalue -> threshold + tie fix-up": lambda x, k: _MaskMul.apply(x, k, select_kthvalue_threshold),
    "topk on a bf16 copy (inexact)": lambda x, k: _MaskMul.apply(x, k, select_topk_bf16),
    "topk on int keys (bits of abs x), uint8 mask": lambda x, k: _MaskMul.apply(x, k, select_topk_int_keys),
    "histogram select, uint8 mask (pure-torch fallback)": lambda x, k: _MaskMul.apply(x, k, select_histogram),
    "C++ op: bitwise count select, fused mask (current)": _AbsTopKCpp.apply,
}


def _fan_forced_scores(w: torch.Tensor, k: int, fan_dims, min_fan: int) -> tuple[torch.Tensor, int]:
    """|w| with each slice's min_fan largest entries forced in (score inf), and k raised to cover them."""
    score = w.detach().abs().float()
    if fan_dims and min_fan > 0:
        forced = torch.zeros_like(score, dtype=torch.bool)
        for dim in fan_dims:
            idx = score.topk(min(min_fan, score.shape[dim]), dim=dim).indices
            forced.scatter_(dim, idx, True)
        score = score.masked_fill(forced, float("inf"))
        k = max(k, int(forced.sum()))
    return score, k


def topk_mask_previous(w: torch.Tensor, k: int, fan_dims=(), min_fan: int = 0) -> torch.Tensor:
    """``sparsity.topk_mask`` before this benchmark: torch.topk per slice and on the flat matrix."""
    score, k = _fan_forced_scores(w, k, fan_dims, min_fan)
    if k >= score.numel():
        return torch.ones_like(score, dtype=torch.bool)
    idx = score.view(-1).topk(k, sorted=False).indices
    return torch.zeros(score.numel(), dtype=torch.bool).scatter_(0, idx, True).view_as(w)


def topk_mask_kthvalue(w: torch.Tensor, k: int, fan_dims=(), min_fan: int = 0) -> torch.Tensor:
    """The same with the flat selection as a kthvalue threshold (+ tie fix-up)."""
    score, k = _fan_forced_scores(w, k, fan_dims, min_fan)
    if k >= score.numel():
        return torch.ones_like(score, dtype=torch.bool)
    flat = score.view(1, -1)
    kth = flat.kthvalue(flat.shape[1] - k + 1, dim=-1, keepdim=True).values
    return _threshold_select(flat, kth, k).view(w.shape).bool()


L0_VARIANTS = {"previous: torch.topk (flat + per slice)": topk_mask_previous,
               "kthvalue threshold + tie fix-up": topk_mask_kthvalue,
               "current: topk on int32 keys, forced by index_fill": sp.topk_mask}


def site_inputs(model: SparseGPT, ids: torch.Tensor, precision: str) -> list[tuple[torch.Tensor, int]]:
    """The value reaching every AbsTopK site in one forward (with AbsTopK off), and its k."""
    ks = {s.name: s.k for s in model.sites if s.k is not None}
    with abstopk_off(model), torch.no_grad(), model.sites.record(list(ks)) as acts:
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext():
            model(input_ids=ids)
    return [(acts[n].clone(), ks[n]) for n in ks]


def bench_kernels(preset: str, precision: str, args) -> dict:
    cfg = configlib.resolve(PretrainConfig, "pretrain", preset)
    torch.manual_seed(0)
    model = SparseGPT(model_config(cfg, cfg.model.afrac))
    stepper = Stepper(model, cfg, precision, sparse=True)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    stepper.step(ids)  # moments exist, weights at their target L0
    inputs = site_inputs(model, ids, precision)
    grads = [torch.randn_like(x) for x, _ in inputs]
    ref = [select_current(x, k) for x, k in inputs]

    def run(fn):
        def once(r: int) -> None:
            for (x, k), g in zip(inputs, grads):
                x = x.detach().requires_grad_()
                fn(x, k).backward(g)
        return once

    mism = {}
    for name, fn in ABSTOPK_VARIANTS.items():  # same kept set (up to ties) as the current version?
        bad = 0
        for (x, k), keep in zip(inputs, ref):
            a = x.abs().reshape(-1, x.shape[-1]).double()
            got = (fn(x, k) != 0) | ((x == 0) & (keep != 0))  # exact zeros kept by both read as zero
            kept = lambda m: a.masked_fill(~m.reshape(a.shape).bool(), -1).sort(-1).values  # noqa: E731
            bad += int((kept(got) != kept(keep)).any(-1).sum())
        mism[name] = bad
    variants = {name: run(fn) for name, fn in ABSTOPK_VARIANTS.items()}
    mats, sc = stepper.matrices, stepper.sc
    frac = sp.kept_fraction(sc.target_fraction, 1.0)

    def l0(fn):
        def once(r: int) -> None:
            for name, p in mats.items():
                f = sp.matrix_fraction(name, sc, frac, 1.0)
                fn(p, sp.target_count(p.numel(), f), sp.fan_constraints(name, sc.min_fan), sc.min_fan)
        return once

    for name, fn in L0_VARIANTS.items():
        variants["L0 " + name] = l0(fn)
    masks = sp.compute_masks(mats, sc, cfg.train.steps, cfg.train.steps)
    variants["L0 apply_masks (unchanged)"] = lambda r: sp.apply_masks(mats, masks, stepper.opt)
    # The trainer's call now: the masks and their application in one compiled call per matrix (compare it with
    # "current" + "apply_masks", which is what it replaces).
    variants["L0 fused: sparsity.project (select + apply)"] = lambda r: sp.project(mats, sc, cfg.train.steps,
                                                                                  cfg.train.steps, stepper.opt)
    wall, cpu = interleaved(variants, args.steps, args.warmup)
    rows = {name: {"median_ms": 1e3 * statistics.median(wall[name]), "cpu_median_ms": 1e3 * statistics.median(cpu[name]),
                   "rows_differing": mism.get(name)} for name in variants}
    sites = [f"{tuple(x.shape)} {str(x.dtype)[6:]} k={k}" for x, k in inputs]
    return {"shape": preset, "precision": precision, "sites_per_step": len(inputs), "site_inputs": sites,
            "rows_per_step": sum(x.numel() // x.shape[-1] for x, _ in inputs), "variants": rows}


def kernel_table(res: dict) -> str:
    prev = res["variants"]["previous: topk, bool mask, masked_fill"]["median_ms"]
    l0_prev = res["variants"]["L0 previous: torch.topk (flat + per slice)"]["median_ms"]
    lines = [f"{res['shape']} {res['precision']}: {res['sites_per_step']} AbsTopK sites per step "
             f"(forward + backward summed); L0 projection over every weight matrix",
             "| variant | ms per step | CPU ms | vs previous | rows not matching torch.topk |", "|---|---|---|---|---|"]
    for name, v in res["variants"].items():
        base = l0_prev if name.startswith("L0") else prev
        diff = "" if v["rows_differing"] is None else str(v["rows_differing"])
        lines.append(f"| {name} | {v['median_ms']:.1f} | {v['cpu_median_ms']:.1f} | {base / v['median_ms']:.2f}x | {diff} |")
    return "\n".join(lines)


def summarize(preset: str, precision: str, args, wall: dict[str, list[float]], cpu: dict[str, list[float]],
              mode: str) -> dict:
    med = {n: statistics.median(v) for n, v in wall.items()}
    cmed = {n: statistics.median(v) for n, v in cpu.items()}
    tokens = args.batch * args.seq
    row = {
        "shape": preset, "precision": precision, "mode": mode, "tokens_per_step": tokens,
        "median_s": med, "median_cpu_s": cmed, "times_s": wall, "cpu_times_s": cpu,
        "dense_tok_s": tokens / med["dense"], "sparse_tok_s": tokens / med["sparse"],
        "ratio_sparse_dense": med["sparse"] / med["dense"],
        "abstopk_share": (med["sparse"] - med["sparse_no_abstopk"]) / med["sparse"],
        "l0_share": med["l0"] / med["sparse"],
        "cpu_ratio_sparse_dense": cmed["sparse"] / cmed["dense"],
        "cpu_abstopk_share": (cmed["sparse"] - cmed["sparse_no_abstopk"]) / cmed["sparse"],
        "cpu_l0_share": cmed["l0"] / cmed["sparse"],
    }
    if "sparse_torch_abstopk" in med:
        row["ratio_torch_abstopk_dense"] = med["sparse_torch_abstopk"] / med["dense"]
        row["cpu_ratio_torch_abstopk_dense"] = cmed["sparse_torch_abstopk"] / cmed["dense"]
    if "gpt2" in med:
        row["gpt2_tok_s"] = tokens / med["gpt2"]
    return row


def table(rows: list[dict]) -> str:
    gpt2 = any("gpt2_tok_s" in r for r in rows)
    alt = any("ratio_torch_abstopk_dense" in r for r in rows)
    head = ["shape", "precision", "dense tok/s", "sparse tok/s", "sparse/dense step time", "AbsTopK share",
            "L0-projection share", "same by CPU time: ratio / AbsTopK / L0"] + \
        (["sparse/dense with pure-torch AbsTopK (wall / CPU)"] if alt else []) + (["GPT-2 tok/s"] if gpt2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["shape"], r["precision"], f"{r['dense_tok_s']:,.0f}", f"{r['sparse_tok_s']:,.0f}",
                 f"{r['ratio_sparse_dense']:.2f}x", f"{100 * r['abstopk_share']:.0f}%", f"{100 * r['l0_share']:.0f}%",
                 f"{r['cpu_ratio_sparse_dense']:.2f}x / {100 * r['cpu_abstopk_share']:.0f}% / "
                 f"{100 * r['cpu_l0_share']:.0f}%"]
        if alt:
            cells.append(f"{r['ratio_torch_abstopk_dense']:.2f}x / {r['cpu_ratio_torch_abstopk_dense']:.2f}x"
                         if "ratio_torch_abstopk_dense" in r else "")
        if gpt2:
            cells.append(f"{r['gpt2_tok_s']:,.0f}" if "gpt2_tok_s" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["tiny", "paper-1x"], help="pretrain presets (sparse_lm/presets/*.json)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="bf16 = torch.autocast(cpu, bfloat16), the trainer's 'bf16-autocast'")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (each times every variant once)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--gpt2", action="store_true", help="also time a transformers GPT2LMHeadModel of the same shape")
    ap.add_argument("--deepspeed", action="store_true", help="time the real Trainer.train_step on 1 rank")
    ap.add_argument("--dense-preset", default=None,
                    help="with --deepspeed: time the real Trainer.train_step of each --shapes preset (sparse) against "
                         "this dense preset's GPT2LMHeadModel (the main job's pair: tiny vs tiny-dense), with a "
                         "per-part CPU-time breakdown")
    ap.add_argument("--kernels", action="store_true",
                    help="time AbsTopK and L0-projection implementations alone (on one step's real inputs)")
    ap.add_argument("--json", type=Path, default=None, help="write every row (with raw times) here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
            "mode": "deepspeed" if args.deepspeed else "plain"}
    print(f"torch {meta['torch']}, {meta['threads']} threads, {meta['cpu_capability']}; batch {args.batch} x "
          f"{args.seq} tokens; {args.steps} timed rounds after {args.warmup} warm-up", flush=True)
    if args.kernels:
        out = []
        for preset in args.shapes:
            for precision in args.precisions:
                print(f"{preset} {precision} kernels ...", file=sys.stderr, flush=True)
                out.append(bench_kernels(preset, precision, args))
                print(kernel_table(out[-1]) + "\n", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "kernels": out}, indent=2) + "\n")
        return
    if args.dense_preset:
        import shutil
        import tempfile

        from sparse_lm.trainer import shutdown_distributed

        tmp = Path(tempfile.mkdtemp(prefix="bench-vs-dense-"))
        out = []
        try:
            for preset in args.shapes:
                print(f"{preset} vs {args.dense_preset} ...", file=sys.stderr, flush=True)
                out.append(bench_vs_dense(preset, args.dense_preset, args, tmp))
                print(vs_dense_table(out[-1]) + "\n", flush=True)
        finally:
            shutdown_distributed()
            shutil.rmtree(tmp, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "vs_dense": out}, indent=2) + "\n")
        return
    rows = []
    tmp = None
    if args.deepspeed:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="bench-ds-"))
    try:
        for preset in args.shapes:
            for precision in args.precisions:
                print(f"{preset} {precision} ...", file=sys.stderr, flush=True)
                row = bench_deepspeed(preset, precision, args, tmp) if args.deepspeed else \
                    bench_plain(preset, precision, args)
                rows.append(row)
    finally:
        if args.deepspeed:
            import shutil

            from sparse_lm.trainer import shutdown_distributed

            shutdown_distributed()
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
