"""``sparse-lm eval-tasks`` on sparse and dense models saved with their tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sparse_lm_app.cli import main
from sparse_lm.model import SparseGPT, SparseGPTConfig
from sparse_lm.tokenizer import load_tokenizer
from tasks import evaluate_task


@pytest.fixture(scope="module")
def models(small_data, tmp_path_factory):
    tok = load_tokenizer(small_data / "tokenizer")
    out = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    sparse = SparseGPT(SparseGPTConfig(vocab_size=len(tok), block_size=512, n_layer=1, n_head=2, d_head=8,
                                       d_model=16, d_mlp=32))
    dense = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=16, n_layer=1, n_head=2))
    for name, m in (("sparse", sparse), ("dense", dense)):
        m.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    return out, tok


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_eval_tasks_cli_json_matches_the_library(models, kind, capsys):
    out, tok = models
    rc = main(["eval-tasks", "--model", str(out / kind), "--task", "single_double_quote", "--n", "32", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in rows] == ["single_double_quote"]
    assert rows[0]["examples"] + rows[0]["dropped"] == 32
    from sparse_lm.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(out / kind)
    with torch.no_grad():
        ref = evaluate_task(model, tok, "single_double_quote", "test", n=32)
    assert rows[0]["loss"] == pytest.approx(ref["loss"]) and rows[0]["accuracy"] == pytest.approx(ref["accuracy"])


def test_eval_tasks_table_reports_a_task_the_tokenizer_cannot_express(models, tmp_path, capsys):
    out, _ = models
    rows = [{"prompt": f"x{i} = ", "target": "zqxjkv_unlikely" if i % 2 else "qqq_wrong", "distractor":
             "qqq_wrong" if i % 2 else "zqxjkv_unlikely"} for i in range(20)]
    bad = tmp_path / "bad_task.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["eval-tasks", "--model", str(out / "sparse"), "--task", "single_double_quote", str(bad), "--n", "16"])
    assert rc == 1  # a requested result was not produced: not a success, though the table is still printed
    captured = capsys.readouterr()
    assert "1 of 2 task(s) could not be evaluated: bad_task" in captured.err
    table = captured.out
    lines = table.splitlines()
    assert lines[0].split()[-1] == "error"
    assert lines[2].startswith("single_double_quote") and lines[3].startswith("bad_task")
    assert "zqxjkv_unlikely" in lines[3]  # the error names the completion that is not one token


def test_eval_tasks_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["eval-tasks", "--model", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
