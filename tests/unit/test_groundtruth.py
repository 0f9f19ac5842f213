"""Tracr ground truth: import equality, the known circuit, rotation and scoring."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("JAX_PLATFORMS", "cpu")
pytest.importorskip("tracr")

from pruning.circuit import Circuit, CircuitEdge, CircuitNode
from pruning.groundtruth import compile_registered, rotate, score
from pruning.groundtruth.compile import tracr_outputs
from pruning.groundtruth.score import roc_auc
from pruning.groundtruth.truth import predictions


@pytest.fixture(scope="session")
def hist():
    return compile_registered("hist")


@pytest.fixture(scope="session")
def reverse():
    return compile_registered("reverse")


@pytest.mark.slow  # runs tracr's own (jax) forward over every input: ~20 s
@pytest.mark.parametrize("which", ["hist", "reverse"])
def test_torch_forward_equals_tracr_on_whole_input_space(which, request):
    c = request.getfixturevalue(which)
    # two lengths (jax compiles tracr's forward pass once per length): the longest and a padded shorter one
    top = max(len(x) for x in c.task.tokens)
    rows = [i for i, x in enumerate(c.task.tokens) if len(x) in (2, top)]
    ref = tracr_outputs(c.tracr, [c.task.tokens[i] for i in rows])
    with torch.no_grad():
        res = c.model.residual(c.task.input_ids[rows]).numpy()  # right-padded rows: padding is never attended to
    worst = max(float(np.abs(r - res[i, : r.shape[0]]).max()) for i, r in enumerate(ref))
    assert worst < 1e-5
    # and the argmax answers are the program's (RASP evaluation) at every answered position
    pred = predictions(c.model, c.task)
    assert bool(((pred == c.task.targets) | ~c.task.answered).all())


def test_sites_match_sparse_gpt_names(hist):
    names = set(hist.model.sites.names())
    for kind in ["resid_in", "attn.act_in", "attn.q", "attn.k", "attn.v", "attn.resid_delta", "resid_mid",
                 "mlp.act_in", "mlp.post_act", "mlp.resid_delta"]:
        assert f"0.{kind}" in names
    assert "final_resid" in names
    cfg = hist.model.config
    assert hist.model.sites.width("0.attn.q") == cfg.n_head * cfg.d_head
    with hist.model.sites.record(["0.mlp.post_act"]) as acts:
        hist.model(hist.task.input_ids[:3])
    assert acts["0.mlp.post_act"].shape == (3, hist.task.input_ids.shape[1], cfg.d_mlp)


def test_ground_truth_is_sufficient_and_excludes_unused(reverse):
    gt = reverse.ground_truth
    assert gt.sufficient["full_model"] == gt.sufficient["truth_only"] == gt.sufficient["keeps_answers"] == 1.0
    assert gt.sufficient["margin"] >= 0.1 and gt.sufficient["loss_increase"] <= 1e-3
    labels = reverse.model.config.residual_labels
    read = {labels[c] for s, c in gt.nodes if s.endswith(("act_in", "resid_delta"))}
    # constant or never-used dimensions are outside the truth
    assert "one" not in read and "tokens:compiler_pad" not in read
    assert any(lab.startswith("tokens:") for lab in read) and any(lab.startswith("reverse") for lab in read)
    assert 0 < len(gt.nodes) < gt.total_nodes / 4
    # every truth edge joins two truth nodes
    assert all(a in gt.nodes and b in gt.nodes for a, b in gt.edges)


def test_ablating_a_truth_node_breaks_the_program(hist):
    """Each truth MLP neuron and head channel matters on its own (no redundant node in the truth)."""
    gt = hist.ground_truth
    from pruning.groundtruth import task_means

    means = task_means(hist)
    answered = hist.task.answered
    for site, ch in sorted(n for n in gt.nodes if n[0].endswith("post_act")):
        mask = torch.zeros(hist.model.sites.width(site), dtype=torch.bool)
        mask[ch] = True
        pred = predictions(hist.model, hist.task, {site: mask}, {site: means[site].double()})
        assert not bool(((pred == hist.task.targets) | ~answered).all()), (site, ch)


def test_unused_branch_is_outside_the_truth(hist):
    """tracr compiles a SelectorWidth with an MLP that the output never reads: structure, not truth."""
    gt = hist.ground_truth
    dropped = [c for c in gt.components if not c["kept"]]
    assert dropped and all(c["reason"].startswith("output unchanged") for c in dropped)
    from pruning.groundtruth.truth import derive_ground_truth

    # the dropped MLP's neurons are compiled (structural) nodes, but none is in the truth ...
    structural = derive_ground_truth(hist.model, hist.task, functional=False)
    unused = {n for n in structural.nodes if n[0].endswith("post_act")} - gt.nodes
    assert unused and not unused & gt.nodes
    # ... and mean-ablating all of them together leaves every answer as it was
    from pruning.groundtruth import task_means

    means = task_means(hist)
    mask = torch.zeros(hist.model.sites.width("0.mlp.post_act"), dtype=torch.bool)
    mask[[c for _, c in unused]] = True
    pred = predictions(hist.model, hist.task, {"0.mlp.post_act": mask}, {"0.mlp.post_act": means["0.mlp.post_act"]})
    assert bool(((pred == hist.task.targets) | ~hist.task.answered).all())


def test_rotation_keeps_outputs_and_moves_the_basis(hist):
    r = rotate(hist, seed=1)
    with torch.no_grad():
        a, b = hist.model(hist.task.input_ids).logits, r.model(hist.task.input_ids).logits
        ra, rb = hist.model.residual(hist.task.input_ids), r.model.residual(hist.task.input_ids)
    answered = hist.task.answered  # BOS and padding have all-zero logits: their argmax is a tie
    assert float((a - b).abs().max()) < 1e-2 and bool((a.argmax(-1) == b.argmax(-1))[answered].all())
    assert float((ra - rb).abs().max()) > 0.1  # residual channels changed
    assert {n[0].split(".", 1)[1] for n in r.ground_truth.nodes} <= {"attn.q", "attn.k", "attn.v", "attn.y",
                                                                    "mlp.post_act"}


def _circuit(gt, node_sites, pick) -> Circuit:
    widths = [gt.site_widths[s] for s in node_sites]
    offsets = np.cumsum([0] + widths)
    ids = {(s, c): int(offsets[i]) + c for i, s in enumerate(node_sites) for c in range(widths[i])}
    nodes = [CircuitNode(ids[n], n[0], int(n[0].split(".")[0]), n[0].split(".", 1)[1], n[1], None, 1.0, 0.0)
             for n in pick]
    edges = [CircuitEdge(ids[a], ids[b], 1.0) for a, b in gt.edges if a in pick and b in pick]
    return Circuit(model="m", model_type="tracr", task="t", method="learned", target_loss=0.1, n_layer=1,
                   node_sites=list(node_sites), total_nodes=int(offsets[-1]), nodes=nodes, edges=edges,
                   num_nodes=len(nodes), num_edges=len(edges))


def test_score_exact_and_partial(hist):
    gt = hist.ground_truth
    sites = [s for s in gt.site_widths if not s.endswith("attn.y")]
    truth = sorted(n for n in gt.nodes if n[0] in sites)
    s = score(_circuit(gt, sites, set(truth)), gt)
    assert s["node_precision"] == s["node_recall"] == 1.0 and s["edge_recall"] == 1.0 and s["roc_auc"] == 1.0
    half = set(truth[: len(truth) // 2])
    extra = {n for n in gt.all_nodes() if n[0] in sites and n not in gt.nodes}
    s2 = score(_circuit(gt, sites, half | set(sorted(extra)[:3])), gt)
    assert s2["node_recall"] == pytest.approx(len(half) / len(truth))
    assert s2["node_precision"] == pytest.approx(len(half) / (len(half) + 3))


def test_roc_auc_ties_and_order():
    assert roc_auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert roc_auc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert roc_auc([1, 1, 1, 1], [True, False, True, False]) == 0.5


# ---------------------------------------------------------------------------- the pruner on compiled models


def test_split_rows_is_deterministic_and_disjoint():
    from pruning.objective import split_rows

    a = split_rows(101, seed=3)
    assert a == split_rows(101, seed=3) and a != split_rows(101, seed=4)
    rows = [r for part in a for r in part]
    assert sorted(rows) == list(range(101)) and [len(x) for x in a] == [51, 25, 25]


def test_surrogate_gradients_keep_the_forward_pass_and_reach_upstream(hist):
    """tracr's step-function MLPs give no exact gradient upstream; the surrogate does, forward unchanged."""
    from pruning.objective import SequenceObjective

    model, task = hist.model, hist.task
    objective = SequenceObjective.from_task(task, temperature=model.config.logit_scale)
    read = sorted(c for s, c in hist.ground_truth.nodes if s == "0.mlp.act_in")  # what the counting MLP reads
    assert read
    with torch.no_grad():
        exact = model(task.input_ids).logits

    def grad_at_act_in() -> tuple[torch.Tensor, torch.Tensor]:
        box = {}

        def grab(x):
            box["x"] = x = x.detach().requires_grad_(True)
            return x

        with torch.enable_grad(), model.sites.replace({"0.mlp.act_in": grab}):
            loss = objective.loss(model, task)
            loss.backward()
        with torch.no_grad():
            logits = model(task.input_ids).logits
        return logits, box["x"].grad[..., read]

    logits, g_exact = grad_at_act_in()
    with model.surrogate_gradients():
        soft_logits, g_soft = grad_at_act_in()
    assert torch.equal(logits, exact) and torch.equal(soft_logits, exact)
    assert float(g_soft.abs().max()) > 1e-3 > 1e6 * float(g_exact.abs().max())  # exact: 0 up to rounding


