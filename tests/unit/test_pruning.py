"""Pruning: masks, means, bisection, calibration, edges, a planted circuit, attribution, the CLI.

The planted model is a one-layer SparseGPT with hand-set weights: an attention
head moves a cue token's sign (A: +, B: -) from position 0 to the last
position, two MLP neurons turn it into the logit difference of the two answer
tokens, and every other channel carries noise. The pruner must recover (a
subset of) the ten planted nodes.
"""

from __future__ import annotations

import copy

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from pruning.circuit import Circuit
from pruning.config import PruneConfig, parse_target
from pruning.graph import NodeIndex, circuit_edges
from pruning.means import compute_means, load_or_compute_means
from pruning.forward import TaskData, evaluate, fast_head_ok, load_task_data, loss_and_accuracy, orientation
from pruning.pruner import Ablation, bisect_count, fit_calibration, heaviside_ste, prune, surrogate_grad
from sparse_lm.adapters import sites_of
from sparse_lm.model import SparseGPT, SparseGPTConfig
from tasks.loss import TaskBatch

torch.set_num_threads(1)

CUE_A, CUE_B, ANS_A, ANS_B = 1, 2, 3, 4
VOCAB, D, D_MLP = 16, 16, 16
PLANTED = {
    ("0.attn.act_in", 0),  # the cue's sign
    ("0.attn.act_in", 2),  # "I am position 0", read by the key
    ("0.attn.q", 0),  # constant query (bias)
    ("0.attn.k", 0),
    ("0.attn.v", 0),
    ("0.attn.resid_delta", 3),
    ("0.mlp.act_in", 3),
    ("0.mlp.post_act", 0),
    ("0.mlp.post_act", 1),
    ("0.mlp.resid_delta", 1),
}


def planted_model(seed: int = 0) -> SparseGPT:
    cfg = SparseGPTConfig(vocab_size=VOCAB, block_size=32, n_layer=1, n_head=2, d_head=4, d_model=D, d_mlp=D_MLP,
                          afrac=None, sink=False, enable_bigram_table=False)
    model = SparseGPT(cfg)
    g = torch.Generator().manual_seed(seed)
    noise = lambda *shape, std=1.0: torch.randn(*shape, generator=g) * std  # noqa: E731
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.transformer.h[0].ln_1, model.transformer.h[0].ln_2, model.transformer.ln_f):
            norm.weight.fill_(1.0)
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        wte[:, 4:] = noise(VOCAB, D - 4)  # distractor content in channels 4..15
        wte[5:, 0] = noise(VOCAB - 5, std=0.5)  # filler tokens blur channel 0 ...
        wte[CUE_A, 0], wte[CUE_B, 0] = 2.0, -2.0  # ... the cue writes its sign there
        wpe[0, 2] = 3.0  # position 0 marker
        attn = model.transformer.h[0].attn
        w, bias = attn.c_attn.weight, attn.c_attn.bias  # (3 * 8, 16): q rows 0..7, k 8..15, v 16..23
        bias[0] = 4.0  # q channel 0: a constant query
        w[8 + 0, 2] = 4.0  # k channel 0 reads the position-0 marker
        w[16 + 0, 0] = 1.0  # v channel 0 reads the cue
        w[4:8, 4:] = noise(4, D - 4, std=0.3)  # head 1: noise queries, keys and values
        w[12:16, 4:] = noise(4, D - 4, std=0.3)
        w[20:24, 4:] = noise(4, D - 4, std=0.5)
        attn.c_proj.weight[3, 0] = 3.0  # head 0's value -> residual channel 3
        attn.c_proj.weight[4:, 4:8] = noise(D - 4, 4, std=0.5)  # head 1 -> noise channels
        mlp = model.transformer.h[0].mlp
        mlp.c_fc.weight[0, 3], mlp.c_fc.weight[1, 3] = 3.0, -3.0  # two neurons read channel 3 with both signs
        mlp.c_fc.weight[2:, 4:] = noise(D_MLP - 2, D - 4, std=0.5)  # distractor neurons
        mlp.c_proj.weight[1, 0], mlp.c_proj.weight[1, 1] = 3.0, -3.0  # -> residual channel 1
        mlp.c_proj.weight[4:, 2:] = noise(D - 4, D_MLP - 2, std=0.3)
        lm = model.lm_head.weight
        lm[ANS_A, 1], lm[ANS_B, 1] = 0.6, -0.6
        lm[:, 4:] = noise(VOCAB, D - 4, std=0.15)  # the noise channels reach every logit a little
    return model.eval()


