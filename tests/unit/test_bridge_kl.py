"""The bridge's KL terms read KL(dense || hybrid) (not the reverse), and the quality gate says why a bridge failed."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bridges import BridgedPair, BridgeSection, kl_dense_hybrid
from bridges.bridge import evaluate_bridges, format_gate, quality_gate
from sparse_lm.model import SparseGPT, SparseGPTConfig

VOCAB = 64


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), token mean, written out by hand."""
    p = torch.softmax(p_logits.double(), -1)
    q = torch.softmax(q_logits.double(), -1)
    return (p * (p.log() - q.log())).sum(-1).mean()


def test_kl_reads_the_dense_distribution_first_and_a_swap_is_caught():
    # A peaked "dense" distribution and a flat "hybrid" one: KL(p||q) and KL(q||p) differ a lot.
    dense = torch.zeros(1, 3, 8)
    dense[..., 0] = 6.0
    hybrid = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    forward, reverse = _kl(dense, hybrid), _kl(hybrid, dense)
    assert abs(float(forward - reverse)) > 0.5  # the test can tell the two directions apart
    torch.testing.assert_close(kl_dense_hybrid(dense, hybrid).double(), forward, rtol=1e-5, atol=1e-6)
    assert abs(float(kl_dense_hybrid(hybrid, dense)) - float(forward)) > 0.5
    # Only the first n_vocab logits count (a padded dense vocabulary).
    padded = torch.cat([dense, torch.full((1, 3, 4), 9.0)], -1)
    torch.testing.assert_close(kl_dense_hybrid(padded, hybrid, 8).double(), forward, rtol=1e-5, atol=1e-6)


def _pair() -> BridgedPair:
    torch.manual_seed(0)
    sparse = SparseGPT(SparseGPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, d_head=8, d_model=16,
                                       d_mlp=32, afrac=None, sink=False, enable_bigram_table=False)).eval()
    dense = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=24, n_layer=2, n_head=2)).eval()
    with torch.no_grad():  # a dense model far from uniform, so the two KL directions differ
        dense.lm_head.weight.mul_(8.0)
    return BridgedPair(sparse, dense, BridgeSection(afrac=None))


def test_the_pair_measures_kl_from_the_dense_model_to_each_hybrid_and_to_the_sparse_model():
    pair = _pair()
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, out, dense_logits, site = pair.components(x, x)
        for i in (0, 2, 4):
            for direction in ("d2s", "s2d"):
                hybrid = pair.hybrid_logits(x, direction, i)
                want, swapped = _kl(dense_logits, hybrid), _kl(hybrid, dense_logits)
                assert abs(float(want - swapped)) > 1e-3, (direction, i)
                assert float(site[f"kl_{direction}"][i]) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
        ev = evaluate_bridges(pair, x, batch_size=2)
    assert ev["kl_dense_sparse"] == pytest.approx(float(_kl(dense_logits, out.logits)), rel=1e-4)
    assert ev["kl_dense_sparse"] != pytest.approx(float(_kl(out.logits, dense_logits)), rel=1e-2)


GOOD = {"kl_d2s": 0.20, "kl_s2d": 0.30, "kl_dense_sparse": 0.77, "nmse_enc": 0.25, "nmse_dec": 0.10}


def test_the_gate_passes_only_a_bridge_that_beats_no_bridge_with_small_nmse():
    g = quality_gate(GOOD)
    assert g["passed"] and g["reasons"] == [] and g["kl_no_bridge"] == 0.77
    assert set(g) >= {"passed", "kl_d2s", "kl_s2d", "kl_no_bridge", "nmse_enc", "nmse_dec", "reasons"}
    # The main job's numbers of issue 13 (frozen models, 200 steps): worse than no bridge, NMSE 0.62.
    g = quality_gate({"kl_d2s": 0.80, "kl_s2d": 1.22, "kl_dense_sparse": 0.77, "nmse_enc": 0.62, "nmse_dec": 0.62})
    assert not g["passed"] and len(g["reasons"]) == 4
    assert any(r.startswith("kl_d2s 0.8000 >= kl_no_bridge 0.7700") for r in g["reasons"])
    assert "FAILED" in format_gate(g) and "nmse_dec 0.6200 >= 0.3" in format_gate(g)
    for key, bad in (("kl_d2s", 0.77), ("kl_s2d", 0.9), ("nmse_enc", 0.3), ("nmse_dec", 0.31)):
        g = quality_gate({**GOOD, key: bad})
        assert not g["passed"] and len(g["reasons"]) == 1 and g["reasons"][0].startswith(key), (key, g)
    assert quality_gate({**GOOD, "nmse_enc": 0.35}, nmse_max=0.4)["passed"]


def test_finetune_holds_the_trained_models_l0_from_its_own_run_config(tmp_path):
    from bridges.config import BridgeConfig
    from bridges.train import _finetune_sparsity
    from sparse_lm import config as configlib
    from sparse_lm.jobs import PretrainConfig

    trained = PretrainConfig()
    trained.sparsity.target_fraction, trained.sparsity.embed_fraction, trained.sparsity.min_fan = 0.125, 0.5, 3
    (tmp_path / "run" / "model").mkdir(parents=True)
    configlib.save(trained, tmp_path / "run" / "config.json", job="pretrain")
    cfg = configlib.resolve(BridgeConfig, "bridge", "bridge-tiny-joint", [f"sparse={tmp_path / 'run' / 'model'}"])
    assert cfg.mode == "finetune" and cfg.trains_sparse
    _finetune_sparsity(cfg, rank=0)
    s = cfg.sparsity
    assert (s.target_fraction, s.embed_fraction, s.min_fan) == (0.125, 0.5, 3)
    assert s.anneal_start == s.anneal_end == 0.0  # at the target from step 0: no re-annealing from dense
    # Without --sparse the same preset trains a new model (mode joint); with train_sparse false, bridges alone.
    assert configlib.resolve(BridgeConfig, "bridge", "bridge-tiny-joint").mode == "joint"
    assert configlib.resolve(BridgeConfig, "bridge", "bridge-tiny-joint",
                             ["sparse=x", "bridge.train_sparse=false"]).mode == "bridges"


