"""SparseGPT: the site registry, scoped hooks, save/load, generate, config checks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_lm.model import LOCTYPES, SparseGPT, SparseGPTConfig


def small(**kw) -> SparseGPT:
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_head=8, d_model=32, d_mlp=64, sink=True,
                enable_bigram_table=True)
    base.update(kw)
    torch.manual_seed(0)
    m = SparseGPT(SparseGPTConfig(**base)).eval()
    with torch.no_grad():  # make the sink and bigram table matter
        for b in m.transformer.h:
            b.attn.sink_logit.normal_()
        m.bigram_table.normal_(std=0.5)
    return m


def test_registry_holds_every_expected_site():
    m = small()
    expected = {"final_resid"}
    for i in range(2):
        expected |= {f"{i}.resid_in", f"{i}.resid_mid"}
        expected |= {f"{i}.attn.{s}" for s in ("act_in", "q", "k", "v", "y", "resid_delta")}
        expected |= {f"{i}.mlp.{s}" for s in ("act_in", "post_act", "resid_delta")}
    assert set(m.sites.names()) == expected
    assert m.sites.width("0.mlp.post_act") == 64 and m.sites.width("1.attn.q") == 32


def test_abstopk_sites_follow_afrac_loctypes():
    m = small(afrac=0.25, afrac_loctypes="attn_in,mlp_neuron,resid_post_mlp")
    ks = {s.name: s.k for s in m.sites}
    assert ks["0.attn.act_in"] == 8 and ks["1.mlp.post_act"] == 16
    assert ks["1.resid_in"] == 8 and ks["final_resid"] == 8 and ks["0.resid_in"] is None  # embeddings stay dense
    assert ks["0.attn.q"] is None and ks["0.mlp.act_in"] is None
    x = torch.randint(0, 97, (2, 10))
    with m.sites.record(["0.mlp.post_act", "0.attn.q"]) as acts:
        m(x)
    assert ((acts["0.mlp.post_act"] != 0).sum(-1) <= 16).all()
    assert ((acts["0.attn.q"] != 0).sum(-1) > 16).all()


def test_record_and_replace_are_scoped_and_clean_up_after_errors():
    m = small()
    x = torch.randint(0, 97, (2, 12))
    base = m(x).logits
    with m.sites.record() as acts:
        m(x)
    assert set(acts) == set(m.sites.names())
    assert acts["0.attn.q"].shape == (2, 12, 32) and acts["final_resid"].shape == (2, 12, 32)
    with m.sites.replace({"1.mlp.post_act": torch.zeros_like}):
        changed = m(x).logits
    assert not torch.allclose(changed, base)
    with pytest.raises(RuntimeError):
        with m.sites.replace({"0.attn.v": torch.zeros_like}):
            raise RuntimeError("boom")
    assert all(not s.hooks for s in m.sites)
    torch.testing.assert_close(m(x).logits, base, rtol=0, atol=0)


def test_unknown_site_name_is_a_clear_error():
    m = small()
    with pytest.raises(KeyError, match=r"no site named '0\.mlp\.post_ac'.*did you mean 0\.mlp\.post_act"):
        with m.sites.record(["0.mlp.post_ac"]):
            pass
    assert all(not s.hooks for s in m.sites)


def test_replacing_the_residual_stream_changes_what_follows():
    """A write at a residual site is what the rest of the model sees (bridges rely on it)."""
    m = small()
    x = torch.randint(0, 97, (1, 8))
    with m.sites.record(["1.resid_in"]) as acts:
        ref = m(x).logits
    with m.sites.replace({"1.resid_in": lambda h: acts["1.resid_in"]}):
        same = m(x).logits
    torch.testing.assert_close(same, ref)


def test_save_load_identical_logits_and_generate(tmp_path):
    m = small(afrac=0.25)
    x = torch.randint(0, 97, (3, 16))
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SparseGPT
    torch.testing.assert_close(loaded(x).logits, m(x).logits, rtol=0, atol=0)
    # generate == a hand-written greedy loop
    out = m.generate(x[:1, :4], max_new_tokens=6, do_sample=False)
    ids = x[:1, :4]
    for _ in range(6):
        ids = torch.cat([ids, m(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_loss_is_shifted_next_token_cross_entropy():
    m = small()
    x = torch.randint(0, 97, (2, 9))
    out = m(x, labels=x)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


def test_tied_unembedding_shares_the_matrix(tmp_path):
    m = small(tied_unembed=True)
    assert m.lm_head.weight is m.transformer.wte.weight
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.randint(0, 97, (1, 5))
    torch.testing.assert_close(loaded.eval()(x).logits, m(x).logits)


@pytest.mark.parametrize("bad, message", [
    (dict(afrac_loctypes="attn_in,mlp_nope"), "unknown afrac_loctypes"),
    (dict(activation_type="swish"), "activation_type"),
    (dict(afrac=1.5), "afrac must be in"),
])
def test_bad_model_config_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        SparseGPTConfig(**bad)


def test_every_loctype_maps_to_a_site():
    m = small(afrac=0.5, afrac_loctypes=",".join(LOCTYPES), residual_activation_type="relu")
    assert sum(s.k is not None for s in m.sites) == 2 * 10 - 1 + 1  # resid_in of layer 0 stays dense
    x = torch.randint(0, 97, (1, 6))
    assert torch.isfinite(m(x).logits).all()


def test_longer_than_block_size_is_refused():
    m = small()
    with pytest.raises(ValueError, match="longer than block_size 32"):
        m(torch.zeros(1, 33, dtype=torch.long))