def planted_batch(n: int, seed: int) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    length = torch.randint(4, 11, (n,), generator=g)
    ids = torch.zeros(n, 10, dtype=torch.long)
    family = torch.arange(n) % 2
    for i in range(n):
        ids[i, : length[i]] = torch.randint(5, VOCAB, (int(length[i]),), generator=g)
        ids[i, 0] = CUE_A if family[i] == 0 else CUE_B
    target = torch.where(family == 0, ANS_A, ANS_B)
    return TaskBatch(input_ids=ids, lengths=length, target_ids=target, distractor_ids=ANS_A + ANS_B - target,
                     family=family)


def planted_data() -> TaskData:
    return TaskData("planted", planted_batch(256, 1), planted_batch(128, 2), planted_batch(128, 3), ("A", "B"),
                    ("A", "B"), (ANS_A, ANS_B))


def corpus(n: int = 32, length: int = 12, seed: int = 4) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def planted_cfg(**kw) -> PruneConfig:
    base = dict(task="planted", steps=150, batch_size=64, lr=0.05, k_coef=3e-3, n_train=256, n_val=128, n_test=128,
                mean_blocks=32, snippets=0, device="cpu", calibrate_steps=10)
    base.update(kw)
    return PruneConfig(**base)


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    index = NodeIndex.build(model, PruneConfig().node_sites)
    values = compute_means(model, index.names, corpus())
    means = load_or_compute_means(model, index.names, blocks=corpus(), n_blocks=32)
    return model, index, means, values


# ---------------------------------------------------------------------------- the mask


def test_surrogate_gradient_matches_its_formula():
    tau = torch.tensor([-1.0, -0.3, 0.0, 0.2, 1.0], requires_grad=True)
    for temp in (0.5, 1.0, 2.0):
        m = heaviside_ste(tau, temp)
        assert m.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
        (g,) = torch.autograd.grad((m * torch.arange(5.0)).sum(), tau)
        s = torch.sigmoid(tau.detach() / temp)
        assert torch.allclose(g, torch.arange(5.0) * s * (1 - s) / temp)
        assert torch.allclose(surrogate_grad(tau.detach(), temp), s * (1 - s) / temp)


def test_all_open_mask_reproduces_the_model_exactly(planted):
    model, index, means, _ = planted
    data = planted_data()
    plain, _ = evaluate(model, data.test)
    ablation = Ablation(model, index, index.join(means.values))
    with ablation.installed(torch.ones(index.total), all_sites=True):
        masked, _ = evaluate(model, data.test)
    assert torch.equal(plain, masked)
    assert fast_head_ok(model, data.test)  # the last-position shortcut gives the full forward pass's logits
    # and an all-closed mask really changes it
    with ablation.installed(torch.zeros(index.total)):
        closed, _ = evaluate(model, data.test)
    assert not torch.allclose(plain, closed)


# ---------------------------------------------------------------------------- means


def test_means_are_the_means_and_the_cache_is_reused(tmp_path, planted):
    model, index, _, _ = planted
    blocks = corpus(8, 12, seed=9)
    names = ["0.attn.q", "0.mlp.post_act"]
    m1 = load_or_compute_means(model, names, blocks=blocks, n_blocks=8, cache_dir=tmp_path)
    assert not m1.from_cache and m1.path and Path(m1.path).parent == tmp_path
    with model.sites.record(names) as acts, torch.no_grad():
        model(input_ids=blocks)
    for n in names:
        direct = acts[n].reshape(-1, acts[n].shape[-1]).mean(dim=0)
        assert torch.allclose(m1.values[n], direct, atol=1e-6)
    m2 = load_or_compute_means(model, names, blocks=blocks, n_blocks=8, cache_dir=tmp_path)
    assert m2.from_cache and m2.path == m1.path
    assert all(torch.equal(m1.values[n], m2.values[n]) for n in names) and torch.equal(m2.blocks, blocks)
    # other weights -> another key, recomputed
    other = planted_model(seed=1)
    m3 = load_or_compute_means(other, names, blocks=blocks, n_blocks=8, cache_dir=tmp_path)
    assert not m3.from_cache and m3.key != m1.key


# ---------------------------------------------------------------------------- search pieces


