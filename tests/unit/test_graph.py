"""Circuit edges (pruning.graph): typed, counted the paper's way, on hand-built models where every edge is known."""

from __future__ import annotations

import pytest
import torch

from pruning.circuit import Circuit
from pruning.config import DEFAULT_NODE_KINDS
from pruning.graph import (
    EDGE_TYPES,
    QK_LINK,
    RESID_LINK,
    WEIGHT_EDGE_TYPES,
    NodeIndex,
    circuit_edges,
    count_edges,
)
from sparse_lm.arch import ARCHS
from sparse_lm.model import SparseGPT, SparseGPTConfig

Q, K, V = "attn.act_in->attn.q", "attn.act_in->attn.k", "attn.act_in->attn.v"
O, FC, PROJ = "attn.v->attn.resid_delta", "mlp.act_in->mlp.post_act", "mlp.post_act->mlp.resid_delta"


def _blank(n_layer: int, d_model: int = 4, d_mlp: int = 3) -> SparseGPT:
    """A SparseGPT with every weight zero and every norm gain 1 (one head of 2 dims)."""
    cfg = SparseGPTConfig(vocab_size=8, block_size=8, n_layer=n_layer, n_head=1, d_head=2, d_model=d_model,
                          d_mlp=d_mlp, afrac=None, enable_bigram_table=False, sink=False)
    model = SparseGPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for block in model.transformer.h:
            block.ln_1.weight.fill_(1.0)
            block.ln_2.weight.fill_(1.0)
    return model


def _hand_built() -> SparseGPT:
    """Two layers, d_model 4, one head of 2 dims (c_attn rows: q 0-1, k 2-3, v 4-5), d_mlp 3."""
    model = _blank(2)
    h0, h1 = model.transformer.h
    with torch.no_grad():
        a = h0.attn.c_attn.weight  # (6, 4): (out, in)
        a[0, 1] = 1.0  # act_in 1 -> q 0
        a[1, 2] = 1.0  # act_in 2 -> q 1
        a[2, 1] = 1.0  # act_in 1 -> k 0
        a[5, 3] = 1.0  # act_in 3 -> v 1
        a[4, 0] = -2.0  # act_in 0 -> v 0
        h0.attn.c_proj.weight[2, 1] = 1.5  # v 1 -> resid_delta 2
        h0.mlp.c_fc.weight[0, 2] = 1.0  # mlp.act_in 2 -> neuron 0
        h0.mlp.c_fc.weight[1, 2] = 1.0  # mlp.act_in 2 -> neuron 1
        h0.mlp.c_fc.weight[2, 0] = 1.0  # mlp.act_in 0 -> neuron 2
        h0.mlp.c_proj.weight[3, 0] = 1.0  # neuron 0 -> mlp.resid_delta 3
        h1.attn.c_attn.weight[0, 3] = 1.0  # act_in 3 -> q 0
        h1.attn.c_attn.weight[4, 3] = 1.0  # act_in 3 -> v 0
        h1.attn.c_proj.weight[0, 0] = 1.0  # v 0 -> resid_delta 0
        h1.ln_2.weight[1] = 0.0  # layer 1's MLP reads nothing of residual channel 1
    return model


# Counted by hand from `_hand_built`, every node open:
#  weights: q 2 + 1, k 1, v 2 + 1, v->out 1 + 1, act_in->neuron 3, neuron->out 1   = 13
#  q<->k: q dim j pairs with k dim j in each layer's head, no weight involved     = 2 per layer = 4
#  residual: per channel, every write before every read (writes 0.attn 0.mlp 1.attn 1.mlp, reads the same
#  four act_in): 3 + 2 + 1 = 6 links x 4 channels = 24, less the 3 into 1.mlp.act_in 1 (zero gain)   = 21
HAND_COUNTS = {Q: 3, K: 1, V: 3, O: 2, FC: 3, PROJ: 1, RESID_LINK: 21, QK_LINK: 4}


def _all_open(index: NodeIndex) -> torch.Tensor:
    return torch.ones(index.total, dtype=torch.bool)


