"""Closing-quote examples from real .py files (tasks/real_code.py) and their evaluation."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
from test_intervene_planted import planted  # noqa: F401  (the planted bridge fixture)

from tasks import evaluate_task, resolve_task
from tasks.registry import get_task
from tasks.real_code import (
    CODE_TASK_NAME,
    code_quote_examples,
    code_quote_task,
    file_split,
    python_files,
    read_literals,
    sample_code_quotes,
)

SAMPLE = """\
import os


def greet(name):
    x = 'hello'
    y = "world"
    print('merged')
    z = "it's"
    q = 'say "hi"'
    w = f'skip {x}'
    v = '''triple'''
    e = ''
    r = r'raw'
    return x  # 'not a literal'
"""


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    root = tmp_path / "code"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "sample.py").write_text(SAMPLE, encoding="utf-8")
    return root


def test_literals_of_a_file_have_the_right_target_family_and_prompt(code_dir: Path):
    literals, too_long = read_literals(code_dir / "pkg" / "sample.py")
    assert too_long == 0
    got = [(lit.prompt.rsplit("\n", 1)[-1], lit.family, lit.continuation) for lit in literals]
    assert got == [
        ("    x = 'hello", 0, "'\n"),
        ('    y = "world', 1, '"\n'),
        ("    print('merged", 0, "')\n"),
        ('    z = "it\'s', 1, '"\n'),  # the other quote inside: kept, the model must still close with "
        ("    q = 'say \"hi\"", 0, "'\n"),
    ]  # no f-string, triple-quoted, empty, r-prefixed literal, nor the one in a comment
    # The prompt is the source from a line start up to the content: every earlier line is there.
    assert literals[0].prompt == SAMPLE[: SAMPLE.index("'hello") + len("'hello")]
    with_r, _ = read_literals(code_dir / "pkg" / "sample.py", prefixes="rb")
    assert [lit.prompt.rsplit("\n", 1)[-1] for lit in with_r][-1] == "    r = r'raw"


def test_examples_match_single_double_quote(code_dir: Path):
    examples = code_quote_examples(code_dir, n=4, split=file_split("pkg/sample.py"))
    assert [ex.family for ex in examples] == [0, 1, 0, 1]  # balanced, interleaved like Task.examples
    for ex in examples:
        assert (ex.target, ex.distractor) == (("'", '"') if ex.family == 0 else ('"', "'"))
        assert ex.continuation.startswith(ex.target)
        assert ex.prompt[-1] not in "'\"" or ex.prompt.endswith('"hi"')  # ends in content, not an opening quote
    # The file is in exactly one split: the others get nothing from it.
    others = [s for s in ("train", "val", "test") if s != file_split("pkg/sample.py")]
    assert all(code_quote_examples(code_dir, n=4, split=s) == [] for s in others)


def test_context_starts_at_a_line_boundary_and_long_lines_are_skipped(tmp_path: Path):
    lines = [f"a{i} = {i}\n" for i in range(20)] + ["s = 'short'\n", "t = '" + "x" * 80 + "'\n"]
    path = tmp_path / "long.py"
    path.write_text("".join(lines), encoding="utf-8")
    literals, too_long = read_literals(path, context_chars=40)
    assert too_long == 1  # the 80-character literal does not fit in 40 characters
    (lit,) = literals
    assert lit.prompt.endswith("s = 'short") and len(lit.prompt) <= 40
    start = "".join(lines).index(lit.prompt)
    assert start > 0 and "".join(lines)[start - 1] == "\n"  # starts at a line start, not mid-line


def _many_files(root: Path, count: int) -> None:
    for i in range(count):
        body = "".join(f"v{j} = 'f{i}s{j}'\nw{j} = \"f{i}d{j}\"\n" for j in range(3))
        (root / f"mod{i}.py").write_text(body, encoding="utf-8")
    (root / "latin1.py").write_bytes(b"x = '\xe9t\xe9'\n")  # not UTF-8
    (root / "broken.py").write_text("def f(:\n    return 'x'\n", encoding="utf-8")  # does not parse


def _file_of(prompt: str) -> str:
    """The file number a `_many_files` literal names (its content is f<file>s<j> or f<file>d<j>)."""
    found = re.search(r"f(\d+)[sd]\d+$", prompt)
    assert found, prompt[-30:]
    return found.group(1)


def test_split_by_file_and_unusable_files_are_counted(tmp_path: Path):
    _many_files(tmp_path, 60)
    files_of: dict[str, set[str]] = {}
    skipped = {"not_utf8": 0, "unparsable": 0}
    for split in ("train", "val", "test"):
        sample = sample_code_quotes(tmp_path, n=1000, split=split, max_per_file=10)
        files_of[split] = {_file_of(ex.prompt) for ex in sample.examples}
        skipped["not_utf8"] += sample.stats.skipped_not_utf8
        skipped["unparsable"] += sample.stats.skipped_unparsable
        assert sample.stats.files_total == 62
        # Every file of the split was read, and only those: each gave its 3 + 3 literals.
        expected = {f"{i}" for i in range(60) if file_split(f"mod{i}.py") == split}
        assert files_of[split] == expected
        assert sample.stats.examples_by_family == [3 * len(expected)] * 2
    assert skipped == {"not_utf8": 1, "unparsable": 1}  # each lies in exactly one split
    assert not (files_of["train"] & files_of["val"] or files_of["train"] & files_of["test"]
                or files_of["val"] & files_of["test"])
    assert all(files_of.values())  # 60 files: every split got some


def test_sampling_is_deterministic_balanced_and_capped_per_file(tmp_path: Path):
    _many_files(tmp_path, 60)
    first = code_quote_examples(tmp_path, n=10, split="train", seed=3, max_per_file=1)
    assert first == code_quote_examples(tmp_path, n=10, split="train", seed=3, max_per_file=1)
    assert first != code_quote_examples(tmp_path, n=10, split="train", seed=4, max_per_file=1)
    assert [ex.family for ex in first].count(0) == 5 and len({ex.prompt for ex in first}) == 10
    # max_per_file=1: no two examples of a family from one file (each literal names its file).
    files = [(ex.family, _file_of(ex.prompt)) for ex in first]
    assert len(set(files)) == len(files)


def test_identical_files_give_a_prompt_once(tmp_path: Path):
    # Two files of one split with the same text (a vendored copy): each prompt is used once.
    names = [f"copy{i}.py" for i in range(200) if file_split(f"copy{i}.py") == "test"][:2]
    for name in names:
        (tmp_path / name).write_text("a = 'one'\nb = \"two\"\n", encoding="utf-8")
    sample = sample_code_quotes(tmp_path, n=10, split="test")
    assert len(sample.examples) == 2 and sample.stats.duplicates == 2


def test_python_files_walks_a_folder_or_takes_a_list(code_dir: Path, tmp_path: Path):
    (code_dir / "__pycache__").mkdir()
    (code_dir / "__pycache__" / "cached.py").write_text("x = 'no'\n", encoding="utf-8")
    (code_dir / "notes.txt").write_text("x = 'no'\n", encoding="utf-8")
    root, files = python_files(code_dir)
    assert root == code_dir and [f.relative_to(code_dir).as_posix() for f in files] == ["pkg/sample.py"]
    root, files = python_files([code_dir / "pkg" / "sample.py"])
    assert files == [(code_dir / "pkg" / "sample.py").resolve()]
    with pytest.raises(FileNotFoundError, match="no folder or file"):
        python_files(tmp_path / "missing")


# -- with the project's byte-level BPE ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from sparse_lm.corpus import load_corpus
    from sparse_lm.tokenizer import train_tokenizer

    return train_tokenizer(load_corpus("stdlib", max_documents=60), vocab_size=512)


def test_contract_drops_a_quote_that_merges_with_a_parenthesis(code_dir: Path, tokenizer):
    merged = tokenizer("')", add_special_tokens=False)["input_ids"]
    assert len(merged) == 1, "precondition: this BPE has `')` as one token"
    split = file_split("pkg/sample.py")
    candidates = code_quote_examples(code_dir, n=6, split=split)
    assert any(ex.continuation.startswith("')") for ex in candidates)
    task = code_quote_task(code_dir)
    # Real code breaks the contract often (here also `'say "hi"`: the distractor would make `""`): allow any share.
    resolved = resolve_task(task, tokenizer, candidates, max_drop_fraction=1.0)
    assert resolved.dropped_by_family[0] >= 1
    assert not any(ex.continuation.startswith("')") for ex in resolved.examples)
    # With the tokenizer, sampling keeps only contract-abiding examples and counts the rest.
    sample = sample_code_quotes(code_dir, n=6, split=split, tokenizer=tokenizer)
    assert not any(ex.continuation.startswith("')") for ex in sample.examples)
    assert sample.stats.dropped_by_family[0] >= 1
    assert resolve_task(task, tokenizer, sample.examples).dropped == 0


@pytest.fixture(scope="module")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=256,
                        bos_token_id=eos, eos_token_id=eos)
    out = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_eval_on_real_code_with_a_tiny_model(tmp_path: Path, tokenizer, tiny_model_dir: Path, capsys):
    from argparse import Namespace

    from sparse_lm.loading import load_model_and_tokenizer
    from sparse_lm_app.cli import main
    from sparse_lm_app.commands.eval_tasks import code_rows, code_task

    _many_files(tmp_path, 60)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    args = Namespace(code=str(tmp_path), code_prefixes="", code_context=None)
    task = code_task(args, tok, model)
    whole = evaluate_task(model, tok, task, "train", n=40)
    assert whole["task"] == CODE_TASK_NAME and whole["examples"] == 40 and 0 <= whole["accuracy"] <= 1
    rows = code_rows(model, tok, task, "train", 40, 0, 16)
    assert [r["task"] for r in rows] == [CODE_TASK_NAME, f"{CODE_TASK_NAME}:'", f'{CODE_TASK_NAME}:"']
    assert [r["examples"] for r in rows] == [40, 20, 20]
    # The task loss averages per family, so the whole row is the mean of the family rows and equals evaluate_task.
    assert math.isclose(rows[0]["loss"], whole["loss"], rel_tol=1e-6)
    assert math.isclose(rows[0]["loss"], (rows[1]["loss"] + rows[2]["loss"]) / 2, rel_tol=1e-9)

    assert main(["eval-tasks", "--model", str(tiny_model_dir), "--code", str(tmp_path), "--split", "train",
                 "--n", "20"]) == 0
    out = capsys.readouterr().out
    assert "single_double_quote " in out and f"{CODE_TASK_NAME}:'" in out
    assert "skipped 1 not UTF-8" in out or "skipped 0 not UTF-8" in out


def test_family_copy_shares_the_sample(code_dir: Path):
    task = code_quote_task(code_dir)
    split = file_split("pkg/sample.py")
    both = task.examples(split, 4)
    only = dataclasses.replace(task, family=1)
    assert only.examples(split, 4) == [ex for ex in both if ex.family == 1]
    assert only.samples is task.samples


def test_circuit_eval_scores_a_saved_circuit_on_real_code(tmp_path: Path, tokenizer, tiny_model_dir: Path, capsys):
    import json

    import torch

    from pruning.graph import NodeIndex
    from sparse_lm.loading import load_model_and_tokenizer, model_fingerprint
    from sparse_lm_app.cli import main

    code = tmp_path / "code"
    code.mkdir()
    _many_files(code, 60)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    sites = ["attn.resid_delta", "mlp.resid_delta"]
    index = NodeIndex.build(model, sites)
    torch.manual_seed(1)
    keep = sorted(torch.randperm(index.total)[: index.total // 2].tolist())
    nodes = []
    for i in keep:
        site, channel = index.node(i)
        nodes.append({"id": i, "site": site.name, "channel": channel})
    circuit = {"task": "single_double_quote", "model": str(tiny_model_dir), "node_sites": index.names,
               "nodes": nodes, "calibration": {"scale": 1.0, "shift": 0.0},
               "model_fingerprint": model_fingerprint(model),
               "hyperparameters": {"mean_blocks": 4, "device": "cpu", "precision": "fp32",
                                   "cache_dir": str(tmp_path / "cache")}}
    folder = tmp_path / "circ"
    folder.mkdir()
    (folder / "circuit.json").write_text(json.dumps(circuit), encoding="utf-8")
    assert main(["circuit-eval", str(folder), "--code", str(code), "--split", "train", "--n", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    synthetic, real = out["rows"]
    assert real["prompts"].startswith(CODE_TASK_NAME) and real["examples"] == 20
    # The full-model column is the evaluation path's own number on the same examples.
    from argparse import Namespace

    from sparse_lm_app.commands.eval_tasks import code_task

    task = code_task(Namespace(code=str(code), code_prefixes="", code_context=None), tok, model)
    assert math.isclose(real["full_loss"], evaluate_task(model, tok, task, "train", n=20)["loss"], rel_tol=1e-4)
    # Half the nodes mean-ablated changes the answer; the circuit and its complement differ.
    assert real["circuit_loss"] != real["full_loss"] and real["circuit_loss"] != real["ablated_loss"]
    assert synthetic["examples"] > 0
    # A node id that does not match its site is refused (a circuit of other node sites).
    circuit["nodes"][0]["channel"] += 1
    (folder / "circuit.json").write_text(json.dumps(circuit), encoding="utf-8")
    assert main(["circuit-eval", str(folder), "--split", "train", "--n", "8"]) == 1
    assert "node index" in capsys.readouterr().err


def test_intervention_measures_on_the_eval_task_and_selects_on_the_synthetic_one(planted):  # noqa: F811
    from test_intervene_planted import ALPHAS, TASK, _circuit

    from bridges.intervene import intervene
    from tasks.task import Task

    pair, tok, _ = planted
    # The same decision written differently: selection must not read it, measurement must.
    other = Task(name="planted@other", description="", completion_options=TASK.completion_options,
                 generator=lambda rng, f: f"value_{rng.randint(0, 99999)} = {'x' if f == 0 else 'y'}")
    r = intervene(pair, tok, TASK, _circuit(pair.sparse), alphas=ALPHAS, n_channels=8, n_controls=4,
                  n_examples=32, split="train", select_split="train", eval_task=other)
    assert r["eval_task"] == "planted@other" and r["task"] == "planted"
    assert r["selected_on_evaluation_data"] is False  # same split name, different prompts
    assert r["examples"] == 32 and r["sign_ok"]
    same = intervene(pair, tok, TASK, _circuit(pair.sparse), alphas=ALPHAS, n_channels=8, n_controls=4,
                     n_examples=32, split="train", select_split="train")
    assert same["selected_on_evaluation_data"] is True
    assert same["channel"] == r["channel"]  # chosen on the same (synthetic train) prompts either way


def test_real_literals_ask_the_synthetic_tasks_question_for_each_split(code_dir: Path, stdlib_tokenizers):
    # The paper's split writes a line-ending closing quote as `'\n`: the real-code pair follows the synthetic
    # task's, so only literals that end their line are scored there; GPT-2's split scores the bare quote.
    from tasks.real_code import LINE_END_QUOTES, QUOTES, code_quote_pair

    split = file_split("pkg/sample.py")
    for pretokenizer, pair in (("tinypython", LINE_END_QUOTES), ("gpt2", QUOTES)):
        tok = stdlib_tokenizers[pretokenizer]
        assert code_quote_pair(tok) == pair == resolve_task(get_task("single_double_quote"), tok).completions
        sample = sample_code_quotes(code_dir, n=6, split=split, tokenizer=tok)
        assert sample.examples and all(ex.target == pair[ex.family] for ex in sample.examples)
        assert all(ex.continuation.startswith(ex.target) for ex in sample.examples)
        task = code_quote_task(code_dir, tokenizer=tok)
        assert task.completion_options == (pair,)
        assert resolve_task(task, tok, sample.examples).dropped == 0
    assert code_quote_pair(None) == QUOTES
