"""The intervention on a model with a planted channel: its ΔP has a known sign and size.

A SparseGPT whose blocks write nothing, so the residual at the last prompt position is the
embedding of the last token: channel C holds +2 for family 0's last token and -2 for family 1's,
and the unembedding reads only channel C for the two completions (family 0's completion up when
C > 0). Bridged to a copy of itself with identity maps, moving C toward the other family's mean
must raise P(other completion) by exactly what the model's own head computes by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bridges import BridgedPair, BridgeSection
from bridges.intervene import intervene
from sparse_lm.loading import model_fingerprint
from sparse_lm.model import SparseGPT, SparseGPTConfig
from tasks import encode_examples, resolve_task
from tasks.task import Task

C, WEAK = 3, (7, 11)  # the planted channel; two circuit channels that barely separate the families
ALPHAS = [0.0, 0.5, 1.0, 2.0]


def _gen(rng, family):
    name = rng.choice("abcdefgh") + str(rng.randint(0, 99999))
    return f"{name} = {'x' if family == 0 else 'y'}"


TASK = Task(name="planted", description="x -> ' +', y -> ' -'", completion_options=((" +", " -"),), generator=_gen)


@pytest.fixture(scope="module")
def planted(small_data):
    from sparse_lm.tokenizer import load_tokenizer

    tok = load_tokenizer(small_data / "tokenizer")
    resolved = resolve_task(TASK, tok, TASK.examples("train", 32))
    batch = encode_examples(tok, resolved.examples)
    last = batch.input_ids[torch.arange(len(batch.lengths)), batch.lengths - 1]
    lasts = [set(last[batch.family == f].tolist()) for f in (0, 1)]
    assert lasts[0].isdisjoint(lasts[1])  # the families differ in their last token
    targets = [tok.convert_tokens_to_ids(t) for t in resolved.token_strings]
    torch.manual_seed(0)
    model = SparseGPT(SparseGPTConfig(vocab_size=len(tok), block_size=64, n_layer=2, n_head=2, d_head=8, d_model=16,
                                      d_mlp=32, afrac=None, sink=False, enable_bigram_table=False,
                                      tied_unembed=False)).eval()
    with torch.no_grad():
        for block in model.transformer.h:  # blocks write nothing: the residual is the embedding throughout
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        wte.mul_(0.1 / wte.std())
        wpe.zero_()
        wte[:, C] = 0.0
        for f, sign in ((0, 2.0), (1, -2.0)):
            for t in lasts[f]:
                wte[t, C] = sign
                wte[t, WEAK[0]] += 0.05 * sign  # a weak family signal on the other circuit channels
                wte[t, WEAK[1]] += 0.02 * sign
        head = model.lm_head.weight
        head[targets] = 0.0
        head[targets[0], C], head[targets[1], C] = 1.5, -1.5
    pair = BridgedPair(model, copy.deepcopy(model), BridgeSection(afrac=None))
    pair.bridges.set_identity()
    return pair.eval(), tok, targets


def _circuit(model, **extra):
    nodes = [{"id": 1, "site": "1.mlp.resid_delta", "layer": 1, "kind": "mlp.resid_delta", "channel": C},
             {"id": 2, "site": "1.mlp.resid_delta", "layer": 1, "kind": "mlp.resid_delta", "channel": WEAK[0]},
             {"id": 3, "site": "1.attn.resid_delta", "layer": 1, "kind": "attn.resid_delta", "channel": WEAK[1]},
             {"id": 4, "site": "0.attn.act_in", "layer": 0, "kind": "attn.act_in", "channel": WEAK[1]}]
    return {"task": "planted", "nodes": nodes, "model_fingerprint": model_fingerprint(model), **extra}


@torch.no_grad()
def _expected_delta_p(pair, tok, targets, alphas) -> list[float]:
    """ΔP(other completion) by hand: the head on the last-position residual with C moved to the other family's
    mean (+2 <-> -2), averaged within each family, then over families."""
    model = pair.sparse
    resolved = resolve_task(TASK, tok, TASK.examples("test", 48))
    batch = encode_examples(tok, resolved.examples)
    with model.sites.record(["final_resid"]) as acts:
        model(input_ids=batch.input_ids)
    x = acts["final_resid"][torch.arange(len(batch.lengths)), batch.lengths - 1]  # (B, d)
    fam = batch.family
    move = torch.where(fam == 0, -4.0, 4.0)  # m_other - m_this on channel C

    def p_other(h):
        logits = model.lm_head(model.transformer.ln_f(h))[:, targets]  # (B, 2): family 0's, family 1's completion
        p = torch.softmax(logits.double(), -1)
        return p[torch.arange(len(fam)), 1 - fam]

    base = p_other(x)
    out = []
    for a in alphas:
        moved = x.clone()
        moved[:, C] += a * move
        d = p_other(moved) - base
        out.append(float(sum(d[fam == f].mean() for f in (0, 1)) / 2))
    return out


def test_the_planted_channel_moves_p_by_the_known_amount_with_the_right_sign(planted, capsys):
    pair, tok, targets = planted
    r = intervene(pair, tok, TASK, _circuit(pair.sparse), alphas=ALPHAS, n_channels=8, n_controls=6, n_examples=48)
    assert r["select_split"] == "train" and r["split"] == "test" and not r["selected_on_evaluation_data"]
    assert r["model_fingerprint"]["checked"] is True
    single, multi = r["single"], r["multi"]
    assert single["channel"]["bridge_site"] == "final_resid" and single["channel"]["channels"] == [C]
    assert single["channel"]["mean_by_family"] == [[pytest.approx(2.0), pytest.approx(-2.0)]]
    assert multi["channel"]["channels"] == [C, WEAK[0]]  # the circuit channels at the chosen site, best first
    want = _expected_delta_p(pair, tok, targets, ALPHAS)
    assert want[2] > 0.3  # the planted effect is large: the test can tell a right answer from a wrong one
    for part in ("dense", "sparse"):  # identity bridge to a copy: the dense model sees the same change
        assert single[part]["delta_p"] == pytest.approx(want, abs=1e-4), part
    assert single["sign_ok"] and multi["sign_ok"] and all(single["sign_ok_by_alpha"])
    assert single["effect_alpha"] == 1.0 and single["effect_sd"] > 3
    ctrl = single["control"]
    assert len(ctrl["per_draw"]) == 6 and ctrl["delta_p"][0] == 0.0 and ctrl["std"][2] > 0
    assert single["effect_sd"] == pytest.approx((want[2] - ctrl["delta_p"][2]) / ctrl["std"][2], rel=1e-3)
    assert r["dense"] is not None and r["channel"] == multi["channel"]  # the top level repeats multi
    assert "circuit_failed" in r and r["select_examples"] == 48


def test_a_circuit_of_another_model_is_refused_and_an_old_one_warned_about(planted, capsys):
    pair, tok, _ = planted
    other = copy.deepcopy(pair.sparse)
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1.0
    assert model_fingerprint(other) != model_fingerprint(pair.sparse)
    with pytest.raises(ValueError, match="pruned from another model"):
        intervene(pair, tok, TASK, _circuit(other), alphas=[0.0, 1.0], n_controls=2, n_examples=16)
    old = _circuit(pair.sparse)
    del old["model_fingerprint"]
    r = intervene(pair, tok, TASK, old, alphas=[0.0, 1.0], n_controls=2, n_examples=16, select_split="test")
    assert "no model_fingerprint" in capsys.readouterr().err
    assert r["model_fingerprint"]["checked"] is False and r["selected_on_evaluation_data"]


def test_the_channel_is_chosen_by_what_it_does_to_the_sparse_model_not_by_how_far_its_family_means_lie(planted):
    """A decoy circuit channel separates the families 2.5x more than the planted one but is read by nothing:
    selection by the sparse model's own ΔP (the default) must still move the planted channel; selection by raw
    separation picks the decoy, whose move changes neither model's answer."""
    pair, tok, _ = planted
    decoy = copy.deepcopy(pair)
    with torch.no_grad():
        for model in (decoy.sparse, decoy.dense):
            wte = model.transformer.wte.weight
            signal = wte[:, C].sign() * 5.0  # +-5 where C holds +-2: the same families, 2.5x the separation
            wte[:, WEAK[0]] = torch.where(wte[:, C] != 0, signal, wte[:, WEAK[0]])
    circuit = _circuit(decoy.sparse)
    kw = dict(alphas=[0.0, 1.0], n_channels=1, n_controls=2, n_examples=48)
    by_effect = intervene(decoy, tok, TASK, circuit, **kw)
    assert by_effect["select_by"] == "effect" and by_effect["single"]["channel"]["channels"] == [C]
    assert by_effect["single"]["sparse"]["delta_p"][1] > 0.3 and by_effect["single"]["sign_ok"]
    by_separation = intervene(decoy, tok, TASK, circuit, select_by="separation", **kw)
    assert by_separation["single"]["channel"]["channels"] == [WEAK[0]]
    assert abs(by_separation["single"]["sparse"]["delta_p"][1]) < 0.05
    effects = {c["channel"]: c["sparse_effect"] for c in by_effect["candidates"] if c["bridge_site"] == "final_resid"}
    assert effects[C] > 0.3 > abs(effects[WEAK[0]])
    assert by_effect["candidates_scored"] == by_effect["candidates_total"] > 2  # under the default cap: all scored
    # capped to the single most separated channel, only the decoy is scored, and chosen: what the cap risks
    capped = intervene(decoy, tok, TASK, circuit, max_scored=1, **kw)
    assert (capped["candidates_scored"], capped["candidates_total"]) == (1, by_effect["candidates_total"])
    assert capped["single"]["channel"]["channels"] == [WEAK[0]]