def test_nmse_gradient_treats_the_target_spread_as_a_constant_when_asked():
    """bridge.nmse_detach_spread: a sparse model trained with its bridges cannot lower NMSE(enc(h_dense),
    h_sparse) by changing its own variance: the gradient reaching the target is the numerator's alone."""
    from bridges.bridge import nmse

    g = torch.Generator().manual_seed(0)
    target = (torch.randn(2, 5, 4, generator=g) * 3 + 1).requires_grad_(True)
    pred = torch.randn(2, 5, 4, generator=g)
    value = nmse(pred, target, detach_spread=True)
    value.backward()
    t = target.detach().flatten(0, -2)
    spread = (t - t.mean(0)).pow(2).sum()
    torch.testing.assert_close(value.detach(), (pred.flatten(0, -2) - t).pow(2).sum() / spread)
    # d/dtarget of sum (pred - target)^2 / spread, the spread held fixed
    torch.testing.assert_close(target.grad, 2 * (target.detach() - pred) / spread)
    # the default (bridge.nmse_detach_spread=false) differentiates the spread too: another gradient, the same value
    free = target.detach().clone().requires_grad_(True)
    value_free = nmse(pred, free)
    value_free.backward()
    torch.testing.assert_close(value_free.detach(), value.detach())
    assert not torch.allclose(free.grad, target.grad, rtol=1e-3)


def _massive(n: int, d: int, seed: int) -> torch.Tensor:
    """Activations with two channels ~1000x the rest, as in a pretrained Llama's residual stream."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    x[:, :2] *= 1000.0
    return x


def test_maps_fit_in_normalised_units_and_stay_linear_maps():
    from bridges.bridge import Bridges, SitePair, nmse

    b = Bridges([SitePair("0.resid_in", "0.resid_in", 8, 24)], afrac=None)
    h_d = _massive(512, 24, 0)
    mix = torch.randn(24, 8, generator=torch.Generator().manual_seed(1)) * 0.02
    h_s = (h_d / h_d.std(0)) @ mix * 0.03  # a sparse side at a tiny scale, a linear function of the dense one
    b.fit_least_squares([h_d], [h_s])
    torch.testing.assert_close(b.dense_scale(0), h_d.std(0))
    assert float(b.sparse_scale(0)) == pytest.approx(float(h_s.pow(2).mean().sqrt()), rel=1e-5)
    with torch.no_grad():
        assert float(nmse(b.encode(0, h_d), h_s)) < 1e-3
        # Still a linear (affine) map of its input: decode(a x + c y) = a decode(x) + c decode(y) - (a + c - 1) decode(0)
        x, y, zero = h_s[:3], h_s[3:6], torch.zeros(3, 8)
        torch.testing.assert_close(b.decode(0, 2 * x - y), 2 * b.decode(0, x) - b.decode(0, y), rtol=1e-4, atol=1e-2)
        assert b.decode(0, zero).abs().sum() > 0  # the bias is there too


def test_bridges_saved_before_the_scales_load_as_the_plain_maps():
    from bridges.bridge import Bridges, SitePair

    pairs = [SitePair("0.resid_in", "0.resid_in", 8, 24)]
    old = Bridges(pairs, afrac=None)
    state = {k: v for k, v in old.state_dict().items() if "scale" not in k}  # a file from before the scales
    new = Bridges(pairs, afrac=None)
    with torch.no_grad():
        new.dense_scale(0).fill_(7.0)
    new.load_state_dict(state)
    assert float(new.dense_scale(0).max()) == 1.0 and float(new.sparse_scale(0)) == 1.0
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(new.encode(0, x), old.encoders[0](x))
        torch.testing.assert_close(new.decode(0, x[:, :8]), old.decoders[0](x[:, :8]))


def test_the_sparse_scale_follows_a_growing_sparse_model_and_maps_get_their_own_lr():
    from bridges.bridge import Bridges, SitePair

    b = Bridges([SitePair("0.resid_in", "0.resid_in", 8, 24)], afrac=None)
    h = torch.full((10, 8), 5.0)
    for _ in range(200):
        b.follow_sparse_scale(0, h, 0.05)
    assert float(b.sparse_scale(0)) == pytest.approx(5.0, rel=1e-3)
    b.follow_sparse_scale(0, torch.zeros(10, 8) + 1.0, 0.0)  # momentum 0: fixed
    assert float(b.sparse_scale(0)) == pytest.approx(5.0, rel=1e-3)
    pair = _pair()
    pair.cfg.map_lr_scale = 0.02
    scales = pair.lr_scales()
    assert set(scales) == set(pair.bridges.parameters()) and set(scales.values()) == {0.02}
    assert not set(scales) & set(pair.sparse.parameters())
