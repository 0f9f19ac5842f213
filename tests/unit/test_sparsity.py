"""Weight sparsity: exact L0 after annealing, minimum fan-in/out, schedules, optimizer state."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_lm import sparsity as sp
from sparse_lm.model import SparseGPT, SparseGPTConfig


def model() -> SparseGPT:
    torch.manual_seed(0)
    return SparseGPT(SparseGPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, d_head=8, d_model=32,
                                     d_mlp=128, enable_bigram_table=True))


def test_after_annealing_every_matrix_has_its_target_count_and_min_fan():
    m = model()
    cfg = sp.SparsityConfig(target_fraction=0.1, embed_fraction=0.5, unembed_fraction=0.25, min_fan=3)
    mats = m.weight_matrices()
    assert "bigram_table" not in mats
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 16))
    for step in range(1, 11):  # a few real steps so the moments exist and weights move
        m(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        sp.apply_masks(mats, sp.compute_masks(mats, cfg, step, 10), opt, zero_moments=True)
    for name, w in mats.items():
        frac = 0.5 if "wte" in name or "wpe" in name else 0.25 if "lm_head" in name else 0.1
        assert int((w != 0).sum()) == sp.target_count(w.numel(), frac), name
        for dim in sp.fan_constraints(name, 3):
            assert int((w != 0).sum(dim=dim).min()) >= 3, (name, dim)
        state = opt.state[w]
        assert (state["exp_avg"][w == 0] == 0).all() and (state["exp_avg_sq"][w == 0] == 0).all(), name


def test_fan_constraints_cover_neurons_and_channels():
    assert sp.fan_constraints("transformer.h.0.mlp.c_fc.weight", 4) == [1]  # neuron inputs
    assert sp.fan_constraints("transformer.h.0.mlp.c_proj.weight", 4) == [0]  # neuron outputs
    assert sp.fan_constraints("transformer.h.3.attn.c_attn.weight", 4) == [1]  # q/k/v channel inputs
    assert sp.fan_constraints("transformer.h.3.attn.c_proj.weight", 4) == [0]  # attention output channels
    assert sp.fan_constraints("transformer.wte.weight", 4) == []
    assert sp.fan_constraints("transformer.h.0.mlp.c_fc.weight", 0) == []


def test_topk_mask_forces_min_fan_then_takes_largest():
    w = torch.zeros(4, 10)
    w[0] = torch.arange(1, 11).float()  # all the big weights in row 0
    w[1:] = 0.01 * torch.rand(3, 10) + 0.001
    mask = sp.topk_mask(w, k=12, fan_dims=[1], min_fan=2)
    assert int(mask.sum()) == 12
    assert (mask.sum(1) >= 2).all()
    assert mask[0].sum() == 6  # 3 small rows keep their 2 forced each; row 0 takes the other 6
    assert mask[0, -6:].all()


def test_fan_budget_is_checked_up_front():
    m = model()
    with pytest.raises(ValueError, match=r"min_fan=4 forces up to .* raise target_fraction"):
        sp.check_fan_budget(m.weight_matrices(), sp.SparsityConfig(target_fraction=0.01, min_fan=4))


def test_l0_annealing_schedule_shape():
    total = 1000
    frac = [sp.kept_fraction(0.05, sp.anneal_progress(s, total, 0.01, 0.5)) for s in range(total + 1)]
    assert frac[0] == 1.0 and frac[10] == 1.0  # dense until 1%
    assert frac[500] == pytest.approx(0.05) and frac[1000] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(frac, frac[1:]))  # never grows back
    mid = sp.kept_fraction(0.05, sp.anneal_progress(255, total, 0.01, 0.5))
    assert mid == pytest.approx(1 + (0.05 - 1) * (255 - 10) / 490)  # linear in between


def test_sharkfin_learning_rate_shape():
    total, base = 1000, 1e-2
    lr = [sp.sharkfin_lr(s, total, base, 0.01) for s in range(total)]
    assert lr[0] == pytest.approx(base / 10) and lr[9] == pytest.approx(base)  # linear warmup over 1%
    assert lr[999] < lr[500] < lr[10] and lr[999] >= 0
    assert sp.sharkfin_lr(500, total, base, 0.01, 0.05) / sp.sharkfin_lr(500, total, base, 0.01, 0.2) \
        == pytest.approx(math.sqrt(0.2 / 0.05))  # rises as the model gets sparser


def test_sharkfin_is_the_papers_one_over_sqrt_l0():
    """1 at the dense start (base lr = dense-start lr), 1/sqrt(f) at kept fraction f, whatever the target."""
    total, base = 1000, 1e-2
    assert sp.sharkfin_lr(9, total, base, 0.01, 1.0) == pytest.approx(base)  # end of warmup, still dense
    shape = (total - 500) / (total - 10)
    assert sp.sharkfin_lr(500, total, base, 0.01, 1 / 16) == pytest.approx(base * shape * 4)
    assert sp.sharkfin_lr(500, total, base, 0.01, 1 / 64) == pytest.approx(base * shape * 8)


def _masked_adam_steps(zero_moments: bool):
    m = model()
    cfg = sp.SparsityConfig(target_fraction=0.25, min_fan=0)
    mats = m.weight_matrices()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 16))
    for step in range(1, 4):
        m(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        sp.apply_masks(mats, sp.compute_masks(mats, cfg, step, 3), opt, zero_moments=zero_moments)
    return mats, opt


def test_zero_moments_switch():
    """Off (the paper: weights only): pruned entries keep their moments; on: the moments are zeroed too."""
    assert sp.SparsityConfig().zero_moments is False
    for zero_moments in (False, True):
        mats, opt = _masked_adam_steps(zero_moments)
        w = mats["transformer.h.0.mlp.c_fc.weight"]
        assert int((w != 0).sum()) == sp.target_count(w.numel(), 0.25)  # the weights are projected either way
        state = opt.state[w]
        pruned_moments = state["exp_avg_sq"][w == 0]
        assert bool((pruned_moments == 0).all()) == zero_moments


def test_sparsity_config_rejects_bad_values():
    with pytest.raises(ValueError, match="target_fraction"):
        sp.SparsityConfig(target_fraction=0.0).validate()
    with pytest.raises(ValueError, match="anneal_start"):
        sp.SparsityConfig(anneal_start=0.6, anneal_end=0.5).validate()