def test_hand_built_counts_per_type():
    model = _hand_built()
    index = NodeIndex.build(model, DEFAULT_NODE_KINDS)
    edges = circuit_edges(model, index, _all_open(index))
    counts = count_edges(edges)
    assert counts.by_type == HAND_COUNTS
    assert list(counts.by_type) == list(EDGE_TYPES)
    assert counts.weights == 13  # the headline: weights only
    assert counts.all_links == 13 + 21 + 4 == len(edges)
    assert all(e.is_weight == (e.type in WEIGHT_EDGE_TYPES) for e in edges)

    def named(e):
        (s, c), (d, j) = index.node(e.src), index.node(e.dst)
        return s.name, c, d.name, j, e.weight

    weights = {named(e) for e in edges if e.is_weight}
    assert ("0.attn.act_in", 0, "0.attn.v", 0, -2.0) in weights
    assert ("0.attn.v", 1, "0.attn.resid_delta", 2, 1.5) in weights
    assert ("1.attn.v", 0, "1.attn.resid_delta", 0, 1.0) in weights
    # no residual link into the zero-gain read; the weight of a link is the reading gain
    links = {named(e)[:4] for e in edges if e.type == RESID_LINK}
    assert ("0.mlp.resid_delta", 1, "1.mlp.act_in", 1) not in links
    assert ("0.mlp.resid_delta", 1, "1.attn.act_in", 1) in links
    assert ("1.mlp.resid_delta", 0, "1.mlp.act_in", 0) not in links  # a write never reaches an earlier read


def test_closed_nodes_drop_their_edges():
    model = _hand_built()
    index = NodeIndex.build(model, DEFAULT_NODE_KINDS)
    mask = _all_open(index)
    mask[index.id_of("0.attn.v", 1)] = False  # drops act_in 3 -> v 1 and v 1 -> resid_delta 2
    mask[index.id_of("1.attn.k", 0)] = False  # drops the layer-1 pair q0 <-> k0 (no weight edge touches k0)
    counts = count_edges(circuit_edges(model, index, mask)).by_type
    assert counts == {**HAND_COUNTS, V: 2, O: 1, QK_LINK: 3}


@pytest.mark.parametrize("n_layer,links", [(4, 28), (8, 120)])
def test_residual_links_are_not_counted_as_edges(n_layer, links):
    """One residual channel used by every block: the weights grow linearly with depth, the links quadratically."""
    model = _blank(n_layer, d_model=4, d_mlp=2)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight[0, 0] = 1.0  # channel 0 -> neuron 0
            block.mlp.c_proj.weight[0, 0] = 1.0  # neuron 0 -> channel 0
    index = NodeIndex.build(model, DEFAULT_NODE_KINDS)
    mask = torch.zeros(index.total, dtype=torch.bool)
    for i in range(n_layer):
        for site in ("attn.act_in", "attn.resid_delta", "mlp.act_in", "mlp.post_act", "mlp.resid_delta"):
            mask[index.id_of(f"{i}.{site}", 0)] = True
    counts = count_edges(circuit_edges(model, index, mask))
    assert counts.weights == 2 * n_layer  # the paper's count: fc and proj of each block
    assert counts.by_type[RESID_LINK] == links  # 2L writes x later reads: 2L (2L - 1) / 2
    assert counts.all_links == 2 * n_layer + links


def test_circuit_json_has_typed_edges_and_counts_per_type(tmp_path):
    model = _hand_built()
    index = NodeIndex.build(model, DEFAULT_NODE_KINDS)
    edges = circuit_edges(model, index, _all_open(index))
    c = Circuit(model="m", model_type="sparse_gpt", task="t", method="learned", target_loss=0.15, n_layer=2,
                node_sites=index.names, total_nodes=index.total)
    c.set_edges(edges, max_listed=100)
    data = c.to_json()
    assert data["num_edges"] == 13 and data["num_edges_all_links"] == 38
    assert data["edges_by_type"] == HAND_COUNTS
    assert {e["type"] for e in data["edges"]} == set(EDGE_TYPES)
    back = Circuit.from_json(c.dumps())
    assert back.edges_by_type == HAND_COUNTS and back.edges == c.edges and back.edges_complete

    # capped: the weights are listed before any link, and the counts still cover everything
    c.set_edges(edges, max_listed=15)
    assert [e.type in WEIGHT_EDGE_TYPES for e in c.edges] == [True] * 13 + [False] * 2
    assert c.num_edges == 13 and c.num_edges_all_links == 38 and not c.edges_complete


