"""Byte-level BPE tokenizer trained on a corpus, wrapped as a `transformers` fast tokenizer.

Byte-level means every string is encodable (no unknown tokens) and decoding is
exact, so `decode(encode(text)) == text`. `<|endoftext|>` is the only special
token; it separates documents in the packed token stream and serves as BOS,
EOS and padding.

Before BPE, text is split into pieces that no merge crosses (the pre-tokenizer).
The default, ``tinypython``, is the split of the paper's own ``tinypython_2k``
tokenizer (the regular expression in openai/circuit_sparsity's
``tiktoken_ext/tinypython.py``): a run of punctuation keeps the newlines that
follow it and a letter run keeps one punctuation mark before it. So a line that
ends by closing a list ends with the token ``]\n``, and ``.add`` is one token;
the tasks compare exactly these (``]\n`` against the ``]`` of ``]]\n``,
``.add`` against `` +=``). ``gpt2`` is GPT-2's split (punctuation never joins a
newline or a name), which makes those tasks compare ``]`` with a rare ``]]``
and ``.`` with `` +=``.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sparse_lm.corpus import Corpus

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["EOS_TOKEN", "PRETOKENIZERS", "train_tokenizer", "load_tokenizer", "tokenizer_hash"]

EOS_TOKEN = "<|endoftext|>"
# 256 byte symbols + EOS: below this the byte alphabet itself does not fit.
MIN_VOCAB_SIZE = 257
# Documents are packed into blocks by our own code, so no length limit should warn or truncate.
MODEL_MAX_LENGTH = 10**12
# Pre-tokenizer splits (see the module docstring); None is byte-level BPE's own (GPT-2's) split.
PRETOKENIZERS: dict[str, str | None] = {
    "tinypython": r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "gpt2": None,
}


def train_tokenizer(
    corpus: Corpus,
    vocab_size: int = 2048,
    out_dir: str | Path | None = None,
    *,
    pretokenizer: str = "tinypython",
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with exactly `vocab_size` tokens (EOS included) on `corpus`.

    Training reads the already-decoded documents (not files), so files skipped by the
    corpus loader never reach it. When `out_dir` is given the tokenizer is saved there
    with `save_pretrained`, loadable offline by `AutoTokenizer.from_pretrained(out_dir)`.
    `pretokenizer` names the split before BPE (`PRETOKENIZERS`).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs >= {MIN_VOCAB_SIZE} (256 bytes + EOS)")
    if len(corpus) == 0:
        raise ValueError(f"corpus {corpus.source!r} has no documents to train a tokenizer on")
    if pretokenizer not in PRETOKENIZERS:
        raise ValueError(f"unknown pretokenizer {pretokenizer!r}; choose from {sorted(PRETOKENIZERS)}")

    backend = Tokenizer(models.BPE())
    pattern = PRETOKENIZERS[pretokenizer]
    if pattern is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # split by the pattern, then map bytes to symbols without GPT-2's split on top
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],  # first, so it gets id 0
        # The full byte alphabet, so that bytes absent from the corpus still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator((doc.text for doc in corpus.documents), trainer=trainer, length=len(corpus))
    if backend.get_vocab_size() != vocab_size:
        raise ValueError(
            f"corpus {corpus.source!r} ({len(corpus)} documents, {corpus.num_bytes()} bytes) only supports "
            f"{backend.get_vocab_size()} BPE tokens, fewer than vocab_size {vocab_size}; "
            "use a larger corpus or a smaller vocab_size"
        )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        # The default clean-up rewrites " ." to "." and breaks exact round trips of code.
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by `train_tokenizer(out_dir=path)`."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {str(path)!r}; train one with train_tokenizer(corpus, out_dir={str(path)!r})"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{str(path)!r} loaded as {type(tokenizer).__name__}, expected a fast tokenizer")
    return tokenizer


def tokenizer_hash(tokenizer: PreTrainedTokenizerFast | str | Path) -> str:
    """sha256 of the tokenizer's ``tokenizer.json``: a folder/file path, or a tokenizer object.

    For an object the JSON is written the way `save_pretrained` writes it, so the hash of a
    trained tokenizer equals the hash of its saved folder and of the tokenizer loaded back.
    """
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
        if path.is_dir():
            path = path / "tokenizer.json"
        return hashlib.sha256(path.read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "tokenizer.json"
        tokenizer.backend_tokenizer.save(str(file))
        return hashlib.sha256(file.read_bytes()).hexdigest()
