"""Typed configs: presets, overrides, unknown keys and wrong types are errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparse_lm import config as configlib
from sparse_lm.jobs import DenseConfig, PretrainConfig


def test_every_preset_resolves():
    for job, cls in (("pretrain", PretrainConfig), ("dense", DenseConfig)):
        names = configlib.list_presets(job)
        assert names, job
        for name in names:
            cfg = configlib.resolve(cls, job, name)
            assert cfg.train.global_batch % cfg.train.micro_batch == 0


def test_paper_1x_preset_is_the_paper_shape():
    cfg = configlib.resolve(PretrainConfig, "pretrain", "paper-1x")
    m = cfg.model
    assert (m.n_layer, m.d_model, m.n_head, m.d_head, m.d_mlp, m.afrac) == (8, 256, 16, 16, 1024, 0.25)
    assert (cfg.data.block_size, cfg.data.vocab_size) == (256, 2048)
    assert cfg.optim.eps == 0.1


def test_overrides_are_typed():
    cfg = configlib.resolve(PretrainConfig, "pretrain", "tiny",
                            ["train.steps=7", "optim.lr=0.5", "model.afrac=null", "model.afrac_loctypes=attn_in,mlp_in"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.5 and cfg.model.afrac is None
    assert cfg.model.afrac_loctypes == ["attn_in", "mlp_in"]


@pytest.mark.parametrize("override, message", [
    ("model.foo=1", r"unknown config key model\.foo; known keys of model\.: activation_type"),
    ("trian.steps=3", r"unknown config key trian"),
    ("train.steps=abc", r"train\.steps: expected an integer, got 'abc'"),
    ("train.precision=fp8", r"train\.precision: 'fp8' is not one of 'fp32', 'bf16', 'bf16-autocast'"),
    ("train.global_batch=33", r"not a multiple of train\.micro_batch"),
    ("sparsity.target_fraction=2", r"sparsity\.target_fraction must be in \(0, 1\]"),
    ("steps", r"is not of the form key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):  # ConfigError is a ValueError
        configlib.resolve(PretrainConfig, "pretrain", "tiny", [override])


def test_wrong_job_preset_and_missing_preset():
    with pytest.raises(configlib.ConfigError, match="is a 'dense' preset"):
        configlib.resolve(PretrainConfig, "pretrain", "tiny-dense")
    with pytest.raises(configlib.ConfigError, match="no preset 'nope'"):
        configlib.resolve(PretrainConfig, "pretrain", "nope")


def test_saved_config_round_trips(tmp_path):
    cfg = configlib.resolve(PretrainConfig, "pretrain", "tiny", ["train.steps=9"])
    configlib.save(cfg, tmp_path / "config.json", job="pretrain")
    assert json.loads((tmp_path / "config.json").read_text())["job"] == "pretrain"
    assert configlib.load(PretrainConfig, tmp_path / "config.json") == cfg
    assert "train.steps = 9" in configlib.describe(cfg)


# -- one schema for the architecture -------------------------------------------------------------


def test_sparse_model_section_is_sparsegptconfig_schema():
    """Same keyword names and defaults: a knob of the model is a knob of the job config, and back."""
    import dataclasses
    import inspect

    from sparse_lm.jobs import SparseModelSection
    from sparse_lm.model import SparseGPTConfig

    params = {k: p.default for k, p in inspect.signature(SparseGPTConfig.__init__).parameters.items()
              if k not in ("self", "kwargs", "vocab_size")}  # vocab_size: the tokenizer's
    section = SparseModelSection()
    assert {f.name for f in dataclasses.fields(section)} == set(params)
    for name, default in params.items():
        value = getattr(section, name)
        if name == "block_size":  # None: derived from data.block_size
            assert value is None
        elif name == "afrac_loctypes":
            assert ",".join(value) == default
        else:
            assert value == default, name


def test_dense_model_section_keys_are_gpt2config_keywords():
    import dataclasses

    from transformers import GPT2Config

    from sparse_lm.jobs import DenseModelSection

    reference = GPT2Config()
    for f in dataclasses.fields(DenseModelSection):
        assert hasattr(reference, f.name), f.name
        if f.name not in ("n_positions", "tie_word_embeddings", "n_layer", "n_embd", "n_head"):
            assert getattr(DenseModelSection(), f.name) == getattr(reference, f.name), f.name


def test_model_configs_of_the_presets_are_unchanged():
    """The models the presets built before the sections took the model configs' names."""
    from sparse_lm.jobs import DenseConfig, dense_model_config, sparse_model_config

    tiny = sparse_model_config(configlib.resolve(PretrainConfig, "pretrain", "tiny"), 2048)
    expected = dict(vocab_size=2048, block_size=1024, n_layer=4, n_head=8, d_head=32, d_model=256, d_mlp=1024,
                    bias=True, ln_bias=False, rms_norm=True, activation_type="gelu",
                    residual_activation_type="identity", afrac=0.25,
                    afrac_loctypes="attn_in,attn_q,attn_k,attn_v,attn_out,mlp_in,mlp_neuron,mlp_out", sink=True,
                    enable_bigram_table=True, learnable_bigram_table=True, tied_unembed=False)
    assert {k: getattr(tiny, k) for k in expected} == expected
    paper = sparse_model_config(configlib.resolve(PretrainConfig, "pretrain", "paper-1x"), 2048)
    assert (paper.n_head, paper.d_head, paper.sink, paper.enable_bigram_table) == (16, 16, True, True)
    dense = dense_model_config(configlib.resolve(DenseConfig, "dense", "tiny-dense"), 2048)
    assert (dense.n_layer, dense.n_embd, dense.n_head, dense.n_inner, dense.n_positions) == (4, 256, 8, 1024, 1024)
    assert (dense.activation_function, dense.tie_word_embeddings, dense.resid_pdrop) == ("gelu_new", False, 0.0)