def test_bisection_finds_the_smallest_count_on_a_monotone_loss():
    calls = []

    def loss(c: int) -> float:
        calls.append(c)
        return 1.0 / (1 + c)  # <= 0.1 from c = 9 on

    count, trail = bisect_count(loss, 1000, 0.1)
    assert count == 9
    assert dict((int(c), v) for c, v in trail)[9] <= 0.1 and dict((int(c), v) for c, v in trail)[8] > 0.1
    assert len(calls) <= 14
    for hint in (1, 5, 8, 9, 10, 40, 999):
        calls.clear()
        assert bisect_count(loss, 1000, 0.1, hint=hint)[0] == 9
        assert len(calls) <= 14
    assert bisect_count(loss, 1000, 0.0001)[0] is None
    assert bisect_count(loss, 1000, 2.0)[0] == 0


def test_bisection_gives_up_only_past_its_bound():
    """With give_up_above, a count past it that misses ends the search (None); an answer at or under it is
    still found exactly, and so is one past it whose search never evaluated a miss past the bound."""
    calls = []

    def loss(c: int) -> float:
        calls.append(c)
        return 1.0 / (1 + c)  # <= 0.1 from c = 9 on

    count, trail = bisect_count(loss, 1000, 0.1, hint=2, give_up_above=6)  # gallop 2, 4, 8: 8 misses past 6
    assert count is None and len(calls) <= 5
    assert any(c > 6 and v > 0.1 for c, v in trail) and all(c <= 8 for c, v in trail if c != 1000)
    for bound in (9, 10, 40):
        assert bisect_count(loss, 1000, 0.1, hint=2, give_up_above=bound)[0] == 9
    assert bisect_count(loss, 1000, 0.1, hint=20, give_up_above=90)[0] == 9  # galloping down: misses under 90


def test_calibration_fits_scale_and_shift_of_the_logit_difference():
    g = torch.Generator().manual_seed(0)
    family = torch.arange(400) % 2
    s = orientation(family)
    # true difference: +2 for family 0, -2 for family 1, seen shrunk by 1/4 and shifted by +0.3
    diff = (2 * s + 0.3 * torch.randn(400, generator=g)) / 4 + 0.3
    a, b = fit_calibration(diff, family, steps=50)
    before = loss_and_accuracy(s * diff, family)["loss"]
    after = loss_and_accuracy(s * (a * diff + b), family)["loss"]
    assert a > 2 and after < before
    assert b == pytest.approx(-0.3 * a, abs=0.15 * a)
    assert fit_calibration(diff, family, steps=0) == (1.0, 0.0)


def test_calibration_stays_finite_and_positive_on_separable_margins():
    family = torch.arange(200) % 2
    s = orientation(family)
    # every prompt right by a wide margin: the unpenalised optimum is an infinite scale
    a, b = fit_calibration(3.0 * s, family, steps=100)
    assert 1.0 < a < 1e3 and abs(b) < 1e3
    # a circuit that answers every prompt wrongly is not flipped by a negative scale
    a, _ = fit_calibration(-3.0 * s, family, steps=100)
    assert a > 0


def test_parse_target():
    assert parse_target("0.15") == (0.15, None)
    assert parse_target("relative:+0.05") == (None, 0.05)
    with pytest.raises(ValueError):
        parse_target("relative:x")


# ---------------------------------------------------------------------------- edges


