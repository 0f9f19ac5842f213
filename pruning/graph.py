"""Nodes and edges of a circuit.

A *node* is one channel of one node site (``"1.attn.v"`` channel 12). The
`NodeIndex` numbers all nodes of a model in forward order (layer, then site
kind as the forward pass meets it, then channel), so a mask over every node is
one vector and node id ``i`` is a stable name for the same channel.

An *edge* is a nonzero weight between two circuit nodes (SPEC §5, the paper's
definition). `circuit_edges` lists every connection between open nodes with a
type; only the *weight* types are edges in the headline count
(``num_edges``, `EdgeCounts.weights`):

==================================  ========================================================  =======
type                                through                                                   counted
==================================  ========================================================  =======
``attn.act_in->attn.q``             the q rows of c_attn (Llama: q_proj), ``W[j, i] != 0``     yes
``attn.act_in->attn.k``             the k rows of c_attn (k_proj)                              yes
``attn.act_in->attn.v``             the v rows of c_attn (v_proj)                              yes
``attn.v->attn.resid_delta``        attn.c_proj (o_proj) ``W[o, j]``, through the attention    yes
                                    pattern; with grouped-query attention a v channel feeds
                                    one o column per query head of its group: an edge when
                                    any of them is nonzero (weight: the largest in size)
``mlp.act_in->mlp.post_act``        mlp.c_fc (gated MLP: gate or up nonzero)                   yes
``mlp.post_act->mlp.resid_delta``   mlp.c_proj (down_proj)                                     yes
``resid_delta->act_in``             the residual stream: a write of channel c reaches every    no
                                    later read of c (``L'.attn|mlp.act_in``); weight: the
                                    reading norm's gain at c (0: no link). In a parallel
                                    block (Pythia) the MLP reads the block's input, so the
                                    attention's write beside it is not a read of it
``attn.q<->attn.k``                 the score: q and k channels of the same head dimension     no
                                    multiply (Llama: and the rotary partner); weight 1
==================================  ========================================================  =======

The residual convention. A residual channel is not a node: its writes
(``resid_delta``) and reads (``act_in``) are. A write reaches a later read of
the same channel through the identity of the residual stream (times the norm
gain, which folds into the next matrix), not through a weight matrix entry, so
these links are not edges. Counting them would link every write to every
later read: quadratic in depth (one channel used by every block: 28 links at
4 layers, 120 at 8) and largest for dense circuits, which use many channels.
The q-k pairing is a product of two activations, not a weight, and is not an
edge either. Both kinds stay listed (typed) so a viewer can draw the path of
the signal, and are counted per type; `EdgeCounts.all_links` is the old count
(weights + residual links + q-k pairs).

Weights are read in ``(out, in)`` layout through the weight map of the
model's architecture record (`sparse_lm.arch.layer_weights`): SparseGPT's
``nn.Linear`` is already ``(out, in)``; GPT-2's ``Conv1D`` stores ``(in, out)`` and is transposed; Llama
has separate q/k/v projections, grouped keys and values and a gated MLP. Edges touching a
site kind that is not a node site are not listed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sparse_lm.adapters import sites_of
from sparse_lm.arch import is_parallel, layer_weights, n_layers

# Where each known kind sits in a block's forward pass; other site kinds sort after these.
FORWARD_ORDER = {
    "resid_in": 0,
    "attn.act_in": 1,
    "attn.q": 2,
    "attn.k": 3,
    "attn.v": 4,
    "attn.y": 5,
    "attn.resid_delta": 6,
    "resid_mid": 7,
    "mlp.act_in": 8,
    "mlp.post_act": 9,
    "mlp.resid_delta": 10,
}


@dataclass(frozen=True)
class NodeSite:
    """One node site: its name, layer, kind, width and the id of its channel 0."""

    name: str
    layer: int
    kind: str
    width: int
    offset: int

    @property
    def ids(self) -> range:
        return range(self.offset, self.offset + self.width)


def split_site_name(name: str) -> tuple[int, str]:
    """``"3.mlp.post_act"`` -> (3, "mlp.post_act")."""
    head, _, kind = name.partition(".")
    if not head.isdigit() or not kind:
        raise ValueError(f"node site {name!r} is not of the form LAYER.KIND (e.g. 1.attn.v)")
    return int(head), kind


class NodeIndex:
    """Every node of a model's node sites, numbered in forward order."""

    def __init__(self, sites: list[NodeSite]):
        self.sites = sites
        self.by_name = {s.name: s for s in sites}
        self.total = sum(s.width for s in sites)
        # site number of each node, for id -> (site, channel)
        self._site_of = torch.repeat_interleave(torch.arange(len(sites)), torch.tensor([s.width for s in sites]))

    @classmethod
    def build(cls, model: nn.Module, node_sites: list[str]) -> NodeIndex:
        """Node sites from kinds (``"attn.q"``: every layer) or full names (``"2.attn.q"``); checked to exist."""
        registry = sites_of(model)
        layers = n_layers(model)
        names: list[str] = []
        for entry in node_sites:
            if entry[:1].isdigit():
                names.append(entry)
            else:
                names.extend(f"{i}.{entry}" for i in range(layers))
        registry.check(names)  # unknown names fail here, with a did-you-mean
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"node sites listed twice: {dup}")

        def order(name: str) -> tuple[int, int, str]:
            layer, kind = split_site_name(name)
            return layer, FORWARD_ORDER.get(kind, len(FORWARD_ORDER)), kind

        sites, offset = [], 0
        for name in sorted(names, key=order):
            layer, kind = split_site_name(name)
            width = registry.width(name)
            sites.append(NodeSite(name, layer, kind, width, offset))
            offset += width
        return cls(sites)

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[NodeSite]:
        return iter(self.sites)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def node(self, node_id: int) -> tuple[NodeSite, int]:
        """(site, channel) of a node id."""
        if not 0 <= node_id < self.total:
            raise IndexError(f"node id {node_id} is outside 0..{self.total - 1}")
        site = self.sites[int(self._site_of[node_id])]
        return site, node_id - site.offset

    def id_of(self, site: str, channel: int) -> int:
        s = self.by_name[site]
        if not 0 <= channel < s.width:
            raise IndexError(f"channel {channel} is outside site {site!r} of width {s.width}")
        return s.offset + channel

    def split(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A per-node vector (N,) cut into per-site pieces {name: (width,)} (views)."""
        if vector.shape[0] != self.total:
            raise ValueError(f"expected a vector over {self.total} nodes, got shape {tuple(vector.shape)}")
        return {s.name: vector[s.offset : s.offset + s.width] for s in self.sites}

    def join(self, pieces: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-site pieces back into one (N,) vector (the inverse of `split`)."""
        missing = [s.name for s in self.sites if s.name not in pieces]
        if missing:
            raise KeyError(f"no values for node sites {missing}")
        return torch.cat([pieces[s.name].reshape(-1) for s in self.sites])


# ---------------------------------------------------------------------------- edges

# Edge types (see the module docstring): the weight types count as edges, the link types do not.
WEIGHT_EDGE_TYPES = (
    "attn.act_in->attn.q",
    "attn.act_in->attn.k",
    "attn.act_in->attn.v",
    "attn.v->attn.resid_delta",
    "mlp.act_in->mlp.post_act",
    "mlp.post_act->mlp.resid_delta",
)
RESID_LINK = "resid_delta->act_in"
QK_LINK = "attn.q<->attn.k"
LINK_TYPES = (RESID_LINK, QK_LINK)
EDGE_TYPES = WEIGHT_EDGE_TYPES + LINK_TYPES


@dataclass(frozen=True)
class Edge:
    src: int
    dst: int
    weight: float
    type: str = ""

    @property
    def is_weight(self) -> bool:
        """A weight matrix entry (counted in ``num_edges``), not a residual or q-k link."""
        return self.type in WEIGHT_EDGE_TYPES


@dataclass(frozen=True)
class EdgeCounts:
    """Counts of a list of typed edges."""

    weights: int  # the headline ``num_edges``: nonzero weights between circuit nodes
    all_links: int  # weights + residual links + q-k pairs (the count before issue 14)
    by_type: dict[str, int]  # every type of `EDGE_TYPES`, zeros included, in that order


def count_edges(edges: list[Edge]) -> EdgeCounts:
    by_type = dict.fromkeys(EDGE_TYPES, 0)
    for e in edges:
        if e.type not in by_type:
            raise ValueError(f"edge {e} has no known type; known: {', '.join(EDGE_TYPES)}")
        by_type[e.type] += 1
    weights = sum(by_type[t] for t in WEIGHT_EDGE_TYPES)
    return EdgeCounts(weights=weights, all_links=len(edges), by_type=by_type)


def _matrix_edges(index: NodeIndex, open_mask: torch.Tensor, src: str, dst: str, w: torch.Tensor,
                  kind: str) -> list[Edge]:
    """Edges src channel i -> dst channel j for W[j, i] != 0, both open. w: (dst width, src width)."""
    if src not in index.by_name or dst not in index.by_name:
        return []
    s, d = index.by_name[src], index.by_name[dst]
    if tuple(w.shape) != (d.width, s.width):
        raise ValueError(f"weight for {src} -> {dst} has shape {tuple(w.shape)}, expected ({d.width}, {s.width}) "
                         f"(the weight map in sparse_lm/arch.py does not match the sites)")
    s_open = open_mask[s.offset : s.offset + s.width].nonzero().flatten()
    d_open = open_mask[d.offset : d.offset + d.width].nonzero().flatten()
    if not len(s_open) or not len(d_open):
        return []
    sub = w[d_open][:, s_open]  # (open dst, open src)
    rows, cols = sub.nonzero(as_tuple=True)
    return [Edge(s.offset + int(s_open[c]), d.offset + int(d_open[r]), float(sub[r, c]), kind)
            for r, c in zip(rows.tolist(), cols.tolist())]


def _pair_edges(index: NodeIndex, open_mask: torch.Tensor, src: str, dst: str,
                pairs: tuple[torch.Tensor, torch.Tensor], kind: str,
                weight: torch.Tensor | None = None) -> list[Edge]:
    """Edges src channel a -> dst channel b for each listed pair (a, b), both open (and weight != 0)."""
    if src not in index.by_name or dst not in index.by_name:
        return []
    s, d = index.by_name[src], index.by_name[dst]
    a, b = pairs
    keep = open_mask[s.offset + a] & open_mask[d.offset + b]
    if weight is not None:
        keep &= weight != 0
    out = []
    for i in keep.nonzero().flatten().tolist():
        w = 1.0 if weight is None else float(weight[i])
        out.append(Edge(s.offset + int(a[i]), d.offset + int(b[i]), w, kind))
    return out


def fold_o_to_v(o: torch.Tensor, o_reads_v: torch.Tensor | None, d_v: int) -> torch.Tensor:
    """The output matrix as seen from the v channels: (d_model, d_q) -> (d_model, d_v).

    Column c of ``o`` reads v channel ``o_reads_v[c]`` (grouped-query attention:
    every query head of a group reads the same key/value head, as the model
    repeats them). A v channel's entry is the largest-in-size entry of the
    columns that read it, so it is nonzero exactly when one of them is.
    """
    if o_reads_v is None:
        if o.shape[1] != d_v:
            raise ValueError(f"o has {o.shape[1]} input columns but v has {d_v} channels and the weight map gives "
                             f"no column -> v channel map (LayerWeights.o_reads_v)")
        return o
    zeros = torch.zeros(o.shape[0], d_v, dtype=o.dtype)
    cols = o_reads_v.to(torch.long).expand_as(o)  # (d_model, d_q): the v channel of every entry
    hi = zeros.scatter_reduce(1, cols, o, "amax", include_self=False)  # (d_model, d_v)
    lo = zeros.scatter_reduce(1, cols, o, "amin", include_self=False)
    return torch.where(hi.abs() >= lo.abs(), hi, lo)


def _weight_matrices(w) -> dict[str, torch.Tensor]:
    """One layer's matrix (target width, source width) for each type of `WEIGHT_EDGE_TYPES`, in that order."""
    o = fold_o_to_v(w.o, w.o_reads_v, w.v.shape[0])
    return dict(zip(WEIGHT_EDGE_TYPES, (w.q, w.k, w.v, o, w.fc, w.proj)))


def _ends(prefix: str, edge_type: str) -> tuple[str, str]:
    """The (source, target) site names of a weight edge type in one layer ("0." + "attn.v", ...)."""
    src, dst = edge_type.split("->")
    return prefix + src, prefix + dst


def weight_edge_count(model: nn.Module, index: NodeIndex) -> int:
    """``num_edges`` of the whole model (every node open), counted without listing ~millions of edges:
    the nonzero entries of the weight matrices between node sites, as `circuit_edges` types them."""
    n = 0
    for layer in sorted({s.layer for s in index}):
        for kind, m in _weight_matrices(layer_weights(model, layer)).items():
            src, dst = _ends(f"{layer}.", kind)
            if src in index.by_name and dst in index.by_name:
                n += int((m != 0).sum())
    return n


def circuit_edges(model: nn.Module, index: NodeIndex, open_mask: torch.Tensor) -> list[Edge]:
    """Every typed edge and link between open nodes (``open_mask``: (N,) bool), in forward order of their targets.

    `count_edges` gives the headline count (weights only) and the count per type.
    """
    open_mask = open_mask.bool().cpu()
    if open_mask.shape != (index.total,):
        raise ValueError(f"open_mask must be ({index.total},), got {tuple(open_mask.shape)}")
    layers = sorted({s.layer for s in index})
    parallel = is_parallel(model)  # the MLP reads the block's input, not the attention's write beside it
    edges: list[Edge] = []
    writes: list[str] = []  # residual writes seen so far, in forward order
    for layer in layers:
        w = layer_weights(model, layer)
        p = f"{layer}."
        mats = _weight_matrices(w)

        def weights(*kinds: str) -> list[Edge]:
            return [e for k in kinds for e in _matrix_edges(index, open_mask, *_ends(p, k), mats[k], k)]

        for kind, gain in (("attn.act_in", w.attn_gain), ("mlp.act_in", w.mlp_gain)):
            reader = p + kind
            for writer in writes:
                ch = torch.arange(gain.shape[0])
                edges += _pair_edges(index, open_mask, writer, reader, (ch, ch), RESID_LINK, weight=gain)
            if kind == "attn.act_in":
                edges += weights("attn.act_in->attn.q", "attn.act_in->attn.k", "attn.act_in->attn.v")
                edges += _pair_edges(index, open_mask, p + "attn.q", p + "attn.k", w.qk_pairs, QK_LINK)
                edges += weights("attn.v->attn.resid_delta")
                if not parallel:
                    writes.append(p + "attn.resid_delta")
            else:
                edges += weights("mlp.act_in->mlp.post_act", "mlp.post_act->mlp.resid_delta")
                writes += [p + "attn.resid_delta"] * parallel + [p + "mlp.resid_delta"]
    return edges
