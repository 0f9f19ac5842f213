"""Tokenize a corpus, split it by file and pack it into fixed-length blocks.

Pipeline: split the documents into train/validation by file (so no validation
file leaks into training), tokenize each split with `datasets.map` (EOS
appended after every document), concatenate the token stream and cut it into
blocks of exactly `block_size` tokens (the remainder is dropped). Every
`datasets` cache file goes into `cache_dir`, never into ``~/.cache``.

`prepare_data` saves the result with `save_to_disk` next to ``data_meta.json``,
which records what the data was built from (tokenizer hash, block size) and
the unigram entropy of the train tokens: the loss of a model that ignores
context entirely, so a trained model's validation loss must be below it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sparse_lm.corpus import Corpus, Document
from sparse_lm.io import write_json
from sparse_lm.tokenizer import tokenizer_hash as compute_tokenizer_hash

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["build_datasets", "prepare", "prepare_data", "load_data", "split_documents", "unigram_entropy",
           "META_FILE"]

META_FILE = "data_meta.json"
SPLITS = ("train", "validation")
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- split


def split_documents(corpus: Corpus, val_fraction: float = 0.02, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Split documents by file into (train, validation), both in corpus order.

    ``max(1, round(val_fraction * n))`` documents, drawn with `seed`, go to validation.
    """
    n = len(corpus)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"corpus {corpus.source!r} has {n} document(s); a train/validation split by file needs >= 2")
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    val_indices = set(random.Random(seed).sample(range(n), n_val))
    train = [doc for i, doc in enumerate(corpus.documents) if i not in val_indices]
    val = [doc for i, doc in enumerate(corpus.documents) if i in val_indices]
    return train, val


# ---------------------------------------------------------------------------- tokenize + pack


def _tokenize_batch(batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, eos_id: int) -> dict[str, list[list[int]]]:
    """`datasets.map` function: token ids of each document followed by EOS."""
    encoded = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return {"input_ids": [ids + [eos_id] for ids in encoded]}


def _content_key(documents: Sequence[Document], tok_hash: str) -> str:
    """Fingerprint of (documents, tokenizer): names the cache files.

    `datasets` reuses an existing `cache_file_name` without checking what produced it,
    so the name itself must change whenever the documents or the tokenizer do.
    """
    h = hashlib.sha256(tok_hash.encode())
    for doc in documents:
        for part in (doc.name, doc.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))  # length prefix: ("ab","c") != ("a","bc")
            h.update(data)
    return h.hexdigest()[:32]


def _tokenize_and_pack(
    documents: Sequence[Document],
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str,
    block_size: int,
    tok_hash: str,
    cache_dir: Path,
    num_proc: int,
) -> tuple[datasets.Dataset, np.ndarray]:
    """Tokenize `documents` (EOS after each) and pack them; return (blocks dataset, token stream (n_tokens,))."""
    import datasets
    import pyarrow as pa

    key = _content_key(documents, tok_hash)
    docs = datasets.Dataset.from_dict({"text": [d.text for d in documents], "name": [d.name for d in documents]})
    num_proc = max(1, min(num_proc, len(documents)))
    tokenized = docs.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "eos_id": tokenizer.eos_token_id},
        remove_columns=["text"],
        features=datasets.Features({"name": datasets.Value("string"), "input_ids": datasets.List(datasets.Value("int32"))}),
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(cache_dir / f"tokens-{split}-{key}.arrow"),
        new_fingerprint=key,  # given, so datasets does not try to hash the tokenizer
        desc=f"tokenize {split}",
    )
    # Rows are in document order, so flattening the list column gives the token stream.
    stream = np.asarray(tokenized.data.column("input_ids").combine_chunks().flatten())  # (n_tokens,) int32
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"the {split} split has {len(stream)} tokens ({len(documents)} documents), fewer than one block of "
            f"{block_size}; use more documents, a larger val_fraction or a smaller block_size"
        )
    # A fixed-size list array over the stream's buffer: no per-row Python work (from_dict on a
    # 2-D array encodes row by row, ~2 s for the standard library).
    blocks = pa.FixedSizeListArray.from_arrays(pa.array(stream[: n_blocks * block_size]), block_size)
    packed = datasets.Dataset.from_dict({"input_ids": blocks})  # (n_blocks,) rows of block_size int32
    return packed, stream