def test_edges_on_a_hand_built_model():
    cfg = SparseGPTConfig(vocab_size=8, block_size=8, n_layer=2, n_head=2, d_head=2, d_model=4, d_mlp=4, afrac=None,
                          sink=False, enable_bigram_table=False)
    model = SparseGPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                p.zero_()
        h0, h1 = model.transformer.h[0], model.transformer.h[1]
        h0.attn.c_attn.weight[0, 1] = 1.0  # act_in 1 -> q 0
        h0.attn.c_attn.weight[4 + 0, 2] = 2.0  # act_in 2 -> k 0
        h0.attn.c_attn.weight[4 + 1, 2] = 2.0  # act_in 2 -> k 1 (k 1 closed)
        h0.attn.c_attn.weight[8 + 3, 1] = 3.0  # act_in 1 -> v 3
        h0.attn.c_proj.weight[2, 3] = 4.0  # v 3 -> resid_delta 2
        h0.mlp.c_fc.weight[1, 0] = 5.0  # mlp.act_in 0 -> post_act 1
        h0.mlp.c_proj.weight[3, 1] = 6.0  # post_act 1 -> mlp.resid_delta 3
        h0.mlp.c_proj.weight[0, 1] = 6.0  # post_act 1 -> mlp.resid_delta 0 (closed)
        h1.mlp.c_fc.weight[2, 3] = 7.0  # 1.mlp.act_in 3 -> 1.post_act 2
        h1.ln_2.weight[2] = 0.0  # a zero gain: no residual edge into 1.mlp.act_in 2
    index = NodeIndex.build(model, PruneConfig().node_sites)
    open_nodes = [("0.attn.act_in", 1), ("0.attn.act_in", 2), ("0.attn.q", 0), ("0.attn.k", 0), ("0.attn.v", 3),
                  ("0.attn.resid_delta", 2), ("0.mlp.act_in", 0), ("0.mlp.act_in", 2), ("0.mlp.post_act", 1),
                  ("0.mlp.resid_delta", 3), ("1.attn.act_in", 3), ("1.mlp.act_in", 3), ("1.mlp.act_in", 2),
                  ("1.mlp.post_act", 2)]
    mask = torch.zeros(index.total, dtype=torch.bool)
    for site, ch in open_nodes:
        mask[index.id_of(site, ch)] = True
    got = {(index.node(e.src)[0].name, index.node(e.src)[1], index.node(e.dst)[0].name, index.node(e.dst)[1])
           for e in circuit_edges(model, index, mask)}
    expected = {
        ("0.attn.act_in", 1, "0.attn.q", 0), ("0.attn.act_in", 2, "0.attn.k", 0), ("0.attn.act_in", 1, "0.attn.v", 3),
        ("0.attn.q", 0, "0.attn.k", 0),  # same head dimension, both open
        ("0.attn.v", 3, "0.attn.resid_delta", 2), ("0.mlp.act_in", 0, "0.mlp.post_act", 1),
        ("0.mlp.post_act", 1, "0.mlp.resid_delta", 3),
        ("0.attn.resid_delta", 2, "0.mlp.act_in", 2),  # residual, same layer, later read
        ("0.mlp.resid_delta", 3, "1.attn.act_in", 3), ("0.mlp.resid_delta", 3, "1.mlp.act_in", 3),
        ("1.mlp.act_in", 3, "1.mlp.post_act", 2),
    }
    assert got == expected


def test_gpt2_weight_map_transposes_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel

    from sparse_lm.arch import layer_weights

    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
                                       eos_token_id=0)).eval()
    w = layer_weights(model, 0)
    c_attn = model.transformer.h[0].attn.c_attn.weight  # Conv1D (in, out)
    assert torch.equal(w.q, c_attn[:, :8].t()) and torch.equal(w.v, c_attn[:, 16:].t())
    assert w.fc.shape == (32, 8) and w.proj.shape == (8, 32)
    index = NodeIndex.build(model, PruneConfig().node_sites)
    x = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        plain = model(input_ids=x).logits
        means = {s.name: torch.zeros(s.width) for s in index}
        with Ablation(model, index, index.join(means)).installed(torch.ones(index.total), all_sites=True):
            same = model(input_ids=x).logits
    assert torch.equal(plain, same)


# ---------------------------------------------------------------------------- whole searches


def test_planted_circuit_is_recovered(planted):
    model, index, means, _ = planted
    data = planted_data()
    full = loss_and_accuracy(evaluate(model, data.test)[0], data.test.family)
    assert full["loss"] < 0.05  # the planted model solves its task
    circuit = prune(model, None, planted_cfg(), means=means, data=data, progress=False)
    assert not circuit.failed, circuit.reason
    found = {(n.site, n.channel) for n in circuit.nodes}
    assert 1 <= circuit.num_nodes <= len(PLANTED) and found <= PLANTED, found - PLANTED
    assert circuit.metrics["circuit"]["loss"] <= 0.15 and circuit.verification["keeps_target"]
    assert circuit.verification["destroys_task"]
    assert circuit.metrics["all_ablated"]["loss"] >= math.log(2) - 1e-6
    assert circuit.metrics["circuit_calibrated"]["loss"] <= circuit.metrics["circuit"]["loss"] + 1e-6
    # raw and calibrated on both splits; the bisection's target is met by the raw validation loss
    assert circuit.metrics["circuit_val"]["loss"] <= circuit.target_loss and circuit.verification["keeps_target_val"]
    assert {"circuit_calibrated_val", "full_model_val"} <= set(circuit.metrics)
    from sparse_lm.loading import model_fingerprint
    assert circuit.model_fingerprint == model_fingerprint(model) and len(circuit.model_fingerprint) == 16
    faith = circuit.faithfulness
    assert faith["split"] == "test" and set(faith["by_order"]) == {"learned", "attribution"}
    for entry in faith["by_order"].values():
        nodes = [p[0] for p in entry["curve"]]
        assert nodes[0] == 0 and nodes[-1] == circuit.total_nodes and circuit.num_nodes in nodes
        assert entry["curve"][0][2] == pytest.approx(0.0) and entry["curve"][-1][2] == pytest.approx(1.0)
        assert 0 < entry["cpr"] <= 1.2 and entry["cmd"] >= 0
    # the learned order keeps the task with its first few nodes: faithful at the circuit's own size
    at_count = {p[0]: p[2] for p in faith["curve"]}[circuit.num_nodes]
    assert at_count > 0.5
    ids = {n.id for n in circuit.nodes}
    assert circuit.edges_complete and circuit.num_edges == sum(e.type != "resid_delta->act_in" and e.type != "attn.q<->attn.k"
                                                               for e in circuit.edges) >= 4
    assert all(e.src in ids and e.dst in ids for e in circuit.edges)
    assert [c for c, _ in circuit.search["bisection"]][-1] is not None
    assert circuit.objective("nodes") == (float(circuit.num_nodes), False)
    # the JSON round trip
    again = Circuit.from_json(json.loads(circuit.dumps()))
    assert again.to_json() == circuit.to_json()
    assert all(len(n.mean_by_family) == 2 for n in circuit.nodes)


