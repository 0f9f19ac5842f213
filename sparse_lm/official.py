"""Import and export the paper's released checkpoint format (SPEC §1b).

A released model is a folder with ``beeg_config.json`` (a flat JSON of model
settings) and ``final_model.pt`` (a torch state dict). :class:`SparseGPT`
already uses the released module names, so the conversion is:

- config: the released fields map one to one onto :class:`SparseGPTConfig`
  (``n_mlp`` is the older name of ``d_mlp``; ``d_head: null`` means
  ``d_model // n_head``; absent fields take the defaults of the authors'
  config class, listed in :data:`FORMAT_DEFAULTS`);
- weights: one key is renamed, ``transformer.h.{i}.attn.attn_imp.sink_logit``
  <-> ``transformer.h.{i}.attn.sink_logit``; the authors' causal-mask buffers
  (``transformer.h.{i}.attn.bias`` of shape (1, 1, T, T)) are dropped; an
  absent ``final_logits_bias`` is zeros.

Everything else is checked, not repaired: every expected tensor must be
present with its shape, nothing unexpected may be left over, and a config
field that would change the forward pass in a way SparseGPT cannot express
(``d_pos_emb``, ``bigram_table_rank``...) is an error naming the field.

Both directions verify what they wrote before it replaces the output folder:
an import reloads the ``save_pretrained`` folder and compares every tensor,
an export re-imports the written files and compares tensors, config and logits.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from sparse_lm.io import atomic_dir, write_json
from sparse_lm.model import SparseGPT, SparseGPTConfig

CONFIG_FILE = "beeg_config.json"
WEIGHTS_FILE = "final_model.pt"
PROVENANCE_FILE = "official_config.json"  # the source beeg_config.json, kept beside an imported model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PAPER_TOKENIZER = "tinypython_2k"

Log = Callable[[str], None]

# -- config -------------------------------------------------------------------

# What the authors' config class gives a field that a beeg_config.json leaves out.
# (``d_head``/``d_mlp`` None mean d_model // n_head and 4 * d_model.)
FORMAT_DEFAULTS: dict[str, Any] = {
    "block_size": 1024,
    "d_head": None,
    "d_mlp": None,
    "bias": True,
    "ln_bias": True,
    "rms_norm": False,
    "activation_type": "gelu",
    "residual_activation_type": "identity",
    "afrac": None,
    "afrac_loctypes": "attn_in,attn_out,mlp_in,mlp_out",
    "tied_unembed": True,
    "enable_bigram_table": False,
    "learnable_bigram_table": False,
    "sink": False,
}
# Shape-defining fields with no credible default: a file without them is not a model config.
REQUIRED_FIELDS = ("vocab_size", "n_layer", "n_head", "d_model")

# Fields that change the forward pass unless they hold the neutral value: (neutral, what they would do).
UNSUPPORTED_FIELDS: dict[str, tuple[Any, str]] = {
    "d_pos_emb": (None, "positional embeddings concatenated to the residual instead of added"),
    "bigram_table_rank": (None, "a low-rank factorised bigram table"),
    "use_tied_aux_matrix": (False, "an auxiliary matrix tied into the weights"),
}

# Fields of training, kernels or debugging: they do not change eval-mode logits.
TRAINING_ONLY_FIELDS = frozenset({
    "dropout", "dropout_cat_pos_emb", "sinusoidal_cat_pos_emb",  # no dropout at eval; the cat-pos ones need d_pos_emb
    "pfrac", "expansion_factor", "expansion_factor_mlp", "ignore_dw_grad",  # weight-sparsity training
    "tokenizer_name",  # which tokenizer the data used; the tokenizer is not part of the checkpoint
    "grad_checkpointing", "flash", "enable_sparse_kernels", "sparse_matmul_impl",  # kernel switches
    "afrac_approx", "rtopk", "debug_exact_topk",  # training-time top-k approximations
    "debug_nans", "n_embd",  # debug flag; an unused alias
})

_INT_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "d_model", "d_head", "d_mlp")
_BOOL_FIELDS = ("bias", "ln_bias", "rms_norm", "tied_unembed", "enable_bigram_table", "learnable_bigram_table", "sink")
_STR_FIELDS = ("activation_type", "residual_activation_type", "afrac_loctypes")
MODEL_FIELDS = frozenset(REQUIRED_FIELDS) | frozenset(FORMAT_DEFAULTS) | {"n_mlp"}


def config_from_official(raw: Mapping[str, Any], *, source: str = CONFIG_FILE,
                         allow_unknown_fields: bool = False) -> tuple[SparseGPTConfig, list[str]]:
    """A :class:`SparseGPTConfig` for a released ``beeg_config.json``, and notes on what was assumed.

    Raises ``ValueError`` naming ``source`` and the field for a missing required
    field, a value of the wrong type, a forward-changing field we do not
    support, or (unless ``allow_unknown_fields``) a field the format does not have.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a JSON object of model settings, found {type(raw).__name__}")
    raw = dict(raw)
    notes: list[str] = []

    if "n_mlp" in raw:  # the older name of d_mlp
        n_mlp = raw.pop("n_mlp")
        if raw.get("d_mlp") is not None and raw["d_mlp"] != n_mlp:
            raise ValueError(f"{source}: n_mlp ({n_mlp}) and d_mlp ({raw['d_mlp']}) disagree; keep one")
        raw["d_mlp"] = n_mlp
        notes.append("n_mlp read as d_mlp (older name)")

    for name, (neutral, meaning) in UNSUPPORTED_FIELDS.items():
        value = raw.get(name)
        if value is not None and not (value is False and neutral is False):
            raise ValueError(f"{source}: {name} = {value!r} ({meaning}) changes the forward pass and is not "
                             f"supported by SparseGPT; only {name} = {json.dumps(neutral)} can be imported")

    known = MODEL_FIELDS | TRAINING_ONLY_FIELDS | set(UNSUPPORTED_FIELDS)
    unknown = sorted(set(raw) - known)
    if unknown and not allow_unknown_fields:
        raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)}: not part of the released format as "
                         f"far as this importer knows, so they might change the forward pass; if they do not, "
                         f"pass --allow-unknown-fields (allow_unknown_fields=True)")
    if unknown:
        notes.append(f"unknown fields ignored (allowed): {', '.join(f'{k}={raw[k]!r}' for k in unknown)}")

    missing = [k for k in REQUIRED_FIELDS if k not in raw]
    if missing:
        raise ValueError(f"{source}: required field(s) {', '.join(missing)} missing")
    defaulted = {k: v for k, v in FORMAT_DEFAULTS.items() if k not in raw}
    if defaulted:
        notes.append("absent fields, format defaults used: " + ", ".join(f"{k}={json.dumps(v)}"
                                                                        for k, v in defaulted.items()))
    values = {**FORMAT_DEFAULTS, **{k: raw[k] for k in MODEL_FIELDS if k in raw}}

    for k in _INT_FIELDS:
        v = values[k]
        if v is None and k in ("d_head", "d_mlp"):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{source}: {k} must be a positive integer, got {v!r}")
    for k in _BOOL_FIELDS:
        if not isinstance(values[k], bool):
            raise ValueError(f"{source}: {k} must be true or false, got {values[k]!r}")
    if isinstance(values["afrac_loctypes"], list):
        values["afrac_loctypes"] = ",".join(values["afrac_loctypes"])
    for k in _STR_FIELDS:
        if not isinstance(values[k], str):
            raise ValueError(f"{source}: {k} must be a string, got {values[k]!r}")
    afrac = values["afrac"]
    if afrac is not None and (isinstance(afrac, bool) or not isinstance(afrac, (int, float))):
        raise ValueError(f"{source}: afrac must be a number or null (dense activations), got {afrac!r}")

    if values["d_head"] is None:
        if values["d_model"] % values["n_head"]:
            raise ValueError(f"{source}: d_head is null and d_model {values['d_model']} is not divisible by "
                             f"n_head {values['n_head']}")
        values["d_head"] = values["d_model"] // values["n_head"]
        notes.append(f"d_head null -> d_model // n_head = {values['d_head']}")
    if values["d_mlp"] is None:
        values["d_mlp"] = 4 * values["d_model"]
        notes.append(f"d_mlp null -> 4 * d_model = {values['d_mlp']}")

    ignored = sorted(k for k in raw if k in TRAINING_ONLY_FIELDS)
    if ignored:
        notes.append("training-only fields ignored: " + ", ".join(f"{k}={json.dumps(raw[k])}" for k in ignored))
    try:
        cfg = SparseGPTConfig(**values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return cfg, notes


def official_config(cfg: SparseGPTConfig) -> dict[str, Any]:
    """The ``beeg_config.json`` fields that fix a SparseGPT's forward pass."""
    return {
        "vocab_size": cfg.vocab_size,
        "block_size": cfg.block_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "d_head": cfg.d_head,
        "d_model": cfg.d_model,
        "d_mlp": cfg.d_mlp,
        "bias": cfg.bias,
        "ln_bias": cfg.ln_bias,
        "rms_norm": cfg.rms_norm,
        "activation_type": cfg.activation_type,
        "residual_activation_type": cfg.residual_activation_type,
        "afrac": cfg.afrac,
        "afrac_loctypes": cfg.afrac_loctypes,
        "sink": cfg.sink,
        "enable_bigram_table": cfg.enable_bigram_table,
        "learnable_bigram_table": cfg.learnable_bigram_table,
        "tied_unembed": cfg.tied_unembed,
        "d_pos_emb": None,
    }


# -- state dict keys --------------------------------------------------------------

_OUR_SINK = re.compile(r"transformer\.h\.(\d+)\.attn\.sink_logit")
_THEIR_SINK = re.compile(r"transformer\.h\.(\d+)\.attn\.attn_imp\.sink_logit")
_CAUSAL_MASK = re.compile(r"transformer\.h\.(\d+)\.attn\.bias")


def to_official_key(key: str) -> str:
    m = _OUR_SINK.fullmatch(key)
    return f"transformer.h.{m[1]}.attn.attn_imp.sink_logit" if m else key


def from_official_key(key: str) -> str:
    m = _THEIR_SINK.fullmatch(key)
    return f"transformer.h.{m[1]}.attn.sink_logit" if m else key


def official_state_dict(model: SparseGPT) -> dict[str, torch.Tensor]:
    """The model's tensors under the released key names (both unembedding keys when tied, as theirs)."""
    return {to_official_key(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _listing(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" ... ({len(keys) - n} more)" if len(keys) > n else "")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load ``final_model.pt``; a file that is not a readable state dict of tensors is a ValueError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickled objects beyond tensors...
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} could not be read as a torch state dict (truncated or corrupt?): "
                         f"{type(e).__name__}: {why[:300]}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        hint = ""
        if any(isinstance(obj.get(k), Mapping) for k in ("model", "state_dict", "module")):
            hint = " (it looks like a training checkpoint; the released format is the bare model state dict)"
        raise ValueError(f"{path} is not a state dict of tensors: entries {_listing(bad)} are not tensors{hint}")
    return dict(obj)


def _match_state_dict(sd: dict[str, torch.Tensor], model: SparseGPT, path: Path,
                      notes: list[str]) -> dict[str, torch.Tensor]:
    """Released tensors -> ``model``'s key names, checked strictly against its keys and shapes."""
    cfg = model.config
    sd = dict(sd)
    masks = [k for k in sd if _CAUSAL_MASK.fullmatch(k) and sd[k].ndim == 4 and sd[k].shape[:2] == (1, 1)
             and sd[k].shape[2] == sd[k].shape[3]]
    for k in masks:
        del sd[k]
    if masks:
        notes.append(f"dropped {len(masks)} causal-mask buffers (attn.bias)")
    if "final_logits_bias" not in sd:
        sd["final_logits_bias"] = torch.zeros(cfg.vocab_size)
        notes.append("final_logits_bias absent -> zeros")
    if cfg.tied_unembed:
        wte, head = sd.get("transformer.wte.weight"), sd.get("lm_head.weight")
        if wte is not None and head is not None and not torch.equal(wte, head):
            raise ValueError(f"{path}: tied_unembed is true but lm_head.weight and transformer.wte.weight differ "
                             f"(max |diff| {(wte.float() - head.float()).abs().max().item():.3g})")
        if wte is None and head is not None:
            sd["transformer.wte.weight"] = head
        elif head is None and wte is not None:
            sd["lm_head.weight"] = wte

    expected = {to_official_key(k): v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s) {_listing(unexpected)}")
        hint = ""
        prefixes = {k.split(".", 1)[0] for k in unexpected}
        if prefixes & {"_orig_mod", "module", "model"}:
            hint = "; the keys carry a wrapper prefix (torch.compile / DDP): save the bare model's state dict"
        elif any(k == "bigram_table" for k in unexpected + missing):
            hint = "; check enable_bigram_table in beeg_config.json"
        elif any("sink_logit" in k for k in unexpected + missing):
            hint = "; check sink in beeg_config.json"
        raise ValueError(f"{path} does not match {CONFIG_FILE}: " + "; ".join(parts) + hint)
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(s)})" for k, s in expected.items() if sd[k].shape != s]
    if wrong:
        raise ValueError(f"{path}: tensor shapes do not match {CONFIG_FILE}: {_listing(wrong, 6)}")
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()})
    if dtypes != ["float32"]:
        notes.append(f"source dtypes {', '.join(dtypes)} loaded into float32")
    return {from_official_key(k): v for k, v in sd.items()}


