"""What the ground truth means under mean ablation, and how a pruned circuit is scored against it."""

from __future__ import annotations

import os

import pytest
import torch

from pruning.groundtruth.score import substitutions
from pruning.groundtruth.truth import GroundTruth

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def test_an_alternative_stands_for_the_truth_node_it_replaces():
    from tests.unit.test_groundtruth import _circuit

    gt = GroundTruth(nodes={("0.attn.q", 0), ("0.attn.q", 2), ("0.attn.v", 0)}, edges=set(),
                     site_widths={"0.attn.q": 4, "0.attn.v": 2}, node_kinds=["attn.q", "attn.v"],
                     alternatives={("0.attn.q", 2): [("0.attn.q", 3)]})
    sites = ["0.attn.q", "0.attn.v"]
    from pruning.groundtruth import score

    swapped = score(_circuit(gt, sites, {("0.attn.q", 0), ("0.attn.q", 3), ("0.attn.v", 0)}), gt)
    assert swapped["node_recall"] == swapped["node_precision"] == 1.0
    assert swapped["node_recall_strict"] == pytest.approx(2 / 3) and swapped["substitutions"] == [
        [["0.attn.q", 3], ["0.attn.q", 2]]]
    # a channel that is no recorded alternative is an error like any other, and an alternative only counts
    # when the truth node it replaces is missing (keeping both is one node too many)
    other = score(_circuit(gt, sites, {("0.attn.q", 0), ("0.attn.q", 1), ("0.attn.v", 0)}), gt)
    assert other["node_recall"] == pytest.approx(2 / 3) and other["substitutions"] == []
    both = score(_circuit(gt, sites, {("0.attn.q", 0), ("0.attn.q", 2), ("0.attn.q", 3), ("0.attn.v", 0)}), gt)
    assert both["node_recall"] == 1.0 and both["node_precision"] == 0.75
    assert substitutions({("s", 1)}, {("s", 0), ("s", 2)}, {("s", 0): [("s", 1)], ("s", 2): [("s", 1)]}) == {
        ("s", 1): ("s", 0)}  # one kept channel stands for one truth node only


# ---------------------------------------------------------------------------- on compiled programs

tracr = pytest.importorskip("tracr")


@pytest.fixture(scope="module")
def hist():
    from pruning.groundtruth import compile_registered

    return compile_registered("hist")


def _judge(compiled):
    from pruning.groundtruth.truth import (
        NODE_KINDS,
        AnswerJudge,
        _sites,
        means_of,
        record_real,
    )

    means = means_of(record_real(compiled.model, compiled.task, list(_sites(compiled.model, NODE_KINDS))))
    return AnswerJudge(compiled.model, compiled.task, means)


@pytest.mark.slow  # derives two truths: the full suite runs it, make test-fast stays under 3 min
def test_truth_keeps_the_answers_and_no_single_node_of_it_can_go(hist):
    from pruning.groundtruth import rotate
    from pruning.groundtruth.truth import _outside

    for compiled in (hist, rotate(hist)):
        gt = compiled.ground_truth
        assert gt.sufficient["keeps_answers"] == 1.0 and gt.sufficient["margin"] >= 0.1
        judge = _judge(hist)  # the unrotated model has the same candidate channels as the rotated one
        assert judge.keeps(_outside(gt.nodes, gt.site_widths))
        for n in sorted(gt.nodes):  # 1-minimal: each node is needed given the rest of the truth
            assert not judge.keeps(_outside(gt.nodes - {n}, gt.site_widths)), (compiled.name, n)
        for n, alts in gt.alternatives.items():  # and every recorded swap keeps the answers
            for a in alts:
                assert judge.keeps(_outside((gt.nodes - {n}) | {a}, gt.site_widths))


