"""The main job at toy size (`--quick`), end to end, and a second run that redoes nothing."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, subprocess_env


@pytest.mark.slow
def test_quick_main_job_end_to_end_and_resume(tmp_path):
    cmd = [PYTHON, "-m", "sparse_lm_app.main_job", "--quick", "--out", str(tmp_path)]
    res = subprocess.run(cmd, env=subprocess_env(OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=1800,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    run = tmp_path / "quick"
    assert "estimated time" in res.stdout and "ETA" in res.stdout
    for stage in ("data", "sparse", "dense", "eval", "prune", "bridge", "report"):
        assert (run / "stages" / f"{stage}.json").exists(), stage
    sparse = json.loads((run / "stages" / "sparse.json").read_text())
    # the main job saved every stage's resolved config before it launched anything
    target = json.loads((run / "configs" / "sparse.json").read_text())["sparsity"]["target_fraction"]
    assert sparse["world_size"] == 2 and sparse["kept_fraction_blocks"] == pytest.approx(target, abs=1e-3)
    assert sparse["val_loss"] < json.loads((run / "stages" / "data.json").read_text())["unigram_entropy_nats"] + 0.5
    ev = json.loads((run / "stages" / "eval.json").read_text())
    assert {r["task"] for r in ev["sparse"]} >= {"single_double_quote", "set_or_string"}
    # --quick prunes every task in both models, at a tight target over the toy models' own loss
    prune = json.loads((run / "stages" / "prune.json").read_text())
    assert len(prune["circuits"]) == 12
    found = [c for c in prune["circuits"] if not c["failed"]]
    assert found, [c["reason"] for c in prune["circuits"]]
    for c in found:
        circuit = json.loads((Path(c["circuit_dir"]) / "circuit.json").read_text())
        assert circuit["num_nodes"] == c["nodes"] and circuit["target_loss"] == pytest.approx(c["target_loss"])
        assert (Path(c["circuit_dir"]) / "circuit.html").exists()
    bridge = json.loads((run / "stages" / "bridge.json").read_text())
    assert (run / "bridge" / "summary.json").exists() and bridge["losses"]
    # the sparse model trained on with its bridges; the gate is reported either way (20 toy steps do not pass it)
    assert bridge["mode"] == "finetune" and set(bridge["gate"]) >= {"passed", "kl_d2s", "kl_s2d", "kl_no_bridge"}
    assert bridge["circuit"].get("model_dir", "").endswith("sparse_model") or bridge["circuit"]["failed"]
    report = (run / "report.html").read_text()
    assert "Tasks" in report and "Circuits" in report and "Bridge" in report and "data:image/png;base64" in report
    assert (run / "report.md").exists()
    def no_nan(const):  # results.json is strict JSON: missing numbers are absent, never NaN
        raise AssertionError(f"{const} in results.json")

    results = json.loads((run / "results.json").read_text(), parse_constant=no_nan)
    assert results["format"] == "sparse-lm-results/1" and results["preset"] == "debug"
    assert set(results["stages"]) == {"data", "sparse", "dense", "eval", "prune", "bridge", "report"}
    assert results["models"]["sparse"]["tasks"]["single_double_quote"]["split"] == "test"
    assert len(results["circuits"]) == 12 and "kl_d2s" in results["bridge"]
    # the dense circuits come from the dense snapshot (or final model) closest to the sparse model's val loss
    assert list((run / "dense" / "snapshots").glob("step*/model.safetensors"))
    assert prune["equal_loss"]["candidates"] == 2
    assert results["models"]["dense"]["pruned_checkpoint"]["path"] == prune["equal_loss"]["path"]
    assert all(c["tuned_by"] == "carbs" and c["sweep_iterations"] == 2
               for c in results["circuits"] if c["method"] == "learned" and not c["failed"])
    assert "random_control" in results
    # accuracy against training tokens: the circuit tasks on every snapshot of each run (debug presets: steps 10, 20,
    # 30) and on the final model, whose point is the eval table's row
    for key in ("sparse", "dense"):
        m = results["models"][key]
        snaps = sorted(int(d.name[len("step"):]) for d in (run / key / "snapshots").glob("step*")
                       if (d / "config.json").exists())
        assert len(snaps) >= 2, (key, snaps)
        assert [pt["step"] for pt in m["curve"]] == [*snaps, m["steps"]] and m["curve_split"] == "test"
        assert all(pt["tokens"] == pt["step"] * m["tokens_per_step"] for pt in m["curve"])
        # the three circuit tasks, less one the tokenizer cannot express (the debug BPE has no `]]` token for
        # bracket_counting: its table row is NaN, so it is absent from results.json's tasks and from every point)
        scored = {"single_double_quote", "bracket_counting", "set_or_string"} & set(m["tasks"])
        assert scored >= {"single_double_quote", "set_or_string"}, m["tasks"]
        for pt in m["curve"]:
            assert set(pt["tasks"]) == scored, pt
            assert all(0.0 <= v["accuracy"] <= 1.0 and v["loss"] > 0 for v in pt["tasks"].values()), pt
        assert "val_loss" in m["curve"][-1] and "val_loss" in next(pt for pt in m["curve"] if pt["step"] == 20)
        final = m["curve"][-1]["tasks"]["single_double_quote"]
        assert final["accuracy"] == m["tasks"]["single_double_quote"]["accuracy"]
        assert ev["curves"][key] == m["curve"]
    assert ev["curve_split"] == "test"
    assert (run / "task_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "](task_curves.png)" in (run / "report.md").read_text() and 'alt="task_curves"' in report

    t0 = time.perf_counter()
    again = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[done] sparse" in again.stdout and "== stage sparse" not in again.stdout
    assert time.perf_counter() - t0 < 120  # nothing retrained

    # --redo bridge: the bridge and its intervention again (old outputs kept aside); models, eval and circuits kept.
    # (Which stages a redo implies is tested on its own in test_redoing_a_stage_redoes_the_stages_that_read_it.)
    redo = subprocess.run([*cmd, "--redo", "bridge"], env=subprocess_env(), capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert redo.returncode == 0, redo.stdout[-3000:] + redo.stderr[-3000:]
    assert "== stage bridge" in redo.stdout
    assert "== stage sparse" not in redo.stdout and "== stage prune" not in redo.stdout
    kept = list(run.glob("bridge.before-*"))
    assert len(kept) == 1 and (kept[0] / "summary.json").exists() and (run / "bridge" / "summary.json").exists()


def test_common_target_is_the_papers_unless_a_model_misses_it():
    from sparse_lm_app.main_job.stages import common_target

    assert common_target({"sparse": {"loss": 0.05}, "dense": {"loss": 0.09}})[0] == 0.15
    target, why = common_target({"sparse": {"loss": 0.05}, "dense": {"loss": 0.3}})
    assert target == pytest.approx(0.35) and "0.300" in why
    assert common_target({"sparse": {"loss": 0.12}}, margin=0.01)[0] == 0.15


def test_a_model_near_chance_loss_gets_no_circuit_target():
    from sparse_lm_app.main_job.stages import CHANCE_LOSS, has_room

    # the tinypy run's bracket_counting: accuracy 0.65 passes the accuracy bar, but its loss 0.672 would put the
    # target at 0.722, above the 0.693 the empty circuit already gets
    assert not has_room(0.672)
    assert has_room(0.59) and not has_room(0.60)
    assert has_room(CHANCE_LOSS - 0.02, margin=0.01) and not has_room(CHANCE_LOSS - 0.019, margin=0.01)


def test_prune_summary_gives_geometric_mean_edge_ratios():
    from sparse_lm_app.main_job.stages import prune_summary

    def row(model, task, method, edges, failed=False):
        return {"model": model, "task": task, "method": method, "edges": edges, "failed": failed}

    rows = [row("sparse", "single_double_quote", "learned", 10), row("dense", "single_double_quote", "learned", 40),
            row("sparse", "bracket_counting", "learned", 20), row("dense", "bracket_counting", "learned", 20),
            row("sparse", "single_double_quote", "attribution", 30),
            row("dense", "set_or_string", "learned", 5), row("sparse", "set_or_string", "learned", 0, failed=True)]
    text = prune_summary(rows)
    assert "dense/sparse: 2.0x (geometric mean over 2 task(s))" in text  # sqrt(4 * 1)
    assert "attribution/learned (sparse): 3.0x (geometric mean over 1 task(s))" in text


def test_redoing_a_stage_redoes_the_stages_that_read_it():
    from sparse_lm_app.main_job.pipeline import stages_to_redo

    assert stages_to_redo({"sparse"}) == {"sparse", "eval", "prune", "bridge"}
    assert stages_to_redo({"prune"}) == {"prune", "bridge"}
    assert stages_to_redo({"data"}) == {"data", "sparse", "dense", "eval", "prune", "bridge"}
    assert stages_to_redo({"report"}) == {"report"} and stages_to_redo(set()) == set()
