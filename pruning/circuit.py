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
      "edges": [{"src": node id, "dst": node id, "weight": float,   # see pruning.graph
                 "type": str}],      # one of pruning.graph.EDGE_TYPES ("attn.act_in->attn.q", ...,
                                     # "resid_delta->act_in", "attn.q<->attn.k"); weights listed first
                                     # when the list is capped
      "num_nodes": int,
      "num_edges": int,              # the paper's count: nonzero weights between circuit nodes (the weight
                                     # types; residual links and q-k pairs are not weights), all counted
                                     # even when the list is capped
      "num_edges_all_links": int,    # weights + residual write->read links + q-k pairs (the pre-issue-14 count)
      "edges_by_type": {type: int},  # every edge type, zeros included
      "metrics": {                   # each {"loss": nats, "accuracy": share}; test split unless *_val
        "full_model": ..., "circuit": ..., "circuit_calibrated": ...,
        "circuit_ablated": ...,      # the circuit's own nodes mean-ablated, everything else intact
        "all_ablated": ...,          # every candidate node mean-ablated
        "full_model_val": ..., "circuit_val": ..., "circuit_calibrated_val": ...,   # validation split:
                                     # what the bisection chose on (raw) and what a sweep may choose on
        "all_ablated_val": ...},     # the empty circuit on validation (when min_accuracy > 0): a target at
                                     # or above it is refused, any node set would meet it
      "verification": {
        "keeps_target": bool,        # circuit test loss <= target_loss (raw, uncalibrated, as bisected)
        "keeps_target_val": bool,    # the same on validation (true by construction of the bisection)
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
      "faithfulness": {              # test split; empty when faithfulness_points is 0 or the search failed
        "split": "test", "metric": str,
        "curve": [[nodes, task_loss, faithfulness], ...],   # the circuit's own node order, by node budget
        "cpr": float, "cmd": float,  # MIB's areas under f and under |1 - f| over nodes / total_nodes
        "by_order": {"learned" | "attribution": {"curve", "cpr", "cmd"}}},   # learned runs: both orders
      "model_fingerprint": str,      # sparse_lm.loading.model_fingerprint of the pruned model (16 hex)
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

from pruning.html import write_circuit_html
from sparse_lm.io import atomic_write_text, write_json

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
    type: str = ""  # a pruning.graph edge type ("" in files written before edges were typed)


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
    num_edges_all_links: int | None = None  # None in files written before edges were typed
    edges_by_type: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=lambda: {"scale": 1.0, "shift": 0.0})
    search: dict[str, Any] = field(default_factory=dict)
    faithfulness: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    completions: list[str] = field(default_factory=list)
    target_tokens: list[str] = field(default_factory=list)
    failed: bool = False
    reason: str = ""
    format: str = FORMAT
    # The pruner's whole node order and the count the bisection kept: not written to circuit.json, kept on the
    # object so that curves can be added later (a sweep computes them for its best circuit only).
    order_and_count: tuple[list[int], int] | None = field(default=None, repr=False, compare=False)

    # -- edges ----------------------------------------------------------------------------------
    def set_edges(self, edges: list[Any], max_listed: int) -> None:
        """Fill the edge fields from `pruning.graph.circuit_edges` (typed edges); list at most `max_listed`.

        When the list is capped the weight edges come first, so the residual links (quadratic in
        depth) cannot crowd them out. The counts always cover every edge.
        """
        from pruning.graph import count_edges

        counts = count_edges(edges)
        self.num_edges, self.num_edges_all_links, self.edges_by_type = counts.weights, counts.all_links, counts.by_type
        listed = edges if len(edges) <= max_listed else (
            [e for e in edges if e.is_weight] + [e for e in edges if not e.is_weight])[:max_listed]
        self.edges = [CircuitEdge(e.src, e.dst, e.weight, e.type) for e in listed]

    @property
    def edges_complete(self) -> bool:
        """Every edge and link is in the list (it was not capped)."""
        total = self.num_edges if self.num_edges_all_links is None else self.num_edges_all_links
        return len(self.edges) == total

    # -- the sweep's view ----------------------------------------------------------------------
    @property
    def ok(self) -> bool:
        """A circuit was found and it meets the target on the VALIDATION split (see `sweep_outcome`)."""
        return not self.objective("nodes")[1]

    def objective(self, size: Literal["nodes", "edges"] = "nodes") -> tuple[float, bool]:
        """(size, is_failure) for a hyperparameter sweep; see `sweep_outcome`."""
        view = {k: getattr(self, k) for k in ("failed", "metrics", "search", "target_loss", "num_nodes", "num_edges")}
        return sweep_outcome(view, size)

    # -- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A plain dict (strict JSON: NaN and infinities become null)."""
        d = _finite(asdict(self))
        order = ["format", "model", "model_type", "task", "method", "target_loss", "n_layer", "node_sites",
                 "total_nodes", "nodes", "edges", "num_nodes", "num_edges", "num_edges_all_links", "edges_by_type",
                 "metrics", "verification", "calibration",
                 "search", "faithfulness", "model_fingerprint", "hyperparameters", "completions", "target_tokens",
                 "failed", "reason"]
        return {k: d[k] for k in order}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.dumps())

    def write(self, out: str | Path, prune_cfg: dict[str, Any], model_dir: str) -> None:
        """This circuit's folder: circuit.json, config.json and circuit.html (see `write_circuit_folder`)."""
        write_circuit_folder(self.to_json(), prune_cfg, model_dir, out)

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


