"""Architecture records: every listed architecture is complete and matches a tiny model of its kind."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_models import CONTEXT, LAYERS, VOCAB, tiny_model
from transformers import GPT2Config

from sparse_lm.adapters import sites_of
from sparse_lm.arch import ARCHS, arch_of, context_length, layer_weights, missing_fields, n_layers

torch.set_num_threads(1)
_tiny = tiny_model


def test_every_record_is_complete():
    for name, arch in ARCHS.items():
        assert arch.model_type == name
        assert missing_fields(arch) == [], f"{name} lacks {missing_fields(arch)}"
        assert callable(arch.weights) and callable(arch.head)
    # the check itself notices a hole
    assert missing_fields(replace(ARCHS["gpt2"], head=None, blocks="")) == ["blocks", "head"]


def test_an_unlisted_architecture_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    model.config = GPT2Config()
    model.config.model_type = "nonesuch"
    with pytest.raises(ValueError, match="unsupported model_type 'nonesuch'.*gpt2"):
        context_length(model)


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_record_matches_a_tiny_model(model_type):
    model = _tiny(model_type)
    arch = arch_of(model)
    assert arch.model_type == model_type
    assert context_length(model) == CONTEXT and n_layers(model) == LAYERS

    # module paths
    blocks = model.get_submodule(arch.blocks)
    assert len(blocks) == LAYERS
    model.get_submodule(arch.final_norm)
    for block in blocks:
        for path in (arch.norm1, arch.attn, arch.norm2, arch.mlp, arch.post_act[0], *arch.qkv):
            block.get_submodule(path)

    # weight map: (out, in) shapes that chain, gains of the model's width
    d = 16
    for layer in range(LAYERS):
        w = layer_weights(model, layer)
        assert w.q.shape[1] == w.k.shape[1] == w.v.shape[1] == w.fc.shape[1] == d
        assert w.o.shape == (d, w.q.shape[0]) and w.proj.shape == (d, w.fc.shape[0])  # o reads every query head
        assert w.attn_gain.shape == w.mlp_gain.shape == (d,)
        q_ch, k_ch = w.qk_pairs
        assert int(q_ch.max()) < w.q.shape[0] and int(k_ch.max()) < w.k.shape[0]

    # the fast head on the final residual gives the full forward pass's logits
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad(), sites_of(model).record(["final_resid"]) as acts:
        full = model(input_ids=ids).logits  # (B, T, V)
        fast = arch.head(model, acts["final_resid"][:, -1], ids[:, -1])  # (B, V)
    torch.testing.assert_close(fast, full[:, -1], rtol=1e-4, atol=1e-4)


def test_weight_map_reads_the_real_matrices():
    gpt2 = _tiny("gpt2")
    w = layer_weights(gpt2, 1)
    conv = gpt2.transformer.h[1].attn.c_attn.weight  # Conv1D: (in, 3 * out)
    torch.testing.assert_close(w.k, conv[:, 16:32].t())
    llama = _tiny("llama")
    w = layer_weights(llama, 0)
    torch.testing.assert_close(w.v, llama.model.layers[0].self_attn.v_proj.weight)
    # grouped-query attention: 4 query heads share 2 key heads of 4 dims; query channel 4 (head 1) reads key
    # channel 0 (key head 0), and its rotary partner 2
    q_ch, k_ch = w.qk_pairs
    assert sorted(k_ch[q_ch == 4].tolist()) == [0, 2]


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_weight_map_gains_are_what_the_norms_multiply(model_type):
    """attn_gain and mlp_gain are the per-channel factors the two pre-norms apply: a vector of mean 0 and
    RMS 1 comes out as gain * x (+ a LayerNorm's bias). Catches Gemma's 1 + weight and a norm read from the
    wrong module (Gemma 2's MLP reads pre_feedforward_layernorm, not post_attention_layernorm)."""
    model = _tiny(model_type)
    arch = arch_of(model)
    blocks = model.get_submodule(arch.blocks)
    x = torch.tensor([1.0, -1.0] * 8)  # (16,): mean 0, RMS 1, variance 1
    for layer in range(LAYERS):
        w = layer_weights(model, layer)
        for path, gain in ((arch.norm1, w.attn_gain), (arch.norm2, w.mlp_gain)):
            norm = blocks[layer].get_submodule(path)
            with torch.no_grad():
                y = norm(x)
            bias = getattr(norm, "bias", None)
            if bias is not None:
                y = y - bias
            torch.testing.assert_close(y * x, gain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gemma", "gemma2", "gemma3_text", "phi3"])
def test_weight_map_output_matrices_give_what_the_residual_receives(model_type):
    """o and proj map the attention heads' and the MLP's hidden values onto what the block adds to the
    residual, up to one scale per position: Gemma 2/3 normalise those outputs (post-norms), so their gains
    belong to o's and proj's rows."""
    model = _tiny(model_type)
    block = model.model.layers[0]
    w = layer_weights(model, 0)
    gen = torch.Generator().manual_seed(0)
    y, z = torch.randn(3, w.o.shape[1], generator=gen), torch.randn(3, w.proj.shape[1], generator=gen)
    with torch.no_grad():
        added_attn, added_mlp = block.self_attn.o_proj(y), block.mlp.down_proj(z)
        if hasattr(block, "post_feedforward_layernorm"):
            added_attn = block.post_attention_layernorm(added_attn)
            added_mlp = block.post_feedforward_layernorm(added_mlp)
    for added, mapped in ((added_attn, y @ w.o.T), (added_mlp, z @ w.proj.T)):
        cos = torch.nn.functional.cosine_similarity(added, mapped, dim=1)
        torch.testing.assert_close(cos, torch.ones(3), rtol=1e-5, atol=1e-5)


def test_rotary_pairs_follow_each_models_rotation():
    """GPT-J turns neighbouring dimensions (0 with 1, 2 with 3) of the first rotary_dim of a head; GPT-NeoX
    and Phi turn dimension e with e + r/2 (rotate-half) of the first r; the rest pair only with themselves."""
    q_ch, k_ch = layer_weights(_tiny("gptj"), 0).qk_pairs  # 2 heads of 8 dims, rotary_dim 4
    assert sorted(k_ch[q_ch == 8].tolist()) == [8, 9] and sorted(k_ch[q_ch == 11].tolist()) == [10, 11]
    assert sorted(k_ch[q_ch == 13].tolist()) == [13]
    q_ch, k_ch = layer_weights(_tiny("gpt_neox"), 0).qk_pairs  # 2 heads of 8 dims, a quarter turned: r = 2
    assert sorted(k_ch[q_ch == 8].tolist()) == [8, 9] and sorted(k_ch[q_ch == 10].tolist()) == [10]
    q_ch, k_ch = layer_weights(_tiny("phi"), 0).qk_pairs  # 4 query heads of 4 dims, 2 key heads, r = 2
    assert sorted(k_ch[q_ch == 4].tolist()) == [0, 1] and sorted(k_ch[q_ch == 14].tolist()) == [6]


def test_fused_projections_split_as_the_model_splits_them():
    """Phi-3's qkv_proj (grouped-query widths) and gate_up_proj (gate rows, then up rows)."""
    phi = _tiny("phi3")
    att, mlp = phi.model.layers[1].self_attn, phi.model.layers[1].mlp
    w = layer_weights(phi, 1)
    assert w.q.shape == (16, 16) and w.k.shape == (8, 16) == w.v.shape  # 4 query heads, 2 key heads of 4 dims
    torch.testing.assert_close(w.k, att.qkv_proj.weight[16:24])
    torch.testing.assert_close(w.v, att.qkv_proj.weight[24:32])
    up = mlp.gate_up_proj.weight[24:]
    torch.testing.assert_close(w.fc, torch.where(up != 0, up, mlp.gate_up_proj.weight[:24]))
    # half of each head is turned by the rotary embedding (dims 0-1 pair with each other), the rest is not
    q_ch, k_ch = w.qk_pairs
    assert sorted(k_ch[q_ch == 4].tolist()) == [0, 1]  # query head 1 dim 0 reads key head 0 dims 0 and 1
    assert sorted(k_ch[q_ch == 6].tolist()) == [2]  # dim 2 is not turned: only itself
    sites = sites_of(phi)
    assert [sites.width(f"0.attn.{n}") for n in "qkv"] == [16, 8, 8]


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_qk_pairs_are_the_channels_that_meet_in_the_attention_score(model_type):
    """A query channel a and a key channel b are listed as a q-k pair exactly when they meet in the score:
    with q = e_a at every position and k = +-(position + 1) e_b, the attention is uniform (as with q = 0) unless
    a and b are in the same head and the same or rotary-partner dimension (the key's sign alternates, so the
    per-head norms of Qwen3 keep it non-uniform). Checks every (a, b) of layer 0
    against the model itself (rotate-half, neighbouring pairs, partial rotary, grouped-query heads)."""
    model = _tiny(model_type)
    sites = sites_of(model)
    q_ch, k_ch = layer_weights(model, 0).qk_pairs
    dq, dk = sites.width("0.attn.q"), sites.width("0.attn.k")
    T = 6
    ids = torch.randint(0, VOCAB, (dk, T), generator=torch.Generator().manual_seed(7))
    keys = torch.zeros(dk, T, dk)
    # row b: (-1)^t (t + 1) e_b; the sign survives the per-head key norms of Qwen3 and Gemma 3, the size does not
    t = torch.arange(T, dtype=torch.float)
    keys[torch.arange(dk), :, torch.arange(dk)] = (1 - 2 * (t % 2)) * (t + 1)

    def attn_out(q: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), sites.replace({"0.attn.q": lambda h: q.expand_as(h), "0.attn.k": lambda h: keys}), \
                sites.record(["0.attn.resid_delta"]) as acts:
            model(input_ids=ids)
        return acts["0.attn.resid_delta"]

    uniform = attn_out(torch.zeros(dq))
    for a in range(dq):
        e_a = torch.zeros(dq)
        e_a[a] = 3.0
        moved = (attn_out(e_a) - uniform).abs().amax(dim=(1, 2)) > 1e-5  # (dk,): key channel b changed it
        listed = torch.zeros(dk, dtype=torch.bool)
        listed[k_ch[q_ch == a]] = True
        assert torch.equal(moved, listed), (a, moved.nonzero().flatten().tolist(), listed.nonzero().flatten().tolist())