def test_grouped_query_attention_maps_v_channels_through_their_query_heads():
    """Llama with 4 query heads sharing 2 key/value heads (head_dim 4): o_proj has 16 columns, v has 8 channels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=8)).eval()
    o = model.model.layers[0].self_attn.o_proj.weight  # (16, 16): (out, query channel)
    with torch.no_grad():
        o.zero_()
        o[3, 5] = 0.5  # query head 1, dim 1: reads kv head 0 -> v channel 1
        o[2, 10] = -0.7  # query head 2, dim 2: reads kv head 1 -> v channel 6
        o[2, 14] = 0.2  # query head 3, dim 2: also v channel 6 (the larger entry names the edge)
    index = NodeIndex.build(model, ["attn.v", "attn.resid_delta"])
    assert index.by_name["0.attn.v"].width == 8
    edges = circuit_edges(model, index, _all_open(index))
    got = {(index.node(e.src)[1], index.node(e.dst)[1], round(e.weight, 4), e.type) for e in edges}
    # reading the first 8 columns of o as if they were v channels would give v5 -> 3 and miss v6
    assert got == {(1, 3, 0.5, O), (6, 2, -0.7, O)}


def test_whole_model_edge_count_without_listing_equals_the_listed_count():
    """What a sweep tells CARBS a collapsed run would have cost under the edges objective."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pruning.graph import weight_edge_count

    model = _hand_built()
    index = NodeIndex.build(model, DEFAULT_NODE_KINDS)
    assert weight_edge_count(model, index) == 13  # HAND_COUNTS' weights
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=8)).eval()
    with torch.no_grad():
        llama.model.layers[1].mlp.down_proj.weight[:, :3] = 0.0  # some zero weights: not edges
    for kinds in (DEFAULT_NODE_KINDS, ["attn.v", "attn.resid_delta", "mlp.post_act"]):
        index = NodeIndex.build(llama, kinds)
        assert weight_edge_count(llama, index) == count_edges(circuit_edges(llama, index, _all_open(index))).weights


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_every_architecture_lists_its_whole_model_edges_and_counts_them_alike(model_type):
    """Every architecture record's weight map feeds the edge listing (types, grouped-query columns, rotary
    pairs) and the count without listing the same way."""
    from tiny_models import tiny_model

    from pruning.graph import weight_edge_count

    model = tiny_model(model_type)
    index = NodeIndex.build(model, DEFAULT_NODE_KINDS)
    counts = count_edges(circuit_edges(model, index, _all_open(index)))
    assert counts.weights > 0 and weight_edge_count(model, index) == counts.weights


@pytest.mark.parametrize("model_type", ["gpt_neox", "gpt_neox_sequential"])
def test_a_parallel_blocks_mlp_reads_no_write_of_its_own_attention(model_type):
    """Pythia's blocks feed the MLP the block's input: the attention's write beside it reaches the next
    block's reads, not this MLP's, so no residual link joins them (GPT-NeoX's sequential blocks keep it)."""
    from tiny_models import LAYERS, tiny_model

    model = tiny_model(model_type)
    index = NodeIndex.build(model, DEFAULT_NODE_KINDS)
    names = [s.name for s in index for _ in range(s.width)]  # node id -> its site
    links = {(names[e.src], names[e.dst]) for e in circuit_edges(model, index, _all_open(index))
             if e.type == "resid_delta->act_in"}
    same_block = {(f"{i}.attn.resid_delta", f"{i}.mlp.act_in") for i in range(LAYERS)}
    assert (same_block <= links) == (model_type == "gpt_neox_sequential")
    assert not (same_block & links) or model_type == "gpt_neox_sequential"
    # both reach the next block
    assert {("0.attn.resid_delta", "1.attn.act_in"), ("0.mlp.resid_delta", "1.mlp.act_in")} <= links
