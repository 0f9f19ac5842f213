"""Load a model and its tokenizer from a model folder or a run folder, with clear errors."""

from __future__ import annotations

from pathlib import Path


def model_dir(path: str | Path) -> Path:
    """A ``save_pretrained`` folder; a run folder resolves to its ``model/``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (give a model folder or a run folder)")
    if not (path / "config.json").exists() or (path / "model" / "config.json").exists():
        if (path / "model" / "config.json").exists():
            return path / "model"
        raise FileNotFoundError(
            f"{path} is not a model folder (no config.json); give the `model/` folder of a run or a "
            f"`save_pretrained` folder"
        )
    return path


def load_model_and_tokenizer(path: str | Path, device: str | None = None):
    """(model in eval mode, tokenizer) for a SparseGPT or any transformers causal LM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sparse_lm  # noqa: F401  (registers sparse_gpt with the Auto classes)

    d = model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(d)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load a causal LM from {d}: {e}") from e
    tok_dir = d if (d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists() else d.parent / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists() and not (tok_dir / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"no tokenizer next to the model in {d} (nor in {d.parent / 'tokenizer'}); "
                                f"save one with tokenizer.save_pretrained({str(d)!r})")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if device:
        model.to(torch.device(device))
    return model, tokenizer