def test_selection_by_the_dense_effect_moves_the_channel_the_bridge_carries(planted):
    """The dense model reads another channel than the sparse one: its head reads WEAK[0] (which carries the
    same family signal as C in both models), not C. Selection by the sparse model's own ΔP moves C, which
    changes nothing in the dense model; selection by the dense ΔP on the train prompts (through the decoder)
    moves WEAK[0] and the dense answer follows, measured on test."""
    pair, tok, targets = planted
    other = copy.deepcopy(pair)
    with torch.no_grad():
        for model in (other.sparse, other.dense):
            wte = model.transformer.wte.weight
            wte[:, WEAK[0]] = torch.where(wte[:, C] != 0, wte[:, C], wte[:, WEAK[0]])  # +-2: the same families
        head = other.dense.lm_head.weight
        head[targets[0], C], head[targets[1], C] = 0.0, 0.0
        head[targets[0], WEAK[0]], head[targets[1], WEAK[0]] = 1.5, -1.5
    circuit = _circuit(other.sparse)
    kw = dict(alphas=[0.0, 1.0], n_channels=1, n_controls=4, n_examples=48)
    by_sparse = intervene(other, tok, TASK, circuit, dense_single=True, **kw)
    assert by_sparse["single"]["channel"]["channels"] == [C]
    assert by_sparse["single"]["sparse"]["delta_p"][1] > 0.3 and abs(by_sparse["single"]["dense"]["delta_p"][1]) < 1e-6
    # reported beside it (the main job's way): the channel the bridge carries
    assert by_sparse["single_dense"]["channel"]["channels"] == [WEAK[0]]
    assert by_sparse["single_dense"]["dense"]["delta_p"][1] > 0.3
    by_dense = intervene(other, tok, TASK, circuit, select_by="dense", **kw)
    single = by_dense["single"]
    assert by_dense["select_by"] == "dense" and single["channel"]["channels"] == [WEAK[0]]
    assert single["dense"]["delta_p"][1] > 0.3 and single["sign_ok"] and single["effect_sd"] > 3
    effects = {c["channel"]: c["dense_effect"] for c in by_dense["candidates"] if c["bridge_site"] == "final_resid"}
    assert effects[WEAK[0]] > 0.3 > abs(effects[C])