def test_collapsed_masks_are_trained_again_with_a_weaker_k_coef_and_a_new_seed(planted):
    model, _, means, _ = planted
    # k_coef 0.1: closing any node pays more than the whole task loss, so every mask closes and stays closed
    cfg = planted_cfg(k_coef=0.1, collapse_retries=2)
    circuit = prune(model, None, cfg, means=means, data=planted_data(), progress=False)
    assert not circuit.failed, circuit.reason
    falls = circuit.search["collapses"]
    assert [f["k_coef"] for f in falls] == pytest.approx([0.1, 0.1 / 3]) and [f["seed"] for f in falls] == [0, 1]
    # detected a fifth of the way in, near chance (ln 2), and the last attempt ran to the end unchecked
    assert all(f["step"] == 30 and f["loss"] > 0.5 for f in falls)
    assert circuit.search["k_coef"] == pytest.approx(0.1 / 9) and circuit.search["seed"] == 2
    assert len(circuit.search["train_curve"]) > 0 and circuit.search["train_curve"][-1][0] == cfg.steps - 1
    # without retries the collapse is kept (a sweep must see it)
    once = prune(model, None, planted_cfg(k_coef=0.1, collapse_retries=0), means=means, data=planted_data(),
                 progress=False)
    assert "collapses" not in once.search and once.search["k_coef"] == 0.1
    # a sweep's run ends at the collapse, as failed, with the step and the loss that showed it
    stopped = prune(model, None, planted_cfg(k_coef=0.1, collapse_retries=0), means=means, data=planted_data(),
                    progress=False, fail_on_collapse=True)
    assert stopped.failed and "masks collapsed" in stopped.reason and "k_coef 0.1" in stopped.reason
    assert [(f["step"], f["k_coef"]) for f in stopped.search["collapses"]] == [(30, 0.1)]
    assert "bisection" not in stopped.search and "optimise" in stopped.search["seconds"]
    # a run that does not collapse is not retried
    fine = prune(model, None, planted_cfg(), means=means, data=planted_data(), progress=False)
    assert "collapses" not in fine.search and fine.search["seed"] == 0
    # ... and with fail_on_collapse it runs as without it
    kept = prune(model, None, planted_cfg(collapse_retries=0), means=means, data=planted_data(), progress=False,
                 fail_on_collapse=True)
    assert not kept.failed and [n.id for n in kept.nodes] == [n.id for n in fine.nodes]