@pytest.fixture(scope="session")
def hist_learned(hist):
    from pruning.groundtruth import prune_compiled

    return prune_compiled(hist, "learned")


def test_learned_masks_recover_the_truth(hist, hist_learned):
    c = hist_learned
    assert not c.failed and c.verification["keeps_target"] and c.verification["destroys_task"]
    s = score(c, hist.ground_truth)
    assert s["node_recall"] == 1.0 and s["node_precision"] >= 0.9 and s["roc_from"] == "node_scores"
    assert s["roc_auc"] >= 0.95 and len(c.search["node_scores"]) == c.total_nodes
    assert "skipped" in c.search["calibration"] and c.metrics["circuit"]["accuracy"] == 1.0
    assert c.model_type == "tracr" and c.num_edges > 0
    # the same Circuit as `sparse-lm prune` writes: it survives its JSON form
    back = Circuit.from_json(c.dumps())
    assert score(back, hist.ground_truth) == s


def test_attribution_and_the_rotated_variant(hist):
    from pruning.groundtruth import prune_compiled

    a = prune_compiled(hist, "attribution")
    s = score(a, hist.ground_truth)
    assert a.method == "attribution" and s["node_recall"] == 1.0 and s["roc_auc"] > 0.9
    r = rotate(hist)
    learned = prune_compiled(r, "learned")
    assert set(learned.node_sites) == {"0.attn.q", "0.attn.k", "0.attn.v", "0.mlp.post_act"}
    s = score(learned, r.ground_truth)
    assert s["node_recall"] == 1.0 and s["node_precision"] >= 0.9


