"""Learned node pruning (SPEC §5): the smallest set of site channels that keeps a task's loss at a target.

Every node (one channel of a node site, see `pruning.graph`) gets a mask logit
tau. The forward pass uses the hard mask ``m = Heaviside(tau)`` (tau > 0: open)
and gives a closed node its mean activation over the pretraining text
(`pruning.means`): ``value = x * m + mean * (1 - m)``, installed through the
model's named sites only (``sites_of(model).replace``). The backward pass is
straight-through with ``d/dtau sigmoid(tau / T)`` as the surrogate gradient.
The loss is the binary task loss on a random train minibatch plus
``k_coef x sum(m)`` (the number of open nodes, with the same surrogate
gradient); Adam trains tau alone, the model's parameters are frozen, and tau
is clamped to [-1, 1] after every step. A k_coef tuned on one model can be far
too strong for another (a dense model spreads the task over many weakly
important channels, and every node closes at once): when the masked task loss
stays near chance, the masks are trained again with k_coef / 3 and a new seed
(``collapse_retries``; a sweep turns the retries off and ends a collapsed run there,
``stop_collapsed``). The same budget retries masks that *settled above* the target
(the circuit needed more than twice the nodes they left open, plus 10: their loss
hovered above the target without nearing chance, and the order past the open set
is a guess); the smallest circuit of the attempts is kept.

Then the nodes are ordered by tau (equal taus, common at the clamp, by a
running average of how much each node's mask lowered the task loss) and the
number kept is bisected for the fewest whose circuit reaches the target loss
on the validation split (galloping from the number the masks left open); only
then, as in the paper, a scale and shift of the two-token logit difference are
fitted on the train split with LBFGS. The target is judged on the raw
(uncalibrated) loss; both raw and calibrated losses are recorded on validation
and test. Splits: masks, attribution and calibration read train; the
full-model check (a model at chance, or above the target, gives no circuit),
the relative target and the bisection read validation; test is only reported:
the metrics, the two checks (the circuit alone keeps the target, ablating the
circuit's own nodes destroys the task) and the faithfulness curves (task loss
and normalised logit difference by node budget for the learned and the
attribution order, `pruning.faithfulness`).

Speed: ``precision="bf16"`` (the default) runs the frozen model's linear layers
in bfloat16 with weights cast once per mask training, everything else in float32
(`pruning.forward.precision_context`); the forward pass trims a SparseGPT's last
block, pads least and attends through SDPA's flash kernel (`pruning.forward`), and
the ablation has a hand-written backward, one compiled pass on CPU, and passes
all-open sites through (`_MeanAblate`). Together 1.66x (batch 64, 2 threads) less
CPU time per mask step than the plain pass, same loss and mask gradients up to
float rounding (benchmarks/prune.py, tests/unit/test_prune_fast_path.py).

Use::

    from pruning import pruner
    from pruning.config import PruneConfig
    circuit = pruner.prune(model, tokenizer, PruneConfig(task="single_double_quote"))
    circuit.num_nodes, circuit.num_edges, circuit.metrics["circuit"]
    size, failed = circuit.objective("edges")     # what a sweep minimises

`prune` never raises for an expected failure (the model itself misses the
target, a diverging run): it returns a `Circuit` with ``failed=True`` and the
reason, quickly, so a hyperparameter sweep can record it and go on. A sweep
prepares the task batches and means once (`prepare_inputs`) and passes them in.

The forward passes (task batches, last-position logits, margins, loss and
accuracy) are in `pruning.forward`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pruning.attribution import attribution_scores
from pruning.circuit import Circuit, CircuitNode, destroys
from pruning.config import PruneConfig
from pruning.faithfulness import budgets, faithfulness_curve
from pruning.forward import (PruneError, TaskData, batch_margins, evaluate, fast_head_ok, load_task_data,
                             loss_and_accuracy, orientation, precision_context, task_loss)
from pruning.graph import NodeIndex, circuit_edges
from pruning.means import Means, load_or_compute_means, top_snippets
from sparse_lm.adapters import sites_of
from sparse_lm.arch import context_length, n_layers
from sparse_lm.loading import model_fingerprint
from sparse_lm.topk import gate_backward
from tasks.loss import TaskBatch, family_mean

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["prune", "finish_circuit", "prepare_inputs", "PruneError", "heaviside_ste", "surrogate_grad", "Ablation", "train_masks",
           "order_nodes", "keep_mask", "bisect_count", "fit_calibration", "resolve_device", "frozen"]


# Train examples the two calibration parameters are fitted on (more adds time, not accuracy).
CALIBRATION_EXAMPLES = 512
# L2 weight on log(scale) and shift in the calibration fit: small enough not to matter unless the margins are
# perfectly separable, where it keeps the fit finite.
CALIBRATION_L2 = 1e-3


# ---------------------------------------------------------------------------- the mask


def surrogate_grad(tau: torch.Tensor, temp: float) -> torch.Tensor:
    """d/dtau sigmoid(tau / T) = sigmoid(tau/T) (1 - sigmoid(tau/T)) / T."""
    s = torch.sigmoid(tau / temp)
    return s * (1 - s) / temp


class _HeavisideSTE(torch.autograd.Function):
    """Forward: 1 where tau > 0, else 0. Backward: the derivative of sigmoid(tau / T)."""

    @staticmethod
    def forward(ctx, tau: torch.Tensor, temp: float) -> torch.Tensor:
        ctx.save_for_backward(tau)
        ctx.temp = temp
        return (tau > 0).to(tau.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (tau,) = ctx.saved_tensors
        return grad * surrogate_grad(tau, ctx.temp), None


def heaviside_ste(tau: torch.Tensor, temp: float = 1.0) -> torch.Tensor:
    """Hard 0/1 mask of tau with a straight-through sigmoid-derivative gradient (temperature `temp`)."""
    return _HeavisideSTE.apply(tau, temp)


class _MeanAblate(torch.autograd.Function):
    """``x * m + mean * (1 - m)`` per channel (x: (..., width); m, mean: (width,)) with a hand-written
    backward: the gradient of x is ``g * m`` and that of m is ``sum over rows of g * (x - mean)``,
    the products autograd's addcmul backward forms too, without its graph of broadcasts, casts and
    reductions per site (mean carries no gradient); both come from one pass over g and x
    (`sparse_lm.topk.gate_backward`, a compiled op on CPU in float32).

    `closed` is ``mean * (1 - m)``, made once per mask for every site (`Ablation.set`), not once per
    site and chunk. A site whose channels are all open (`is_open`: m is all ones, as for every site
    early in training) passes x through unchanged, and its x gets the gradient g itself: exactly what
    the multiply-add gives for m = 1, without a full-size pass in either direction.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor, closed: torch.Tensor, mean: torch.Tensor,
                is_open: bool) -> torch.Tensor:
        ctx.save_for_backward(x, m, mean)
        ctx.is_open = is_open
        if is_open:
            return x.view_as(x)  # x * 1 + mean * 0 == x exactly
        return torch.addcmul(closed, x, m)  # (..., width)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, m, mean = ctx.saved_tensors
        need_x, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not need_m:
            return (grad if ctx.is_open else grad * m) if need_x else None, None, None, None, None
        # one pass over grad and x for both gradients (the compiled op, where it runs)
        grad_x, grad_m = gate_backward(grad, x, m, mean, need_grad_x=need_x and not ctx.is_open)
        if need_x and ctx.is_open:
            grad_x = grad
        return grad_x, grad_m, None, None, None


