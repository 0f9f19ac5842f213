"""Released checkpoint format (SPEC §1b): import, export, and logits against a literal reference.

The reference forward pass below is written from SPEC §1b alone, with plain
torch ops on the raw state dict and config dict, and shares no code with
``sparse_lm.model``. Checkpoints are built in the released format from random
weights of realistic scale, with nonzero sink logits, bigram table and final
logits bias so that each of them changes the logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sparse_lm_app.cli import main
from sparse_lm.model import SparseGPT
from sparse_lm.official import export_official, import_official

ALL_LOCTYPES = ("attn_in,attn_q,attn_k,attn_v,attn_out,mlp_in,mlp_neuron,mlp_out,"
                "resid_post_attn,resid_post_mlp")

# Fields of training and kernels that real beeg_config.json files carry; the importer must ignore them.
TRAINING_FIELDS = dict(dropout=0.1, pfrac=0.0625, expansion_factor=4, tokenizer_name="tinypython_2k",
                       grad_checkpointing=True, flash=True, enable_sparse_kernels=False, debug_nans=False,
                       afrac_approx=False, dropout_cat_pos_emb=False, sinusoidal_cat_pos_emb=False)

CONFIGS: dict[str, dict] = {
    # (a) the paper's 1x sweep model, scaled down: afrac 0.125 at six location types,
    # learnable bigram table, untied unembedding, attention sink.
    "sweep_1x_small": dict(
        block_size=32, vocab_size=96, n_layer=3, n_head=4, d_head=8, d_model=32, d_mlp=128,
        bias=True, ln_bias=False, rms_norm=True, activation_type="gelu", residual_activation_type="identity",
        afrac=0.125, afrac_loctypes="attn_in,attn_out,mlp_in,mlp_out,mlp_neuron,attn_v",
        tied_unembed=False, enable_bigram_table=True, learnable_bigram_table=True, sink=True,
        d_pos_emb=None, bigram_table_rank=None, **TRAINING_FIELDS),
    # (b) every location type, ReLU on the residual stream, d_head * n_head != d_model.
    "all_loctypes_relu_resid": dict(
        block_size=24, vocab_size=80, n_layer=2, n_head=2, d_head=12, d_model=32, d_mlp=64,
        bias=True, ln_bias=False, rms_norm=True, activation_type="gelu", residual_activation_type="relu",
        afrac=0.25, afrac_loctypes=ALL_LOCTYPES, tied_unembed=False, enable_bigram_table=True,
        learnable_bigram_table=True, sink=True, d_pos_emb=None),
    # (c) dense activations, no sink field, tied unembedding, the older n_mlp, d_head null;
    # the state dict has no final_logits_bias.
    "dense_tied_old": dict(
        block_size=32, vocab_size=64, n_layer=2, n_head=4, d_head=None, d_model=32, n_mlp=64,
        bias=True, ln_bias=False, rms_norm=True, activation_type="gelu", residual_activation_type="identity",
        afrac=None, afrac_loctypes="attn_in,attn_out,mlp_in,mlp_out", tied_unembed=True,
        enable_bigram_table=False, learnable_bigram_table=False, d_pos_emb=None, tokenizer_name="tinypython_2k"),
    # (d) LayerNorm with bias, linears without bias, ReLU MLP; causal-mask buffers in the file.
    "layernorm_nobias": dict(
        block_size=16, vocab_size=72, n_layer=2, n_head=4, d_head=8, d_model=32, d_mlp=96,
        bias=False, ln_bias=True, rms_norm=False, activation_type="relu", residual_activation_type="identity",
        afrac=0.25, afrac_loctypes="attn_in,attn_q,attn_k,attn_v,attn_out,mlp_in,mlp_neuron,mlp_out",
        tied_unembed=False, enable_bigram_table=True, learnable_bigram_table=True, sink=False, d_pos_emb=None,
        flash=False),
}
NO_FINAL_LOGITS_BIAS = {"dense_tied_old"}
CAUSAL_MASKS = {"layernorm_nobias"}


# -- a checkpoint in the released format --------------------------------------------


def dims(cfg: dict) -> tuple[int, int, int, int]:
    d_model, n_head = cfg["d_model"], cfg["n_head"]
    d_head = cfg.get("d_head") or d_model // n_head
    d_mlp = cfg.get("d_mlp") or cfg.get("n_mlp") or 4 * d_model
    return d_model, n_head, d_head, d_mlp


def released_state_dict(cfg: dict, seed: int, *, final_logits_bias: bool = True,
                        causal_masks: bool = False) -> dict[str, torch.Tensor]:
    """Random weights under the SPEC §1b key names, at scales where every part matters."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    V, T = cfg["vocab_size"], cfg["block_size"]
    D, H, Dh, M = dims(cfg)
    A = H * Dh
    sd: dict[str, torch.Tensor] = {"transformer.wte.weight": rand(V, D, std=0.5),
                                   "transformer.wpe.weight": rand(T, D, std=0.3)}

    def norm(name: str) -> None:
        sd[f"{name}.weight"] = 1 + rand(D, std=0.2)
        if not cfg["rms_norm"] and cfg["ln_bias"]:
            sd[f"{name}.bias"] = rand(D, std=0.1)

    def linear(name: str, n_out: int, n_in: int, std: float) -> None:
        sd[f"{name}.weight"] = rand(n_out, n_in, std=std)
        if cfg["bias"]:
            sd[f"{name}.bias"] = rand(n_out, std=0.1)

    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        norm(p + "ln_1")
        linear(p + "attn.c_attn", 3 * A, D, 0.3)
        linear(p + "attn.c_proj", D, A, 0.2)
        if cfg.get("sink", False):
            sd[p + "attn.attn_imp.sink_logit"] = rand(H, std=1.5)
        if causal_masks:
            sd[p + "attn.bias"] = torch.ones(T, T).tril().view(1, 1, T, T)
        norm(p + "ln_2")
        linear(p + "mlp.c_fc", M, D, 0.3)
        linear(p + "mlp.c_proj", D, M, 0.15)
    norm("transformer.ln_f")
    # A tied model's state dict holds the one matrix under both names.
    sd["lm_head.weight"] = sd["transformer.wte.weight"] if cfg["tied_unembed"] else rand(V, D, std=0.3)
    if final_logits_bias:
        sd["final_logits_bias"] = rand(V, std=0.2)
    if cfg["enable_bigram_table"]:
        sd["bigram_table"] = rand(V, V, std=0.5)
    return sd