def test_groundtruth_command_writes_scores_and_circuit(tmp_path, capsys):
    import json

    from sparse_lm_app.cli import main

    assert main(["groundtruth", "--program", "count_a", "--method", "attribution", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "count_a" in out and "node P" in out
    report = json.loads((tmp_path / "groundtruth.json").read_text())
    (run,) = report["runs"]
    assert run["program"] == "count_a" and run["method"] == "attribution" and 0 < run["scores"]["node_recall"] <= 1
    assert (tmp_path / "circuit.html").stat().st_size > 1000 and (tmp_path / "circuit.json").is_file()
    assert main(["groundtruth", "--program", "nonesuch", "--out", str(tmp_path)]) == 1


def test_drop_one_by_one_removes_what_the_check_allows_in_the_given_order():
    from pruning.objective import drop_one_by_one

    need = {1, 3}
    mask, tried = drop_one_by_one(lambda m: all(m[i] > 0 for i in need), torch.ones(5), torch.arange(5))
    assert mask.tolist() == [0, 1, 0, 1, 0] and tried == 5
    # two interchangeable nodes (either one suffices): the one tried first goes, the other stays
    either = lambda m: bool(m[0] > 0 or m[2] > 0)
    assert drop_one_by_one(either, torch.ones(3), torch.tensor([0, 1, 2]))[0].tolist() == [1, 0, 0]
    assert drop_one_by_one(either, torch.ones(3), torch.tensor([2, 1, 0]))[0].tolist() == [0, 0, 1]
    # nodes outside the mask are never tried (and never added)
    mask, tried = drop_one_by_one(lambda m: True, torch.tensor([1.0, 0.0, 1.0]), torch.arange(3))
    assert mask.sum() == 0 and tried == 2


def test_refine_and_tie_break_are_recorded(hist, hist_learned):
    from pruning.groundtruth import prune_compiled

    assert hist_learned.search["tie_break"].startswith("supplied")  # the default: attribution orders equal tau
    assert hist_learned.search["refine"]["order"] == "reverse_forward"  # on by default (REFINE)
    assert "refine" not in prune_compiled(hist, "attribution", refine=None).search
    c = prune_compiled(hist, "attribution", refine="reverse_forward")
    assert c.search["refine"]["order"] == "reverse_forward" and "tie_break" not in c.search
    assert c.search["refine"]["kept"] == c.num_nodes <= c.search["refine"]["bisected"]
    assert c.metrics["circuit"]["accuracy"] == 1.0 and score(c, hist.ground_truth)["node_recall"] == 1.0
    with pytest.raises(Exception, match="refine must be one of"):
        prune_compiled(hist, "attribution", refine="sideways")
