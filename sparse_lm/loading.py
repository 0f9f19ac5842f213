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

__all__ = ["model_dir", "tokenizer_dir", "load_tokenizer_of", "load_model_and_tokenizer", "model_fingerprint"]


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


def load_model_and_tokenizer(path: str | Path, device: str | None = None):
    """(model in eval mode without gradients, tokenizer) for a SparseGPT or any transformers causal LM."""
    d = model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(d)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load a causal LM from {d}: {e}") from e
    tokenizer = load_tokenizer_of(d)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if device:
        model.to(torch.device(device))
    return model, tokenizer


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
