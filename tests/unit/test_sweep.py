"""``sparse-lm sweep``: CARBS over pruning runs, resumable state, best circuit written as by prune."""

from __future__ import annotations

import json

import pytest
import torch

from pruning.circuit import Circuit
from pruning.sweep import (
    PROTOCOL,
    STATE_FILE,
    Sweep,
    SweepConfig,
    pareto_front,
    search_space,
)
from sparse_lm import config as configlib
from sparse_lm.model import SparseGPT, SparseGPTConfig
from sparse_lm.tokenizer import load_tokenizer
from sparse_lm_app.cli import main

FAST = ["prune.steps=15", "prune.n_train=64", "prune.n_val=32", "prune.n_test=32", "prune.mean_blocks=4",
        "prune.relative_margin=0.05", "prune.snippets=1", "prune.task=single_double_quote",
        "prune.min_accuracy=0", "prune.faithfulness_points=0"]  # an untrained model: prune it anyway


@pytest.fixture(scope="module")
def model_dir(small_data, tmp_path_factory):
    tok = load_tokenizer(small_data / "tokenizer")
    out = tmp_path_factory.mktemp("sweep_model")
    torch.manual_seed(0)
    SparseGPT(SparseGPTConfig(vocab_size=len(tok), block_size=512, n_layer=1, n_head=2, d_head=8, d_model=16,
                              d_mlp=32)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_search_space_is_centred_on_the_base_config():
    cfg = configlib.resolve(SweepConfig, "sweep", None, ["prune.k_coef=0.002", "prune.lr=0.1"])
    centres = {p.name: p.search_center for p in search_space(cfg.prune)}
    assert centres["k_coef"] == 0.002 and centres["lr"] == 0.1
    assert set(centres) == {"k_coef", "lr", "weight_decay", "beta2", "heaviside_temp", "init_noise"}


@pytest.mark.slow  # kept out of make test-fast (under 3 min); the full suite runs it
def test_sweep_resumes_after_a_kill_and_writes_the_best_circuit(model_dir, tmp_path):
    out = tmp_path / "sweep"
    cfg = configlib.resolve(SweepConfig, "sweep", None, [*FAST, "iterations=2"])
    Sweep(cfg, str(model_dir), out).run(progress=False)
    first = json.loads((out / STATE_FILE).read_text())["results"]
    assert len(first) == 2
    # "kill": a suggestion was handed out but never observed
    sweep = Sweep(cfg, str(model_dir), out)
    sweep.carbs.suggest()
    sweep._save_state()
    cfg3 = configlib.resolve(SweepConfig, "sweep", None, [*FAST, "iterations=3"])
    with pytest.raises(ValueError, match="belongs to another sweep"):
        Sweep(cfg3, str(model_dir), out)  # a different config must not silently continue someone else's state
    best = Sweep(cfg, str(model_dir), out)
    assert not best.carbs.outstanding_suggestions  # the lost suggestion is forgotten on resume
    assert best.results == first
    ok = [r for r in first if not r["failed"]]
    assert ok  # a random model's own loss + 0.05 is reachable
    assert all(r["cost"] == 15.0 for r in first)  # mask steps, not seconds
    assert all(r["val_loss"] <= r["target_loss"] for r in ok)  # judged on validation
    circuit = json.loads((out / "circuit.json").read_text())
    assert circuit["num_nodes"] == min(r["num_nodes"] for r in ok)
    assert set(circuit["edges_by_type"]) >= {"attn.act_in->attn.q", "resid_delta->act_in"}
    assert (out / "circuit.html").exists() and (out / "config.json").exists()
    assert (out / "sweep.png").stat().st_size > 5000
    summary = best.summary()
    assert summary["best"]["num_nodes"] == circuit["num_nodes"] and summary["iterations"] == 2
    assert summary["state_file"] == str(out / STATE_FILE) and summary["circuit"] == str(out / "circuit.json")
    # a state from the earlier protocol (costs in seconds, failures on test) is not continued
    state = json.loads((out / STATE_FILE).read_text())
    assert state["protocol"] == PROTOCOL
    del state["protocol"]
    (out / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match="another sweep protocol"):
        Sweep(cfg, str(model_dir), out)


def _fake_circuit(val_loss: float, test_loss: float, nodes: int, edges: int) -> dict:
    c = Circuit(model="m", model_type="sparse_gpt", task="t", method="learned", target_loss=0.15, n_layer=1,
                node_sites=["0.mlp.post_act"], total_nodes=32, num_nodes=nodes, num_edges=edges)
    c.search = {"bisection": [[32, 0.01], [nodes, val_loss], [nodes - 1, 0.5]]}  # val loss at the chosen count
    c.metrics = {"circuit": {"loss": test_loss, "accuracy": 0.9}}
    c.verification = {"keeps_target": test_loss <= 0.15, "destroys_task": True, "note": ""}
    return c.to_json()


def test_failure_and_choice_use_validation_and_cost_is_mask_steps(tmp_path):
    cfg = configlib.resolve(SweepConfig, "sweep", None, [*FAST, "iterations=3", "prune.steps=40"])
    sweep = Sweep(cfg, "unused-model", tmp_path)
    runs = [
        (_fake_circuit(val_loss=0.12, test_loss=0.40, nodes=9, edges=4), 500.0),  # val ok, test misses: success
        (_fake_circuit(val_loss=0.30, test_loss=0.05, nodes=3, edges=1), 0.5),  # val misses, test ok: failure
        (_fake_circuit(val_loss=0.15, test_loss=0.10, nodes=12, edges=6), 2.0),  # at the target: success
    ]
    rows = [sweep._observe(i, sweep.carbs.suggest().suggestion,
                           {"circuit": c, "seconds": sec, "order_and_count": (list(range(32)), c["num_nodes"])})
            for i, (c, sec) in enumerate(runs)]
    assert [r["failed"] for r in rows] == [False, True, False]
    assert "validation loss 0.3" in rows[1]["reason"]
    assert sweep.best()["iteration"] == 0 and sweep.best()["objective"] == 9.0  # chosen on validation
    kept = json.loads((tmp_path / "best_order.json").read_text())  # measured on test at the end of the sweep
    assert kept["iteration"] == 0 and kept["circuit"]["num_nodes"] == 9 and kept["count"] == 9
    costs = [o.cost for o in sweep.carbs.success_observations + sweep.carbs.failure_observations]
    assert costs == [40.0, 40.0, 40.0]  # the seconds (500, 0.5, 2) play no part
    assert Circuit.from_json(runs[1][0]).objective("edges") == (float("inf"), True)
    assert Circuit.from_json(runs[0][0]).objective("edges") == (4.0, False)


def _fake_collapse() -> dict:
    c = Circuit(model="m", model_type="sparse_gpt", task="t", method="learned", target_loss=0.15, n_layer=1,
                node_sites=["0.mlp.post_act"], total_nodes=32, failed=True, reason="the masks collapsed: at step 3")
    c.search = {"stopped_at_collapse": True, "collapses": [{"step": 3}]}
    return c.to_json()


def _fake_settled_above() -> dict:
    c = Circuit(model="m", model_type="sparse_gpt", task="t", method="learned", target_loss=0.15, n_layer=1,
                node_sites=["0.mlp.post_act"], total_nodes=32, failed=True, reason="settled far above")
    c.search = {"open_at_end": 2, "stopped_settled_above": {"open_at_end": 2, "missed_at": 24, "give_up_above": 18},
                "bisection": [[32, 0.1], [0, 0.8], [2, 0.5], [4, 0.45], [8, 0.44], [16, 0.41], [24, 0.4]]}
    return c.to_json()


@pytest.mark.parametrize("stopped", ["collapsed", "settled_above"])
@pytest.mark.parametrize("objective", ["nodes", "edges"])
def test_a_stopped_run_is_seen_by_carbs_as_the_whole_model_and_is_never_the_best(model_dir, tmp_path, objective,
                                                                                   stopped):
    from pruning.graph import NodeIndex, weight_edge_count
    from sparse_lm.loading import load_model_and_tokenizer

    cfg = configlib.resolve(SweepConfig, "sweep", None, [*FAST, "iterations=3", f"objective={objective}"])
    sweep = Sweep(cfg, str(model_dir), tmp_path)
    runs = [_fake_circuit(val_loss=0.12, test_loss=0.1, nodes=9, edges=4),
            _fake_collapse() if stopped == "collapsed" else _fake_settled_above(),
            _fake_circuit(val_loss=0.30, test_loss=0.1, nodes=3, edges=1)]  # the last misses the target: a failure
    rows = [sweep._observe(i, sweep.carbs.suggest().suggestion, {"circuit": c, "seconds": 1.0})
            for i, c in enumerate(runs)]
    model, _ = load_model_and_tokenizer(str(model_dir))
    index = NodeIndex.build(model, cfg.prune.node_sites)
    whole = 32.0 if objective == "nodes" else float(weight_edge_count(model, index))
    assert whole > 9
    assert [(r["failed"], r[stopped]) for r in rows] == [(False, False), (True, True), (True, False)]
    assert not any(r["collapsed" if stopped == "settled_above" else "settled_above"] for r in rows)
    assert rows[1]["carbs_output"] == whole and rows[1]["objective"] is None
    assert rows[1]["val_loss"] is None  # no circuit (not the empty one its bisection measured at count 0)
    assert sweep.summary()[stopped] == 1 and sweep.summary()["failures"] == 2
    # CARBS: two circuits (9 or 4, and the whole model), one failure; the collapse is never the best
    assert sorted(o.output for o in sweep.carbs.success_observations) == [9.0 if objective == "nodes" else 4.0, whole]
    assert len(sweep.carbs.failure_observations) == 1
    assert sweep.best()["iteration"] == 0
    # a repeat of the stopped run is answered the same way: the whole model, not a failure
    again = sweep._observe_repeat(3, sweep.carbs.suggest().suggestion, rows[1])
    assert again["carbs_output"] == whole and len(sweep.carbs.failure_observations) == 1


def test_pareto_front_keeps_only_unbeaten_points():
    assert pareto_front([(40, 9), (40, 12), (20, 15), (80, 9), (80, 5)]) == [(20, 15), (40, 9), (80, 5)]


@pytest.mark.slow  # whole sweeps: the full suite runs it, make test-fast stays under 3 min
def test_sweep_cli(model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["sweep", "--model", str(model_dir), "--iterations", "2", "--out", str(out), "--no-progress", *FAST])
    text = capsys.readouterr()
    state = json.loads((out / STATE_FILE).read_text())
    assert len(state["results"]) == 2
    assert all(set(r["params"]) == {"k_coef", "lr", "weight_decay", "beta2", "heaviside_temp", "init_noise"}
               for r in state["results"])
    assert rc == 0, text.err
    assert "best circuit" in text.out and (out / "circuit.json").exists()


@pytest.mark.slow  # whole sweeps: the full suite runs it, make test-fast stays under 3 min
def test_two_in_process_sweeps_on_different_models_do_not_share_inputs(model_dir, small_data, tmp_path):
    # The main job runs one-worker sweeps in its own process, sparse model then dense model: the second must
    # not reuse the first model's task data and means (a vector over the wrong number of nodes).
    tok = load_tokenizer(small_data / "tokenizer")
    other = tmp_path / "other_model"
    torch.manual_seed(1)
    SparseGPT(SparseGPTConfig(vocab_size=len(tok), block_size=512, n_layer=1, n_head=2, d_head=8, d_model=24,
                              d_mlp=48)).save_pretrained(other)
    tok.save_pretrained(other)
    cfg = configlib.resolve(SweepConfig, "sweep", None, [*FAST, "iterations=1"])
    Sweep(cfg, str(model_dir), tmp_path / "a").run(progress=False)
    Sweep(cfg, str(other), tmp_path / "b").run(progress=False)
    state = json.loads((tmp_path / "b" / STATE_FILE).read_text())
    assert len(state["results"]) == 1 and "lack node sites" not in (state["results"][0]["reason"] or "")


@pytest.mark.slow  # whole sweeps: the full suite runs it, make test-fast stays under 3 min
def test_only_the_best_circuit_gets_faithfulness_curves_and_they_equal_a_lone_prune(model_dir, tmp_path):
    """Runs skip the curves (they cost as much as the mask training); the best circuit gets them at the end,
    the same curves `prune` gives when run alone with the winning settings."""
    from pruning.pruner import prune
    from sparse_lm.loading import load_model_and_tokenizer

    out = tmp_path / "sweep"
    fast = [o for o in FAST if not o.startswith("prune.faithfulness_points")]
    cfg = configlib.resolve(SweepConfig, "sweep", None, [*fast, "prune.faithfulness_points=4", "iterations=2"])
    sweep = Sweep(cfg, str(model_dir), out)
    best = sweep.run(progress=False)
    assert best is not None
    written = json.loads((out / "circuit.json").read_text())
    assert written["faithfulness"]["split"] == "test" and len(written["faithfulness"]["curve"]) >= 3
    assert json.loads((out / "best_order.json").read_text())["iteration"] == best["iteration"]
    model, tok = load_model_and_tokenizer(str(model_dir))
    alone = prune(model, tok, configlib.from_dict(type(cfg.prune), {**sweep._prune_cfg(best["params"]),
                                                                    "collapse_retries": 0}),
                  progress=False, model_dir=str(model_dir), fallback_dir=str(out))
    assert alone.num_nodes == written["num_nodes"]
    # measured on test at the end, as the lone run measures it; the other runs never read test
    lone = alone.to_json()
    for key in ("nodes", "edges_by_type", "calibration", "verification"):
        assert written[key] == lone[key], key
    assert set(written["metrics"]) == set(lone["metrics"])
    for key, value in lone["metrics"].items():
        assert written["metrics"][key] == pytest.approx(value, rel=1e-5), key
    rows = json.loads((out / STATE_FILE).read_text())["results"]
    assert [r["test_loss"] is not None for r in rows] == [r["iteration"] == best["iteration"] for r in rows]
    assert rows[best["iteration"]]["test_loss"] == written["metrics"]["circuit"]["loss"]
    assert Sweep(cfg, str(model_dir), out).run(progress=False)["iteration"] == best["iteration"]  # a rerun: done
    got = written["faithfulness"]["curve"]
    want = alone.faithfulness["curve"]
    assert [p[0] for p in got] == [p[0] for p in want]
    assert [p[1] for p in got] == pytest.approx([p[1] for p in want], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("stop", [False, True])
def test_the_stops_reach_each_run_and_are_on_by_default(model_dir, tmp_path, monkeypatch, stop):
    import pruning.sweep as sweep_module

    # CARBS sees a stopped run as the whole model
    assert SweepConfig().stop_collapsed is True and SweepConfig().stop_settled_above is True
    seen = []

    def fake_run_one(prune_cfg, out_dir, stop_collapsed=False, stop_settled_above=False):
        seen.append((stop_collapsed, stop_settled_above))
        return {"circuit": _fake_circuit(val_loss=0.1, test_loss=0.1, nodes=5, edges=2), "seconds": 0.0}

    monkeypatch.setattr(sweep_module, "_run_one", fake_run_one)
    flag = str(stop).lower()
    cfg = configlib.resolve(SweepConfig, "sweep", None,
                            [*FAST, "iterations=2", f"stop_collapsed={flag}", f"stop_settled_above={not stop}".lower()])
    Sweep(cfg, str(model_dir), tmp_path).run(progress=False)
    assert seen == [(stop, not stop), (stop, not stop)]


def test_a_repeated_suggestion_is_answered_by_its_twin_which_a_rerun_would_equal(model_dir, tmp_path, monkeypatch):
    """CARBS re-suggests its best point (6 of the main job's 48 runs on 2026-12-03): such a suggestion is
    answered from the finished run with the same values, because a run is a deterministic function of them."""
    import pruning.sweep as sweep_module

    real_run_one, runs = sweep_module._run_one, []

    def counted(prune_cfg, out_dir, stop_collapsed=False, stop_settled_above=False):
        runs.append(prune_cfg)
        return real_run_one(prune_cfg, out_dir, stop_collapsed, stop_settled_above)

    monkeypatch.setattr(sweep_module, "_run_one", counted)
    cfg = configlib.resolve(SweepConfig, "sweep", None, [*FAST, "iterations=3"])
    sweep = Sweep(cfg, str(model_dir), tmp_path)
    real_suggest, given = sweep.carbs.suggest, []

    def suggest_the_first_again():
        out = real_suggest()
        if len(given) == 2:  # the third suggestion: the first one's values, under its own uuid
            out.suggestion.update({k: given[0][k] for k in sweep_module.SEARCHED})
        given.append(dict(out.suggestion))
        return out

    monkeypatch.setattr(sweep.carbs, "suggest", suggest_the_first_again)
    sweep.run(progress=False)
    rows = sweep.results
    assert len(runs) == 2 and len(rows) == 3  # three observations, two pruning runs
    assert rows[2]["repeat_of"] == 0 and "repeat_of" not in rows[0] and rows[2]["seconds"] == 0.0
    for key in ("failed", "objective", "num_nodes", "num_edges", "val_loss", "carbs_output"):
        assert rows[2][key] == rows[0][key], key
    assert sweep.carbs.observation_count == 3  # CARBS saw all three
    # what justifies it: the same settings pruned again give exactly the same circuit
    again = real_run_one(runs[0], str(tmp_path / "again"))["circuit"]
    assert again["num_nodes"] == rows[0]["num_nodes"] and again["num_edges"] == rows[0]["num_edges"]
    from pruning.circuit import validation_loss
    assert validation_loss(again) == rows[0]["val_loss"]
    # a resumed sweep answers from the rows it reloads (the state holds the twin)
    resumed = Sweep(cfg, str(model_dir), tmp_path)
    assert resumed._finished_twin(given[0])["iteration"] == 0