class Ablation:
    """Mean ablation of nodes through the model's named sites: ``x * m + mean * (1 - m)`` per channel.

    With ``m = 1`` the value is exactly ``x`` and with ``m = 0`` exactly the mean
    (no ``mean + (x - mean)`` rounding), so an all-open mask reproduces the model.
    ``fused=False`` applies it with plain autograd ops (the reference the fused
    `_MeanAblate` is tested against).
    """

    def __init__(self, model: nn.Module, index: NodeIndex, mean_vec: torch.Tensor, *, fused: bool = True):
        self.sites = sites_of(model)
        self.index = index
        self.mean_vec = mean_vec
        self.means = index.split(mean_vec)
        self.masks: dict[str, torch.Tensor] = {}
        self.fused = fused
        self._closed: dict[str, torch.Tensor] = {}  # mean * (1 - m) per site, made by `set` (fused path)
        self._open: dict[str, bool] = {}  # sites whose mask is all ones, found by `set` (fused path)

    def set(self, mask: torch.Tensor) -> None:
        """Use this (N,) mask (float, may carry a gradient) from the next forward pass on."""
        self.masks = self.index.split(mask)
        self._closed, self._open = {}, {}
        if self.fused and mask.requires_grad:
            # Once per mask, not per site and chunk: mean * (1 - m) of every node, and which sites are all open.
            fixed = mask.detach()
            self._closed = self.index.split(self.mean_vec * (1 - fixed))
            shut = torch.cat([fixed.new_zeros(1), (fixed != 1).cumsum(0)])  # (N + 1,) closed nodes before each id
            ends = torch.tensor([[s.offset, s.offset + s.width] for s in self.index.sites], device=shut.device)
            counts = (shut[ends[:, 1]] - shut[ends[:, 0]]).tolist()  # closed nodes per site (one sync)
            self._open = {s.name: c == 0 for s, c in zip(self.index.sites, counts)}

    def _apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        m = self.masks[name].to(x.dtype)
        mean = self.means[name].to(x.dtype)
        if self.fused and (x.requires_grad or m.requires_grad):
            closed = self._closed.get(name)
            if closed is None or closed.dtype != x.dtype:
                closed = (mean * (1 - m)).detach()
            return _MeanAblate.apply(x, m, closed, mean, self._open.get(name, False))
        # mean * (1 - m) is one (width,) vector, so the only full-size operation is one fused multiply-add
        return torch.addcmul(mean * (1 - m), x, m)  # (..., width)

    @contextmanager
    def installed(self, mask: torch.Tensor | None = None, *, all_sites: bool = False) -> Iterator[None]:
        """Hooks on the node sites for the block. With a fixed `mask`, fully open sites get no hook."""
        if mask is not None:
            self.set(mask)
        names = [s.name for s in self.index if all_sites or bool((self.masks[s.name] != 1).any())]
        with self.sites.replace({n: (lambda x, n=n: self._apply(n, x)) for n in names}):
            yield


# ---------------------------------------------------------------------------- calibration and search


def fit_calibration(diff: torch.Tensor, family: torch.Tensor, steps: int = 20) -> tuple[float, float]:
    """Scale a and shift b of d = logit(c0) - logit(c1) minimising the task loss of a*d + b (LBFGS).

    The shift acts on the fixed-orientation difference, so it favours one completion
    for every prompt; it is not a shift toward each prompt's own target. The scale is
    kept positive (a = exp(s): calibration must not flip the circuit's answers), and a
    small L2 penalty on s and b keeps both finite when the train margins separate the
    families perfectly (the unpenalised optimum is then at infinity).
    """
    if steps <= 0:
        return 1.0, 0.0
    d = diff.detach().double().cpu()
    fam = family.cpu()
    sign = orientation(fam).double()
    log_a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_a, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def calibrated_loss(a: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return task_loss(sign * (a * d + shift), fam)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = calibrated_loss(log_a.exp(), b) + CALIBRATION_L2 * (log_a**2 + b**2)
        loss.backward()
        return loss

    before = calibrated_loss(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)).item()
    opt.step(closure)
    a_fit, b_fit = log_a.detach().exp(), b.detach()
    after = calibrated_loss(a_fit, b_fit).item()
    if not (math.isfinite(after) and math.isfinite(float(a_fit)) and math.isfinite(float(b_fit))) or after > before:
        return 1.0, 0.0
    return float(a_fit), float(b_fit)


class _GiveUp(Exception):
    """`bisect_count` past its `give_up_above` bound with the target still missed."""