def validation_loss(circuit: dict[str, Any]) -> float | None:
    """The circuit's task loss on the validation split (nats), or None when none was measured.

    Read from ``metrics["circuit_val"]`` when the pruner stored it, else from the
    bisection trail (``search["bisection"]``, measured on validation) at the circuit's node count.
    A failed search has no circuit, so None (its trail's count 0 is the empty circuit, not a result).
    """
    if circuit.get("failed"):
        return None
    val = (circuit.get("metrics") or {}).get("circuit_val")
    if isinstance(val, dict) and val.get("loss") is not None:
        return float(val["loss"])
    count = circuit.get("num_nodes")
    for n, loss in reversed((circuit.get("search") or {}).get("bisection") or []):
        if n == count and loss is not None:
            return float(loss)
    return None


def sweep_outcome(circuit: dict[str, Any], size: Literal["nodes", "edges"] = "nodes") -> tuple[float, bool]:
    """(size, is_failure) of one pruning run, as a hyperparameter sweep sees it (SPEC §5, splits).

    A failure is a failed search, or a circuit whose VALIDATION loss misses the
    target (or was not measured): the sweep chooses its best circuit on validation
    so that the test split, on which that circuit is reported, plays no part in
    the choice. The size is the node count or the paper's edge count
    (``num_edges``: weights only); +inf for a failure.
    """
    if size not in ("nodes", "edges"):
        raise ValueError(f"size must be 'nodes' or 'edges', got {size!r}")
    loss = validation_loss(circuit)
    target = circuit.get("target_loss")
    if circuit.get("failed") or loss is None or target is None or not loss <= target:
        return math.inf, True
    n = circuit.get("num_nodes" if size == "nodes" else "num_edges")
    if n is None:
        return math.inf, True
    return float(n), False


def write_circuit_folder(circuit: dict[str, Any], prune_cfg: dict[str, Any], model_dir: str, out: str | Path) -> None:
    """A circuit's folder, each file written atomically.

    ``circuit.json`` (`Circuit.to_json`, or a circuit read back as a dict),
    ``config.json`` (the resolved PruneConfig plus ``"job": "prune"`` and
    ``"model"``: drop those two keys to rebuild the config with
    `sparse_lm.config.from_dict`) and ``circuit.html`` (the viewer).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"job": "prune", **prune_cfg, "model": model_dir})
    write_json(out / "circuit.json", circuit, indent=1)
    write_circuit_html(circuit, out / "circuit.html")