def write_released(folder: Path, cfg: dict, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "beeg_config.json").write_text(json.dumps(cfg, indent=1))
    torch.save(sd, folder / "final_model.pt")
    return folder


# -- the reference forward pass, literally SPEC §1b -----------------------------------


def reference_logits(sd: dict[str, torch.Tensor], cfg: dict, idx: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    sd = {k: v.to(dtype) for k, v in sd.items()}
    B, T = idx.shape
    D, H, Dh, _ = dims(cfg)
    afrac = cfg.get("afrac")
    loctypes = set(cfg.get("afrac_loctypes", "").split(","))
    relu_resid = cfg["residual_activation_type"] == "relu"

    def abstopk(x: torch.Tensor, loctype: str) -> torch.Tensor:
        if afrac is None or loctype not in loctypes:
            return x
        keep = x.abs().topk(int(afrac * x.shape[-1]), dim=-1).indices
        return torch.zeros_like(x).scatter(-1, keep, x.gather(-1, keep))

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        if cfg["rms_norm"]:
            return F.rms_norm(x, (D,), sd[f"{name}.weight"], eps=None)
        return F.layer_norm(x, (D,), sd[f"{name}.weight"], sd.get(f"{name}.bias"), 1e-5)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ sd[f"{name}.weight"].T
        return y + sd[f"{name}.bias"] if cfg["bias"] else y

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]  # (B, T, D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = abstopk(norm(x, p + "ln_1"), "attn_in")
        q, k, v = linear(h, p + "attn.c_attn").split(H * Dh, dim=-1)  # q, k, v stacked in that order
        q, k, v = heads(abstopk(q, "attn_q")), heads(abstopk(k, "attn_k")), heads(abstopk(v, "attn_v"))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)  # (B, H, T, T)
        scores = scores.masked_fill(~causal, float("-inf"))
        if cfg.get("sink", False):
            # One more always-visible slot with zero key (score = its logit) and zero value.
            sink = sd[p + "attn.attn_imp.sink_logit"].view(1, H, 1, 1).expand(B, H, T, 1)
            probs = torch.softmax(torch.cat([sink, scores], dim=-1), dim=-1)[..., 1:]
        else:
            probs = torch.softmax(scores, dim=-1)
        y = (probs @ v).transpose(1, 2).reshape(B, T, H * Dh)  # heads side by side
        x = x + abstopk(linear(y, p + "attn.c_proj"), "attn_out")
        x = abstopk(torch.relu(x) if relu_resid else x, "resid_post_attn")
        h = abstopk(norm(x, p + "ln_2"), "mlp_in")
        h = linear(h, p + "mlp.c_fc")
        h = F.gelu(h) if cfg["activation_type"] == "gelu" else torch.relu(h)  # exact erf GELU
        h = abstopk(h, "mlp_neuron")
        x = x + abstopk(linear(h, p + "mlp.c_proj"), "mlp_out")
        x = abstopk(torch.relu(x) if relu_resid else x, "resid_post_mlp")
    x = norm(x, "transformer.ln_f")
    logits = x @ sd["lm_head.weight"].T
    if "final_logits_bias" in sd:
        logits = logits + sd["final_logits_bias"]
    if cfg["enable_bigram_table"]:
        logits = logits + sd["bigram_table"][idx]
    return logits


