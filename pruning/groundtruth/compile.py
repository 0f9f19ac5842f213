"""Compile a RASP program with tracr and import it as a torch model, with its task.

This is the only module that touches jax/tracr, and only inside functions, so
``import pruning.groundtruth`` works without the ``groundtruth`` extra; calling
`compile_tracr` without it raises an error that says how to install it.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pruning.groundtruth.task import IGNORE, SequenceTask
from pruning.groundtruth.torch_model import TracrTransformer, from_tracr_params

COMPILER_PAD = "compiler_pad"
# Enumerate every input when there are at most this many; otherwise sample `n_random`.
MAX_EXHAUSTIVE = 4096
N_RANDOM = 1000


def _tracr():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # tracr needs no accelerator; keep jax off the GPU
    try:
        from tracr.compiler import compiling
        from tracr.craft import bases
        from tracr.rasp import rasp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"tracr is not installed ({e}); install the extra: pip install -e '.[groundtruth]'") from e
    return compiling, bases, rasp


@dataclass
class TracrModel:
    """What tracr compiled, as plain data (numpy), and how to run tracr's own forward pass."""

    assembled: Any  # tracr AssembledTransformerModel
    program: Any  # the rasp.SOp
    vocab: list[Any]
    max_seq_len: int
    compiler_bos: str
    categorical: bool
    classes: list[Any]  # output values, in tracr's output encoding order
    output_labels: list[str]  # residual labels of the output dimensions
    output_proj: np.ndarray  # (d_model, n_classes) tracr's unembedding (before argmax)

    @property
    def encoding(self) -> dict[Any, int]:
        return dict(self.assembled.input_encoder.encoding_map)

    @property
    def bos_id(self) -> int:
        return self.encoding[self.compiler_bos]

    @property
    def pad_id(self) -> int:
        return self.encoding[COMPILER_PAD]

    def forward(self, tokens: Sequence[Any]) -> Any:
        """tracr's own forward pass on one input (no BOS: it is added here)."""
        return self.assembled.apply([self.compiler_bos, *tokens])


def compile_tracr(program: Any, vocab: Sequence[Any], max_seq_len: int, compiler_bos: str = "BOS",
                  mlp_exactness: int = 100) -> TracrModel:
    """tracr's compiler, bidirectional attention, as `compile_rasp_to_model`."""
    compiling, bases, rasp = _tracr()
    if not isinstance(program, rasp.SOp):
        raise TypeError(f"program must be a rasp.SOp (e.g. tracr.compiler.lib.make_length()), got {type(program)}")
    vocab_set = set(vocab)
    assembled = compiling.compile_rasp_to_model(program, vocab=vocab_set, max_seq_len=max_seq_len,
                                                compiler_bos=compiler_bos, compiler_pad=COMPILER_PAD,
                                                mlp_exactness=mlp_exactness)
    labels = list(assembled.residual_labels)
    categorical = rasp.is_categorical(program)
    if categorical:
        enc = assembled.output_encoder.encoding_map  # value -> class index
        classes = [v for v, _ in sorted(enc.items(), key=lambda kv: kv[1])]
        output_labels = [str(bases.BasisDirection(program.label, v)) for v in classes]
    else:
        classes = [program.label]
        output_labels = [str(bases.BasisDirection(program.label))]
    missing = [lab for lab in output_labels if lab not in labels]
    if missing:
        raise RuntimeError(f"output dimensions {missing} are not in the compiled residual stream {labels}")
    proj = np.zeros((len(labels), len(output_labels)))
    for c, lab in enumerate(output_labels):
        proj[labels.index(lab), c] = 1.0
    return TracrModel(assembled, program, sorted(vocab_set, key=repr), max_seq_len, compiler_bos, categorical, classes,
                      output_labels, proj)


def to_torch(tm: TracrModel, logit_scale: float = 10.0, dtype: torch.dtype = torch.float32) -> TracrTransformer:
    cfg = tm.assembled.model_config
    params = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in tm.assembled.params.items()}
    return from_tracr_params(params, n_layer=cfg.num_layers, n_head=cfg.num_heads, key_size=cfg.key_size,
                             d_mlp=cfg.mlp_hidden_size, output_proj=tm.output_proj, pad_id=tm.pad_id,
                             bos_id=tm.bos_id, residual_labels=list(tm.assembled.residual_labels),
                             output_labels=tm.output_labels, logit_scale=logit_scale, dtype=dtype)


