"""A pruned circuit as data: `Circuit`, its JSON form, and the size objective of a sweep.

``circuit.json`` (format ``sparse-lm-circuit/1``)::

    {
      "format": "sparse-lm-circuit/1",
      "model": str,                  # the model folder (or name) that was pruned
      "model_type": str,             # "sparse_gpt" | "gpt2" | "llama" | ...
      "task": str,
      "method": "learned" | "attribution",
      "target_loss": float,          # nats, absolute (a relative target is resolved before pruning)
      "n_layer": int,
      "node_sites": [str],           # every site whose channels were candidate nodes ("0.attn.q", ...)
      "total_nodes": int,            # how many candidate nodes there were
      "nodes": [                     # the circuit, in forward order
        {"id": int,                  # index among all candidate nodes (layer, site kind, channel order)
         "site": "1.attn.v", "layer": 1, "kind": "attn.v", "channel": 12,
         "tau": float | null,        # learned mask logit (null for attribution)
         "score": float,             # what the nodes were ordered by: tau, or the attribution score
         "mean": float,              # the mean activation over the corpus (the ablation value)
         "mean_by_family": [f0, f1], # mean activation at the last prompt position, per prompt family,
                                     # test split, with the circuit installed (the rest mean-ablated)
         "snippets": [{"text": str, "activation": float,   # top-activating corpus snippets
                       "token": str, "highlight": [start, end]}]}   # text[start:end] is the max token
      ],
      "edges": [{"src": node id, "dst": node id, "weight": float}],   # see pruning.graph
      "num_nodes": int, "num_edges": int,   # num_edges counts all edges even when the list is capped
      "metrics": {                   # test split; each {"loss": nats, "accuracy": share}
        "full_model": ..., "circuit": ..., "circuit_calibrated": ...,
        "circuit_ablated": ...,      # the circuit's own nodes mean-ablated, everything else intact
        "all_ablated": ...},         # every candidate node mean-ablated
      "verification": {
        "keeps_target": bool,        # circuit test loss <= target_loss
        "destroys_task": bool,       # circuit_ablated loss >= ln 2 (chance) or accuracy <= 0.6
        "note": str},
      "calibration": {"scale": a, "shift": b},   # d' = a * d + b on d = logit(c0) - logit(c1)
      "search": {"bisection": [[count, val_loss], ...],   # in the order evaluated
                 "train_curve": [[step, task_loss, open_nodes], ...],   # learned only
                 "open_at_end": int,         # nodes the learned masks left open (learned only)
                 "full_model_val": {"loss", "accuracy"},   # the unpruned model on the validation split
                 "seconds": {"prepare", "optimise" | "attribution", "bisection", "evaluate", "edges",
                             "snippets", "total"},
                 "means_source": str, "fast_head": bool,
                 "warning": str},            # only when the result looks untrustworthy
      "hyperparameters": {...},      # the resolved PruneConfig
      "completions": [c0, c1],       # the two completions (family 0, family 1)
      "target_tokens": [t0, t1],     # their tokens as the tokenizer spells them
      "failed": bool, "reason": str  # failed: no circuit (e.g. the model itself misses the target)
    }

The calibration shift is applied to the logit difference in a fixed
orientation (completion 0 minus completion 1), never to the target-minus-
distractor margin (which would use the label) nor to all logits (which
changes nothing under the softmax).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

FORMAT = "sparse-lm-circuit/1"
CHANCE_LOSS = math.log(2)
DESTROYED_ACCURACY = 0.6


@dataclass
class CircuitNode:
    id: int
    site: str
    layer: int
    kind: str
    channel: int
    tau: float | None
    score: float
    mean: float
    mean_by_family: list[float] = field(default_factory=list)
    snippets: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CircuitEdge:
    src: int
    dst: int
    weight: float


def _metric(loss: float, accuracy: float) -> dict[str, float]:
    return {"loss": float(loss), "accuracy": float(accuracy)}


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def destroys(metric: dict[str, float]) -> bool:
    """A task counts as destroyed at chance loss (>= ln 2) or accuracy <= 0.6."""
    return metric["loss"] >= CHANCE_LOSS or metric["accuracy"] <= DESTROYED_ACCURACY


@dataclass
class Circuit:
    model: str
    model_type: str
    task: str
    method: Literal["learned", "attribution"]
    target_loss: float
    n_layer: int
    node_sites: list[str]
    total_nodes: int
    nodes: list[CircuitNode] = field(default_factory=list)
    edges: list[CircuitEdge] = field(default_factory=list)
    num_nodes: int = 0
    num_edges: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=lambda: {"scale": 1.0, "shift": 0.0})
    search: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    completions: list[str] = field(default_factory=list)
    target_tokens: list[str] = field(default_factory=list)
    failed: bool = False
    reason: str = ""
    format: str = FORMAT

    # -- the sweep's view ----------------------------------------------------------------------
    @property
    def ok(self) -> bool:
        """A circuit was found and it keeps the target on the test split."""
        return not self.failed and bool(self.verification.get("keeps_target", False))

    def objective(self, size: Literal["nodes", "edges"] = "nodes") -> tuple[float, bool]:
        """(size, is_failure) for a hyperparameter sweep: the circuit's node or edge count, or a failure.

        A failed search, or a circuit that misses the target on the test split, is a
        failure (its size is +inf).
        """
        if not self.ok:
            return math.inf, True
        return float(self.num_nodes if size == "nodes" else self.num_edges), False

    # -- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A plain dict (strict JSON: NaN and infinities become null)."""
        d = _finite(asdict(self))
        order = ["format", "model", "model_type", "task", "method", "target_loss", "n_layer", "node_sites",
                 "total_nodes", "nodes", "edges", "num_nodes", "num_edges", "metrics", "verification", "calibration",
                 "search", "hyperparameters", "completions", "target_tokens", "failed", "reason"]
        return {k: d[k] for k in order}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> None:
        from sparse_lm.io import atomic_write_text

        atomic_write_text(path, self.dumps())

    @classmethod
    def from_json(cls, data: dict[str, Any] | str | Path) -> "Circuit":
        """From a dict, a JSON string or a path to circuit.json."""
        if isinstance(data, Path) or (isinstance(data, str) and not data.lstrip().startswith("{")):
            data = json.loads(Path(data).read_text())
        elif isinstance(data, str):
            data = json.loads(data)
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format {data.get('format')!r})")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw["nodes"] = [CircuitNode(**n) for n in data.get("nodes", [])]
        kw["edges"] = [CircuitEdge(**e) for e in data.get("edges", [])]
        return cls(**kw)

    # -- reading ---------------------------------------------------------------------------------
    def summary(self) -> str:
        """A few lines for a terminal."""
        if self.failed:
            return f"pruning {self.task} ({self.method}) failed: {self.reason}"
        m = self.metrics

        def fmt(name: str) -> str:
            x = m.get(name)
            return f"{x['loss']:.4f} (acc {x['accuracy']:.3f})" if x else "-"

        v = self.verification
        by_kind: dict[str, int] = {}
        for n in self.nodes:
            by_kind[n.kind] = by_kind.get(n.kind, 0) + 1
        kinds = ", ".join(f"{k} {c}" for k, c in by_kind.items())
        return "\n".join([
            f"circuit for {self.task} ({self.method}) in {self.model}: {self.num_nodes} nodes of {self.total_nodes}, "
            f"{self.num_edges} edges",
            f"   nodes by kind: {kinds or 'none'}",
            f"   test loss: full model {fmt('full_model')}, circuit {fmt('circuit')}, calibrated "
            f"{fmt('circuit_calibrated')}  (target {self.target_loss:.4f})",
            f"   ablations: circuit ablated {fmt('circuit_ablated')}, all ablated {fmt('all_ablated')}",
            f"   verification: keeps target {v.get('keeps_target')}, destroys task when ablated "
            f"{v.get('destroys_task')}",
            f"   calibration: scale {self.calibration['scale']:.3f}, shift {self.calibration['shift']:.3f}",
        ] + ([f"   warning: {self.search['warning']}"] if self.search.get("warning") else []))