def token_batches(vocab: int, block: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(vocab, (3, block), generator=g), torch.randint(vocab, (2, 7), generator=g)]


def logits_of(model: SparseGPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict, dict]]:
    """name -> (folder, config dict, state dict as written)."""
    out = {}
    for seed, (name, cfg) in enumerate(CONFIGS.items()):
        sd = released_state_dict(cfg, seed, final_logits_bias=name not in NO_FINAL_LOGITS_BIAS,
                                 causal_masks=name in CAUSAL_MASKS)
        out[name] = (write_released(tmp_path_factory.mktemp(name), cfg, sd), cfg, sd)
    return out


@pytest.fixture(scope="module")
def imported(released) -> dict[str, SparseGPT]:
    return {name: import_official(folder, log=None) for name, (folder, _, _) in released.items()}


# -- logits -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_import_matches_reference(name, released, imported):
    _, cfg, sd = released[name]
    model = imported[name]
    assert not model.training
    for idx in token_batches(cfg["vocab_size"], cfg["block_size"]):
        torch.testing.assert_close(logits_of(model, idx), reference_logits(sd, cfg, idx), atol=1e-5, rtol=1e-5)
    # In float64 rounding cannot flip an AbsTopK choice, so the match must be near exact.
    model64 = import_official(released[name][0], log=None).double()
    for idx in token_batches(cfg["vocab_size"], cfg["block_size"]):
        torch.testing.assert_close(logits_of(model64, idx), reference_logits(sd, cfg, idx, torch.float64),
                                   atol=1e-10, rtol=1e-10)


def test_test_weights_exercise_sink_bigram_and_bias(released):
    """The random checkpoints are strong enough that dropping a part would be caught."""
    _, cfg, sd = released["sweep_1x_small"]
    idx = token_batches(cfg["vocab_size"], cfg["block_size"])[0]
    base = reference_logits(sd, cfg, idx)
    for key in ("bigram_table", "final_logits_bias", "transformer.h.1.attn.attn_imp.sink_logit"):
        changed = reference_logits({**sd, key: torch.zeros_like(sd[key])}, cfg, idx)
        assert (changed - base).abs().max() > 0.05, key
    dense = reference_logits(sd, {**cfg, "afrac": None}, idx)
    assert (dense - base).abs().max() > 0.05


