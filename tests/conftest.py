"""Shared fixtures: small real data (a slice of the standard library) prepared once per session."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """Tokenizer (BPE 512) and 64-token blocks from 60 standard-library files."""
    from sparse_lm.corpus import load_corpus
    from sparse_lm.data import prepare_data
    from sparse_lm.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("small_data")
    corpus = load_corpus("stdlib", max_documents=60)
    tok = train_tokenizer(corpus, vocab_size=512, out_dir=out / "tokenizer")
    prepare_data(corpus, tok, out, block_size=64, val_fraction=0.1, num_proc=1)
    return out


@pytest.fixture(scope="session")
def stdlib_tokenizers() -> dict:
    """BPE 2048 on the whole standard library, by pre-tokenizer ("tinypython", the default, and "gpt2"), trained
    once per session (the project's own tokenizer; tests must not change them)."""
    from sparse_lm.corpus import load_corpus
    from sparse_lm.tokenizer import PRETOKENIZERS, train_tokenizer

    corpus = load_corpus("stdlib")
    return {name: train_tokenizer(corpus, vocab_size=2048, pretokenizer=name) for name in PRETOKENIZERS}


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), **extra})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture
def single_rank(monkeypatch):
    """One in-process rank; the env the trainer sets is undone after the test."""
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=free_port()).items():
        monkeypatch.setenv(key, value)
