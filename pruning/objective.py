"""Pluggable task objectives for the pruner, and the multi-class sequence objective.

The pruner (`pruning.pruner`) was written for binary next-token tasks: two
candidate tokens at the last prompt position, a logit-difference margin, and a
calibration of that difference. A compiled RASP program (`pruning.groundtruth`)
answers instead at every position with one of C classes. An `Objective` says
what the pruner needs to know about a task, whatever its form:

- three splits (``train`` / ``val`` / ``test``): any batch with ``__len__``,
  ``select(index)`` (a sub-batch), ``input_ids`` and ``to(device)``;
- ``loss(model, batch)``: the differentiable mean task loss (mask training);
- ``example_loss(model, batch)``: the same loss as a sum of separate per-example
  terms (the attribution baseline needs each example's own gradient);
- ``metrics(model, batch)``: ``{"loss", "accuracy"}`` without gradients (the
  bisection on the validation split, every reported number on the test split);
- ``chance_loss`` and ``destroys(metric)``: when mask training collapsed and
  when an ablated circuit destroyed the task.

`prune_objective` runs the pruner's own pieces on an objective: the same mask
parameterisation and training (`pruner.train_masks` with its collapse retries),
the same node order (`pruner.order_nodes`), the same galloping bisection on the
node count (`pruner.bisect_count`) toward a target on the validation split, the
same attribution scores (`attribution.attribution_scores`) and the same edges
(`graph.circuit_edges`), and returns the same `Circuit`. What differs: the
ablation values are supplied by the caller (``means``: for a compiled program,
the mean over its own input distribution, not over a text corpus), there are no
corpus snippets, and there is no calibration: the binary scale/shift of a logit
difference has no multi-class counterpart here (the circuit records
``search["calibration"]`` saying so; ``calibration`` stays the identity).

The circuit also stores ``search["node_scores"]``: one score per candidate node,
higher joining the circuit earlier (the pruner's node order, as ``total - rank``),
so that the order itself can be scored (ROC-AUC against a known circuit), and
``search["node_values"]``: the raw values it was ordered by (tau or the
attribution score).

    objective = SequenceObjective.from_task(task, name="hist")
    circuit = prune_objective(model, objective, PruneConfig(method="learned", relative_margin=0.01), means)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from pruning.attribution import attribution_scores
from pruning.circuit import DESTROYED_ACCURACY, Circuit, CircuitEdge, CircuitNode
from pruning.config import PruneConfig
from pruning.forward import PruneError
from pruning.graph import NodeIndex, circuit_edges
from pruning.groundtruth.task import IGNORE, SequenceTask, sequence_task_loss
from pruning.pruner import (
    COLLAPSE_K_FACTOR,
    Ablation,
    MaskCollapse,
    bisect_count,
    frozen,
    keep_mask,
    order_nodes,
    resolve_device,
    train_masks,
)
from sparse_lm.arch import n_layers

__all__ = ["CALIBRATION_SKIPPED", "REFINE_ORDERS", "Objective", "SequenceObjective", "drop_one_by_one", "node_attribution", "prune_objective", "split_rows"]

REFINE_ORDERS = (None, "node_order", "reverse_forward")
CALIBRATION_SKIPPED = ("skipped: the calibration fits a scale and shift of a two-token logit difference; a "
                       "multi-class objective has no such difference, so the circuit's logits are used as they are")


class Objective(Protocol):
    """What the pruner needs of a task (see the module docstring)."""

    name: str
    train: Any
    val: Any
    test: Any
    chance_loss: float
    labels: list[str]  # what the task's answers are (the circuit's ``completions``)

    def to(self, device: torch.device | str) -> Objective: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def example_loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def metrics(self, model: nn.Module, batch: Any) -> dict[str, float]: ...

    def destroys(self, metric: dict[str, float]) -> bool: ...


def split_rows(n: int, fractions: tuple[float, float, float] = (0.5, 0.25, 0.25), seed: int = 0
               ) -> tuple[list[int], list[int], list[int]]:
    """Rows 0..n-1 shuffled with `seed` and cut into train / val / test by `fractions` (each split non-empty)."""
    if n < 3:
        raise PruneError(f"a task needs at least 3 inputs to split into train, validation and test; it has {n}")
    if len(fractions) != 3 or min(fractions) <= 0:
        raise PruneError(f"split fractions must be three positive numbers (train, val, test), got {fractions}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    total = sum(fractions)
    n_val = max(1, round(n * fractions[1] / total))
    n_test = max(1, round(n * fractions[2] / total))
    n_train = n - n_val - n_test
    if n_train < 1:
        n_train, n_val = 1, n - 1 - n_test
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


@dataclass
class SequenceObjective:
    """A multi-class target at chosen positions: cross-entropy over every answered position.

    The model maps ``input_ids`` (B, T) to per-position logits (B, T, C) (``model(ids).logits``);
    the batches are `SequenceTask`s (``targets``: class index or ``IGNORE``). ``accuracy`` is the
    share of inputs whose every answered position is right (a program's output is right only when
    the whole sequence is).
    """

    name: str
    train: SequenceTask
    val: SequenceTask
    test: SequenceTask
    n_classes: int
    labels: list[str] = field(default_factory=list)
    # The training and attribution losses read logits / temperature: a model that answers with saturated
    # logits (a compiled program) has almost no gradient at its own answers, so every mask would drift
    # shut at once; at a softer temperature the nodes the answers need push back.
    temperature: float = 1.0

    @classmethod
    def from_task(cls, task: SequenceTask, name: str = "sequence", *,
                  fractions: tuple[float, float, float] = (0.5, 0.25, 0.25), seed: int = 0,
                  temperature: float = 1.0) -> SequenceObjective:
        """Split a task's inputs deterministically (`split_rows`)."""
        if not temperature > 0:
            raise PruneError(f"temperature must be > 0, got {temperature}")
        train, val, test = split_rows(len(task), fractions, seed)
        return cls(name, task.select(train), task.select(val), task.select(test), task.n_classes,
                   [str(c) for c in task.classes], temperature)

    @property
    def chance_loss(self) -> float:
        return math.log(max(2, self.n_classes))

    def to(self, device: torch.device | str) -> SequenceObjective:
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))

    def loss(self, model: nn.Module, batch: SequenceTask) -> torch.Tensor:
        return sequence_task_loss(model(batch.input_ids).logits / self.temperature, batch.targets)[0]

    def example_loss(self, model: nn.Module, batch: SequenceTask) -> torch.Tensor:
        # The mean over answered positions is a sum of per-position terms / their count: a per-example sum.
        logits = model(batch.input_ids).logits.float() / self.temperature  # (B, T, C)
        per_pos = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1),
                                                    ignore_index=IGNORE, reduction="sum")
        return per_pos / batch.answered.sum().clamp(min=1)

    @torch.no_grad()
    def metrics(self, model: nn.Module, batch: SequenceTask) -> dict[str, float]:
        loss, acc = sequence_task_loss(model(batch.input_ids).logits, batch.targets)
        return {"loss": float(loss), "accuracy": float(acc)}

    def destroys(self, metric: dict[str, float]) -> bool:
        return metric["loss"] >= self.chance_loss or metric["accuracy"] <= DESTROYED_ACCURACY