def _build(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    val_fraction: float,
    seed: int,
    cache_dir: str | Path,
    num_proc: int,
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Build the packed splits and the statistics that go into the meta file."""
    import datasets

    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token; documents need an EOS separator")
    if num_proc > 1:
        # Parallelism comes from datasets' worker processes; tokenizers' own threads would be
        # disabled after the fork anyway, with a warning per worker.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok_hash = compute_tokenizer_hash(tokenizer)
    split_docs = dict(zip(SPLITS, split_documents(corpus, val_fraction, seed)))

    packed: dict[str, datasets.Dataset] = {}
    streams: dict[str, np.ndarray] = {}
    for split, docs in split_docs.items():
        packed[split], streams[split] = _tokenize_and_pack(
            docs, tokenizer, split=split, block_size=block_size, tok_hash=tok_hash, cache_dir=cache_dir, num_proc=num_proc
        )

    vocab_size = len(tokenizer)
    train_blocks = np.asarray(packed["train"].data.column("input_ids").combine_chunks().flatten())
    train_text_bytes = sum(len(doc.text.encode("utf-8")) for doc in split_docs["train"])
    train_text_tokens = len(streams["train"]) - len(split_docs["train"])  # EOS tokens are not text
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": corpus.source,
        "block_size": block_size,
        "vocab_size": vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer_hash": tok_hash,
        "seed": seed,
        "val_fraction": val_fraction,
        "skipped_files": corpus.skipped,
        "num_documents": {split: len(docs) for split, docs in split_docs.items()},
        # Token stream length per split (EOS included) before the remainder is dropped.
        "num_tokens": {split: int(len(stream)) for split, stream in streams.items()},
        "num_blocks": {split: len(ds) for split, ds in packed.items()},
        # Entropy of the unigram distribution of the train tokens in blocks: the best
        # cross-entropy a context-free model can reach.
        "unigram_entropy_nats": unigram_entropy(np.bincount(train_blocks, minlength=vocab_size)),
        "bytes_per_token": train_text_bytes / max(train_text_tokens, 1),
        "validation_names": [doc.name for doc in split_docs["validation"]],
    }
    return datasets.DatasetDict(packed), meta


def build_datasets(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    val_fraction: float = 0.02,
    seed: int = 0,
    cache_dir: str | Path,
    num_proc: int = 2,
) -> datasets.DatasetDict:
    """Packed ``{"train", "validation"}`` datasets with one column ``input_ids`` of `block_size` int32 tokens.

    The split is by file (see `split_documents`); the tokenization cache files live in `cache_dir`.
    """
    dataset_dict, _ = _build(
        corpus, tokenizer, block_size=block_size, val_fraction=val_fraction, seed=seed, cache_dir=cache_dir, num_proc=num_proc
    )
    return dataset_dict


# ---------------------------------------------------------------------------- save / load


def prepare_data(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    block_size: int,
    val_fraction: float = 0.02,
    seed: int = 0,
    num_proc: int = 2,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Build the packed splits and save them to ``out_dir/{train,validation}`` plus ``out_dir/data_meta.json``.

    The splits are written to a staging folder first and renamed into place; the meta file
    goes last, so a folder with a meta file is always complete. `cache_dir` defaults to
    ``out_dir/cache``, which is removed afterwards (the saved splits hold all the data).
    Returns the meta dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    own_cache = cache_dir is None
    cache_path = out_dir / "cache" if cache_dir is None else Path(cache_dir)
    dataset_dict, meta = _build(
        corpus, tokenizer, block_size=block_size, val_fraction=val_fraction, seed=seed, cache_dir=cache_path, num_proc=num_proc
    )
    staging = out_dir / f".staging-{uuid.uuid4().hex}"
    try:
        for split in SPLITS:
            dataset_dict[split].save_to_disk(str(staging / split))
        write_json(staging / META_FILE, meta)
        # Remove the old meta first: from here until the new one lands the folder reads as incomplete.
        (out_dir / META_FILE).unlink(missing_ok=True)
        for split in SPLITS:
            if (out_dir / split).exists():
                shutil.rmtree(out_dir / split)
            os.replace(staging / split, out_dir / split)
        os.replace(staging / META_FILE, out_dir / META_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if own_cache:
        shutil.rmtree(cache_path, ignore_errors=True)
    return meta


def load_data(
    out_dir: str | Path,
    *,
    block_size: int | None = None,
    tokenizer_hash: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Load data saved by `prepare_data`: (train (N, block_size) int32, validation (M, block_size) int32, meta).

    Pass `block_size` and/or `tokenizer_hash` to fail early when the data was built for another run.
    """
    import datasets

    out_dir = Path(out_dir)
    meta_path = out_dir / META_FILE
    if not out_dir.is_dir():
        raise FileNotFoundError(f"data folder {str(out_dir)!r} does not exist; build it with prepare_data(corpus, tokenizer, out_dir)")
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{str(out_dir)!r} has no {META_FILE}: the data was never prepared there or its preparation was "
            "interrupted; run prepare_data again"
        )
    meta = json.loads(meta_path.read_text())
    if block_size is not None and meta["block_size"] != block_size:
        raise ValueError(
            f"data in {str(out_dir)!r} was packed with block_size {meta['block_size']}, not {block_size}; "
            "prepare it again or use that block size"
        )
    if tokenizer_hash is not None and meta["tokenizer_hash"] != tokenizer_hash:
        raise ValueError(
            f"data in {str(out_dir)!r} was tokenized with tokenizer {meta['tokenizer_hash'][:12]}, "
            f"not {tokenizer_hash[:12]}; prepare it again with this tokenizer"
        )
    tensors = []
    for split in SPLITS:
        dataset = datasets.load_from_disk(str(out_dir / split))
        flat = np.asarray(dataset.data.column("input_ids").combine_chunks().flatten())
        blocks = flat.reshape(-1, meta["block_size"])  # (n_blocks, block_size)
        if len(blocks) != meta["num_blocks"][split]:
            raise ValueError(f"{split} in {str(out_dir)!r} has {len(blocks)} blocks, meta says {meta['num_blocks'][split]}")
        tensors.append(torch.from_numpy(blocks.copy()))  # copy: the arrow buffer is a read-only memory map
    return tensors[0], tensors[1], meta