# -- import -------------------------------------------------------------------------


def _check_dir(src: Path) -> None:
    if not src.exists():
        raise FileNotFoundError(f"released checkpoint folder {src} does not exist")
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder (expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} not found (a released checkpoint folder holds {CONFIG_FILE} "
                                    f"and {WEIGHTS_FILE})")


def _check_out(out: Path, src: Path) -> None:
    # atomic_dir replaces ``out`` whole: it must not be (or contain) the folder we read from.
    o, s = out.resolve(), src.resolve()
    if o == s or o in s.parents:
        raise ValueError(f"output folder {out} would replace the source folder {src}; choose another --out")


def load_official(src_dir: str | Path, *, allow_unknown_fields: bool = False) -> tuple[SparseGPT, list[str]]:
    """Build the SparseGPT of a released folder; also returns notes on what was assumed or dropped."""
    src = Path(src_dir)
    _check_dir(src)
    cfg_path = src / CONFIG_FILE
    try:
        raw = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    cfg, notes = config_from_official(raw, source=str(cfg_path), allow_unknown_fields=allow_unknown_fields)
    sd = read_state_dict(src / WEIGHTS_FILE)
    model = SparseGPT(cfg)
    ours = _match_state_dict(sd, model, src / WEIGHTS_FILE, notes)
    model.load_state_dict(ours, strict=True)
    return model.eval(), notes