# ---------------------------------------------------------------------------- inputs and the task


def input_space(vocab: Sequence[Any], max_seq_len: int, *, min_len: int = 1, max_exhaustive: int = MAX_EXHAUSTIVE,
                n_random: int = N_RANDOM, seed: int = 0,
                accept: Callable[[list[Any]], bool] | None = None) -> list[list[Any]]:
    """Every input of lengths min_len..max_seq_len when there are at most `max_exhaustive`, else a sample.

    `accept` filters inputs (e.g. distinct tokens for a sort that needs unique keys). The sample draws a
    length uniformly, then tokens uniformly, and keeps `n_random` distinct accepted inputs (fewer if the
    accepted space is smaller).
    """
    vocab = sorted(set(vocab), key=repr)
    total = sum(len(vocab) ** n for n in range(min_len, max_seq_len + 1))
    if total <= max_exhaustive:
        out = [list(seq) for n in range(min_len, max_seq_len + 1) for seq in itertools.product(vocab, repeat=n)]
        return [x for x in out if accept is None or accept(x)]
    rng = random.Random(seed)
    seen: set[tuple] = set()
    out = []
    for _ in range(50 * n_random):
        n = rng.randint(min_len, max_seq_len)
        x = [rng.choice(vocab) for _ in range(n)]
        if tuple(x) in seen or (accept is not None and not accept(x)):
            continue
        seen.add(tuple(x))
        out.append(x)
        if len(out) == n_random:
            break
    return out


def build_task(tm: TracrModel, inputs: Sequence[Sequence[Any]]) -> SequenceTask:
    """Encode inputs (BOS added, right-padded) and evaluate the RASP program for the per-position targets."""
    _, _, rasp = _tracr()
    if not inputs:
        raise ValueError("no inputs: give at least one input sequence")
    enc = tm.encoding
    bad = sorted({repr(t) for x in inputs for t in x if t not in enc or t in (tm.compiler_bos, COMPILER_PAD)})
    if bad:
        raise ValueError(f"inputs use tokens outside the vocabulary {tm.vocab}: {', '.join(bad)}")
    long = [x for x in inputs if not 1 <= len(x) <= tm.max_seq_len]
    if long:
        raise ValueError(f"inputs must have 1..{tm.max_seq_len} tokens (max_seq_len); e.g. {long[0]!r}")
    T = 1 + max(len(x) for x in inputs)
    ids = torch.full((len(inputs), T), tm.pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(inputs), T), IGNORE, dtype=torch.long)
    class_of = {v: c for c, v in enumerate(tm.classes)}
    for row, x in enumerate(inputs):
        ids[row, 0] = tm.bos_id
        ids[row, 1 : 1 + len(x)] = torch.tensor([enc[t] for t in x])
        if tm.categorical:
            for pos, value in enumerate(rasp.evaluate(tm.program, list(x))):
                if value is not None and value in class_of:
                    targets[row, 1 + pos] = class_of[value]
    lengths = torch.tensor([1 + len(x) for x in inputs], dtype=torch.long)
    return SequenceTask(ids, lengths, targets, list(tm.classes), [list(x) for x in inputs])


def tracr_outputs(tm: TracrModel, inputs: Sequence[Sequence[Any]]) -> list[np.ndarray]:
    """tracr's own final residual (``transformer_output``) per input, (1 + len, d_model) each.

    Inputs of one length run as one batch (tracr has no padding mask, so lengths are never mixed).
    """
    import jax.numpy as jnp

    enc = tm.encoding
    out: list[np.ndarray | None] = [None] * len(inputs)
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(inputs):
        by_len.setdefault(len(x), []).append(i)
    for rows in by_len.values():
        ids = jnp.array([[tm.bos_id] + [enc[t] for t in inputs[i]] for i in rows])  # (n, 1 + len)
        res = np.asarray(tm.assembled.forward(tm.assembled.params, ids).transformer_output.output)
        for j, i in enumerate(rows):
            out[i] = res[j]
    return out  # type: ignore[return-value]
