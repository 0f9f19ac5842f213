"""`logits_to_keep`: SparseGPT's argument, and `task_logits_last` unembedding only the last positions."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from sparse_lm.model import SparseGPT, SparseGPTConfig
from tasks import loss
from tasks.loss import _KEEP_MODE, task_logits_last

VOCAB = 97
# Right-padded rows: distinct lengths, one repeated (two rows read the same kept column), one of length 1.
LENGTHS = torch.tensor([7, 3, 12, 7, 1, 10])


def sparse_gpt() -> SparseGPT:
    torch.manual_seed(0)
    cfg = SparseGPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, d_head=8, d_model=32, d_mlp=64,
                          sink=True, enable_bigram_table=True, afrac=0.5)
    model = SparseGPT(cfg).eval()
    with torch.no_grad():  # a bigram table and sink that matter: reading them at wrong positions shows
        for block in model.transformer.h:
            block.attn.sink_logit.normal_()
        model.bigram_table.normal_(std=1.0)
    return model


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32)).eval()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def padded_batch(pad: int = 0) -> torch.Tensor:
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), 14))  # (B, T): two columns past the longest prompt
    ids[torch.arange(14)[None, :] >= LENGTHS[:, None]] = pad
    return ids


def full_path(model, ids: torch.Tensor) -> torch.Tensor:
    """Today's reference: every position's logits, then each row's last one."""
    logits = model(input_ids=ids).logits  # (B, T, V)
    return logits[torch.arange(len(LENGTHS)), LENGTHS - 1]  # (B, V)


def record_logits_to_keep(model: nn.Module) -> list:
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("logits_to_keep")),
                                    with_kwargs=True)
    return seen


# What each model is asked for: SparseGPT takes 1-D positions (kept in every row); transformers 5.x
# models, whose forward slices with the shared helper, take (B, 1): each row only its last position.
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
DISTINCT_LAST = torch.tensor([0, 2, 6, 9, 11])  # sorted distinct LENGTHS - 1
ROW_LAST = (LENGTHS - 1)[:, None]  # (B, 1)


@pytest.mark.parametrize(("make", "mode"), [(sparse_gpt, "positions"), (gpt2, "positions"), (llama, "positions"),
                                            (gpt2, "rows"), (llama, "rows")],
                         ids=["sparse_gpt", "gpt2_positions", "llama_positions", "gpt2_rows", "llama_rows"])
def test_task_logits_last_keeps_only_last_positions_and_matches_full_logits(make, mode, monkeypatch):
    model = make()
    if mode == "rows" and not TRANSFORMERS_5:
        pytest.skip("transformers < 5 has no per-row logits_to_keep")
    monkeypatch.setitem(_KEEP_MODE, type(model), mode)  # the mode under test, whatever detection would say
    ids = padded_batch()
    with torch.no_grad():
        expected = full_path(model, ids)
        seen = record_logits_to_keep(model)
        got = task_logits_last(model, ids, LENGTHS)
    assert torch.equal(seen[0], ROW_LAST if mode == "rows" else DISTINCT_LAST)
    assert got.shape == (len(LENGTHS), VOCAB) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1])  # rows really read different positions


def test_the_keep_mode_is_detected_from_the_forward(monkeypatch):
    monkeypatch.setattr(loss, "_KEEP_MODE", {})  # detect afresh
    assert loss._logits_to_keep_mode(sparse_gpt()) == "positions"  # SparseGPT slices by itself
    for make in (gpt2, llama):
        assert loss._logits_to_keep_mode(make()) == ("rows" if TRANSFORMERS_5 else "positions")
    assert loss._logits_to_keep_mode(TupleWrapper(sparse_gpt())) is None
    assert loss._logits_to_keep_mode(KwargsWrapper(sparse_gpt())) is None
    assert loss._logits_to_keep_mode(lambda input_ids, logits_to_keep=0: None) == "positions"
    assert loss._logits_to_keep_mode(lambda input_ids: None) is None
    assert not loss._slices_rows(lambda hidden, keep: hidden[:, keep, :])  # a model's own slicing


def test_sparse_gpt_logits_to_keep_selects_positions_before_unembedding():
    model = sparse_gpt()
    ids = padded_batch(pad=5)
    with torch.no_grad():
        full = model(input_ids=ids).logits  # (B, T, V)
        positions = torch.tensor([9, 0, 4, 4])  # unsorted and repeated, as transformers allows
        kept = model(input_ids=ids, logits_to_keep=positions).logits
        last3 = model(input_ids=ids, logits_to_keep=3).logits
        everything = model(input_ids=ids, logits_to_keep=100).logits
        default = model(input_ids=ids, logits_to_keep=0).logits
    assert kept.shape == (len(LENGTHS), 4, VOCAB)
    torch.testing.assert_close(kept, full[:, positions], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last3, full[:, -3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(everything, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(default, full)  # the default is the unchanged full path, bit for bit


def test_sparse_gpt_sites_still_see_every_position():
    model = sparse_gpt()
    ids = padded_batch()
    with torch.no_grad(), model.sites.record(["final_resid", "1.mlp.post_act"]) as acts:
        model(input_ids=ids, logits_to_keep=torch.tensor([2]))
    assert acts["final_resid"].shape == (len(LENGTHS), 14, 32)
    assert acts["1.mlp.post_act"].shape == (len(LENGTHS), 14, 64)


def test_sparse_gpt_rejects_bad_logits_to_keep():
    model = sparse_gpt()
    ids = padded_batch()
    with pytest.raises(ValueError, match="labels need the logits of every position"):
        model(input_ids=ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="1-D integer positions"):
        model(input_ids=ids, logits_to_keep=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="1-D integer positions"):
        model(input_ids=ids, logits_to_keep=torch.ones(14, dtype=torch.bool))
    with pytest.raises(ValueError, match="int >= 0"):
        model(input_ids=ids, logits_to_keep=-1)
    loss = model(input_ids=ids, labels=ids).loss  # labels with the default still work
    assert loss is not None and torch.isfinite(loss)


class TupleWrapper(nn.Module):
    """A model without `logits_to_keep` whose output is a tuple."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return (self.inner(input_ids=input_ids).logits,)


class KwargsWrapper(nn.Module):
    """A catch-all ``**kwargs`` is no promise to honour `logits_to_keep`: it must not be passed."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, **kwargs):
        assert "logits_to_keep" not in kwargs
        return self.inner(input_ids=input_ids).logits  # a raw tensor


@pytest.mark.parametrize("wrap", [TupleWrapper, KwargsWrapper, lambda m: (lambda input_ids: m(input_ids).logits)],
                         ids=["tuple_module", "kwargs_module", "plain_function"])
def test_models_without_logits_to_keep_take_the_full_path(wrap):
    inner = sparse_gpt()
    ids = padded_batch()
    with torch.no_grad():
        expected = full_path(inner, ids)
        seen = record_logits_to_keep(inner)
        got = task_logits_last(wrap(inner), ids, LENGTHS)
    assert seen == [None]  # the full forward, no logits_to_keep
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class IgnoresLogitsToKeep(nn.Module):
    """Names the argument but returns every position: a clear error, not a silent wrong column."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, logits_to_keep=0):
        return self.inner(input_ids=input_ids).logits


def test_a_model_that_ignores_logits_to_keep_is_an_error():
    with torch.no_grad(), pytest.raises(ValueError, match=r"kept=5 for logits_to_keep of shape \(5,\)"):
        task_logits_last(IgnoresLogitsToKeep(sparse_gpt()), padded_batch(), LENGTHS)
