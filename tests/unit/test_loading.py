"""sparse_lm.loading refuses a model whose files disagree, instead of loading random weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sparse_lm.loading import check_tokenizer_fits, load_causal_lm
from sparse_lm.model import SparseGPT, SparseGPTConfig


class FakeTokenizer:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    SparseGPT(SparseGPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, d_head=8, d_model=16,
                              d_mlp=32)).save_pretrained(root / "sparse")
    GPT2LMHeadModel(GPT2Config(vocab_size=320, n_layer=2, n_embd=16, n_head=2, n_positions=32, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(root / "gpt2")
    return root


def _edited(folders, tmp_path, name, **changes):
    d = tmp_path / f"{name}-{'-'.join(f'{k}{v}' for k, v in changes.items())}"
    shutil.copytree(folders / name, d)
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_exact_models_load(folders):
    for name in ("sparse", "gpt2"):
        model = load_causal_lm(folders / name)
        assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", ["sparse", "gpt2"])
def test_layer_count_disagreeing_with_the_weights_is_an_error(folders, tmp_path, name):
    with pytest.raises(ValueError, match="missing from the weights"):
        load_causal_lm(_edited(folders, tmp_path, name, n_layer=3))
    with pytest.raises(ValueError, match="in the weights but not in the model config"):
        load_causal_lm(_edited(folders, tmp_path, name, n_layer=1))


def test_damaged_files_are_errors_that_name_them(folders, tmp_path):
    d = tmp_path / "truncated"
    shutil.copytree(folders / "sparse", d)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500])
    with pytest.raises(ValueError, match="damaged or truncated"):
        load_causal_lm(d)
    (d / "config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not a readable JSON model config"):
        load_causal_lm(d)
    (d / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no model_type"):
        load_causal_lm(d)


def test_tokenizer_must_match_the_embedding(folders):
    sparse = load_causal_lm(folders / "sparse")  # 300 rows
    check_tokenizer_fits(sparse, FakeTokenizer(300))
    for n in (299, 301, 512):  # our models size the embedding from the tokenizer: exact
        with pytest.raises(ValueError, match="not the one the model was trained with"):
            check_tokenizer_fits(sparse, FakeTokenizer(n))
    gpt2 = load_causal_lm(folders / "gpt2")  # 320 rows
    check_tokenizer_fits(gpt2, FakeTokenizer(320))
    check_tokenizer_fits(gpt2, FakeTokenizer(317))  # padding of a few rows, as many hub models have
    for n in (321, 200):
        with pytest.raises(ValueError, match="320 rows"):
            check_tokenizer_fits(gpt2, FakeTokenizer(n))