def test_rotated_truth_is_derived_for_the_rotated_candidates(hist):
    """With the residual channels intact (they are no candidates after a rotation), the rotated truth keeps
    the answers on the rotated model itself, with everything else mean-ablated as the pruner does."""
    from pruning.groundtruth import ROTATED_KINDS, rotate, task_means
    from pruning.groundtruth.truth import _agrees, _outside, predictions

    r = rotate(hist, seed=3)
    gt = r.ground_truth
    assert gt.node_kinds == ROTATED_KINDS and set(gt.site_widths) == {
        f"{i}.{k}" for i in range(r.model.config.n_layer) for k in ROTATED_KINDS}
    means = {n: m.double() for n, m in task_means(r, list(gt.site_widths)).items()}
    reference = r.task.targets.masked_fill(~r.task.answered, -1)
    assert _agrees(predictions(r.model, r.task, _outside(gt.nodes, gt.site_widths), means), reference, r.task) == 1.0
    with pytest.raises(ValueError, match="already rotated"):
        rotate(r)


def test_a_planted_unneeded_neuron_is_outside_the_truth(hist):
    """A neuron planted into a compiled MLP (one more hidden unit) that reads what a truth neuron reads but
    writes only a ten-thousandth of its output is structure, not truth; the truth is otherwise unchanged."""
    import copy

    from pruning.groundtruth.torch_model import TracrTransformer
    from pruning.groundtruth.truth import derive_ground_truth

    gt = hist.ground_truth
    last = hist.model.config.n_layer - 1
    site = f"{last}.mlp.post_act"
    src = min(c for s, c in gt.nodes if s == site)
    cfg = copy.deepcopy(hist.model.config)
    cfg.d_mlp += 1
    model = TracrTransformer(cfg)
    state = {}
    for k, v in hist.model.state_dict().items():  # every MLP gets one zero unit at the end ...
        if k.endswith(("mlp.c_fc.weight", "mlp.c_fc.bias")):
            v = torch.cat([v, torch.zeros_like(v[:1])])
        elif k.endswith("mlp.c_proj.weight"):
            v = torch.cat([v, torch.zeros_like(v[:, :1])], dim=1)
        state[k] = v
    model.load_state_dict(state)
    n = cfg.d_mlp - 1
    mlp = model.transformer.h[last].mlp
    with torch.no_grad():  # ... and the last one's reads like a truth neuron and writes almost nothing
        mlp.c_fc.weight[n] = mlp.c_fc.weight[src]
        mlp.c_fc.bias[n] = mlp.c_fc.bias[src]
        mlp.c_proj.weight[:, n] = 1e-4 * mlp.c_proj.weight[:, src]
    with torch.no_grad():  # the answers are the same (BOS's logits, never answered, move a little)
        answered = hist.task.answered
        a, b = model(hist.task.input_ids).logits[answered], hist.model(hist.task.input_ids).logits[answered]
    assert torch.equal(a.argmax(-1), b.argmax(-1)) and float((a - b).abs().max()) < 0.1
    planted = derive_ground_truth(model, hist.task)
    assert (site, n) in planted.structural_nodes and (site, n) not in planted.nodes
    assert planted.nodes == gt.nodes and planted.sufficient["keeps_answers"] == 1.0


def test_pruner_defaults_select_on_every_input_and_refine(hist):
    from pruning.groundtruth import prune_compiled, score

    c = prune_compiled(hist, "attribution")
    assert c.search["refine"]["order"] == "reverse_forward" and c.search["splits"]["val"] == len(hist.task)
    assert c.search["selection"].startswith("every task input")
    assert c.verification["note"].startswith("not held out")  # its test numbers were seen by the selection
    s = score(c, hist.ground_truth)
    assert s["node_recall"] == 1.0 and s["node_precision"] == 1.0
    held_out = prune_compiled(hist, "attribution", refine=None, select_on_all=False)
    assert "refine" not in held_out.search and held_out.search["splits"]["val"] < len(hist.task) // 3
    assert held_out.verification["note"].startswith("test split")
    assert held_out.num_nodes >= c.num_nodes