def bisect_count(loss_at: Callable[[int], float], total: int, target: float, *, hint: int | None = None,
                 known: dict[int, float] | None = None,
                 give_up_above: int | None = None) -> tuple[int | None, list[list[float]]]:
    """The smallest count c in [0, total] with loss_at(c) <= target, assuming the loss falls with c.

    With a `hint` (the number of nodes the masks left open) the search gallops from
    it by factors of 2 before bisecting, which needs fewer evaluations when the
    answer is near the hint. With `give_up_above`, the search stops as soon as a
    count above it misses the target (the answer is then larger still).

    Returns (count or None when even `total` misses or the search gave up, [[count, loss], ...]
    in the order evaluated). The count returned was evaluated and meets the target;
    count - 1 was evaluated and misses it (or count is 0).
    """
    history: dict[int, float] = {}
    known = dict(known or {})

    def at(c: int) -> float:
        if c not in history:
            history[c] = known[c] if c in known else float(loss_at(c))
            if give_up_above is not None and c > give_up_above and not history[c] <= target:
                raise _GiveUp
        return history[c]

    trail = lambda: [[c, v] for c, v in history.items()]  # noqa: E731
    try:
        return _bisect(at, total, target, hint), trail()
    except _GiveUp:
        return None, trail()


def _bisect(at: Callable[[int], float], total: int, target: float, hint: int | None) -> int | None:
    if not at(total) <= target:
        return None
    if at(0) <= target:
        return 0
    lo, hi = 0, total  # invariant: lo misses, hi meets
    if hint is not None and 0 < hint < total:
        # Gallop from the hint (the learned circuit is usually close to it), then bisect.
        if at(hint) <= target:
            hi = hint
            while hi > 1 and at(hi // 2) <= target:
                hi //= 2
            if hi > 1:
                lo = hi // 2
        else:
            lo = hint
            while lo * 2 < total and at(lo * 2) > target:
                lo *= 2
            if lo * 2 < total:
                hi = lo * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters without gradients and eval mode for the block; both restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


# ---------------------------------------------------------------------------- learned masks


# Nats between a model's own task loss and chance (ln 2) below which no collapse is detected.
COLLAPSE_MIN_GAP = 0.05
# A retry after a collapse weakens the sparsity pressure by this factor and draws new initial noise and
# minibatches: both a too-strong k_coef and an unlucky first few Adam steps (which move every tau by about lr,
# whatever its gradient, so many nodes cross zero together) end in a collapse.
COLLAPSE_K_FACTOR = 3.0


class MaskCollapse(Exception):
    """The masked task loss stayed near chance: the sparsity pressure closed the nodes the task needs."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"masked task loss {loss:.3f} at step {step}")
        self.step, self.loss = step, loss


def train_masks(model: nn.Module, ablation: Ablation, train: TaskBatch, cfg: PruneConfig, *,
                progress: bool = True, fast: bool = True, k_coef: float | None = None,
                collapse_at: float | None = None, task_loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    """Adam on tau; returns (final tau (N,), importance (N,), curve [[step, task loss, open nodes]]).

    `task_loss_fn(model, minibatch)`, when given, replaces the binary task loss (a multi-class
    objective, `pruning.objective`); `train` is then any batch with ``select`` and ``input_ids``.

    importance is a running average of -d(task loss)/d(mask): how much opening a node
    would lower the loss (or closing it raise it) in the circuits seen late in training.
    It orders nodes whose tau is equal, which is common: the clamp leaves many at
    exactly -1 or 1.

    With `collapse_at`, raises `MaskCollapse` once a fifth of the steps are done and a running mean of
    the task loss is still above it: past that point the masks rarely recover, and the rest is wasted.
    """
    k_coef = cfg.k_coef if k_coef is None else k_coef
    ema = None
    check_from = max(10, cfg.steps // 5)
    device = train.input_ids.device
    gen = torch.Generator().manual_seed(cfg.seed)
    n = ablation.index.total
    tau = (cfg.init_value + cfg.init_noise * torch.randn(n, generator=gen)).clamp(-1, 1).to(device)
    tau.requires_grad_(True)
    opt = torch.optim.Adam([tau], lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    importance = torch.zeros_like(tau, requires_grad=False)
    curve: list[list[float]] = []
    log_every = max(1, cfg.steps // 100)
    order = torch.randperm(len(train), generator=gen)
    pos = 0
    steps: Any = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="pruning", unit="step", leave=False)
    # one precision region for every step: the bf16 weight copies are made once
    with ablation.installed(torch.ones(n, device=device), all_sites=True), \
            precision_context(cfg.precision, device, model):
        for step in steps:
            if pos + cfg.batch_size > len(order):
                order, pos = torch.randperm(len(train), generator=gen), 0
            idx = order[pos : pos + cfg.batch_size]
            pos += cfg.batch_size
            mb = train.select(idx.to(device))
            mask = heaviside_ste(tau, cfg.heaviside_temp)
            mask.retain_grad()
            ablation.set(mask)
            if task_loss_fn is not None:
                masked_loss = task_loss_fn(model, mb).float()
            else:
                margin = batch_margins(model, mb, chunk_tokens=cfg.chunk_tokens, fast=fast)[0]  # (b,) float32
                masked_loss = task_loss(margin, mb.family)
            loss = masked_loss + k_coef * mask.sum()
            if not torch.isfinite(loss):
                raise PruneError(f"the pruning loss became {loss.item()} at step {step}; lower lr or k_coef")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                tau.clamp_(-1.0, 1.0)
                # d(loss)/d(mask) = d(task loss)/d(mask) + k_coef
                importance.mul_(0.95).add_(k_coef - mask.grad, alpha=0.05)
            value = masked_loss.item()
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            if step % log_every == 0 or step == cfg.steps - 1:
                n_open = int(mask.sum().item())
                curve.append([step, round(value, 6), n_open])
                if progress:
                    steps.set_postfix(loss=f"{value:.3f}", open=n_open)
            if collapse_at is not None and step >= check_from and ema > collapse_at:
                raise MaskCollapse(step, ema)
    return tau.detach(), importance, curve


def order_nodes(scores: torch.Tensor, tie_break: torch.Tensor | None = None) -> torch.Tensor:
    """Node ids by descending score; equal scores by descending `tie_break`, then by id."""
    ids = torch.arange(len(scores), device=scores.device)
    if tie_break is not None:
        ids = ids[torch.sort(tie_break, descending=True, stable=True).indices]
    return ids[torch.sort(scores[ids], descending=True, stable=True).indices]


def keep_mask(order: torch.Tensor, count: int, total: int) -> torch.Tensor:
    mask = torch.zeros(total, device=order.device)
    mask[order[:count]] = 1.0
    return mask


# ---------------------------------------------------------------------------- prune


def prepare_inputs(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, cfg: PruneConfig, *,
                   data: TaskData | None = None, means: Means | None = None, model_dir: str | None = None,
                   fallback_dir: str | None = None, progress: bool = False) -> tuple[TaskData, Means]:
    """The task batches and the mean activations `prune` needs; a sweep makes them once and passes them in.

    Only what is missing is made; means are checked to cover `cfg.node_sites`.
    """
    index = NodeIndex.build(model, cfg.node_sites)
    if data is None:
        if tokenizer is None:
            raise PruneError("prune needs a tokenizer to build the task examples (or pass data=)")
        data = load_task_data(tokenizer, cfg, max_length=context_length(model))
    if data.task not in (cfg.task, Path(cfg.task).stem):
        raise PruneError(f"the task data given are for {data.task!r}, but the config prunes for {cfg.task!r}")
    if means is None:
        means = load_or_compute_means(model, index.names, tokenizer=tokenizer, n_blocks=cfg.mean_blocks,
                                      model_dir=model_dir, cache_dir=cfg.cache_dir, fallback_dir=fallback_dir,
                                      progress=progress)
    if not means.covers(index.names):
        missing = [n for n in index.names if n not in means.values]
        raise PruneError(f"the means lack node sites {missing[:5]}{'...' if len(missing) > 5 else ''}; compute them "
                         "for the same node_sites")
    return data, means


def _model_name(model: nn.Module, given: str | None) -> str:
    if given:
        return str(given)
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


@dataclass
class _Search:
    """What the steps of one `prune` call share: the model, its inputs, the circuit being filled in, timings."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    cfg: PruneConfig
    progress: bool
    index: NodeIndex
    data: TaskData
    means: Means
    mean_vec: torch.Tensor  # (N,) the ablation value of every node
    ablation: Ablation
    circuit: Circuit
    t0: float
    seconds: dict[str, float] = field(default_factory=dict)
    fast: bool = False  # the last-position shortcut matches the full forward pass
    target: float = 0.0  # absolute target loss (a relative one resolved)
    full_val: dict[str, float] = field(default_factory=dict)  # the unpruned model on the validation split
    fail_on_collapse: bool = False  # a collapse after the last retry fails the search (a sweep) instead of going on
    stop_settled_above: bool = False  # the bisection gives up far above the open set (a sweep; `_search_count`)
    measure: bool = True  # measure on test, calibrate and describe the circuit (a sweep's runs: only the best, later)

    def margins(self, batch: TaskBatch, mask: torch.Tensor,
                record: list[str] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Margins with the nodes outside `mask` mean-ablated (float32, computed at `cfg.precision`)."""
        with self.ablation.installed(mask), precision_context(self.cfg.precision, batch.input_ids.device, self.model):
            return evaluate(self.model, batch, chunk_tokens=self.cfg.chunk_tokens, fast=self.fast, record=record)

    def metric(self, batch: TaskBatch, mask: torch.Tensor) -> dict[str, float]:
        """{"loss", "accuracy"} of the circuit `mask` on `batch`."""
        return loss_and_accuracy(self.margins(batch, mask)[0], batch.family)

    def fail(self, reason: str, *, timed: bool = True) -> Circuit:
        self.circuit.failed, self.circuit.reason = True, reason
        if timed:
            self.circuit.search["seconds"] = {**self.seconds, "total": time.perf_counter() - self.t0}
        return self.circuit


def prune(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    cfg: PruneConfig,
    means: Means | None = None,
    progress: bool = True,
    *,
    data: TaskData | None = None,
    model_dir: str | None = None,
    fallback_dir: str | None = None,
    faithfulness: bool = True,
    fail_on_collapse: bool = False,
    measure: bool = True,
    stop_settled_above: bool = False,
) -> Circuit:
    """Find the smallest circuit of `model` for `cfg.task` at the target loss (see the module docstring).

    `means` and `data` (from `prepare_inputs`) can be passed to skip their
    preparation when pruning one model repeatedly (a sweep). A tokenizer is needed unless both are given (then
    snippets are skipped). The model is moved to ``cfg.device``; its parameters'
    ``requires_grad`` and its train/eval mode are restored afterwards. ``faithfulness=False`` skips the
    faithfulness curves (as long as the mask training on the main job's model). ``fail_on_collapse=True``
    (a sweep) ends the search as failed when the masks collapse after the last retry, instead of ordering
    and bisecting nodes the masks never told apart (such a search ends near the whole model and costs
    more than a good one); its ``search`` then has
    ``stopped_at_collapse``. ``measure=False`` (a sweep's runs) stops once the circuit is chosen and its nodes
    and edges listed: no test split, no calibration, no per-family means or snippets; `finish_circuit` adds
    them later, for the one circuit a sweep keeps, as this call would have. ``stop_settled_above=True`` (a
    sweep) fails the search, with ``stopped_settled_above`` in its ``search``, once the bisection finds a count
    past ``SETTLED_ABOVE_STOP`` times the open set (+ 10) still missing the target: such a circuit ends near the
    whole model, and the rest of its bisection and its edge listing cost ~30 s of a ~140 s run (README,
    "Settled above").
    """
    s = _start(model, tokenizer, cfg, means, progress, data=data, model_dir=model_dir, fallback_dir=fallback_dir)
    s.fail_on_collapse, s.measure, s.stop_settled_above = fail_on_collapse, measure, stop_settled_above
    with frozen(model):
        reason = _check_full_model(s)
        if reason:
            return s.fail(reason)
        try:
            order, scores, tau, hint = _order_nodes(s)
        except PruneError as e:
            return s.fail(str(e))
        count = _search_count(s, order, hint)
        stopped = s.circuit.search.get("stopped_settled_above")
        if stopped:
            return s.fail(f"the masks left {hint} nodes open but {stopped['missed_at']} nodes still miss the target "
                          f"on the validation split: the circuit settled far above the open set (stopped there)")
        order, scores, tau, count = _retry_if_settled_above(s, order, scores, tau, hint, count)
        if count is None:  # cannot happen when the full model meets the target; kept for non-monotone surprises
            return s.fail("no node count reaches the target on the validation split", timed=False)
        s.circuit.order_and_count = (order.tolist(), int(count))
        _list_edges(s, keep_mask(order, count, s.index.total))
        _list_nodes(s, order[:count].sort().values.tolist(), scores, tau)
        if measure:
            _finish(s, order, count, faithfulness)
    s.seconds["total"] = time.perf_counter() - s.t0
    s.circuit.search["seconds"] = {k: round(v, 3) for k, v in s.seconds.items()}
    s.circuit.search["means_source"] = s.means.source
    return s.circuit


def finish_circuit(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, cfg: PruneConfig,
                   circuit: dict[str, Any], order_and_count: tuple[list[int], int], *, faithfulness: bool = True,
                   data: TaskData | None = None, means: Means | None = None, model_dir: str | None = None,
                   fallback_dir: str | None = None) -> Circuit:
    """The circuit `prune` would have returned, from one it returned with ``measure=False`` (``circuit``, its
    JSON) and its ``order_and_count``: calibration, test metrics, checks, node descriptions and (with
    `faithfulness`) the curves, on the same splits. A sweep measures only the circuit it keeps."""
    s = _start(model, tokenizer, cfg, means, False, data=data, model_dir=model_dir, fallback_dir=fallback_dir)
    s.circuit = Circuit.from_json(circuit)
    order, count = order_and_count
    with frozen(model):
        s.fast = fast_head_ok(model, s.data.val)
        s.full_val, s.target = s.circuit.metrics["full_model_val"], s.circuit.target_loss
        _finish(s, torch.as_tensor(order, dtype=torch.long, device=s.mean_vec.device), int(count), faithfulness)
    s.circuit.search["seconds"] = {**s.circuit.search.get("seconds", {}),
                                   **{k: round(v, 3) for k, v in s.seconds.items() if k != "prepare"}}
    s.circuit.order_and_count = (list(order), int(count))
    return s.circuit


def _start(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, cfg: PruneConfig, means: Means | None,
           progress: bool, *, data: TaskData | None, model_dir: str | None, fallback_dir: str | None) -> _Search:
    """Move the model to the device, prepare the inputs, and begin the circuit record."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    model.to(device)
    index = NodeIndex.build(model, cfg.node_sites)
    data, means = prepare_inputs(model, tokenizer, cfg, data=data, means=means, model_dir=model_dir,
                                 fallback_dir=fallback_dir, progress=progress)
    data = data.to(device)
    mean_vec = index.join(means.values).to(device).float()
    circuit = Circuit(model=_model_name(model, model_dir), model_type=str(getattr(model.config, "model_type", "?")),
                      task=data.task, method=cfg.method, target_loss=cfg.target_loss, n_layer=n_layers(model),
                      node_sites=index.names, total_nodes=index.total, hyperparameters=asdict(cfg),
                      completions=list(data.completions), target_tokens=list(data.token_strings),
                      model_fingerprint=model_fingerprint(model))
    s = _Search(model=model, tokenizer=tokenizer, cfg=cfg, progress=progress, index=index, data=data, means=means,
                mean_vec=mean_vec, ablation=Ablation(model, index, mean_vec), circuit=circuit, t0=t0)
    s.seconds["prepare"] = time.perf_counter() - t0
    return s


def _check_full_model(s: _Search) -> str | None:
    """Measure the unpruned model and resolve the target; the reason to stop when the model cannot be pruned.

    Every decision here reads the validation split (the test split is measured for the report only):
    a model below `cfg.min_accuracy` (e.g. at chance) does not solve the task, so any circuit of it,
    the empty one included, would be meaningless; a relative target is the model's own
    validation loss plus the margin; and a model whose validation loss misses the target cannot have a
    circuit that reaches it.
    """
    model, data, cfg = s.model, s.data, s.cfg
    s.fast = fast_head_ok(model, data.val)
    all_open = torch.ones(s.index.total, device=s.mean_vec.device)  # no site hooked: the model itself
    full_val = s.metric(data.val, all_open)
    s.full_val = full_val
    s.circuit.metrics["full_model_val"] = full_val
    if s.measure:  # else measured with the rest, for the circuit a sweep keeps (`finish_circuit`)
        s.circuit.metrics["full_model"] = s.metric(data.test, all_open)
    s.circuit.search.update(full_model_val=full_val, fast_head=s.fast)
    own = full_val["loss"]
    s.target = cfg.target_loss if cfg.relative_margin is None else own + cfg.relative_margin
    s.circuit.target_loss = s.target
    if full_val["accuracy"] < cfg.min_accuracy:
        return (
            f"the model does not solve this task: accuracy {full_val['accuracy']:.3f} on validation (task loss "
            f"{full_val['loss']:.4f} nats on {data.task}; chance is accuracy 0.5, loss ln 2 = {math.log(2):.4f}), "
            f"below min_accuracy {cfg.min_accuracy:g}, so any circuit of it, even the empty one, would be "
            f"meaningless; train the model longer or prune it for a task it solves (min_accuracy=0 prunes anyway)"
        )
    if full_val["loss"] > s.target:
        return (
            f"the unpruned model itself misses the target: its task loss on {data.task} is "
            f"{full_val['loss']:.4f} nats on the validation split (accuracy {full_val['accuracy']:.3f}), above the "
            f"target {s.target:.4f}; prune toward a target relative to the model's own loss, e.g. --target-loss "
            f"relative:+0.05 (= {own + 0.05:.4f} here) or relative_margin=0.05, or use a model that solves the task"
        )
    if cfg.min_accuracy > 0:  # min_accuracy=0 asks to prune anyway (toy models near chance)
        # A model just above min_accuracy can have a loss near ln 2, and its relative target then sits above
        # what the empty circuit gets (only the embeddings' direct path and the means left): any set of
        # nodes, the empty one included, "meets" it, and the circuit would say nothing about the task.
        empty = s.metric(data.val, torch.zeros_like(all_open))
        s.circuit.metrics["all_ablated_val"] = empty
        if empty["loss"] <= s.target:
            return (
                f"the target {s.target:.4f} is met by the empty circuit: with every node mean-ablated the task "
                f"loss on {data.task} is {empty['loss']:.4f} nats on the validation split (the model's own "
                f"{own:.4f}, chance ln 2 = {math.log(2):.4f}), so any circuit would meet it without carrying the "
                f"task; choose a target under {empty['loss']:.4f} (a smaller relative margin) or a model that "
                f"solves the task with more to spare"
            )
    return None


def _order_nodes(s: _Search) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int | None]:
    """(node ids in the order they join the circuit, their scores, tau or None, nodes the masks left open or None)."""
    t1 = time.perf_counter()
    try:
        if s.cfg.method == "learned":
            tau, importance = _learn_masks(s)
            order, scores, hint = order_nodes(tau, tie_break=importance), tau, int((tau > 0).sum())
        else:
            scores = _attribution(s)
            order, tau, hint = order_nodes(scores), None, None
    finally:  # a failed search (a collapse in a sweep) records its time too
        key = "optimise" if s.cfg.method == "learned" else "attribution"
        s.seconds[key] = s.seconds.get(key, 0.0) + time.perf_counter() - t1  # summed over retries
    return order, scores, tau, hint


def _learn_masks(s: _Search) -> tuple[torch.Tensor, torch.Tensor]:
    """`train_masks`, again with a weaker k_coef and a new seed after each collapse; (tau, importance)."""
    cfg, progress = s.cfg, s.progress
    # Collapse: the running task loss stays past 3/4 of the way from the model's own loss to chance. A model
    # within COLLAPSE_MIN_GAP of chance (pruned only with min_accuracy 0) has no collapse to tell from noise.
    gap = math.log(2) - s.full_val["loss"]
    collapse_at = s.full_val["loss"] + 0.75 * gap if gap >= COLLAPSE_MIN_GAP else None
    k_coef, seed, collapses = cfg.k_coef, cfg.seed, []
    for attempt in range(cfg.collapse_retries + 1):
        last = attempt == cfg.collapse_retries
        try:
            tau, importance, curve = train_masks(s.model, s.ablation, s.data.train, replace(cfg, seed=seed),
                                                 progress=progress, fast=s.fast, k_coef=k_coef,
                                                 collapse_at=None if last and not s.fail_on_collapse else collapse_at)
            break
        except MaskCollapse as e:
            collapses.append({"k_coef": k_coef, "seed": seed, "step": e.step, "loss": round(e.loss, 4)})
            if last:  # only with fail_on_collapse
                s.circuit.search.update(k_coef=k_coef, seed=seed, collapses=collapses, stopped_at_collapse=True)
                raise PruneError(
                    f"the masks collapsed: {e} of {cfg.steps}, a running mean past {collapse_at:.3f} (3/4 of the way "
                    f"from the model's own validation loss {s.full_val['loss']:.3f} to chance ln 2) with k_coef "
                    f"{k_coef:g}, lr {cfg.lr:g}; stopped there (a weaker k_coef or a smaller lr keeps nodes open)"
                ) from None
            if progress:
                print(f"masks collapsed with k_coef {k_coef:g}, seed {seed} ({e}); again with k_coef "
                      f"{k_coef / COLLAPSE_K_FACTOR:g}, seed {seed + 1}", flush=True)
            k_coef, seed = k_coef / COLLAPSE_K_FACTOR, seed + 1
    s.circuit.search.update(train_curve=curve, k_coef=k_coef, seed=seed)
    if collapses:
        s.circuit.search["collapses"] = collapses
    return tau, importance


# A sweep's bisection gives up when a count past this many times the open set (+ 10) misses the target: four
# times the margin of `_settled_above`, so a circuit that ends moderately past the open set is still found
# exactly (on a `tiny` sparse model a run with 85 nodes open ended at 369, which a bound of 4x stopped at 361).
SETTLED_ABOVE_STOP = 8


def _settled_above(hint: int | None, count: int | None) -> bool:
    """The masks closed too much: the circuit needed far more nodes than they left open (past the open set the
    order is a guess, and such a circuit ends near the whole model)."""
    return hint is not None and count is not None and count > 2 * hint + 10


def _retry_if_settled_above(s: _Search, order: torch.Tensor, scores: torch.Tensor, tau: torch.Tensor | None,
                            hint: int | None, count: int | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor | None, int | None]:
    """Masks that settled above the target are trained again with k_coef / 3 and the next seed, as after a
    collapse and from the same retry budget (none in a sweep: CARBS must see what its k_coef does); the smallest
    circuit found wins, and every attempt is recorded in ``search["settled_above"]``.

    A k_coef tuned on one model (the sweep's, on the sparse model before its bridges) can close a near relative
    too far: its masked train loss hovers just above the target, never near chance, so no collapse is seen, and
    the bisection then walks an arbitrary order up to almost every node."""
    left = s.cfg.collapse_retries - len(s.circuit.search.get("collapses", []))
    if s.cfg.method != "learned" or not _settled_above(hint, count) or left <= 0:
        return order, scores, tau, count
    search = s.circuit.search
    attempts = [{"k_coef": search["k_coef"], "seed": search["seed"], "open_at_end": hint, "nodes": count}]
    best = (count, order, scores, tau, copy.deepcopy(search))
    for _ in range(left):
        k_coef, seed = search["k_coef"] / COLLAPSE_K_FACTOR, search["seed"] + 1
        if s.progress:
            print(f"the masks left {hint} nodes open but the circuit needed {count}; again with k_coef {k_coef:g}, "
                  f"seed {seed}", flush=True)
        # No collapse detection in the retry (collapse_retries=0, not failing): it is the weaker pressure's turn.
        s.cfg = replace(s.cfg, k_coef=k_coef, seed=seed, collapse_retries=0)
        for key in ("warning", "open_at_end", "collapses"):
            search.pop(key, None)
        order, scores, tau, hint = _order_nodes(s)
        count = _search_count(s, order, hint)
        attempts.append({"k_coef": k_coef, "seed": seed, "open_at_end": hint, "nodes": count})
        if count is not None and (best[0] is None or count < best[0]):
            best = (count, order, scores, tau, copy.deepcopy(search))
        if not _settled_above(hint, count):
            break
    count, order, scores, tau, kept_search = best
    s.circuit.search = {**kept_search, "settled_above": attempts}
    return order, scores, tau, count


def _search_count(s: _Search, order: torch.Tensor, hint: int | None) -> int | None:
    """The fewest nodes (in `order`) whose circuit reaches the target on the validation split."""
    t1 = time.perf_counter()
    total, search = s.index.total, s.circuit.search

    def val_loss(count: int) -> float:
        m = s.margins(s.data.val, keep_mask(order, count, total))[0]
        return loss_and_accuracy(m, s.data.val.family)["loss"]

    # A sweep's run stops once the circuit is sure to have settled far above the open set: CARBS sees the
    # whole model for it, what such a bisection ends near anyway, without its 10-20 more passes.
    give_up = SETTLED_ABOVE_STOP * hint + 10 if s.stop_settled_above and hint else None
    count, trail = bisect_count(val_loss, total, s.target, hint=hint, known={total: s.full_val["loss"]},
                                give_up_above=give_up)
    search["bisection"] = trail
    if count is None and give_up is not None:
        missed = max(c for c, v in trail if c > give_up and not v <= s.target)
        search["stopped_settled_above"] = {"open_at_end": hint, "missed_at": missed, "give_up_above": give_up}
    if hint is not None:
        search["open_at_end"] = hint
        if _settled_above(hint, count):
            search["warning"] = (
                f"the masks left {hint} nodes open but the circuit needed {count}: past the open nodes the "
                f"order is only a guess, so the sparsity pressure was too strong for this model (lower k_coef, "
                f"now {search.get('k_coef', s.cfg.k_coef):g})")
    s.seconds["bisection"] = s.seconds.get("bisection", 0.0) + time.perf_counter() - t1
    return count


def _measure(s: _Search, order: torch.Tensor, count: int) -> tuple[torch.Tensor, list[int], dict[str, torch.Tensor]]:
    """Calibrate, measure, run the two checks; (mask (N,), kept ids, last-position activations on test).

    The paper's order: the bisection has fixed the node count on the raw (uncalibrated) validation
    loss; only then are the scale and shift fitted, on the train split, and both the raw and the
    calibrated circuit are measured on validation (``*_val``: what a sweep may choose on) and on test
    (the reported numbers). The target is judged on the raw loss, as the bisection was.
    """
    t1 = time.perf_counter()
    data, index, target, c = s.data, s.index, s.target, s.circuit
    if "full_model" not in c.metrics:  # a search without `measure`
        c.metrics["full_model"] = s.metric(data.test, torch.ones(index.total, device=s.mean_vec.device))
    mask = keep_mask(order, count, index.total)
    kept = order[:count].sort().values.tolist()
    calib = data.train.select(slice(0, min(len(data.train), CALIBRATION_EXAMPLES)))
    train_margin = s.margins(calib, mask)[0]
    a, b = fit_calibration(train_margin * orientation(calib.family), calib.family, s.cfg.calibrate_steps)
    c.calibration = {"scale": a, "shift": b}

    def raw_and_calibrated(margin: torch.Tensor, fam: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
        sign = orientation(fam)
        return loss_and_accuracy(margin, fam), loss_and_accuracy(sign * (a * (sign * margin) + b), fam)

    node_sites = sorted({index.node(i)[0].name for i in kept})
    test_margin, acts = s.margins(data.test, mask, record=node_sites)
    circuit_test, calibrated_test = raw_and_calibrated(test_margin, data.test.family)
    circuit_val, calibrated_val = raw_and_calibrated(s.margins(data.val, mask)[0], data.val.family)
    metrics = {
        "full_model": c.metrics["full_model"],
        "circuit": circuit_test,
        "circuit_calibrated": calibrated_test,
        "circuit_ablated": s.metric(data.test, 1.0 - mask),
        "all_ablated": s.metric(data.test, torch.zeros_like(mask)),
        "full_model_val": s.full_val,
        **({"all_ablated_val": c.metrics["all_ablated_val"]} if "all_ablated_val" in c.metrics else {}),
        "circuit_val": circuit_val,
        "circuit_calibrated_val": calibrated_val,
    }
    c.metrics = metrics
    keeps = metrics["circuit"]["loss"] <= target
    c.verification = {
        "keeps_target": keeps,
        "keeps_target_val": circuit_val["loss"] <= target,
        "destroys_task": destroys(metrics["circuit_ablated"]),
        "note": (f"test split: the circuit alone (all {index.total - count} other nodes mean-ablated) has loss "
                 f"{metrics['circuit']['loss']:.4f} {'<=' if keeps else '>'} target {target:.4f} (uncalibrated, as "
                 f"the bisection chose it on validation: {circuit_val['loss']:.4f}; calibrated "
                 f"{calibrated_test['loss']:.4f}); with its own {count} nodes mean-ablated the loss is "
                 f"{metrics['circuit_ablated']['loss']:.4f} (accuracy {metrics['circuit_ablated']['accuracy']:.3f}); "
                 f"'destroyed' means loss >= ln 2 = {math.log(2):.4f} or accuracy <= 0.6"),
    }
    s.seconds["evaluate"] = time.perf_counter() - t1
    return mask, kept, acts


def _attribution(s: _Search) -> torch.Tensor:
    """Attribution scores of every node on the train split (N,), at `cfg.precision`."""
    with precision_context(s.cfg.precision, s.mean_vec.device, s.model):
        return attribution_scores(s.model, s.index, s.mean_vec, s.data.train, chunk_tokens=s.cfg.chunk_tokens,
                                  fast=s.fast)


# Faithfulness points by content (the model's weights, the test prompts, the means, the precision, the kept
# nodes) -> (task loss, logit difference), for this process. The main job measures a learned circuit's curves
# (its own order's and attribution's) and then prunes the same model by attribution: that circuit's curve, the
# empty circuit and the whole model are the same evaluations, ~15 passes over the test prompts (~1 minute).
_CURVE_MEMO: dict[str, tuple[float, float]] = {}
_CURVE_MEMO_SIZE = 512


def _curve_context(s: _Search) -> str:
    """What a faithfulness point depends on besides its mask, as a hash."""
    h = hashlib.sha256(f"{s.circuit.model_fingerprint}|{s.cfg.precision}|{s.cfg.chunk_tokens}|{s.fast}".encode())
    test = s.data.test
    for t in (test.input_ids, test.lengths, test.target_ids, test.distractor_ids, test.family, s.mean_vec):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _faithfulness(s: _Search, order: torch.Tensor, count: int) -> None:
    """Faithfulness curves on the test split for the circuit's node order and, for learned masks, attribution's.

    Reported only: nothing here chooses anything, so it reads the test split. A point measured before in
    this process (the same model, prompts, means, precision and nodes: `_CURVE_MEMO`) is reused;
    ``reused_points`` counts them.
    """
    points = s.cfg.faithfulness_points
    if points <= 0:
        return
    t1 = time.perf_counter()
    test, total = s.data.test, s.index.total
    context, reused = _curve_context(s), 0

    def loss_and_diff(mask: torch.Tensor) -> tuple[float, float]:
        nonlocal reused
        key = context + hashlib.sha256(mask.bool().cpu().numpy().tobytes()).hexdigest()
        if key in _CURVE_MEMO:
            reused += 1
            return _CURVE_MEMO[key]
        margin = s.margins(test, mask)[0]
        value = loss_and_accuracy(margin, test.family)["loss"], float(family_mean(margin.double(), test.family))
        if len(_CURVE_MEMO) >= _CURVE_MEMO_SIZE:
            _CURVE_MEMO.pop(next(iter(_CURVE_MEMO)))  # the oldest
        _CURVE_MEMO[key] = value
        return value

    ones = torch.ones(total, device=s.mean_vec.device)
    known = {0: loss_and_diff(torch.zeros_like(ones)), total: loss_and_diff(ones)}
    orders = {s.cfg.method: order}
    if s.cfg.method == "learned":
        orders["attribution"] = order_nodes(_attribution(s))
    counts = budgets(total, points, also=(count,))
    curves = {name: faithfulness_curve(lambda n, o=o: loss_and_diff(keep_mask(o, n, total)), counts, total, known)
              for name, o in orders.items()}
    own = curves[s.cfg.method]
    s.circuit.faithfulness = {
        "split": "test", "metric": "logit difference (target - distractor), family-averaged",
        "curve": own["curve"], "cpr": own["cpr"], "cmd": own["cmd"], "by_order": curves, "reused_points": reused,
    }
    s.seconds["faithfulness"] = time.perf_counter() - t1


def _list_edges(s: _Search, mask: torch.Tensor) -> None:
    t1 = time.perf_counter()
    s.circuit.set_edges(circuit_edges(s.model, s.index, mask.bool()), s.cfg.max_listed_edges)  # typed, counted
    s.seconds["edges"] = time.perf_counter() - t1


def _finish(s: _Search, order: torch.Tensor, count: int, faithfulness: bool) -> None:
    """What the test split and the corpus say about the chosen circuit: calibration, metrics and checks,
    the faithfulness curves, each node's per-family activation and snippets."""
    _, _, acts = _measure(s, order, count)
    if faithfulness:
        _faithfulness(s, order, count)
    _describe_nodes(s, acts)


def _list_nodes(s: _Search, kept: list[int], scores: torch.Tensor, tau: torch.Tensor | None) -> None:
    """One `CircuitNode` per kept node (ids ascending): site, channel, score, tau, ablation mean."""
    index = s.index
    s.circuit.nodes = []
    for i in kept:
        site, ch = index.node(i)
        s.circuit.nodes.append(CircuitNode(
            id=i, site=site.name, layer=site.layer, kind=site.kind, channel=ch,
            tau=None if tau is None else float(tau[i]), score=float(scores[i]), mean=float(s.mean_vec[i])))
    s.circuit.num_nodes = len(s.circuit.nodes)


def _describe_nodes(s: _Search, acts: dict[str, torch.Tensor]) -> None:
    """Each listed node's mean activation per prompt family (test split) and its top corpus snippets."""
    t1 = time.perf_counter()
    nodes, cfg = s.circuit.nodes, s.cfg
    node_keys = [(n.site, n.channel) for n in nodes]
    snippets: list[list[dict[str, Any]]] = [[] for _ in nodes]
    if cfg.snippets > 0 and s.tokenizer is not None and nodes:
        snippets = top_snippets(s.model, s.tokenizer, s.means.blocks, node_keys, k=cfg.snippets,
                                tokens=cfg.snippet_tokens)
    s.seconds["snippets"] = time.perf_counter() - t1
    fam = s.data.test.family
    for node, snips in zip(nodes, snippets):
        values = acts[node.site][:, node.channel]  # (B,) at the last prompt position
        node.mean_by_family = [float(values[fam == f].mean()) if bool((fam == f).any()) else float("nan")
                               for f in (0, 1)]
        node.snippets = snips