def test_every_forward_knob_reaches_the_model():
    from sparse_lm.jobs import sparse_model_config

    cfg = configlib.resolve(PretrainConfig, "pretrain", "debug", [
        "model.rms_norm=false", "model.ln_bias=true", "model.residual_activation_type=relu",
        "model.learnable_bigram_table=false", "model.block_size=512", "model.sink=false"])
    m = sparse_model_config(cfg, 100)
    assert (m.rms_norm, m.ln_bias, m.residual_activation_type, m.learnable_bigram_table, m.block_size, m.sink) == (
        False, True, "relu", False, 512, False)


def test_old_key_name_is_an_error_in_overrides_and_read_in_saved_configs(tmp_path):
    with pytest.raises(configlib.ConfigError, match=r"model\.bigram_table -> model\.enable_bigram_table"):
        configlib.resolve(PretrainConfig, "pretrain", "tiny", ["model.bigram_table=false"])
    data = configlib.to_dict(configlib.resolve(PretrainConfig, "pretrain", "tiny"))
    data["model"]["bigram_table"] = False
    del data["model"]["enable_bigram_table"]
    (tmp_path / "config.json").write_text(json.dumps({"job": "pretrain", **data}))
    with pytest.warns(DeprecationWarning, match="old key names"):
        cfg = configlib.load(PretrainConfig, tmp_path / "config.json")
    assert cfg.model.enable_bigram_table is False


# -- presets are package data ---------------------------------------------------------------------


def test_presets_live_in_the_package():
    import sparse_lm

    assert configlib.PRESET_DIR.parent == Path(sparse_lm.__file__).parent
    assert {"tiny", "paper-1x", "debug"} <= set(configlib.list_presets("pretrain"))
    assert {"tiny-dense", "debug-dense"} <= set(configlib.list_presets("dense"))
    assert "bridge-debug" in configlib.list_presets("bridge")
    assert "prune-debug" in configlib.list_presets("prune")


def test_debug_presets_are_the_former_quick_sizes():
    cfg = configlib.resolve(PretrainConfig, "pretrain", "debug")
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.d_model, m.d_mlp, m.n_head, cfg.data.block_size) == (2, 64, 256, 4, 128)
    assert (t.steps, t.eval_every, t.checkpoint_every, t.log_every, t.global_batch, t.micro_batch) == (
        40, 20, 20, 5, 8, 4)
    dense = configlib.resolve(DenseConfig, "dense", "debug-dense")
    assert (dense.model.n_layer, dense.model.n_embd, dense.model.n_inner, dense.model.n_head) == (2, 64, 256, 4)
    assert (dense.train.steps, dense.train.global_batch, dense.data.block_size) == (40, 8, 128)
    from bridges.config import BridgeConfig
    from pruning.config import PruneConfig

    bridge = configlib.resolve(BridgeConfig, "bridge", "bridge-debug")
    t = bridge.train
    assert (t.steps, t.eval_every, t.checkpoint_every, t.eval_batches, t.micro_batch, t.global_batch) == (
        20, 10, 10, 2, 4, 8)
    # the toy bridge runs in the main job's mode: the trained sparse model trains on with its bridges (its LM loss on)
    assert bridge.data.block_size == 128 and bridge.bridge.lm == 1.0 and bridge.bridge.train_sparse
    prune = configlib.resolve(PruneConfig, "prune", "prune-debug")
    assert (prune.steps, prune.n_train, prune.n_val, prune.n_test, prune.mean_blocks) == (40, 128, 64, 64, 8)
    assert prune.min_accuracy == 0.0  # toy models sit at chance: prune them anyway
