"""Mean activations over the pretraining distribution: the values a pruned node is replaced by.

Mean ablation sets a closed node to its average over ordinary text, every
token position counted, so the circuit is tested against "this channel
carries nothing specific", not against zero (which can be a strong signal).

The text is `mean_blocks` blocks of the model's own pretraining data: the
validation blocks of the run that trained it (found beside the model folder:
``<run>/model`` + ``<run>/config.json`` / ``<run>/data``); a model without run
data (a GPT-2 from elsewhere) gets its tokenizer's encoding of the Python
standard library instead. Blocks are taken evenly spaced over the source.

Means are cached per model in a safetensors file named by a hash of the model
weights, the site list, the number of blocks and the blocks themselves, in
``<model_dir>/.sparse_lm_cache/`` when that is writable, else in a fallback
folder (the run's output folder). The blocks are stored in the same file, so
the top-activating snippets of circuit nodes (`top_snippets`) are computed
later, only for the few nodes that make it into a circuit, on the same text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparse_lm.adapters import sites_of
from sparse_lm.arch import context_length
from sparse_lm.io import atomic_write_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Means", "corpus_blocks", "compute_means", "load_or_compute_means", "weights_hash", "top_snippets",
           "find_run_data", "CACHE_DIRNAME"]

CACHE_DIRNAME = ".sparse_lm_cache"
BLOCKS_KEY = "__blocks__"
DEFAULT_BLOCK_LEN = 256


@dataclass
class Means:
    """Per-channel mean of every node site, and the corpus blocks they were taken over."""

    values: dict[str, torch.Tensor]  # site name -> (width,) float32
    blocks: torch.Tensor  # (n_blocks, block_len) long: the text, for snippets
    source: str  # where the blocks come from ("run data /tmp/runs/x/data", "stdlib")
    key: str = ""  # the cache key (hash)
    from_cache: bool = False
    path: str | None = None  # the cache file, when there is one
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def covers(self, names: list[str]) -> bool:
        return all(n in self.values for n in names)


# ---------------------------------------------------------------------------- corpus


def find_run_data(model_dir: str | Path | None) -> Path | None:
    """The prepared data folder of the run that trained the model in `model_dir`, if there is one."""
    if model_dir is None:
        return None
    model_dir = Path(model_dir)
    candidates = [model_dir / "data", model_dir.parent / "data"]
    run_config = model_dir.parent / "config.json"
    if run_config.is_file():
        try:
            data_dir = (json.loads(run_config.read_text()).get("data") or {}).get("data_dir")
        except (json.JSONDecodeError, AttributeError):
            data_dir = None
        if data_dir:
            candidates.insert(0, Path(data_dir))
    for c in candidates:
        if (c / "data_meta.json").is_file():
            return c
    return None


def _spread(n_total: int, n: int) -> list[int]:
    """n indices evenly spaced over range(n_total)."""
    if n >= n_total:
        return list(range(n_total))
    return [int(i * n_total / n) for i in range(n)]


def _stdlib_blocks(tokenizer: PreTrainedTokenizerBase, n_blocks: int, block_len: int) -> torch.Tensor:
    from sparse_lm.corpus import load_corpus

    corpus = load_corpus("stdlib")
    docs = list(corpus.documents)
    random.Random(0).shuffle(docs)  # a fixed mix of the library, not its first files in name order
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    need = n_blocks * block_len
    for doc in docs:
        stream += tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    n = min(n_blocks, len(stream) // block_len)
    if n == 0:
        raise ValueError(f"the standard library gave {len(stream)} tokens, fewer than one block of {block_len}")
    return torch.tensor(stream[: n * block_len], dtype=torch.long).view(n, block_len)  # (n, block_len)


def corpus_blocks(
    tokenizer: PreTrainedTokenizerBase | None,
    n_blocks: int,
    *,
    model_dir: str | Path | None = None,
    max_len: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, str]:
    """(blocks (n, block_len) long, a description of the source): run data if found, else the stdlib."""
    data_dir = find_run_data(model_dir)
    if data_dir is not None:
        from sparse_lm.data import load_data

        try:
            _, val, meta = load_data(data_dir)
            ok = vocab_size is None or int(val.max()) < vocab_size
            if ok and tokenizer is not None and "tokenizer_hash" in meta:
                from sparse_lm.tokenizer import tokenizer_hash

                ok = tokenizer_hash(tokenizer) == meta["tokenizer_hash"]
            if ok:
                blocks = val[_spread(len(val), n_blocks)].long()
                if max_len is not None:
                    blocks = blocks[:, :max_len]
                if len(blocks) < n_blocks:
                    warnings.warn(f"{data_dir} has {len(val)} validation blocks, fewer than the {n_blocks} asked for",
                                  stacklevel=2)
                return blocks, f"run data {data_dir} (validation)"
            warnings.warn(f"{data_dir} was built with another tokenizer or vocabulary; using the standard library",
                          stacklevel=2)
        except (OSError, ValueError) as e:
            warnings.warn(f"could not read run data {data_dir} ({e}); using the standard library", stacklevel=2)
    if tokenizer is None:
        raise ValueError("no run data beside the model and no tokenizer to encode the standard library with; "
                         "pass a tokenizer or the corpus blocks")
    block_len = min(DEFAULT_BLOCK_LEN, max_len or DEFAULT_BLOCK_LEN)
    return _stdlib_blocks(tokenizer, n_blocks, block_len), "stdlib"


# ---------------------------------------------------------------------------- means


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def compute_means(model: nn.Module, site_names: list[str], blocks: torch.Tensor, batch_size: int = 8,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """Mean of each named site's channels over every position of `blocks` (float64 sums, float32 result)."""
    sites = sites_of(model)
    sites.check(site_names)
    device = _device_of(model)
    sums = {n: torch.zeros(sites.width(n), dtype=torch.float64, device=device) for n in site_names}
    count = 0
    was_training = model.training
    model.eval()
    starts = range(0, len(blocks), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="means", unit="batch", leave=False)
    try:
        for start in starts:
            ids = blocks[start : start + batch_size].to(device)
            with sites.record(site_names) as acts:
                model(input_ids=ids)
            for n in site_names:
                sums[n] += acts[n].double().sum(dim=(0, 1))  # (B, T, W) -> (W,)
            count += ids.numel()
    finally:
        model.train(was_training)
    return {n: (s / count).float().cpu() for n, s in sums.items()}


