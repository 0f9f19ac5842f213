"""Nodes and edges of a circuit.

A *node* is one channel of one node site (``"1.attn.v"`` channel 12). The
`NodeIndex` numbers all nodes of a model in forward order (layer, then site
kind as the forward pass meets it, then channel), so a mask over every node is
one vector and node id ``i`` is a stable name for the same channel.

An *edge* is a nonzero weight between two open nodes (SPEC §5):

========================  ==============================  ==========================================
from                      to                              through
========================  ==============================  ==========================================
``L.attn.act_in`` i       ``L.attn.q/k/v`` j              the q/k/v rows of c_attn, ``W[j, i]``
``L.attn.q`` j            ``L.attn.k`` j'                 the score: q and k channels of the same
                                                          head dimension multiply (weight 1)
``L.attn.v`` j            ``L.attn.resid_delta`` o        attn.c_proj ``W[o, j]`` (per head, through
                                                          the attention pattern)
``L.mlp.act_in`` i        ``L.mlp.post_act`` n            mlp.c_fc ``W[n, i]``
``L.mlp.post_act`` n      ``L.mlp.resid_delta`` o         mlp.c_proj ``W[o, n]``
``L.*.resid_delta`` c     ``L'.*.act_in`` c               the residual stream, for every read after
                                                          the write in forward order (weight: the
                                                          reading norm's gain at c)
========================  ==============================  ==========================================

Weights are read in ``(out, in)`` layout through one small function per
architecture (`layer_weights`): SparseGPT's ``nn.Linear`` is already
``(out, in)``; GPT-2's ``Conv1D`` stores ``(in, out)`` and is transposed; Llama
has separate q/k/v projections, grouped keys and a gated MLP. Edges touching a
site kind that is not a node site are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from sparse_lm.adapters import n_layers, sites_of

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
    def build(cls, model: nn.Module, node_sites: list[str]) -> "NodeIndex":
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


# ---------------------------------------------------------------------------- weights per architecture


@dataclass
class LayerWeights:
    """A layer's matrices in (out, in) layout, and how its q and k channels pair in the score."""

    q: torch.Tensor  # (d_q, d_model)
    k: torch.Tensor  # (d_k, d_model)
    v: torch.Tensor  # (d_v, d_model)
    o: torch.Tensor  # (d_model, d_v)
    fc: torch.Tensor  # (d_mlp, d_model); for a gated MLP: nonzero where gate or up is
    proj: torch.Tensor  # (d_model, d_mlp)
    attn_gain: torch.Tensor  # (d_model,) gain of the norm before attention (the attn.act_in read)
    mlp_gain: torch.Tensor  # (d_model,) gain of the norm before the MLP
    qk_pairs: tuple[torch.Tensor, torch.Tensor]  # (q channels, k channels) that multiply in the score


