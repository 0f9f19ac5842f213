"""Which split each stage of `prune` reads, the random-weights control, bf16 masks and faithfulness curves.

Masks, attribution and calibration read train; the full-model check, the
relative target and the bisection read validation; test is only reported.
The tests give one split labels that would change every choice made on it
and check which results move.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_pruning import PLANTED, planted, planted_cfg, planted_data, planted_model  # noqa: F401  (fixture)

from pruning.control import random_weights_like
from pruning.faithfulness import budgets, curve_areas, faithfulness_curve, faithfulness_value
from pruning.forward import TaskData, precision_context
from pruning.pruner import finish_circuit, prune
from sparse_lm.model import SparseGPT, SparseGPTConfig
from tasks.loss import TaskBatch

torch.set_num_threads(1)


def flipped(batch: TaskBatch) -> TaskBatch:
    """The same prompts with the answers swapped: a model right on `batch` is wrong on this."""
    return TaskBatch(input_ids=batch.input_ids, lengths=batch.lengths, target_ids=batch.distractor_ids,
                     distractor_ids=batch.target_ids, family=1 - batch.family)


def with_split(data: TaskData, **splits: TaskBatch) -> TaskData:
    parts = {"train": data.train, "val": data.val, "test": data.test, **splits}
    return TaskData(data.task, parts["train"], parts["val"], parts["test"], data.completions, data.token_strings,
                    data.token_ids)


@pytest.mark.parametrize("method", ["learned", "attribution"])
def test_nothing_is_chosen_on_the_test_split(planted, method):  # noqa: F811
    model, _, means, _ = planted
    cfg = planted_cfg(method=method, relative_margin=0.1, faithfulness_points=4)
    normal = prune(model, None, cfg, means=means, data=planted_data(), progress=False)
    data = planted_data()
    upside_down = prune(model, None, cfg, means=means, data=with_split(data, test=flipped(data.test)), progress=False)
    assert not normal.failed and not upside_down.failed, upside_down.reason
    # every choice is the same: target, node order and count, calibration
    assert upside_down.target_loss == normal.target_loss
    assert upside_down.search["bisection"] == normal.search["bisection"]
    assert [n.id for n in upside_down.nodes] == [n.id for n in normal.nodes]
    assert upside_down.calibration == normal.calibration
    assert upside_down.metrics["circuit_val"] == normal.metrics["circuit_val"]
    # ... while the reported test numbers do see the flipped answers
    assert upside_down.metrics["full_model"]["accuracy"] < 0.1 and upside_down.metrics["circuit"]["loss"] > math.log(2)
    assert not upside_down.verification["keeps_target"] and upside_down.verification["keeps_target_val"]


def test_a_sweep_run_reads_no_test_split_and_finishing_it_gives_the_lone_prune(planted):  # noqa: F811
    """A sweep's runs stop once the circuit is chosen (``measure=False``); the one it keeps is measured
    afterwards (`finish_circuit`) and must come out as a lone `prune` gives it."""
    model, _, means, _ = planted
    cfg = planted_cfg(relative_margin=0.1, faithfulness_points=4)
    data = planted_data()
    lone = prune(model, None, cfg, means=means, data=data, progress=False).to_json()
    run = prune(model, None, cfg, means=means, data=data, progress=False, measure=False, faithfulness=False)
    blind = prune(model, None, cfg, means=means, data=with_split(data, test=flipped(data.test)), progress=False,
                  measure=False, faithfulness=False)

    def choices(c: dict) -> dict:
        return {**c, "search": {k: v for k, v in c["search"].items() if k != "seconds"}}

    assert not run.failed and choices(run.to_json()) == choices(blind.to_json())  # test plays no part
    assert set(run.metrics) == {"full_model_val", "all_ablated_val"} and not run.faithfulness and not run.verification
    assert [n.id for n in run.nodes] == [n["id"] for n in lone["nodes"]] and run.num_edges == lone["num_edges"]
    done = finish_circuit(model, None, cfg, run.to_json(), run.order_and_count, means=means, data=data).to_json()
    for key in ("nodes", "edges", "num_nodes", "num_edges", "edges_by_type", "metrics", "verification",
                "calibration", "faithfulness", "target_loss"):
        assert done[key] == lone[key], key


def test_the_validation_split_decides_whether_the_model_is_pruned(planted):  # noqa: F811
    model, _, means, _ = planted
    data = planted_data()
    circuit = prune(model, None, planted_cfg(relative_margin=0.05), means=means,
                    data=with_split(data, val=flipped(data.val)), progress=False)
    assert circuit.failed and circuit.num_nodes == 0
    assert "does not solve this task: accuracy 0.0" in circuit.reason and "on validation" in circuit.reason


def test_masks_and_calibration_read_the_train_split(planted):  # noqa: F811
    model, _, means, _ = planted
    data = planted_data()
    cfg = planted_cfg(faithfulness_points=0, steps=60)
    normal = prune(model, None, cfg, means=means, data=data, progress=False)
    # flipped train answers: the masks learn to break the task and calibration to flip nothing (scale > 0)
    wrong = prune(model, None, cfg, means=means, data=with_split(data, train=flipped(data.train)), progress=False)
    assert wrong.search["train_curve"] != normal.search["train_curve"]
    assert wrong.calibration != normal.calibration


def test_a_random_weights_control_fails_as_a_model_that_does_not_solve_the_task(planted):  # noqa: F811
    model, _, means, _ = planted
    control = random_weights_like(model, seed=1)
    assert type(control) is type(model) and control.config.to_dict() == model.config.to_dict()
    # even a relative target (reached by the empty circuit of a model at chance) gives no circuit
    circuit = prune(control, None, planted_cfg(relative_margin=0.05), means=means, data=planted_data(),
                    progress=False)
    assert circuit.failed and circuit.num_nodes == 0 and circuit.nodes == []
    assert "the model does not solve this task: accuracy" in circuit.reason and "on validation" in circuit.reason


def test_a_target_the_empty_circuit_meets_gives_no_circuit(planted):  # noqa: F811
    """A target at or above the empty circuit's validation loss would be met by any node set: no circuit, and
    the reason says so. min_accuracy=0 (prune anyway) still prunes."""
    model, _, means, _ = planted
    circuit = prune(model, None, planted_cfg(relative_margin=5.0), means=means, data=planted_data(), progress=False)
    assert circuit.failed and circuit.num_nodes == 0
    assert "is met by the empty circuit" in circuit.reason, circuit.reason
    empty = circuit.metrics["all_ablated_val"]["loss"]
    assert empty <= circuit.target_loss and empty > circuit.metrics["full_model_val"]["loss"]
    # (a few mask steps: what is checked is decided before the masks train)
    anyway = prune(model, None, planted_cfg(relative_margin=5.0, min_accuracy=0.0, steps=5), means=means,
                   data=planted_data(), progress=False, measure=False, faithfulness=False)
    assert "empty circuit" not in (anyway.reason or "")
    # a target under the empty circuit's loss goes on to the masks
    ok = prune(model, None, planted_cfg(relative_margin=0.1, steps=5), means=means, data=planted_data(),
               progress=False, measure=False, faithfulness=False)
    assert "empty circuit" not in (ok.reason or "") and ok.metrics["all_ablated_val"]["loss"] > ok.target_loss


def test_random_weights_control_keeps_the_weight_sparsity():
    cfg = SparseGPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, d_head=4, d_model=16, d_mlp=32)
    model = SparseGPT(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.weight_matrices().items():
            p.mul_(torch.rand(p.shape, generator=g) < 0.25)  # ~1/4 kept, a different count per matrix
    control = random_weights_like(model, seed=3)
    for name, p in control.weight_matrices().items():
        ref = model.get_parameter(name)
        assert int(torch.count_nonzero(p)) == int(torch.count_nonzero(ref)), name
        assert not torch.equal(p, ref)
    assert not any(p.requires_grad for p in control.parameters())
    # the same seed gives the same control
    assert all(torch.equal(a, b) for a, b in zip(control.parameters(), random_weights_like(model, 3).parameters()))


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast"])
def test_bf16_masks_find_the_fp32_circuit(planted, precision):  # noqa: F811
    model, _, means, _ = planted
    fp32 = prune(model, None, planted_cfg(precision="fp32", faithfulness_points=0), means=means, data=planted_data(),
                 progress=False)
    bf16 = prune(model, None, planted_cfg(precision=precision, faithfulness_points=0), means=means,
                 data=planted_data(), progress=False)
    assert not fp32.failed and not bf16.failed
    assert {(n.site, n.channel) for n in bf16.nodes} == {(n.site, n.channel) for n in fp32.nodes}
    assert {(n.site, n.channel) for n in bf16.nodes} <= PLANTED
    assert bf16.metrics["circuit"]["loss"] == pytest.approx(fp32.metrics["circuit"]["loss"], abs=0.02)


def test_precision_context_runs_matrix_products_in_bf16_and_nothing_else():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with precision_context("bf16-autocast", "cpu"):
        assert (x @ w).dtype == torch.bfloat16
    with precision_context("fp32", "cpu"):
        assert (x @ w).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        precision_context("fp16", "cpu")
    # bf16: the linear layers multiply in bf16 and return float32; the model is untouched afterwards
    model = planted_model()
    for p in model.parameters():
        p.requires_grad_(False)
    lin = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 16) * 3
    before = lin(x)
    with precision_context("bf16", "cpu", model):
        inside = lin(x)
    assert inside.dtype == torch.float32 and not torch.equal(inside, before)
    assert torch.allclose(inside, before, rtol=0.05, atol=0.05)
    assert torch.equal(lin(x), before) and lin.weight.dtype == torch.float32


def test_faithfulness_budgets_and_areas():
    b = budgets(1000, 4, also=(37,))
    assert b == [0, 1, 10, 37, 100, 1000]
    assert faithfulness_value(3.0, 1.0, 5.0) == 0.5 and math.isnan(faithfulness_value(1.0, 1.0, 1.0))
    perfect = [[0, 0.7, 1.0], [10, 0.1, 1.0], [100, 0.1, 1.0]]
    assert curve_areas(perfect, 100) == pytest.approx((1.0, 0.0))
    linear = [[0, 0.7, 0.0], [100, 0.1, 1.0]]
    assert curve_areas(linear, 100) == pytest.approx((0.5, 0.5))
    # measured points are reused, and 0 and total always lie on the curve
    calls = []
    out = faithfulness_curve(lambda n: calls.append(n) or (0.3, n / 10), [0, 5, 10], 10,
                             known={0: (0.7, 0.0), 10: (0.1, 1.0)})
    assert calls == [5] and out["curve"] == [[0, 0.7, 0.0], [5, 0.3, 0.5], [10, 0.1, 1.0]]
    assert out["cpr"] == pytest.approx(0.5) and out["cmd"] == pytest.approx(0.5)
