"""``sparse-lm sweep``: CARBS over pruning runs, resumable state, best circuit written as by prune."""

from __future__ import annotations

import json

import pytest
import torch

from pruning.sweep import STATE_FILE, Sweep, SweepConfig, search_space
from sparse_lm import config as configlib
from sparse_lm.cli import main
from sparse_lm.model import SparseGPT, SparseGPTConfig
from sparse_lm.tokenizer import load_tokenizer

FAST = ["prune.steps=15", "prune.n_train=64", "prune.n_val=32", "prune.n_test=32", "prune.mean_blocks=4",
        "prune.relative_margin=0.05", "prune.snippets=1", "prune.task=single_double_quote"]


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
    circuit = json.loads((out / "circuit.json").read_text())
    assert circuit["num_nodes"] == min(r["num_nodes"] for r in ok)
    assert (out / "circuit.html").exists() and (out / "config.json").exists()
    assert (out / "sweep.png").stat().st_size > 5000


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
