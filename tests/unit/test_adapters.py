"""The site adapter for transformers models (every hooked architecture of `sparse_lm.arch`)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import LAYERS, VOCAB, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sparse_lm.adapters import residual_sites, sites_of
from sparse_lm.arch import ARCHS, arch_of, is_parallel

HOOKED = sorted(name for name, a in ARCHS.items() if not a.native_sites)
# + GPT-NeoX with the blocks one after the other (Pythia's are parallel)
TINY = HOOKED + ["gpt_neox_sequential"]


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


@pytest.mark.parametrize("model_type", TINY)
def test_sites_add_up_to_the_residual_stream(model_type):
    """What each block adds is its two resid_delta sites: resid_mid = resid_in + attn.resid_delta, the next
    resid_in (final_resid after the last block) = resid_mid + mlp.resid_delta; act_in sites are the norms'
    outputs (of resid_mid for the MLP, of resid_in in a parallel block); every site has the width the
    registry says. (A hook on the wrong module, say the attention itself where Gemma 2 adds a normalised
    output, breaks the sums.)"""
    m = tiny_model(model_type)
    sites = sites_of(m)
    arch = arch_of(m)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), sites.record(sites.names()) as acts:
        m(input_ids=ids)
    for name in sites.names():
        assert acts[name].shape[:2] == (2, 7) and acts[name].shape[-1] == sites.width(name), name
    blocks = m.get_submodule(arch.blocks)
    for i in range(LAYERS):
        nxt = f"{i + 1}.resid_in" if i + 1 < LAYERS else "final_resid"
        torch.testing.assert_close(acts[f"{i}.resid_mid"], acts[f"{i}.resid_in"] + acts[f"{i}.attn.resid_delta"])
        torch.testing.assert_close(acts[nxt], acts[f"{i}.resid_mid"] + acts[f"{i}.mlp.resid_delta"])
        norm1, norm2 = blocks[i].get_submodule(arch.norm1), blocks[i].get_submodule(arch.norm2)
        torch.testing.assert_close(acts[f"{i}.attn.act_in"], norm1(acts[f"{i}.resid_in"]))
        mlp_reads = acts[f"{i}.resid_in" if is_parallel(m) else f"{i}.resid_mid"]
        torch.testing.assert_close(acts[f"{i}.mlp.act_in"], norm2(mlp_reads))
    assert is_parallel(m) == (model_type in ("gpt_neox", "gptj", "phi"))
    assert sites.active_torch_hooks() == 0


@pytest.mark.parametrize("model_type", TINY)
def test_every_site_can_be_written_and_identity_changes_nothing(model_type):
    m = tiny_model(model_type)
    sites = sites_of(m)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = m(input_ids=ids).logits
        for name in sites.names():
            with sites.replace({name: lambda h: h}):
                torch.testing.assert_close(m(input_ids=ids).logits, base)
            with sites.replace({name: lambda h: 0.5 * h - 0.3}):  # not a constant shift: keys ignore one
                assert not torch.allclose(m(input_ids=ids).logits, base), name
    assert sites.active_torch_hooks() == 0


@pytest.mark.parametrize("model_type", TINY)
def test_a_resid_mid_write_is_what_the_mlp_reads(model_type):
    """Writing r' at resid_mid makes the MLP read norm2(r') and the block's output r' + MLP(r') (bridges);
    in a parallel block the MLP still reads norm2(resid_in), and the output is r' + MLP(resid_in)."""
    m = tiny_model(model_type)
    sites = sites_of(m)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    target = torch.randn(1, 5, sites.width("0.resid_mid"), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), sites.replace({"0.resid_mid": lambda h: target}), \
            sites.record(["0.resid_in", "0.mlp.act_in", "0.mlp.resid_delta", "1.resid_in"]) as acts:
        m(input_ids=ids)
    norm2 = m.get_submodule(arch_of(m).blocks)[0].get_submodule(arch_of(m).norm2)
    torch.testing.assert_close(acts["0.mlp.act_in"], norm2(acts["0.resid_in"] if is_parallel(m) else target))
    torch.testing.assert_close(acts["1.resid_in"], target + acts["0.mlp.resid_delta"])


def test_gpt_neox_interleaved_qkv_sites_are_what_attention_reads():
    """GPT-NeoX fuses q, k and v per head (q_h, k_h, v_h side by side): the sites must be the model's own q, k
    and v. Zero v and the attention adds only its output bias; zero q (or k) and every position attends
    uniformly to itself and the positions before it, so it adds dense(causal mean of v) + bias. A site cut
    from the wrong columns (q, k, v in thirds, say) fails both."""
    m = tiny_model("gpt_neox")
    sites = sites_of(m)
    dense = m.gpt_neox.layers[0].attention.dense
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with sites.replace({"0.attn.v": torch.zeros_like}), sites.record(["0.attn.resid_delta"]) as acts:
            m(input_ids=ids)
        torch.testing.assert_close(acts["0.attn.resid_delta"], dense.bias.expand(2, 6, -1))
        for zeroed in ("0.attn.q", "0.attn.k"):
            with sites.replace({zeroed: torch.zeros_like}), sites.record(["0.attn.v", "0.attn.resid_delta"]) as acts:
                m(input_ids=ids)
            v = acts["0.attn.v"]  # (B, T, d): heads side by side, as the attention's output is before dense
            causal_mean = v.cumsum(dim=1) / torch.arange(1, 7).view(1, 6, 1)
            torch.testing.assert_close(acts["0.attn.resid_delta"], dense(causal_mean), msg=zeroed)


def test_gpt_neox_weight_map_rows_are_the_sites_columns():
    """The weight map's q, k, v rows (cut from the fused matrix in the same order) give the sites' values:
    differences between positions cancel the biases."""
    from sparse_lm.arch import layer_weights

    m = tiny_model("gpt_neox")
    sites = sites_of(m)
    w = layer_weights(m, 1)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), sites.record(["1.attn.act_in", "1.attn.q", "1.attn.k", "1.attn.v"]) as acts:
        m(input_ids=ids)
    x = acts["1.attn.act_in"][0]
    dx = x[1:] - x[:1]
    for n, mat in zip("qkv", (w.q, w.k, w.v)):
        a = acts[f"1.attn.{n}"][0]
        torch.testing.assert_close(a[1:] - a[:1], dx @ mat.T, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("model_type", ["gptj", "phi"])
def test_a_shared_norms_two_act_in_sites_are_separate(model_type):
    """GPT-J and Phi give one norm's output to both branches; the two act_in sites are what each branch takes
    in, so writing one changes that branch's output and leaves the other's alone."""
    m = tiny_model(model_type)
    sites = sites_of(m)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(6))
    watched = ["0.attn.act_in", "0.mlp.act_in", "0.attn.resid_delta", "0.mlp.resid_delta"]
    with torch.no_grad():
        with sites.record(watched) as base:
            m(input_ids=ids)
        torch.testing.assert_close(base["0.attn.act_in"], base["0.mlp.act_in"])  # the same norm's output
        for written, other in (("attn", "mlp"), ("mlp", "attn")):
            with sites.replace({f"0.{written}.act_in": lambda h: 0.5 * h - 0.3}), sites.record(watched) as acts:
                m(input_ids=ids)
            torch.testing.assert_close(acts[f"0.{other}.act_in"], base[f"0.{other}.act_in"])
            torch.testing.assert_close(acts[f"0.{other}.resid_delta"], base[f"0.{other}.resid_delta"])
            assert not torch.allclose(acts[f"0.{written}.resid_delta"], base[f"0.{written}.resid_delta"])
    assert sites.active_torch_hooks() == 0