def import_official(src_dir: str | Path, out_dir: str | Path | None = None, *, verbose: bool = False,
                    allow_unknown_fields: bool = False, log: Log | None = None) -> SparseGPT:
    """Load a released checkpoint folder (``beeg_config.json`` + ``final_model.pt``) as a SparseGPT.

    With ``out_dir``, also write it as a ``save_pretrained`` folder (safetensors,
    ``AutoModelForCausalLM``-loadable) with the source config kept as
    ``official_config.json`` and the source tokenizer files when there are any.
    The folder is written atomically and checked by reloading it first.
    ``log`` receives a short summary (``None``: silent); ``verbose`` adds the
    notes on ignored and defaulted fields.
    """
    src = Path(src_dir)
    if out_dir is not None:
        _check_out(Path(out_dir), src)
    model, notes = load_official(src, allow_unknown_fields=allow_unknown_fields)
    head, *rest = summary(model)
    lines = [f"imported {src}: {head}", *rest]
    lines += [f"note: {n}" for n in notes if verbose or not n.startswith("training-only")]
    if out_dir is not None:
        out = Path(out_dir)
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            shutil.copyfile(src / CONFIG_FILE, tmp / PROVENANCE_FILE)
            copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
            for f in copied:
                shutil.copyfile(src / f, tmp / f)
            _check_reload(tmp, model)
        lines.append(f"wrote {out} (save_pretrained, safetensors; source config as {PROVENANCE_FILE})")
        if copied:
            lines.append(f"tokenizer copied from the source folder: {', '.join(copied)}")
        else:
            lines.append(f"no tokenizer bundled: the source folder has no tokenizer.json, and the paper's tokenizer "
                         f"({PAPER_TOKENIZER}) is not distributed with the checkpoint; add one with the same "
                         f"{model.config.vocab_size}-token vocabulary before decoding text")
    if log is not None:
        for line in lines:
            log(line)
    return model