def test_masks_that_settle_above_the_target_are_trained_again_weaker(planted, monkeypatch):
    """k_coef 0.006 closes the planted model's masks down to 14 nodes whose loss hovers above the target; the
    order past them is a guess, and the bisection walks it to 88 of 104 nodes. The collapse detector (which on
    this toy model would fire first) is turned off, so only the later check can catch it."""
    from pruning import pruner

    model, _, means, _ = planted
    monkeypatch.setattr(pruner, "COLLAPSE_MIN_GAP", 10.0)  # no model is that far from chance: no collapse check
    once = prune(model, None, planted_cfg(k_coef=0.006, collapse_retries=0), means=means, data=planted_data(),
                 progress=False)
    assert once.num_nodes > 2 * once.search["open_at_end"] + 10 and "warning" in once.search
    assert "settled_above" not in once.search  # no retries: a sweep's CARBS sees what its k_coef did
    again = prune(model, None, planted_cfg(k_coef=0.006, collapse_retries=2), means=means, data=planted_data(),
                  progress=False)
    tries = again.search["settled_above"]
    assert tries[0] == {"k_coef": 0.006, "seed": 0, "open_at_end": once.search["open_at_end"],
                        "nodes": once.num_nodes}
    assert tries[1]["k_coef"] == pytest.approx(0.002) and tries[1]["seed"] == 1
    # the retry is kept: a circuit inside the planted one, meeting the target, without the warning
    assert again.num_nodes == min(t["nodes"] for t in tries) <= len(PLANTED)
    assert {(n.site, n.channel) for n in again.nodes} <= PLANTED
    assert again.search["k_coef"] == pytest.approx(0.002) and "warning" not in again.search
    assert again.verification["keeps_target_val"] and again.hyperparameters["k_coef"] == 0.006
    # a sweep's run stops instead, once a count past k x open + 10 misses: fewer passes, and failed (k = 4 here:
    # the planted model has only 104 nodes, under the default 8 x 14 + 10)
    monkeypatch.setattr(pruner, "SETTLED_ABOVE_STOP", 4)
    stopped = prune(model, None, planted_cfg(k_coef=0.006, collapse_retries=0), means=means, data=planted_data(),
                    progress=False, stop_settled_above=True)
    info, hint = stopped.search["stopped_settled_above"], once.search["open_at_end"]
    assert stopped.failed and "settled far above" in stopped.reason and info["open_at_end"] == hint
    assert info["give_up_above"] == 4 * hint + 10 < info["missed_at"] < once.num_nodes
    assert len(stopped.search["bisection"]) < len(once.search["bisection"])
    assert stopped.search["bisection"] == once.search["bisection"][:len(stopped.search["bisection"])]


def test_attribution_runs_and_gives_a_circuit(planted):
    model, _, means, _ = planted
    circuit = prune(model, None, planted_cfg(method="attribution"), means=means, data=planted_data(), progress=False)
    assert not circuit.failed, circuit.reason
    assert circuit.method == "attribution" and circuit.num_nodes >= 1
    assert circuit.verification["keeps_target"] and all(n.tau is None for n in circuit.nodes)
    # the planted nodes score above the noise
    top = {(n.site, n.channel) for n in sorted(circuit.nodes, key=lambda n: -n.score)[:3]}
    assert top <= PLANTED


def test_faithfulness_points_are_measured_once_per_process(planted, monkeypatch):
    """The learned circuit's attribution curve is the attribution circuit's own: pruned next in the same
    process (as the main job does), the attribution circuit reuses those points, with the values a fresh
    process measures."""
    from pruning import pruner

    model, _, means, _ = planted
    monkeypatch.setattr(pruner, "_CURVE_MEMO", {})
    learned = prune(model, None, planted_cfg(), means=means, data=planted_data(), progress=False)
    attribution = prune(model, None, planted_cfg(method="attribution"), means=means, data=planted_data(),
                        progress=False)
    shared = {n for n, *_ in learned.faithfulness["by_order"]["attribution"]["curve"]} - {learned.num_nodes}
    own_points = {n for n, *_ in attribution.faithfulness["curve"]}
    assert shared <= own_points and len(shared) >= 8
    assert attribution.faithfulness["reused_points"] >= len(shared)  # every shared point, maybe its own size too
    first = {n: (loss, f) for n, loss, f in learned.faithfulness["by_order"]["attribution"]["curve"]}
    assert all(first[n] == (loss, f) for n, loss, f in attribution.faithfulness["curve"] if n in shared)
    monkeypatch.setattr(pruner, "_CURVE_MEMO", {})  # a fresh process: every point measured again, the same values
    fresh = prune(model, None, planted_cfg(method="attribution"), means=means, data=planted_data(), progress=False)
    assert fresh.faithfulness["reused_points"] == 0
    flat = lambda c: [x for point in c.faithfulness["curve"] for x in point]  # noqa: E731
    assert flat(fresh) == pytest.approx(flat(attribution), rel=1e-6, abs=1e-7)
    # another model (other weights) shares nothing
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(p for p in other.parameters() if p.dim() == 2).mul_(1.5)
    again = prune(other, None, planted_cfg(method="attribution", min_accuracy=0), means=means, data=planted_data(),
                  progress=False)
    assert again.faithfulness is None or again.faithfulness["reused_points"] == 0