def weights_hash(model: nn.Module) -> str:
    """sha256 over the model's state (names, shapes, dtypes and bytes), in name order."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_key(model: nn.Module, site_names: list[str], blocks: torch.Tensor) -> str:
    h = hashlib.sha256(weights_hash(model).encode())
    h.update(json.dumps(sorted(site_names)).encode())
    h.update(f"{tuple(blocks.shape)}".encode())
    h.update(blocks.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def cache_dirs(model_dir: str | Path | None, cache_dir: str | Path | None,
               fallback_dir: str | Path | None) -> list[Path]:
    """Where a cache file may live, best first (only existing-or-creatable, writable folders are used to write)."""
    out = []
    if cache_dir is not None:
        out.append(Path(cache_dir))
    if model_dir is not None:
        out.append(Path(model_dir) / CACHE_DIRNAME)
    if fallback_dir is not None:
        out.append(Path(fallback_dir) / CACHE_DIRNAME)
    return out


def load_or_compute_means(
    model: nn.Module,
    site_names: list[str],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    n_blocks: int = 64,
    blocks: torch.Tensor | None = None,
    model_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    fallback_dir: str | Path | None = None,
    progress: bool = False,
) -> Means:
    """Means of `site_names` over `n_blocks` corpus blocks, from the cache when it has them.

    `blocks` overrides the corpus (tests, other text). `model_dir` defaults to the
    folder the model was loaded from; with no folder at all nothing is cached.
    """
    from safetensors.torch import load_file, save

    if model_dir is None:
        guess = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
        model_dir = guess if guess and Path(guess).is_dir() else None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if blocks is None:
        blocks, source = corpus_blocks(tokenizer, n_blocks, model_dir=model_dir, max_len=context_length(model),
                                       vocab_size=vocab)
    else:
        blocks, source = blocks[:n_blocks].long(), "given blocks"
    key = _cache_key(model, site_names, blocks)
    filename = f"means-{key}.safetensors"
    dirs = cache_dirs(model_dir, cache_dir, fallback_dir)
    for d in dirs:
        path = d / filename
        if path.is_file():
            try:
                data = load_file(str(path))
            except Exception as e:  # a damaged cache file is recomputed, not fatal
                warnings.warn(f"ignoring unreadable mean cache {path}: {e}", stacklevel=2)
                continue
            stored = data.pop(BLOCKS_KEY)
            if sorted(data) == sorted(site_names) and torch.equal(stored, blocks):
                return Means(values=data, blocks=stored, source=source, key=key, from_cache=True, path=str(path))
    values = compute_means(model, site_names, blocks, progress=progress)
    means = Means(values=values, blocks=blocks, source=source, key=key)
    payload = save({**{n: v.contiguous() for n, v in values.items()}, BLOCKS_KEY: blocks.contiguous()},
                   metadata={"source": source, "sites": json.dumps(site_names), "n_blocks": str(len(blocks))})
    for d in dirs:
        if _writable_dir(d):
            try:
                atomic_write_bytes(d / filename, payload)
            except OSError:
                continue
            means.path = str(d / filename)
            break
    return means


# ---------------------------------------------------------------------------- snippets


@torch.no_grad()
def top_snippets(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    blocks: torch.Tensor,
    nodes: list[tuple[str, int]],
    *,
    k: int = 5,
    tokens: int = 40,
    batch_size: int = 8,
) -> list[list[dict[str, Any]]]:
    """For each (site, channel): up to `k` snippets of about `tokens` tokens around its largest |activation|.

    One snippet per block at most (its own maximum), the blocks with the largest
    maxima first. Each snippet: ``{"text", "activation", "token", "highlight":
    [start, end]}`` where ``text[start:end]`` is the token at the maximum.
    """
    if not nodes or k <= 0:
        return [[] for _ in nodes]
    sites = sites_of(model)
    names = sorted({s for s, _ in nodes})
    device = _device_of(model)
    # per node: best |value| per block, its signed value and its position
    best_abs = torch.full((len(nodes), len(blocks)), -1.0)
    best_val = torch.zeros(len(nodes), len(blocks))
    best_pos = torch.zeros(len(nodes), len(blocks), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start : start + batch_size].to(device)
            with sites.record(names) as acts:
                model(input_ids=ids)
            for i, (site, ch) in enumerate(nodes):
                a = acts[site][..., ch].float().cpu()  # (B, T)
                pos = a.abs().argmax(dim=1)  # (B,)
                rows = torch.arange(a.shape[0])
                sl = slice(start, start + a.shape[0])
                best_abs[i, sl] = a[rows, pos].abs()
                best_val[i, sl] = a[rows, pos]
                best_pos[i, sl] = pos
    finally:
        model.train(was_training)
    before = max(tokens * 3 // 4, 1)
    out: list[list[dict[str, Any]]] = []
    for i in range(len(nodes)):
        order = best_abs[i].argsort(descending=True)[:k]
        snippets = []
        for b in order.tolist():
            if best_abs[i, b] <= 0:
                continue
            p = int(best_pos[i, b])
            ids = blocks[b].tolist()
            lo, hi = max(p - before, 0), min(p - before + tokens, len(ids))
            prefix = tokenizer.decode(ids[lo:p])
            token = tokenizer.decode(ids[p : p + 1])
            suffix = tokenizer.decode(ids[p + 1 : max(hi, p + 1)])
            snippets.append({"text": prefix + token + suffix, "activation": float(best_val[i, b]),
                             "token": token, "highlight": [len(prefix), len(prefix) + len(token)]})
        out.append(snippets)
    return out