def _same_dim_pairs(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(width)
    return idx, idx


def _gain(norm: nn.Module, d: int) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    return w.detach().float().cpu() if w is not None else torch.ones(d)


def _sparse_gpt_layer(model: nn.Module, i: int) -> LayerWeights:
    block = model.transformer.h[i]
    d_attn = block.attn.n_head * block.attn.d_head
    q, k, v = block.attn.c_attn.weight.detach().float().cpu().split(d_attn, dim=0)  # Linear: (out, in)
    d = model.config.d_model
    return LayerWeights(q=q, k=k, v=v, o=block.attn.c_proj.weight.detach().float().cpu(),
                        fc=block.mlp.c_fc.weight.detach().float().cpu(),
                        proj=block.mlp.c_proj.weight.detach().float().cpu(),
                        attn_gain=_gain(block.ln_1, d), mlp_gain=_gain(block.ln_2, d), qk_pairs=_same_dim_pairs(d_attn))


def _gpt2_layer(model: nn.Module, i: int) -> LayerWeights:
    block = model.transformer.h[i]
    d = model.config.n_embd
    # Conv1D stores (in, out): transpose to (out, in).
    q, k, v = block.attn.c_attn.weight.detach().float().cpu().t().split(d, dim=0)
    return LayerWeights(q=q, k=k, v=v, o=block.attn.c_proj.weight.detach().float().cpu().t(),
                        fc=block.mlp.c_fc.weight.detach().float().cpu().t(),
                        proj=block.mlp.c_proj.weight.detach().float().cpu().t(),
                        attn_gain=_gain(block.ln_1, d), mlp_gain=_gain(block.ln_2, d), qk_pairs=_same_dim_pairs(d))


def _llama_layer(model: nn.Module, i: int) -> LayerWeights:
    block = model.model.layers[i]
    cfg = model.config
    att, mlp = block.self_attn, block.mlp
    q, k = att.q_proj.weight.detach().float().cpu(), att.k_proj.weight.detach().float().cpu()
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = q.shape[0] // k.shape[0]  # query heads per key head (grouped-query attention)
    j = torch.arange(q.shape[0])
    head, dim = j // d_head, j % d_head
    k_same = (head // group) * d_head + dim
    # Rotary embedding mixes dimension e with e +- d_head/2 of the same head.
    k_rot = (head // group) * d_head + (dim + d_head // 2) % d_head
    gate, up = mlp.gate_proj.weight.detach().float().cpu(), mlp.up_proj.weight.detach().float().cpu()
    fc = torch.where(up != 0, up, gate)
    d = cfg.hidden_size
    return LayerWeights(q=q, k=k, v=att.v_proj.weight.detach().float().cpu(),
                        o=att.o_proj.weight.detach().float().cpu(),
                        fc=fc, proj=mlp.down_proj.weight.detach().float().cpu(),
                        attn_gain=_gain(block.input_layernorm, d), mlp_gain=_gain(block.post_attention_layernorm, d),
                        qk_pairs=(torch.cat([j, j]), torch.cat([k_same, k_rot])))


WEIGHT_MAPS = {"sparse_gpt": _sparse_gpt_layer, "gpt2": _gpt2_layer, "llama": _llama_layer, "mistral": _llama_layer,
               "qwen2": _llama_layer, "qwen3": _llama_layer}


def layer_weights(model: nn.Module, layer: int) -> LayerWeights:
    """The matrices of one layer in (out, in) layout, whatever the architecture."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in WEIGHT_MAPS:
        raise ValueError(f"no weight map for model_type {model_type!r}; supported: {', '.join(sorted(WEIGHT_MAPS))}")
    return WEIGHT_MAPS[model_type](model, layer)


# ---------------------------------------------------------------------------- edges


@dataclass(frozen=True)
class Edge:
    src: int
    dst: int
    weight: float


def _matrix_edges(index: NodeIndex, open_mask: torch.Tensor, src: str, dst: str, w: torch.Tensor) -> list[Edge]:
    """Edges src channel i -> dst channel j for W[j, i] != 0, both open."""
    if src not in index.by_name or dst not in index.by_name:
        return []
    s, d = index.by_name[src], index.by_name[dst]
    s_open = open_mask[s.offset : s.offset + s.width].nonzero().flatten()
    d_open = open_mask[d.offset : d.offset + d.width].nonzero().flatten()
    if not len(s_open) or not len(d_open):
        return []
    sub = w[d_open][:, s_open]  # (open dst, open src)
    rows, cols = sub.nonzero(as_tuple=True)
    return [Edge(s.offset + int(s_open[c]), d.offset + int(d_open[r]), float(sub[r, c]))
            for r, c in zip(rows.tolist(), cols.tolist())]


def _pair_edges(index: NodeIndex, open_mask: torch.Tensor, src: str, dst: str,
                pairs: tuple[torch.Tensor, torch.Tensor], weight: torch.Tensor | None = None) -> list[Edge]:
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
        out.append(Edge(s.offset + int(a[i]), d.offset + int(b[i]), w))
    return out


def circuit_edges(model: nn.Module, index: NodeIndex, open_mask: torch.Tensor) -> list[Edge]:
    """Every edge between open nodes (``open_mask``: (N,) bool), in forward order of their targets."""
    open_mask = open_mask.bool().cpu()
    if open_mask.shape != (index.total,):
        raise ValueError(f"open_mask must be ({index.total},), got {tuple(open_mask.shape)}")
    layers = sorted({s.layer for s in index})
    edges: list[Edge] = []
    writes: list[tuple[str, int]] = []  # residual writes seen so far, in forward order: (site, layer)
    for layer in layers:
        w = layer_weights(model, layer)
        p = f"{layer}."
        for kind, gain in (("attn.act_in", w.attn_gain), ("mlp.act_in", w.mlp_gain)):
            reader = p + kind
            for writer, _ in writes:
                ch = torch.arange(gain.shape[0])
                edges += _pair_edges(index, open_mask, writer, reader, (ch, ch), weight=gain)
            if kind == "attn.act_in":
                for n, m in (("q", w.q), ("k", w.k), ("v", w.v)):
                    edges += _matrix_edges(index, open_mask, reader, p + f"attn.{n}", m)
                edges += _pair_edges(index, open_mask, p + "attn.q", p + "attn.k", w.qk_pairs)
                edges += _matrix_edges(index, open_mask, p + "attn.v", p + "attn.resid_delta", w.o)
                writes.append((p + "attn.resid_delta", layer))
            else:
                edges += _matrix_edges(index, open_mask, reader, p + "mlp.post_act", w.fc)
                edges += _matrix_edges(index, open_mask, p + "mlp.post_act", p + "mlp.resid_delta", w.proj)
                writes.append((p + "mlp.resid_delta", layer))
    return edges