# ---------------------------------------------------------------------------- the search


def _learn(model: nn.Module, ablation: Ablation, objective: Objective, cfg: PruneConfig, full_loss: float,
           progress: bool, search: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """`pruner.train_masks` on the objective, again with k_coef / 3 and a new seed after each collapse."""
    collapse_at = full_loss + 0.75 * max(0.0, objective.chance_loss - full_loss)
    k_coef, seed, collapses = cfg.k_coef, cfg.seed, []
    for attempt in range(cfg.collapse_retries + 1):
        last = attempt == cfg.collapse_retries
        try:
            tau, importance, curve = train_masks(model, ablation, objective.train, replace(cfg, seed=seed),
                                                 progress=progress, fast=False, k_coef=k_coef,
                                                 collapse_at=None if last else collapse_at,
                                                 task_loss_fn=objective.loss)
            break
        except MaskCollapse as e:
            collapses.append({"k_coef": k_coef, "seed": seed, "step": e.step, "loss": round(e.loss, 4)})
            k_coef, seed = k_coef / COLLAPSE_K_FACTOR, seed + 1
    search.update(train_curve=curve, k_coef=k_coef, seed=seed)
    if collapses:
        search["collapses"] = collapses
    return tau, importance


def node_attribution(model: nn.Module, objective: Objective, cfg: PruneConfig, means: dict[str, torch.Tensor]
                     ) -> torch.Tensor:
    """The attribution score of every candidate node (`attribution.attribution_scores` on the train split)."""
    device = resolve_device(cfg.device)
    model.to(device)
    objective = objective.to(device)
    index = NodeIndex.build(model, cfg.node_sites)
    mean_vec = index.join({n: means[n].reshape(-1) for n in index.names}).to(device).float()
    with frozen(model):
        return attribution_scores(model, index, mean_vec, objective.train, example_loss=objective.example_loss)


def drop_one_by_one(keeps: Callable[[torch.Tensor], bool], mask: torch.Tensor, order: torch.Tensor
                    ) -> tuple[torch.Tensor, int]:
    """Greedy backward pass: try removing each kept node, the last in `order` first; keep it out if `keeps`.

    Returns (the smaller mask, evaluations). The bisection keeps every node up to the last one the
    target needs in the node order, so a needed node placed late drags in every node before it; this
    pass removes those one at a time (each removal judged with the earlier ones in place).
    """
    mask = mask.clone()
    kept = [i for i in order.tolist() if mask[i] > 0]
    for i in reversed(kept):
        mask[i] = 0.0
        if not keeps(mask):
            mask[i] = 1.0
    return mask, len(kept)


def prune_objective(model: nn.Module, objective: Objective, cfg: PruneConfig, means: dict[str, torch.Tensor], *,
                    name: str | None = None, progress: bool = False, refine: str | None = None,
                    tie_break: torch.Tensor | None = None) -> Circuit:
    """The smallest circuit of `model` for `objective` at the target loss (see the module docstring).

    `means`: the ablation value of every node site ({site name: (width,)}). Like `pruner.prune`, an
    expected failure (the model itself misses the target) returns a `Circuit` with ``failed=True``.

    refine: after the bisection, drop the kept nodes one at a time while the circuit keeps the target loss
    and the full model's accuracy on the validation and the train split (`drop_one_by_one`;
    ``search["refine"]`` says how many went), trying them ``"node_order"``: last in the method's node
    order first, or ``"reverse_forward"``: last layer (last site, last channel) first, a fixed order that
    picks the same one of two interchangeable channels whatever the method. None: the pruner's own result.
    tie_break: learned masks only: one score per node (e.g. `node_attribution`) that orders nodes of equal
    tau before the masks' running importance does. The clamp leaves many nodes at exactly -1, and where
    the loss went flat while they closed their importance is zero too, so the pruner's order among them
    is the node id; None: the pruner's order (tau, then importance).
    """
    if refine not in REFINE_ORDERS:
        raise PruneError(f"refine must be one of {REFINE_ORDERS}, got {refine!r}")
    t0 = time.perf_counter()
    cfg.validate()
    seconds: dict[str, float] = {}
    device = resolve_device(cfg.device)
    model.to(device)
    objective = objective.to(device)
    index = NodeIndex.build(model, cfg.node_sites)
    missing = [n for n in index.names if n not in means]
    if missing:
        raise PruneError(f"means lack node sites {missing[:5]}: compute them for the same node_sites")
    mean_vec = index.join({n: means[n].reshape(-1) for n in index.names}).to(device).float()
    ablation = Ablation(model, index, mean_vec)
    circuit = Circuit(model=name or type(model).__name__, model_type=str(getattr(model.config, "model_type", "?")),
                      task=objective.name, method=cfg.method, target_loss=cfg.target_loss, n_layer=n_layers(model),
                      node_sites=index.names, total_nodes=index.total, hyperparameters=asdict(cfg),
                      completions=list(objective.labels))
    search = circuit.search
    search["calibration"] = CALIBRATION_SKIPPED
    search["splits"] = {"train": len(objective.train), "val": len(objective.val), "test": len(objective.test)}

    def fail(reason: str) -> Circuit:
        circuit.failed, circuit.reason = True, reason
        search["seconds"] = {**seconds, "total": time.perf_counter() - t0}
        return circuit

    def with_mask(batch: Any, mask: torch.Tensor) -> dict[str, float]:
        with ablation.installed(mask):
            return objective.metrics(model, batch)

    with frozen(model):
        full_val, full_test = objective.metrics(model, objective.val), objective.metrics(model, objective.test)
        search["full_model_val"] = full_val
        own = max(full_val["loss"], full_test["loss"])
        target = cfg.target_loss if cfg.relative_margin is None else own + cfg.relative_margin
        circuit.target_loss = target
        if own > target:
            return fail(f"the unpruned model itself misses the target: its loss on {objective.name} is "
                        f"{full_test['loss']:.4f} on the test split ({full_val['loss']:.4f} on validation), above "
                        f"the target {target:.4f}; use a target relative to its own loss (relative_margin=0.01)")
        seconds["prepare"] = time.perf_counter() - t0

        # -- the node order: learned masks or attribution
        t1 = time.perf_counter()
        tau: torch.Tensor | None = None
        if cfg.method == "learned":
            tau, importance = _learn(model, ablation, objective, cfg, full_val["loss"], progress, search)
            if tie_break is None:
                order = order_nodes(tau, tie_break=importance)
            else:  # by tau, then tie_break, then importance, then id (stable sorts, last key first)
                if tie_break.shape != tau.shape:
                    raise PruneError(f"tie_break has shape {tuple(tie_break.shape)}; give one score per node "
                                     f"({index.total})")
                ids = order_nodes(importance)
                ids = ids[torch.sort(tie_break.to(tau.device)[ids], descending=True, stable=True).indices]
                order = ids[torch.sort(tau[ids], descending=True, stable=True).indices]
                search["tie_break"] = "supplied scores (equal tau)"
            values, hint = tau, int((tau > 0).sum())
        else:
            values = attribution_scores(model, index, mean_vec, objective.train, example_loss=objective.example_loss)
            order, hint = order_nodes(values), None
        seconds["optimise" if cfg.method == "learned" else "attribution"] = time.perf_counter() - t1
        rank = torch.empty(index.total, dtype=torch.long)
        rank[order.cpu()] = torch.arange(index.total)
        search["node_scores"] = (index.total - rank).tolist()  # the order as a score: first in, highest
        search["node_values"] = [round(float(v), 6) for v in values.cpu()]

        # -- the fewest nodes in that order that keep the target on the validation split
        t1 = time.perf_counter()
        val_loss = lambda count: with_mask(objective.val, keep_mask(order, count, index.total))["loss"]
        count, trail = bisect_count(val_loss, index.total, target, hint=hint, known={index.total: full_val["loss"]})
        search["bisection"] = trail
        if hint is not None:
            search["open_at_end"] = hint
        seconds["bisection"] = time.perf_counter() - t1
        if count is None:
            return fail("no node count reaches the target on the validation split")

        mask = keep_mask(order, count, index.total)
        if refine is not None:
            t1 = time.perf_counter()
            full_train = objective.metrics(model, objective.train)
            margin = target - own

            def keeps(m: torch.Tensor) -> bool:
                for batch, full in ((objective.val, full_val), (objective.train, full_train)):
                    got = with_mask(batch, m)
                    if got["loss"] > max(target, full["loss"] + margin) or got["accuracy"] < full["accuracy"]:
                        return False
                return True

            drop_order = order if refine == "node_order" else torch.arange(index.total, device=order.device)
            mask, tried = drop_one_by_one(keeps, mask, drop_order)
            search["refine"] = {"bisected": count, "kept": int(mask.sum()), "evaluations": tried,
                                "order": refine, "rule": "drop one at a time while the val and train losses stay "
                                "within the margin of the full model's and their accuracy at the full model's"}
            count = int(mask.sum())
            seconds["refine"] = time.perf_counter() - t1

        # -- measure on the test split (and on every input), verify
        t1 = time.perf_counter()
        metrics = {
            "full_model": full_test,
            "circuit": with_mask(objective.test, mask),
            "circuit_ablated": with_mask(objective.test, 1.0 - mask),
            "all_ablated": with_mask(objective.test, torch.zeros_like(mask)),
        }
        circuit.metrics = metrics
        keeps = metrics["circuit"]["loss"] <= target
        circuit.verification = {
            "keeps_target": keeps,
            "destroys_task": objective.destroys(metrics["circuit_ablated"]),
            "note": (f"test split: the circuit alone (all {index.total - count} other nodes mean-ablated) has loss "
                     f"{metrics['circuit']['loss']:.4f} {'<=' if keeps else '>'} target {target:.4f} (accuracy "
                     f"{metrics['circuit']['accuracy']:.3f}); with its own {count} nodes mean-ablated the loss is "
                     f"{metrics['circuit_ablated']['loss']:.4f} (accuracy {metrics['circuit_ablated']['accuracy']:.3f});"
                     f" 'destroyed' means loss >= {objective.chance_loss:.4f} (chance) or accuracy <= "
                     f"{DESTROYED_ACCURACY}; no calibration (multi-class objective)"),
        }
        seconds["evaluate"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    edges = circuit_edges(model, index, mask.bool())
    circuit.num_edges = len(edges)
    circuit.edges = [CircuitEdge(e.src, e.dst, e.weight) for e in edges[: cfg.max_listed_edges]]
    seconds["edges"] = time.perf_counter() - t1
    for i in mask.nonzero().flatten().tolist():
        site, ch = index.node(i)
        circuit.nodes.append(CircuitNode(id=i, site=site.name, layer=site.layer, kind=site.kind, channel=ch,
                                         tau=None if tau is None else float(tau[i]), score=float(values[i]),
                                         mean=float(mean_vec[i])))
    circuit.num_nodes = len(circuit.nodes)
    seconds["total"] = time.perf_counter() - t0
    search["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    search["means_source"] = "supplied by the caller"
    return circuit