def _check_reload(folder: Path, model: SparseGPT) -> None:
    again = SparseGPT.from_pretrained(folder)
    a, b = model.state_dict(), again.state_dict()
    diff = sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]
    if diff:
        raise RuntimeError(f"save_pretrained round trip in {folder} changed {_listing(diff)}; nothing was written")


def summary(model: SparseGPT) -> list[str]:
    """Shape, AbsTopK sites, sink and bigram table of a model, in a few lines."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    lines = [f"{c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads x {c.d_head}, d_mlp {c.d_mlp}, "
             f"vocab {c.vocab_size}, context {c.block_size}, {n / 1e6:.2f}M parameters; "
             f"{'RMSNorm' if c.rms_norm else 'LayerNorm'}, {c.activation_type}, "
             f"{'tied' if c.tied_unembed else 'untied'} unembedding"]
    groups: dict[tuple[str, int], int] = {}
    for site in model.sites:
        if site.k is not None:
            key = (re.sub(r"^\d+\.", "L.", site.name), site.k)
            groups[key] = groups.get(key, 0) + 1
    if groups:
        listed = ", ".join(f"{name} k={k}" + (f" (x{cnt})" if cnt > 1 else "") for (name, k), cnt in groups.items())
        lines.append(f"AbsTopK (afrac {c.afrac}) at {sum(groups.values())} sites: {listed}")
    else:
        lines.append("AbsTopK: none (dense activations)")
    if c.sink:
        logits = torch.stack([b.attn.sink_logit.detach() for b in model.transformer.h])
        lines.append(f"attention sink: on, per-head logits in [{logits.min().item():.3g}, {logits.max().item():.3g}]")
    else:
        lines.append("attention sink: off")
    if model.bigram_table is not None:
        t = model.bigram_table.detach()
        kind = "learnable" if c.learnable_bigram_table else "fixed"
        lines.append(f"bigram table: {kind}, {tuple(t.shape)}, max |entry| {t.abs().max().item():.3g}")
    else:
        lines.append("bigram table: off")
    if model.final_logits_bias.abs().max() > 0:
        lines.append(f"final_logits_bias: nonzero (max |b| {model.final_logits_bias.abs().max().item():.3g})")
    return lines


# -- export -------------------------------------------------------------------------


def _resolve_model(model_or_dir: SparseGPT | str | Path) -> tuple[SparseGPT, Path | None]:
    if isinstance(model_or_dir, nn.Module):
        if not isinstance(model_or_dir, SparseGPT):
            raise ValueError(f"only a SparseGPT can be written in the released format, not a "
                             f"{type(model_or_dir).__name__}")
        return model_or_dir, None
    path = Path(model_or_dir)
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if (path / "summary.json").is_file() and (path / "model").is_dir():  # a run folder: its final model
        path = path / "model"
    if not (path / "config.json").is_file():
        if (path / CONFIG_FILE).is_file():
            raise ValueError(f"{path} is already in the released format ({CONFIG_FILE}); "
                             f"import it with `sparse-lm import-official`")
        raise FileNotFoundError(f"{path / 'config.json'} not found (expected a save_pretrained model folder)")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    if not isinstance(model, SparseGPT):
        raise ValueError(f"{path} holds a {type(model).__name__}; only a SparseGPT can be written in the "
                         f"released format")
    return model, path


def export_official(model_or_dir: SparseGPT | str | Path, out_dir: str | Path, *, log: Log | None = None) -> Path:
    """Write a SparseGPT (or a save_pretrained folder of one) as ``beeg_config.json`` + ``final_model.pt``.

    The folder is written atomically, after the written files were re-imported
    and found to give the same tensors, config and logits.
    """
    model, src = _resolve_model(model_or_dir)
    out = Path(out_dir)
    if src is not None:
        _check_out(out, src)
    beeg = official_config(model.config)
    sd = official_state_dict(model)
    with atomic_dir(out) as tmp:
        write_json(tmp / CONFIG_FILE, beeg)
        torch.save(sd, tmp / WEIGHTS_FILE)
        copied = [f for f in TOKENIZER_FILES if src is not None and (src / f).is_file()]
        for f in copied:
            shutil.copyfile(src / f, tmp / f)
        _check_export(tmp, model)
    if log is not None:
        size = (out / WEIGHTS_FILE).stat().st_size
        log(f"wrote {out}: {CONFIG_FILE} ({len(beeg)} fields), {WEIGHTS_FILE} ({len(sd)} tensors, "
            f"{size / 1e6:.1f} MB)" + (f", {', '.join(copied)}" if copied else ""))
        for line in summary(model):
            log(line)
    return out


def _check_export(folder: Path, model: SparseGPT) -> None:
    again, _ = load_official(folder)
    fields = official_config(model.config)
    changed = [k for k, v in official_config(again.config).items() if fields[k] != v]
    a, b = model.state_dict(), again.state_dict()
    changed += [k for k in a if not torch.equal(a[k].cpu().float(), b[k])]
    if not changed and all(p.dtype == torch.float32 for p in model.parameters()):
        T = min(8, model.config.block_size)
        ids = torch.randint(model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
        device = next(model.parameters()).device
        with torch.no_grad():
            want = model(ids.to(device)).logits.float().cpu()
            got = again(ids).logits
        if not torch.allclose(want, got, atol=1e-5, rtol=1e-5):
            changed.append(f"logits (max |diff| {(want - got).abs().max().item():.3g})")
    if changed:
        raise RuntimeError(f"re-importing the export in {folder} changed {_listing(changed)}; nothing was written")


__all__ = [
    "CONFIG_FILE", "WEIGHTS_FILE", "PROVENANCE_FILE", "FORMAT_DEFAULTS",
    "config_from_official", "official_config", "official_state_dict", "read_state_dict",
    "load_official", "import_official", "export_official", "summary", "to_official_key", "from_official_key",
]