# ---------------------------------------------------------------------------- statistics


def unigram_entropy(token_counts: Sequence[int] | Mapping[Any, int] | np.ndarray | torch.Tensor) -> float:
    """Entropy in nats of the distribution given by `token_counts` (zero counts contribute nothing)."""
    if isinstance(token_counts, Mapping):
        token_counts = list(token_counts.values())
    if isinstance(token_counts, torch.Tensor):
        token_counts = token_counts.detach().cpu().numpy()
    counts = np.asarray(token_counts, dtype=np.float64).ravel()
    if (counts < 0).any():
        raise ValueError("token counts must be non-negative")
    total = counts.sum()
    if total <= 0:
        raise ValueError("token counts sum to zero: no tokens to measure")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def prepare(cfg, run_dir: Path, rank: int):
    """Tokenizer and packed data of a training job (``cfg.data``), made by rank 0 and read by all ranks.

    The tokenizer goes to ``data.tokenizer`` or ``<run_dir>/tokenizer`` (``<data_dir>/tokenizer`` with a
    prepared ``data.data_dir``); the blocks to ``data.data_dir`` or ``<run_dir>/data``. Returns
    ``(tokenizer, train blocks, validation blocks, data_meta)``.
    """
    import time

    import torch.distributed as dist

    from sparse_lm.corpus import load_corpus
    from sparse_lm.tokenizer import load_tokenizer, train_tokenizer

    d = cfg.data
    tok_dir = Path(d.tokenizer) if d.tokenizer else run_dir / "tokenizer"
    data_dir = Path(d.data_dir) if d.data_dir else run_dir / "data"
    if d.data_dir and not d.tokenizer:
        tok_dir = data_dir / "tokenizer"
    if rank == 0:
        need_data = not (data_dir / META_FILE).exists()
        need_tok = not (tok_dir / "tokenizer.json").exists()
        if (need_tok or need_data) and (d.data_dir and need_data):
            raise FileNotFoundError(f"data.data_dir {data_dir} has no {META_FILE}: run `sparse-lm data` first")
        if need_tok and d.tokenizer:
            raise FileNotFoundError(f"data.tokenizer {tok_dir} has no tokenizer.json")
        if need_tok or need_data:
            corpus = load_corpus(d.source, pattern=d.pattern, text_column=d.text_column, split=d.split,
                                 max_documents=d.max_documents)
            print(f"corpus {d.source}: {len(corpus)} documents, {corpus.num_bytes() / 1e6:.1f} MB, "
                  f"{corpus.skipped} skipped (not UTF-8)", flush=True)
            if need_tok:
                t0 = time.perf_counter()
                train_tokenizer(corpus, vocab_size=d.vocab_size, pretokenizer=d.pretokenizer, out_dir=tok_dir)
                print(f"tokenizer: BPE {d.vocab_size} trained in {time.perf_counter() - t0:.1f}s -> {tok_dir}",
                      flush=True)
            if need_data:
                prepare_data(corpus, load_tokenizer(tok_dir), data_dir, block_size=d.block_size,
                             val_fraction=d.val_fraction, seed=cfg.train.seed, num_proc=d.num_proc)
    dist.barrier()
    tokenizer = load_tokenizer(tok_dir)
    train, val, meta = load_data(data_dir, block_size=d.block_size, tokenizer_hash=compute_tokenizer_hash(tokenizer))
    return tokenizer, train, val, meta
