"""The site adapter for transformers models (GPT-2 and Llama families)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sparse_lm.adapters import residual_sites, sites_of


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32)).eval()


@pytest.mark.parametrize("make", [gpt2, llama])
def test_residual_sites_are_the_hidden_states(make):
    m = make()
    sites = sites_of(m)
    x = torch.randint(0, 50, (2, 7))
    names = residual_sites(sites, 2)
    with sites.record(names) as acts:
        out = m(x, output_hidden_states=True)
    hs = out.hidden_states  # embeddings, after block 0, after block 1 (final norm applied to the last)
    torch.testing.assert_close(acts["0.resid_in"], hs[0])
    torch.testing.assert_close(acts["1.resid_in"], hs[1])
    assert acts["0.resid_mid"].shape == (2, 7, 16)
    assert sites.active_torch_hooks() == 0


@pytest.mark.parametrize("make", [gpt2, llama])
def test_writing_a_site_changes_what_follows_and_identity_changes_nothing(make):
    m = make()
    sites = sites_of(m)
    x = torch.randint(0, 50, (1, 6))
    base = m(x).logits
    for name in ["0.resid_mid", "1.resid_in", "final_resid", "0.mlp.post_act", "1.attn.q", "1.attn.v",
                 "0.attn.resid_delta", "1.mlp.act_in"]:
        with sites.replace({name: lambda h: h}):
            torch.testing.assert_close(m(x).logits, base)
        with sites.replace({name: lambda h: h * 0}):
            assert not torch.allclose(m(x).logits, base), name
    assert sites.active_torch_hooks() == 0


def test_resid_mid_write_is_exact():
    """Writing r' at resid_mid makes the MLP read exactly r' (bridges depend on it)."""
    m = gpt2()
    sites = sites_of(m)
    x = torch.randint(0, 50, (1, 5))
    target = torch.randn(1, 5, 16)
    with sites.replace({"0.resid_mid": lambda h: target}), sites.record(["0.mlp.act_in"]) as acts:
        m(x)
    ln = m.transformer.h[0].ln_2
    torch.testing.assert_close(acts["0.mlp.act_in"], ln(target))


def test_hooks_are_removed_after_an_error_and_widths_are_known():
    m = llama()
    sites = sites_of(m)
    assert sites.width("0.attn.q") == 16 and sites.width("0.attn.k") == 8  # grouped-query attention
    assert sites.width("1.mlp.post_act") == 40
    with pytest.raises(RuntimeError):
        with sites.replace({"0.mlp.post_act": lambda h: h}):
            raise RuntimeError("boom")
    assert sites.active_torch_hooks() == 0
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    with pytest.raises(KeyError, match="no site named"):
        with sites.record(["9.mlp.post_act"]):
            pass
    assert sites.active_torch_hooks() == 0


def test_unsupported_architecture_is_refused():
    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "odd"})()

    with pytest.raises(ValueError, match="no site adapter for model_type 'odd'"):
        sites_of(Odd())
