"""Score a pruned circuit against a ground truth: node and edge precision/recall, node ROC-AUC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pruning.groundtruth.truth import EdgeKey, GroundTruth, Node


def circuit_node_names(circuit: Any, truth: GroundTruth) -> dict[int, Node]:
    """Node id -> (site, channel) for every candidate node of the circuit.

    Ids number the circuit's ``node_sites`` in order, each site's width taken from the
    ground truth (the sites must be candidate sites of the same model).
    """
    out: dict[int, Node] = {}
    offset = 0
    for site in circuit.node_sites:
        if site not in truth.site_widths:
            raise ValueError(f"circuit node site {site!r} is not a ground-truth site; the truth covers "
                             f"{list(truth.site_widths)} (derive it with the circuit's node kinds)")
        for c in range(truth.site_widths[site]):
            out[offset + c] = (site, c)
        offset += truth.site_widths[site]
    if circuit.total_nodes and offset != circuit.total_nodes:
        raise ValueError(f"the circuit has {circuit.total_nodes} candidate nodes but its sites hold {offset} "
                         "in the ground truth's model: not the same model?")
    return out


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve (ties count half); NaN when one class is empty."""
    pairs = sorted(zip(scores, positive), key=lambda p: p[0])
    n_pos = sum(1 for _, p in pairs if p)
    n_neg = len(pairs) - n_pos
    if not n_pos or not n_neg:
        return float("nan")
    # Mann-Whitney U with average ranks over ties.
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + 1 + j) / 2  # ranks i+1..j
        rank_sum += avg_rank * sum(1 for _, p in pairs[i:j] if p)
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _pr(found: set, truth: set) -> tuple[float, float]:
    hit = len(found & truth)
    precision = hit / len(found) if found else (1.0 if not truth else 0.0)
    recall = hit / len(truth) if truth else 1.0
    return precision, recall


def substitutions(found: set[Node], truth: set[Node], alternatives: dict[Node, list[Node]]) -> dict[Node, Node]:
    """{kept alternative: the truth node it stands for}: for each truth node the circuit lacks, the first of its
    recorded alternatives (`GroundTruth.alternatives`) that the circuit keeps and no other truth node claimed."""
    used: dict[Node, Node] = {}
    for n in sorted(truth - found):
        for a in alternatives.get(n, []):
            if a in found and a not in truth and a not in used:
                used[a] = n
                break
    return used


def score(circuit: Any, ground_truth: GroundTruth, node_scores: Sequence[float] | None = None) -> dict[str, Any]:
    """Node and edge precision/recall of a `Circuit` against a `GroundTruth`, and the node ROC-AUC.

    Only the circuit's candidate sites are scored (the truth is restricted to them). The ROC
    ranks every candidate node by ``node_scores`` (one per node id, e.g. the learned mask
    logits or attribution scores of all nodes) when given, else by the circuit's
    ``search["node_scores"]`` when the pruner stored them, else by the circuit membership
    (nodes in the circuit by their score, above all others): then the AUC only measures the cut.

    Where the circuit keeps a recorded alternative of a truth node it lacks (an interchangeable channel of
    the same site: the truth with that swap keeps the answers too, `GroundTruth.alternatives`), the
    alternative counts as that node (nodes and edges; ``substitutions`` lists them); ``node_precision_strict``
    / ``node_recall_strict`` count without them. The ROC-AUC is over the truth as derived.
    """
    names = circuit_node_names(circuit, ground_truth)
    sites = set(circuit.node_sites)
    truth_nodes = {n for n in ground_truth.nodes if n[0] in sites}
    truth_edges = {e for e in ground_truth.edges if e[0][0] in sites and e[1][0] in sites}
    found_nodes = {names[n.id] for n in circuit.nodes}
    found_edges: set[EdgeKey] = {(names[e.src], names[e.dst]) for e in circuit.edges}
    strict_p, strict_r = _pr(found_nodes, truth_nodes)
    swaps = substitutions(found_nodes, truth_nodes, ground_truth.alternatives)
    as_truth = lambda n: swaps.get(n, n)  # a kept alternative stands for the truth channel it replaces
    node_p, node_r = _pr({as_truth(n) for n in found_nodes}, truth_nodes)
    edge_p, edge_r = _pr({(as_truth(a), as_truth(b)) for a, b in found_edges}, truth_edges)
    if node_scores is None:
        node_scores = (getattr(circuit, "search", None) or {}).get("node_scores")
    source = "node_scores"
    if node_scores is None:
        source = "circuit membership"
        in_circuit = {n.id: n.score for n in circuit.nodes}
        low = min(in_circuit.values(), default=0.0)
        node_scores = [1.0 + in_circuit[i] - low if i in in_circuit else 0.0 for i in range(len(names))]
    if len(node_scores) != len(names):
        raise ValueError(f"node_scores has {len(node_scores)} entries, the circuit {len(names)} candidate nodes")
    auc = roc_auc([float(s) for s in node_scores], [names[i] in truth_nodes for i in range(len(names))])
    listed_all = circuit.edges_complete
    return {"node_precision": node_p, "node_recall": node_r, "edge_precision": edge_p, "edge_recall": edge_r,
            "node_precision_strict": strict_p, "node_recall_strict": strict_r,
            "substitutions": sorted([list(a), list(n)] for a, n in swaps.items()), "roc_auc": auc, "roc_from": source, "num_nodes": len(found_nodes), "num_truth_nodes": len(truth_nodes),
            "num_edges": len(found_edges), "num_truth_edges": len(truth_edges), "total_nodes": len(names),
            "edges_complete": listed_all}