def test_model_that_misses_the_target_fails_with_the_numbers(planted):
    model, _, means, _ = planted
    circuit = prune(model, None, planted_cfg(target_loss=1e-6, steps=5), means=means, data=planted_data(),
                    progress=False)
    assert circuit.failed and circuit.num_nodes == 0
    assert "misses the target" in circuit.reason and "relative:+0.05" in circuit.reason
    # the decision reads the validation split, so the reason quotes the validation loss
    assert f"{circuit.metrics['full_model_val']['loss']:.4f} nats on the validation split" in circuit.reason
    own = circuit.metrics["full_model_val"]["loss"]
    assert circuit.objective() == (math.inf, True)
    # a relative target is reachable
    rel = prune(model, None, planted_cfg(relative_margin=0.05, steps=60), means=means, data=planted_data(),
                progress=False)
    assert not rel.failed and rel.target_loss == pytest.approx(own + 0.05)


# ---------------------------------------------------------------------------- the command


def _cli_args(model_dir: Path, out: Path, *extra: str):
    import argparse

    from sparse_lm_app.commands.prune import add_prune_arguments

    p = argparse.ArgumentParser()
    add_prune_arguments(p)
    return p.parse_args(["--model", str(model_dir), "--task", "single_double_quote", "--out", str(out),
                         "--no-progress", *extra])


def test_cli_writes_the_circuit_of_a_real_model_folder(tmp_path, small_data):
    from sparse_lm.tokenizer import load_tokenizer

    from sparse_lm_app.commands.prune import run_prune
    from pruning.pruner import PruneError

    tok = load_tokenizer(small_data / "tokenizer")
    torch.manual_seed(0)
    model = SparseGPT(SparseGPTConfig(vocab_size=len(tok), block_size=256, n_layer=1, n_head=2, d_head=8, d_model=16,
                                      d_mlp=32, afrac=None, sink=True, enable_bigram_table=False))
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    (run / "config.json").write_text(json.dumps({"job": "pretrain", "data": {"data_dir": str(small_data)}}))
    small = ["steps=20", "n_train=64", "n_val=32", "n_test=32", "mean_blocks=8", "snippets=2", "device=cpu",
             "faithfulness_points=3"]

    # a random model does not solve the task: a clear error naming its validation accuracy (issue 16);
    # 128 validation prompts, so chance stays under the 0.6 bar (32 can reach 0.61 by luck)
    with pytest.raises(PruneError, match=r"does not solve this task: accuracy 0\.\d+ on validation"):
        run_prune(_cli_args(run / "model", tmp_path / "chance", "--target-loss", "relative:+0.05", *small, "n_val=128"))
    assert not (tmp_path / "chance" / "circuit.json").exists()
    small.append("min_accuracy=0")  # below: the pipeline itself, on this untrained model

    # a random model misses an absolute target: a clear error, nothing written
    with pytest.raises(PruneError, match=r"misses the target.*relative:\+0\.05"):
        run_prune(_cli_args(run / "model", tmp_path / "fail", "--target-loss", "0.15", *small))
    assert not (tmp_path / "fail" / "circuit.json").exists()

    out = tmp_path / "out"
    # a run folder resolves to its model/ (the means then come from the run's data)
    assert run_prune(_cli_args(run, out, "--target-loss", "relative:+0.05", *small)) == 0
    circuit = Circuit.from_json(out / "circuit.json")
    config = json.loads((out / "config.json").read_text())
    assert config["job"] == "prune" and config["relative_margin"] == 0.05 and config["model"] == str(run / "model")
    assert config["steps"] == 20 and circuit.hyperparameters["steps"] == 20
    own = circuit.metrics["full_model_val"]["loss"]  # a relative target is measured on validation only
    assert circuit.target_loss == pytest.approx(own + 0.05)
    assert circuit.verification["keeps_target_val"] and circuit.completions == ["'", '"']
    assert circuit.search["means_source"].startswith("run data")
    assert any((run / "model" / ".sparse_lm_cache").glob("means-*.safetensors"))
    if importlib.util.find_spec("pruning.html") is not None:
        assert "<svg" in (out / "circuit.html").read_text() or (out / "circuit.html").stat().st_size > 1000
    for node in circuit.nodes:
        assert len(node.snippets) <= 2
        for s in node.snippets:
            start, end = s["highlight"]
            assert s["text"][start:end] == s["token"]


