"""Tiny random models of every architecture in `sparse_lm.arch`, built from configs (nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from sparse_lm.model import SparseGPT, SparseGPTConfig

VOCAB, LAYERS, CONTEXT = 40, 2, 24


def tiny_model(model_type: str, vocab: int = VOCAB, context: int = CONTEXT) -> torch.nn.Module:
    """A tiny random model of `model_type` (d_model 16, LAYERS blocks), built from a config (nothing downloaded)."""
    torch.manual_seed(0)
    llama_kw = dict(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=LAYERS,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
    if model_type == "sparse_gpt":
        cfg = SparseGPTConfig(vocab_size=vocab, block_size=context, n_layer=LAYERS, n_head=2, d_head=8, d_model=16,
                              d_mlp=32, afrac=None, enable_bigram_table=True)
        model = SparseGPT(cfg)
        with torch.no_grad():
            model.bigram_table.normal_()  # the fast head must add it too
        return model.eval()
    if model_type == "tracr":  # a compiled model's layout with random weights (no tracr needed)
        from pruning.groundtruth.torch_model import TracrConfig, TracrTransformer

        return TracrTransformer(TracrConfig(vocab_size=vocab, block_size=context, n_layer=LAYERS, n_head=2, d_head=8,
                                            d_model=16, d_mlp=32, n_classes=vocab)).eval()
    if model_type == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=context, n_embd=16, n_layer=LAYERS,
                                          n_head=2)).eval()
    if model_type == "gpt_neo":
        return GPTNeoForCausalLM(GPTNeoConfig(vocab_size=vocab, max_position_embeddings=context, hidden_size=16,
                                              num_layers=LAYERS, num_heads=2, intermediate_size=32,
                                              attention_types=[[["global", "local"], LAYERS // 2]],
                                              window_size=4)).eval()
    if model_type in ("gpt_neox", "gpt_neox_sequential"):
        # Pythia's layout: parallel blocks (the sequential variant as some GPT-NeoX models have), a quarter of
        # each head turned by the rotary embedding (the q-k pairing must leave the rest alone)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=LAYERS, num_attention_heads=2,
            max_position_embeddings=context, use_parallel_residual=model_type == "gpt_neox",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}))
        return _random_layernorms(model).eval()
    if model_type == "gptj":  # neighbouring-pair rotary on half of each head's 8 dimensions
        return _random_layernorms(GPTJForCausalLM(GPTJConfig(
            vocab_size=vocab, n_positions=context, n_embd=16, n_layer=LAYERS, n_head=2, rotary_dim=4,
            n_inner=24))).eval()
    if model_type == "phi":  # grouped-query heads, rotate-half rotary on half of each head
        return _random_layernorms(PhiForCausalLM(PhiConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=context,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}))).eval()
    made = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
            "olmo": (OlmoConfig, OlmoForCausalLM), "gemma": (GemmaConfig, GemmaForCausalLM),
            "gemma2": (Gemma2Config, Gemma2ForCausalLM), "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
            "phi3": (Phi3Config, Phi3ForCausalLM)}
    config_cls, model_cls = made[model_type]
    extra = {
        "qwen3": {"head_dim": 4},
        "gemma": {"head_dim": 4},
        # a small cap, so that the soft-capping of the logits shows in the fast head's test
        "gemma2": {"head_dim": 4, "query_pre_attn_scalar": 4, "sliding_window": 4, "final_logit_softcapping": 0.5},
        "gemma3_text": {"head_dim": 4, "query_pre_attn_scalar": 4, "sliding_window": 4},
        # half of each head turned by the rotary embedding: the q-k pairing must leave the rest alone
        "phi3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                 "pad_token_id": 0},
    }.get(model_type, {})
    model = model_cls(config_cls(**llama_kw, **extra)).eval()
    if model_type.startswith("gemma"):  # Gemma's norms start at weight 0 (gain 1): make the 1 + w gains differ
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0, 0.5)
    return model


def _random_layernorms(model: torch.nn.Module) -> torch.nn.Module:
    """LayerNorms start at gain 1, bias 0: make their gains and biases differ, so a norm read from the wrong
    module shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in ("layernorm", "layer_norm", "ln_")):
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    return model
