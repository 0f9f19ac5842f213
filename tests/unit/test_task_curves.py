"""The main job's accuracy-vs-tokens curves (sparse_lm_app.main_job.curves) on tiny saved models."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_lm.model import SparseGPT, SparseGPTConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fake training run: snapshots at steps 10 and 20 (two tiny SparseGPTs of different weights), the final
    model of step 30, a metrics.jsonl with a validation loss at steps 20 and 30 only, and a stray unfinished
    export (no config.json) that must be ignored."""
    from sparse_lm.corpus import load_corpus
    from sparse_lm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("run")
    # a small BPE: it expresses single_double_quote and set_or_string, not bracket_counting
    tok = train_tokenizer(load_corpus("stdlib", max_documents=60), vocab_size=512)
    for seed, folder in ((1, "snapshots/step0000010"), (2, "snapshots/step0000020"), (3, "model")):
        torch.manual_seed(seed)
        model = SparseGPT(SparseGPTConfig(vocab_size=len(tok), block_size=512, n_layer=1, n_head=2, d_head=8,
                                          d_model=16, d_mlp=32))
        model.save_pretrained(root / folder)
        tok.save_pretrained(root / folder)
    (root / "snapshots" / "step0000025").mkdir()
    rows = [{"step": 10, "loss": 7.0}, {"step": 20, "loss": 6.0, "val_loss": 6.5},
            {"step": 30, "loss": 5.0, "val_loss": 5.5}]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_curve_scores_every_snapshot_in_step_order_and_reuses_the_final_rows(run):
    from sparse_lm.loading import load_model_and_tokenizer
    from sparse_lm_app.main_job.curves import CURVE_TASKS, build_curve
    from tasks import evaluate_task, evaluate_tasks_or_report

    model, tok = load_model_and_tokenizer(run / "model")
    final_rows = evaluate_tasks_or_report(model, tok, list(CURVE_TASKS), split="test", n=32)
    assert not all(r["accuracy"] == r["accuracy"] for r in final_rows)  # bracket_counting: NaN (not expressible)
    # numbers the final model cannot give: the final point must be these rows, not a second scoring
    for r in final_rows:
        if r["task"] == "set_or_string":
            r["accuracy"], r["loss"] = 0.25, 0.75
    lines: list[str] = []
    curve = build_curve(run, 30, final_rows, tokens_per_step=1024, n=32, log=lines.append)

    assert [pt["step"] for pt in curve] == [10, 20, 30]
    assert [pt["tokens"] for pt in curve] == [10 * 1024, 20 * 1024, 30 * 1024]
    assert "val_loss" not in curve[0] and curve[1]["val_loss"] == 6.5 and curve[2]["val_loss"] == 5.5
    for pt in curve:
        assert list(pt["tasks"]) == ["single_double_quote", "set_or_string"]  # the tokenizer cannot express the other
        assert all(0.0 <= v["accuracy"] <= 1.0 and v["loss"] > 0 for v in pt["tasks"].values())
    assert {k: curve[2]["tasks"]["set_or_string"][k] for k in ("accuracy", "loss")} == {"accuracy": 0.25, "loss": 0.75}
    # a snapshot's point is exactly what the task table's scoring gives on that folder
    snap, snap_tok = load_model_and_tokenizer(run / "snapshots" / "step0000020")
    direct = evaluate_task(snap, snap_tok, "single_double_quote", split="test", n=32)
    assert curve[1]["tasks"]["single_double_quote"] == {"accuracy": direct["accuracy"], "loss": direct["loss"],
                                                         "auc": direct["auc"]}
    assert curve[0]["tasks"] != curve[1]["tasks"]  # two different models were scored
    assert len(lines) == 2 and "step 10" in lines[0] and "step 20" in lines[1]


def test_no_snapshots_no_curve_and_the_plot(run, tmp_path):
    from sparse_lm_app.main_job.curves import build_curve, plot_task_curves

    rows = [{"task": "single_double_quote", "accuracy": 0.5, "loss": 0.7}]
    assert build_curve(tmp_path, 30, rows, tokens_per_step=8, n=4, log=None) == []
    # snapshots at or after the final step (an earlier, longer run's) are not part of this run's curve
    assert build_curve(run, 10, rows, tokens_per_step=8, n=4, log=None) == []
    curve = [{"step": s, "tokens": 8 * s, "tasks": {"single_double_quote": {"accuracy": a, "loss": 0.6}}}
             for s, a in ((10, 0.5), (20, 0.7))]
    png = plot_task_curves({"sparse": curve, "dense": curve[:1]}, tmp_path / "task_curves.png", n=4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_the_tables_rows_the_final_model_is_scored_like_a_snapshot(run):
    """A curve counts the same prompts at every point: with the table scored on more prompts (final_rows None),
    the final model is scored at the curve's n, exactly as evaluate_task gives it."""
    from sparse_lm.loading import load_model_and_tokenizer
    from sparse_lm_app.main_job.curves import build_curve
    from tasks import evaluate_task

    with pytest.raises(ValueError, match="final_dir"):
        build_curve(run, 30, None, tokens_per_step=8, n=16, log=None)
    curve = build_curve(run, 30, None, tokens_per_step=8, n=16, log=None, final_dir=run / "model")
    assert [pt["step"] for pt in curve] == [10, 20, 30]
    model, tok = load_model_and_tokenizer(run / "model")
    direct = evaluate_task(model, tok, "set_or_string", split="test", n=16)
    assert curve[-1]["tasks"]["set_or_string"] == {"accuracy": direct["accuracy"], "loss": direct["loss"],
                                                   "auc": direct["auc"]}
    assert "bracket_counting" not in curve[-1]["tasks"]  # not expressible: absent, as from the table's rows