def test_imported_sites_carry_the_released_afrac(imported):
    model = imported["sweep_1x_small"]
    k = {s.name: s.k for s in model.sites}
    assert k["0.attn.act_in"] == 4 and k["2.attn.v"] == 4 and k["1.mlp.post_act"] == 16
    assert k["0.attn.q"] is None and k["0.attn.k"] is None and k["final_resid"] is None
    assert all(s.k is None for s in imported["dense_tied_old"].sites)
    allk = {s.name: s.k for s in imported["all_loctypes_relu_resid"].sites}
    assert allk["1.resid_in"] == 8 and allk["final_resid"] == 8 and allk["0.resid_mid"] == 8
    assert allk["0.resid_in"] is None  # the embedding output is not a resid_post_mlp


def test_config_mapping(imported):
    c = imported["dense_tied_old"].config
    assert (c.d_head, c.d_mlp, c.sink, c.afrac, c.tied_unembed) == (8, 64, False, None, True)
    m = imported["dense_tied_old"]
    assert m.lm_head.weight is m.transformer.wte.weight
    assert torch.equal(m.final_logits_bias, torch.zeros(64))
    c = imported["layernorm_nobias"].config
    assert (c.rms_norm, c.ln_bias, c.bias, c.activation_type) == (False, True, False, "relu")


# -- export / round trips -----------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_round_trip(name, released, imported, tmp_path):
    folder, cfg, sd = released[name]
    model = imported[name]
    out = export_official(model, tmp_path / "exported")
    beeg = json.loads((out / "beeg_config.json").read_text())
    for field in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "bias", "ln_bias", "rms_norm",
                  "activation_type", "residual_activation_type", "afrac", "tied_unembed",
                  "enable_bigram_table", "learnable_bigram_table"):
        assert beeg[field] == cfg[field], field
    assert beeg["d_head"] == dims(cfg)[2] and beeg["d_mlp"] == dims(cfg)[3]
    assert beeg["afrac_loctypes"] == cfg["afrac_loctypes"] and beeg["d_pos_emb"] is None
    assert beeg["sink"] == cfg.get("sink", False)

    written = torch.load(out / "final_model.pt", map_location="cpu", weights_only=True)
    expected = {k: v for k, v in sd.items() if not k.endswith(".attn.bias")}  # causal masks are dropped
    expected.setdefault("final_logits_bias", torch.zeros(cfg["vocab_size"]))
    assert set(written) == set(expected)
    for k, v in expected.items():
        assert torch.equal(written[k], v), k
    for idx in token_batches(cfg["vocab_size"], cfg["block_size"]):
        torch.testing.assert_close(reference_logits(written, beeg, idx), reference_logits(sd, cfg, idx),
                                   atol=1e-6, rtol=1e-6)

    again = import_official(out, log=None)
    a, b = model.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for idx in token_batches(cfg["vocab_size"], cfg["block_size"]):
        assert torch.equal(logits_of(again, idx), logits_of(model, idx))


@pytest.mark.parametrize("name", ["sweep_1x_small", "dense_tied_old"])
def test_save_pretrained_round_trip(name, released, imported, tmp_path):
    folder, cfg, _ = released[name]
    lines: list[str] = []
    out = tmp_path / "model"
    model = import_official(folder, out, log=lines.append)
    assert (out / "model.safetensors").is_file()
    assert (out / "official_config.json").read_bytes() == (folder / "beeg_config.json").read_bytes()
    text = "\n".join(lines)
    assert "tinypython_2k" in text and "no tokenizer bundled" in text
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, SparseGPT)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for idx in token_batches(cfg["vocab_size"], cfg["block_size"]):
        assert torch.equal(logits_of(loaded, idx), logits_of(imported[name], idx))
    # ... and from the save_pretrained folder back to the released format.
    back = export_official(out, tmp_path / "back")
    again = import_official(back, log=None)
    idx = token_batches(cfg["vocab_size"], cfg["block_size"])[0]
    assert torch.equal(logits_of(again, idx), logits_of(model, idx))


