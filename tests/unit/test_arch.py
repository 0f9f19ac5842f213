"""Architecture records: every listed architecture is complete and matches a tiny model of its kind."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from sparse_lm.adapters import sites_of
from sparse_lm.arch import ARCHS, arch_of, context_length, layer_weights, missing_fields, n_layers
from sparse_lm.model import SparseGPT, SparseGPTConfig

torch.set_num_threads(1)

VOCAB, LAYERS, CONTEXT = 40, 2, 24
_LLAMA_KW = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=LAYERS,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT)


def _tiny(model_type: str) -> torch.nn.Module:
    """A tiny random model of `model_type`, built from a config (nothing downloaded)."""
    torch.manual_seed(0)
    if model_type == "sparse_gpt":
        cfg = SparseGPTConfig(vocab_size=VOCAB, block_size=CONTEXT, n_layer=LAYERS, n_head=2, d_head=8, d_model=16,
                              d_mlp=32, afrac=None, enable_bigram_table=True)
        model = SparseGPT(cfg)
        with torch.no_grad():
            model.bigram_table.normal_()  # the fast head must add it too
        return model.eval()
    if model_type == "tracr":  # a compiled model's layout with random weights (no tracr needed)
        from pruning.groundtruth.torch_model import TracrConfig, TracrTransformer

        return TracrTransformer(TracrConfig(vocab_size=VOCAB, block_size=CONTEXT, n_layer=LAYERS, n_head=2, d_head=8,
                                            d_model=16, d_mlp=32, n_classes=VOCAB)).eval()
    if model_type == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=16, n_layer=LAYERS,
                                          n_head=2)).eval()
    made = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_cls, model_cls = made[model_type]
    extra = {"head_dim": 4} if model_type == "qwen3" else {}
    return model_cls(config_cls(**_LLAMA_KW, **extra)).eval()


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