@pytest.mark.slow  # kept out of make test-fast (under 3 min); the full suite runs it
def test_dense_gpt2_prunes_through_the_site_adapter(small_data):
    from transformers import GPT2Config, GPT2LMHeadModel

    from sparse_lm.tokenizer import load_tokenizer

    tok = load_tokenizer(small_data / "tokenizer")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=16, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    index = NodeIndex.build(model, PruneConfig().node_sites)
    means = load_or_compute_means(model, index.names, tokenizer=tok, n_blocks=4)  # stdlib text: no run data here
    assert means.source == "stdlib" and means.path is None  # no model folder: nothing cached
    for method in ("learned", "attribution"):
        # an untrained model: min_accuracy 0 prunes it anyway (the pipeline is what is tested here)
        cfg = PruneConfig(method=method, relative_margin=0.02, steps=10, n_train=64, n_val=32, n_test=32,
                          mean_blocks=4, snippets=1, device="cpu", min_accuracy=0.0, faithfulness_points=3)
        circuit = prune(model, tok, cfg, means=means, progress=False)
        assert not circuit.failed, circuit.reason
        assert circuit.model_type == "gpt2" and circuit.total_nodes == 2 * (16 * 7 + 64)
        assert circuit.verification["keeps_target_val"]
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored
    assert fast_head_ok(model.eval(), load_task_data(tok, PruneConfig(n_train=8, n_val=8, n_test=8)).val)
    assert sites_of(model).active_torch_hooks() == 0


@pytest.mark.slow  # ~10 s each; the site adapter of every architecture is unit-tested (test_adapters, test_arch)
@pytest.mark.parametrize("model_type", ["gpt_neo", "gpt_neox", "gptj", "phi", "gemma2", "phi3"])
def test_other_dense_architectures_prune_through_the_site_adapter(small_data, model_type):
    """GPT-Neo (GPT-2's layout with Linear q/k/v), GPT-NeoX (per-head interleaved qkv, parallel blocks), GPT-J
    and Phi (parallel blocks with one norm), Gemma 2 (norms on the attention and MLP outputs) and Phi-3
    (fused qkv with grouped-query widths, fused gate/up): masks, bisection, edges and the fast head."""
    from tiny_models import LAYERS, tiny_model

    from sparse_lm.tokenizer import load_tokenizer

    tok = load_tokenizer(small_data / "tokenizer")
    model = tiny_model(model_type, vocab=len(tok), context=1024)
    cfg = PruneConfig(relative_margin=0.02, steps=10, n_train=64, n_val=32, n_test=32, mean_blocks=4, snippets=1,
                      device="cpu", min_accuracy=0.0, faithfulness_points=2)
    circuit = prune(model, tok, cfg, progress=False)
    assert not circuit.failed, circuit.reason
    assert circuit.model_type == model_type
    assert circuit.total_nodes == sum(sites_of(model).width(n) for n in NodeIndex.build(model, cfg.node_sites).names)
    assert circuit.total_nodes > LAYERS * 16 * 5 and circuit.verification["keeps_target_val"]
    assert fast_head_ok(model.eval(), load_task_data(tok, PruneConfig(n_train=8, n_val=8, n_test=8)).val)
    assert sites_of(model).active_torch_hooks() == 0


def test_config_presets_overrides_and_targets(tmp_path):
    from sparse_lm.config import ConfigError, list_presets

    from sparse_lm_app.commands.prune import resolve_config

    assert "prune-default" in list_presets("prune")
    args = _cli_args(Path("m"), tmp_path, "--preset", "prune-quick", "--method", "attribution", "steps=7",
                     "target_loss=relative:+0.1")
    cfg = resolve_config(args)
    assert (cfg.steps, cfg.method, cfg.relative_margin, cfg.task) == (7, "attribution", 0.1, "single_double_quote")
    assert cfg.batch_size == 32  # from the preset
    with pytest.raises(ConfigError, match="k_cof"):
        resolve_config(_cli_args(Path("m"), tmp_path, "k_cof=1"))
    with pytest.raises(ConfigError, match="method"):
        resolve_config(_cli_args(Path("m"), tmp_path, "method=magic"))
    with pytest.raises(ConfigError, match="beta2"):
        resolve_config(_cli_args(Path("m"), tmp_path, "beta2=1.5"))