def test_tokenizer_is_copied_when_present(released, tmp_path):
    folder, cfg, sd = released["dense_tied_old"]
    src = write_released(tmp_path / "src", cfg, sd)
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    lines: list[str] = []
    import_official(src, tmp_path / "out", log=lines.append)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert any("tokenizer copied" in line for line in lines)
    assert not any("no tokenizer bundled" in line for line in lines)


# -- CLI ------------------------------------------------------------------------------


def test_cli_import_and_export(released, imported, tmp_path, capsys):
    folder, cfg, _ = released["sweep_1x_small"]
    assert main(["import-official", str(folder), "--out", str(tmp_path / "m"), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "3 layers, d_model 32, 4 heads x 8, d_mlp 128" in out
    assert "L.attn.act_in k=4 (x3)" in out and "L.mlp.post_act k=16 (x3)" in out
    assert "attention sink: on" in out and "bigram table: learnable" in out
    assert "training-only fields ignored" in out and "pfrac" in out

    assert main(["import-official", str(folder)]) == 0  # check only
    out = capsys.readouterr().out
    assert "checked only" in out and "training-only" not in out

    assert main(["export-official", str(tmp_path / "m"), "--out", str(tmp_path / "official")]) == 0
    assert "final_model.pt" in capsys.readouterr().out
    again = import_official(tmp_path / "official", log=None)
    idx = token_batches(cfg["vocab_size"], cfg["block_size"])[0]
    assert torch.equal(logits_of(again, idx), logits_of(imported["sweep_1x_small"], idx))

    assert main(["import-official", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "does not exist" in err


# -- errors ---------------------------------------------------------------------------


@pytest.fixture
def small(released, tmp_path):
    """A fresh copy of a small released folder to damage."""
    _, cfg, sd = released["sweep_1x_small"]
    return write_released(tmp_path / "ckpt", dict(cfg), dict(sd)), dict(cfg), dict(sd)


def test_missing_folder_and_files(tmp_path, small):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        import_official(tmp_path / "nowhere", log=None)
    folder, _, _ = small
    (folder / "final_model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="final_model.pt"):
        import_official(folder, log=None)
    (folder / "beeg_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="beeg_config.json"):
        import_official(folder, log=None)


def test_corrupt_weights(small):
    folder, _, _ = small
    path = folder / "final_model.pt"
    good = path.read_bytes()
    path.write_bytes(b"\x00garbage, not a torch file" * 40)
    with pytest.raises(ValueError, match="final_model.pt could not be read.*corrupt"):
        import_official(folder, log=None)
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="final_model.pt could not be read.*corrupt"):
        import_official(folder, log=None)
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ValueError, match="final_model.pt holds a list, not a state dict"):
        import_official(folder, log=None)
    torch.save({"model": {"x": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(ValueError, match="not a state dict of tensors.*training checkpoint"):
        import_official(folder, log=None)


def test_missing_unexpected_and_misshapen_keys(small):
    folder, cfg, sd = small
    del sd["transformer.h.1.mlp.c_fc.bias"]
    write_released(folder, cfg, sd)
    with pytest.raises(ValueError, match=r"missing key\(s\) transformer\.h\.1\.mlp\.c_fc\.bias"):
        import_official(folder, log=None)
    sd["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(cfg["d_mlp"])
    sd["transformer.h.0.attn.extra"] = torch.zeros(2)
    write_released(folder, cfg, sd)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) transformer\.h\.0\.attn\.extra"):
        import_official(folder, log=None)
    del sd["transformer.h.0.attn.extra"]
    sd["transformer.h.2.attn.c_proj.weight"] = torch.zeros(32, 31)
    write_released(folder, cfg, sd)
    with pytest.raises(ValueError, match=r"transformer\.h\.2\.attn\.c_proj\.weight \(32, 31\) \(expected \(32, 32\)\)"):
        import_official(folder, log=None)


def test_sink_key_must_match_config(small):
    folder, cfg, sd = small
    write_released(folder, {**cfg, "sink": False}, sd)
    with pytest.raises(ValueError, match="unexpected key.*attn_imp.sink_logit.*check sink"):
        import_official(folder, log=None)


def test_tied_unembedding_must_agree(released, tmp_path):
    _, cfg, sd = released["dense_tied_old"]
    sd = {**sd, "lm_head.weight": sd["lm_head.weight"] + 1}
    folder = write_released(tmp_path / "t", cfg, sd)
    with pytest.raises(ValueError, match="tied_unembed is true but lm_head.weight and transformer.wte.weight differ"):
        import_official(folder, log=None)


@pytest.mark.parametrize("field,value", [("d_pos_emb", 16), ("bigram_table_rank", 8), ("use_tied_aux_matrix", True)])
def test_unsupported_forward_fields(small, field, value):
    folder, cfg, sd = small
    write_released(folder, {**cfg, field: value}, sd)
    with pytest.raises(ValueError, match=f"beeg_config.json: {field} = .* not supported"):
        import_official(folder, log=None)


def test_unknown_and_bad_fields(small):
    folder, cfg, sd = small
    write_released(folder, {**cfg, "rotary": True}, sd)
    with pytest.raises(ValueError, match="unknown field.*rotary"):
        import_official(folder, log=None)
    assert isinstance(import_official(folder, allow_unknown_fields=True, log=None), SparseGPT)
    for bad, match in [({"n_layer": "3"}, "n_layer must be a positive integer"),
                       ({"sink": 1}, "sink must be true or false"),
                       ({"activation_type": "swish"}, "activation_type 'swish'"),
                       ({"afrac_loctypes": "attn_in,nowhere"}, "unknown afrac_loctypes"),
                       ({"d_mlp": 64, "n_mlp": 128}, "n_mlp .* and d_mlp .* disagree")]:
        write_released(folder, {**cfg, **bad}, sd)
        with pytest.raises(ValueError, match=match):
            import_official(folder, log=None)
    no_vocab = {k: v for k, v in cfg.items() if k != "vocab_size"}
    write_released(folder, no_vocab, sd)
    with pytest.raises(ValueError, match="required field.*vocab_size"):
        import_official(folder, log=None)
    (folder / "beeg_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="beeg_config.json is not valid JSON"):
        import_official(folder, log=None)


def test_failed_import_keeps_existing_output(small, tmp_path):
    folder, _, _ = small
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    (folder / "final_model.pt").write_bytes(b"broken")
    with pytest.raises(ValueError):
        import_official(folder, out, log=None)
    assert (out / "keep.txt").read_text() == "earlier result"
    with pytest.raises(ValueError, match="would replace the source folder"):
        import_official(folder, folder, log=None)


def test_export_rejects_non_sparse_models(tmp_path, released):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="only a SparseGPT"):
        export_official(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)), tmp_path / "x")
    with pytest.raises(ValueError, match="already in the released format"):
        export_official(released["dense_tied_old"][0], tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_official(tmp_path / "nowhere", tmp_path / "z")


def test_fixed_bigram_table(tmp_path):
    cfg = {**CONFIGS["layernorm_nobias"], "learnable_bigram_table": False}
    sd = released_state_dict(cfg, 7)
    model = import_official(write_released(tmp_path / "fixed", cfg, sd), log=None)
    assert "bigram_table" not in dict(model.named_parameters())
    idx = token_batches(cfg["vocab_size"], cfg["block_size"])[0]
    torch.testing.assert_close(logits_of(model, idx), reference_logits(sd, cfg, idx), atol=1e-5, rtol=1e-5)
