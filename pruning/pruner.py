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
(``collapse_retries``; a sweep turns this off).

Then the nodes are ordered by tau (equal taus, common at the clamp, by a
running average of how much each node's mask lowered the task loss) and the
number kept is bisected for the fewest whose circuit reaches the target loss
on the validation split (galloping from the number the masks left open); a scale
and shift of the two-token logit difference are fitted on the train split
with LBFGS; every reported number is on the test split, and two checks are
run: the circuit alone keeps the target, and ablating the circuit's own nodes
destroys the task.

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

Speed: a task needs the logits of one position per prompt, so the forward pass
stops at the ``final_resid`` site and only the last positions are unembedded
(per architecture, `HEADS`; checked against the full forward pass before use),
and examples are grouped by length so little padding is computed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from pruning.circuit import Circuit, CircuitEdge, CircuitNode, _metric, destroys
from pruning.config import PruneConfig
from pruning.graph import NodeIndex, circuit_edges
from pruning.means import Means, load_or_compute_means, top_snippets
from sparse_lm.adapters import n_layers, sites_of
from tasks.loss import TaskBatch, encode_examples, family_mean, length_chunks, margins, task_logits_last

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["prune", "prepare_inputs", "PruneError", "TaskData", "load_task_data", "heaviside_ste", "surrogate_grad",
           "Ablation", "bisect_count", "fit_calibration", "evaluate", "batch_margins", "last_logits", "resolve_device"]


# Train examples the two calibration parameters are fitted on (more adds time, not accuracy).
CALIBRATION_EXAMPLES = 512
# L2 weight on log(scale) and shift in the calibration fit: small enough not to matter unless the margins are
# perfectly separable, where it keeps the fit finite.
CALIBRATION_L2 = 1e-3


class PruneError(ValueError):
    """Pruning cannot produce a circuit (the message says why and what to change)."""


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


class Ablation:
    """Mean ablation of nodes through the model's named sites: ``x * m + mean * (1 - m)`` per channel.

    With ``m = 1`` the value is exactly ``x`` and with ``m = 0`` exactly the mean
    (no ``mean + (x - mean)`` rounding), so an all-open mask reproduces the model.
    """

    def __init__(self, model: nn.Module, index: NodeIndex, mean_vec: torch.Tensor):
        self.sites = sites_of(model)
        self.index = index
        self.means = index.split(mean_vec)
        self.masks: dict[str, torch.Tensor] = {}

    def set(self, mask: torch.Tensor) -> None:
        """Use this (N,) mask (float, may carry a gradient) from the next forward pass on."""
        self.masks = self.index.split(mask)

    def _apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        m = self.masks[name].to(x.dtype)
        # mean * (1 - m) is one (width,) vector, so the only full-size operation is one fused multiply-add
        return torch.addcmul(self.means[name].to(x.dtype) * (1 - m), x, m)  # (..., width)

    @contextmanager
    def installed(self, mask: torch.Tensor | None = None, *, all_sites: bool = False) -> Iterator[None]:
        """Hooks on the node sites for the block. With a fixed `mask`, fully open sites get no hook."""
        if mask is not None:
            self.set(mask)
        names = [s.name for s in self.index if all_sites or bool((self.masks[s.name] != 1).any())]
        with self.sites.replace({n: (lambda x, n=n: self._apply(n, x)) for n in names}):
            yield


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
    from tasks import get_task
    from tasks.contract import encode_plain

    task = get_task(cfg.task)
    batches = {}
    resolved = None
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
        resolved = task.resolve(tokenizer, task.examples(split, n, seed=0))
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


def _head_sparse_gpt(model: nn.Module, x: torch.Tensor, last_ids: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(model.transformer.ln_f(x)) + model.final_logits_bias
    if model.bigram_table is not None:
        logits = logits + model.bigram_table[last_ids].to(logits.dtype)
    return logits


def _head_gpt2(model: nn.Module, x: torch.Tensor, last_ids: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.transformer.ln_f(x))


def _head_llama(model: nn.Module, x: torch.Tensor, last_ids: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.model.norm(x))


# The unembedding of each architecture, applied to the final residual at the last prompt positions only:
# a task needs one position's logits, and the full (batch, pos, vocab) logits cost as much as the layers.
HEADS = {"sparse_gpt": _head_sparse_gpt, "gpt2": _head_gpt2, "llama": _head_llama, "mistral": _head_llama,
         "qwen2": _head_llama}


def last_logits(model: nn.Module, batch: TaskBatch, *, fast: bool = True) -> torch.Tensor:
    """Logits at each prompt's last position, (B, V). With `fast`, the forward pass stops at the
    ``final_resid`` site and only the last positions are unembedded (checked against the full
    forward pass by `fast_head_ok`)."""
    head = HEADS.get(getattr(model.config, "model_type", None)) if fast else None
    if head is None:
        return task_logits_last(model, batch.input_ids, batch.lengths)
    box: dict[str, torch.Tensor] = {}

    def grab(site, x: torch.Tensor) -> None:
        box["x"] = x
        raise _Stop

    width = int(batch.lengths.max())
    try:
        with sites_of(model).hooked({"final_resid": grab}):
            model(input_ids=batch.input_ids[:, :width])
    except _Stop:
        pass
    rows = torch.arange(len(batch), device=batch.input_ids.device)
    last = batch.lengths - 1
    return head(model, box["x"][rows, last], batch.input_ids[rows, last])  # (B, V)


@torch.no_grad()
def fast_head_ok(model: nn.Module, batch: TaskBatch, n: int = 4) -> bool:
    """Whether the last-position shortcut gives the logits of the full forward pass."""
    if HEADS.get(getattr(model.config, "model_type", None)) is None:
        return False
    mb = batch.select(slice(0, n))
    full = task_logits_last(model, mb.input_ids, mb.lengths)
    fast = last_logits(model, mb)
    return fast.shape == full.shape and torch.allclose(fast, full, rtol=1e-4, atol=1e-4)


def _length_chunks(batch: TaskBatch, chunk_tokens: int) -> list[torch.Tensor]:
    """`tasks.loss.length_chunks` of the batch, on the batch's device."""
    return [c.to(batch.input_ids.device) for c in length_chunks(batch.lengths, chunk_tokens)]


def batch_margins(model: nn.Module, batch: TaskBatch, *, chunk_tokens: int = 8192, fast: bool = True,
                  record: list[str] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Target-minus-distractor margins (B,) in batch order (differentiable under grad) and, for `record`
    sites, their values at the last prompt position ({name: (B, width)})."""
    sites = sites_of(model)
    chunks = _length_chunks(batch, chunk_tokens)
    values: list[torch.Tensor] = []
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in record or []}
    for idx in chunks:
        mb = batch.select(idx)
        with sites.record(record or []) as rec:
            last = last_logits(model, mb, fast=fast)  # (b, V)
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


def loss_and_accuracy(margin: torch.Tensor, family: torch.Tensor) -> dict[str, float]:
    loss = family_mean(F.softplus(-margin.double()), family)
    acc = family_mean((margin > 0).double(), family)
    return _metric(loss.item(), acc.item())


def orientation(family: torch.Tensor) -> torch.Tensor:
    """+1 for family 0, -1 for family 1: margin = orientation x (logit(c0) - logit(c1))."""
    return 1.0 - 2.0 * family.float()


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

    def task_loss(a: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return family_mean(F.softplus(-sign * (a * d + shift)), fam)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = task_loss(log_a.exp(), b) + CALIBRATION_L2 * (log_a**2 + b**2)
        loss.backward()
        return loss

    before = task_loss(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)).item()
    opt.step(closure)
    a_fit, b_fit = log_a.detach().exp(), b.detach()
    after = task_loss(a_fit, b_fit).item()
    if not (math.isfinite(after) and math.isfinite(float(a_fit)) and math.isfinite(float(b_fit))) or after > before:
        return 1.0, 0.0
    return float(a_fit), float(b_fit)


def bisect_count(loss_at: Callable[[int], float], total: int, target: float, *, hint: int | None = None,
                 known: dict[int, float] | None = None) -> tuple[int | None, list[list[float]]]:
    """The smallest count c in [0, total] with loss_at(c) <= target, assuming the loss falls with c.

    With a `hint` (the number of nodes the masks left open) the search gallops from
    it by factors of 2 before bisecting, which needs fewer evaluations when the
    answer is near the hint.

    Returns (count or None when even `total` misses, [[count, loss], ...] in the order evaluated).
    The count returned was evaluated and meets the target; count - 1 was evaluated
    and misses it (or count is 0).
    """
    history: dict[int, float] = {}
    known = dict(known or {})

    def at(c: int) -> float:
        if c not in history:
            history[c] = known[c] if c in known else float(loss_at(c))
        return history[c]

    trail = lambda: [[c, v] for c, v in history.items()]  # noqa: E731
    if not at(total) <= target:
        return None, trail()
    if at(0) <= target:
        return 0, trail()
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
    return hi, trail()


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
                collapse_at: float | None = None) -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    """Adam on tau; returns (final tau (N,), importance (N,), curve [[step, task loss, open nodes]]).

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
    with ablation.installed(torch.ones(n, device=device), all_sites=True):
        for step in steps:
            if pos + cfg.batch_size > len(order):
                order, pos = torch.randperm(len(train), generator=gen), 0
            idx = order[pos : pos + cfg.batch_size]
            pos += cfg.batch_size
            mb = train.select(idx.to(device))
            mask = heaviside_ste(tau, cfg.heaviside_temp)
            mask.retain_grad()
            ablation.set(mask)
            margin = batch_margins(model, mb, chunk_tokens=cfg.chunk_tokens, fast=fast)[0]  # (b,)
            task_loss = family_mean(F.softplus(-margin), mb.family)
            loss = task_loss + k_coef * mask.sum()
            if not torch.isfinite(loss):
                raise PruneError(f"the pruning loss became {loss.item()} at step {step}; lower lr or k_coef")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                tau.clamp_(-1.0, 1.0)
                # d(loss)/d(mask) = d(task loss)/d(mask) + k_coef
                importance.mul_(0.95).add_(k_coef - mask.grad, alpha=0.05)
            ema = task_loss.item() if ema is None else 0.9 * ema + 0.1 * task_loss.item()
            if step % log_every == 0 or step == cfg.steps - 1:
                n_open = int(mask.sum().item())
                curve.append([step, round(task_loss.item(), 6), n_open])
                if progress:
                    steps.set_postfix(loss=f"{task_loss.item():.3f}", open=n_open)
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
        data = load_task_data(tokenizer, cfg, max_length=_context_length(model))
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


def _context_length(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("block_size", "n_positions", "max_position_embeddings"):
        value = getattr(cfg, key, None)
        if value:
            return int(value)
    return None


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
) -> Circuit:
    """Find the smallest circuit of `model` for `cfg.task` at the target loss (see the module docstring).

    `means` and `data` (from `prepare_inputs`) can be passed to skip their
    preparation when pruning one model repeatedly (a sweep). A tokenizer is needed unless both are given (then
    snippets are skipped). The model is moved to ``cfg.device``; its parameters'
    ``requires_grad`` and its train/eval mode are restored afterwards.
    """
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    model.to(device)
    index = NodeIndex.build(model, cfg.node_sites)
    data, means = prepare_inputs(model, tokenizer, cfg, data=data, means=means, model_dir=model_dir,
                                 fallback_dir=fallback_dir, progress=progress)
    data = data.to(device)
    mean_vec = index.join(means.values).to(device).float()
    seconds["prepare"] = time.perf_counter() - t0

    base = Circuit(model=_model_name(model, model_dir), model_type=str(getattr(model.config, "model_type", "?")),
                   task=data.task, method=cfg.method, target_loss=cfg.target_loss, n_layer=n_layers(model),
                   node_sites=index.names, total_nodes=index.total, hyperparameters=asdict(cfg),
                   completions=list(data.completions), target_tokens=list(data.token_strings))
    ablation = Ablation(model, index, mean_vec)
    ct = cfg.chunk_tokens

    def circuit_margins(batch: TaskBatch, mask: torch.Tensor, record: list[str] | None = None):
        with ablation.installed(mask):
            return evaluate(model, batch, chunk_tokens=ct, fast=fast, record=record)

    with frozen(model):
        fast = fast_head_ok(model, data.val)
        full_val = loss_and_accuracy(evaluate(model, data.val, chunk_tokens=ct, fast=fast)[0], data.val.family)
        full_test = loss_and_accuracy(evaluate(model, data.test, chunk_tokens=ct, fast=fast)[0], data.test.family)
        base.metrics["full_model"] = full_test
        base.search.update(full_model_val=full_val, fast_head=fast)
        # A relative target is measured from the model's own loss on both splits the circuit is judged on.
        own = max(full_test["loss"], full_val["loss"])
        target = cfg.target_loss if cfg.relative_margin is None else own + cfg.relative_margin
        base.target_loss = target
        if full_val["loss"] > target or full_test["loss"] > target:
            base.failed = True
            base.reason = (
                f"the unpruned model itself misses the target: its task loss on {data.task} is "
                f"{full_test['loss']:.4f} nats on the test split ({full_val['loss']:.4f} on validation, accuracy "
                f"{full_test['accuracy']:.3f}), above the target {target:.4f}; prune toward a target relative to the "
                f"model's own loss, e.g. --target-loss relative:+0.05 (= {own + 0.05:.4f} here) or "
                f"relative_margin=0.05, or use a model that solves the task"
            )
            base.search["seconds"] = {**seconds, "total": time.perf_counter() - t0}
            return base

        t1 = time.perf_counter()
        hint = None
        tau = None
        try:
            if cfg.method == "learned":
                # Collapse: the running task loss stays past 3/4 of the way from the model's own loss to chance.
                collapse_at = full_val["loss"] + 0.75 * max(0.0, math.log(2) - full_val["loss"])
                k_coef, seed, collapses = cfg.k_coef, cfg.seed, []
                for attempt in range(cfg.collapse_retries + 1):
                    last = attempt == cfg.collapse_retries
                    try:
                        tau, importance, curve = train_masks(model, ablation, data.train, replace(cfg, seed=seed),
                                                             progress=progress, fast=fast, k_coef=k_coef,
                                                             collapse_at=None if last else collapse_at)
                        break
                    except MaskCollapse as e:
                        collapses.append({"k_coef": k_coef, "seed": seed, "step": e.step, "loss": round(e.loss, 4)})
                        if progress:
                            print(f"masks collapsed with k_coef {k_coef:g}, seed {seed} ({e}); again with k_coef "
                                  f"{k_coef / COLLAPSE_K_FACTOR:g}, seed {seed + 1}", flush=True)
                        k_coef, seed = k_coef / COLLAPSE_K_FACTOR, seed + 1
                base.search.update(train_curve=curve, k_coef=k_coef, seed=seed)
                if collapses:
                    base.search["collapses"] = collapses
                scores = tau
                order = order_nodes(tau, tie_break=importance)
                hint = int((tau > 0).sum())
            else:
                from pruning.attribution import attribution_scores

                scores = attribution_scores(model, index, mean_vec, data.train, chunk_tokens=ct, fast=fast)
                order = order_nodes(scores)
        except PruneError as e:
            base.failed, base.reason = True, str(e)
            base.search["seconds"] = {**seconds, "total": time.perf_counter() - t0}
            return base
        seconds["optimise" if cfg.method == "learned" else "attribution"] = time.perf_counter() - t1

        t1 = time.perf_counter()

        def val_loss(count: int) -> float:
            m = circuit_margins(data.val, keep_mask(order, count, index.total))[0]
            return loss_and_accuracy(m, data.val.family)["loss"]

        count, trail = bisect_count(val_loss, index.total, target, hint=hint, known={index.total: full_val["loss"]})
        base.search["bisection"] = trail
        if hint is not None:
            base.search["open_at_end"] = hint
            if count is not None and count > 2 * hint + 10:
                base.search["warning"] = (
                    f"the masks left {hint} nodes open but the circuit needed {count}: past the open nodes the "
                    f"order is only a guess, so the sparsity pressure was too strong for this model (lower k_coef, "
                    f"now {base.search.get('k_coef', cfg.k_coef):g})")
        seconds["bisection"] = time.perf_counter() - t1
        if count is None:  # cannot happen when the full model meets the target; kept for non-monotone surprises
            base.failed, base.reason = True, "no node count reaches the target on the validation split"
            return base

        t1 = time.perf_counter()
        mask = keep_mask(order, count, index.total)
        kept = order[:count].sort().values.tolist()
        calib = data.train.select(slice(0, min(len(data.train), CALIBRATION_EXAMPLES)))
        train_margin = circuit_margins(calib, mask)[0]
        a, b = fit_calibration(train_margin * orientation(calib.family), calib.family, cfg.calibrate_steps)
        base.calibration = {"scale": a, "shift": b}
        node_sites = sorted({index.node(i)[0].name for i in kept})
        test_margin, acts = circuit_margins(data.test, mask, record=node_sites)
        s = orientation(data.test.family)
        calibrated = s * (a * (s * test_margin) + b)
        metrics = {
            "full_model": full_test,
            "circuit": loss_and_accuracy(test_margin, data.test.family),
            "circuit_calibrated": loss_and_accuracy(calibrated, data.test.family),
            "circuit_ablated": loss_and_accuracy(circuit_margins(data.test, 1.0 - mask)[0], data.test.family),
            "all_ablated": loss_and_accuracy(circuit_margins(data.test, torch.zeros_like(mask))[0], data.test.family),
        }
        base.metrics = metrics
        keeps = metrics["circuit"]["loss"] <= target
        destroyed = destroys(metrics["circuit_ablated"])
        base.verification = {
            "keeps_target": keeps,
            "destroys_task": destroyed,
            "note": (f"test split: the circuit alone (all {index.total - count} other nodes mean-ablated) has loss "
                     f"{metrics['circuit']['loss']:.4f} {'<=' if keeps else '>'} target {target:.4f}; with its own "
                     f"{count} nodes mean-ablated the loss is {metrics['circuit_ablated']['loss']:.4f} (accuracy "
                     f"{metrics['circuit_ablated']['accuracy']:.3f}); 'destroyed' means loss >= ln 2 = "
                     f"{math.log(2):.4f} or accuracy <= 0.6"),
        }
        seconds["evaluate"] = time.perf_counter() - t1

        t1 = time.perf_counter()
        edges = circuit_edges(model, index, mask.bool())
        base.num_edges = len(edges)
        base.edges = [CircuitEdge(e.src, e.dst, e.weight) for e in edges[: cfg.max_listed_edges]]
        seconds["edges"] = time.perf_counter() - t1

        t1 = time.perf_counter()
        node_keys = [(index.node(i)[0].name, index.node(i)[1]) for i in kept]
        snippets: list[list[dict[str, Any]]] = [[] for _ in kept]
        if cfg.snippets > 0 and tokenizer is not None and kept:
            snippets = top_snippets(model, tokenizer, means.blocks, node_keys, k=cfg.snippets,
                                    tokens=cfg.snippet_tokens)
        seconds["snippets"] = time.perf_counter() - t1
        fam = data.test.family
        for i, (site_name, ch), snips in zip(kept, node_keys, snippets):
            site = index.by_name[site_name]
            values = acts[site_name][:, ch]  # (B,) at the last prompt position
            by_family = [float(values[fam == f].mean()) if bool((fam == f).any()) else float("nan") for f in (0, 1)]
            base.nodes.append(CircuitNode(
                id=i, site=site_name, layer=site.layer, kind=site.kind, channel=ch,
                tau=None if tau is None else float(tau[i]), score=float(scores[i]), mean=float(mean_vec[i]),
                mean_by_family=by_family, snippets=snips))
        base.num_nodes = len(base.nodes)
    seconds["total"] = time.perf_counter() - t0
    base.search["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    base.search["means_source"] = means.source
    return base
