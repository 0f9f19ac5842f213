"""Corpus loading, BPE tokenizer and packed datasets, on real standard-library files."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from sparse_lm.corpus import Corpus, Document, load_corpus
from sparse_lm.data import META_FILE, build_datasets, load_data, prepare_data, split_documents, unigram_entropy
from sparse_lm.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer, tokenizer_hash

N_DOCS = 60
VOCAB = 400
BLOCK = 64

SNIPPET = "def f(x, y=2):\n\treturn {'a': [x, y]}  # café ≠ 'ünïcode'\n\n\nclass A :\n    pass\r\n"


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus("stdlib", max_documents=N_DOCS)


@pytest.fixture(scope="module")
def tokenizer_dir(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus, VOCAB, out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf_home_cache")


@pytest.fixture(scope="module")
def built(corpus: Corpus, tokenizer, tmp_path_factory: pytest.TempPathFactory, hf_cache: Path):
    """Datasets built with the default datasets cache pointed at an empty folder that must stay empty."""
    cache_dir = tmp_path_factory.mktemp("data_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
        dataset_dict = build_datasets(corpus, tokenizer, block_size=BLOCK, val_fraction=0.1, seed=3, cache_dir=cache_dir)
    return dataset_dict, cache_dir


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """A small folder: two good .py files, one latin-1 .py file, one empty .py file, one .txt file."""
    write_files(
        tmp_path / "src",
        {
            "b.py": b"y = 2\n",
            "sub/a.py": b"x = 1\n",
            "latin1.py": "s = 'café'\n".encode("latin-1"),
            "empty.py": b"",
            "notes.txt": b"hello\n",
        },
    )
    return tmp_path / "src"


# ---------------------------------------------------------------------------- corpus


def test_stdlib_corpus_sorted_deterministic_and_counts_non_utf8() -> None:
    corpus = load_corpus("stdlib")
    names = [doc.name for doc in corpus.documents]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert all(name.endswith(".py") for name in names)
    assert not any("site-packages" in name or "dist-packages" in name for name in names)
    assert all(doc.text for doc in corpus.documents)
    assert corpus.num_bytes() == sum(len(doc.text.encode()) for doc in corpus.documents)

    # Independent count of the files that are not UTF-8.
    root = Path(sysconfig.get_paths()["stdlib"])
    bad = 0
    for path in root.rglob("*.py"):
        if {"site-packages", "dist-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
    assert corpus.skipped == bad

    again = load_corpus("stdlib", max_documents=N_DOCS)
    assert again.documents == corpus.documents[:N_DOCS]
    assert len(again) == N_DOCS


def test_folder_source_skips_latin1_and_drops_empty(folder: Path) -> None:
    corpus = load_corpus(str(folder))
    assert [doc.name for doc in corpus.documents] == ["b.py", "sub/a.py"]
    assert corpus.skipped == 1
    assert corpus.source == str(folder)
    assert corpus.documents[1] == Document(name="sub/a.py", text="x = 1\n")

    txt = load_corpus(str(folder), pattern="*.txt")
    assert [doc.name for doc in txt.documents] == ["notes.txt"] and txt.skipped == 0
    assert len(load_corpus(str(folder), max_documents=1)) == 1


def test_glob_source(folder: Path) -> None:
    corpus = load_corpus(str(folder / "**" / "*.py"))
    assert [Path(doc.name).name for doc in corpus.documents] == ["b.py", "a.py"]
    assert corpus.skipped == 1
    with pytest.raises(ValueError, match="matches no files"):
        load_corpus(str(folder / "*.rs"))


def test_corpus_errors_say_what_to_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as err:
        load_corpus(str(missing))
    assert str(missing) in str(err.value) and "'stdlib', 'python-site', a folder, a glob or hf:NAME" in str(err.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as err:
        load_corpus(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value) and "**/*.py" in str(err.value)

    write_files(tmp_path / "latin", {"a.py": "é = 1\n".encode("latin-1"), "b.py": b"\xff\xfe"})
    with pytest.raises(ValueError, match="UTF-8"):
        load_corpus(str(tmp_path / "latin"))


def test_python_site_source_adds_site_packages_dedupes_and_counts(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import sparse_lm.corpus as corpus_mod

    stdlib, site = tmp_path / "lib", tmp_path / "site"
    write_files(stdlib, {"os.py": b"import sys\n", "json/__init__.py": b"x = 1\n",
                         "site-packages/inside.py": b"never\n", "enc.py": "\u00e9 = 1\n".encode("latin-1")})
    write_files(site, {"apkg/a_vendored_os.py": b"import sys\n",  # the stdlib's os.py bytes, sorting first
                       "apkg/mod.py": b"def f():\n    return 2\n", "apkg/bad.py": b"\xff\xfe",
                       "apkg/notes.txt": b"not python\n", "apkg/empty.py": b""})
    # purelib and platlib are the same folder on most installs: its files count once
    monkeypatch.setattr(corpus_mod.sysconfig, "get_paths",
                        lambda: {"stdlib": str(stdlib), "purelib": str(site), "platlib": str(site)})
    corpus = load_corpus("python-site")
    # sorted by name; of the two identical files the standard library's is kept, the vendored copy dropped
    assert [d.name for d in corpus.documents] == [
        "site-packages/apkg/mod.py", "stdlib/json/__init__.py", "stdlib/os.py"]
    assert corpus.duplicates == 1 and corpus.skipped == 2  # a_vendored_os.py; enc.py and bad.py
    assert load_corpus("python-site", max_documents=2).documents == corpus.documents[:2]
    # the plain stdlib source is unchanged: no prefix, no deduplication
    assert [d.name for d in load_corpus("stdlib").documents] == ["json/__init__.py", "os.py"]


def test_hf_source_from_local_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline: without this, datasets first tries the Hub for the name (a 5 s timeout here).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    rows = [{"content": "def f():\n    return 1\n"}, {"content": ""}, {"content": "x = 2\n"}]
    write_files(tmp_path / "ds", {"train.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode()})
    corpus = load_corpus(f"hf:{tmp_path / 'ds'}", text_column="content")
    assert [(d.name, d.text) for d in corpus.documents] == [("0", rows[0]["content"]), ("2", rows[2]["content"])]
    with pytest.raises(ValueError, match=r"no column 'text'.*\['content'\]"):
        load_corpus(f"hf:{tmp_path / 'ds'}")


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_has_asked_vocab(tokenizer) -> None:
    assert tokenizer.vocab_size == VOCAB and len(tokenizer) == VOCAB
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == EOS_TOKEN
    ids = tokenizer(SNIPPET, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == SNIPPET
    assert tokenizer.eos_token_id not in ids
    assert len(ids) < len(SNIPPET.encode())  # merges were learned


def test_saved_tokenizer_loads_with_autotokenizer(tokenizer_dir: Path, corpus: Corpus, tmp_path: Path) -> None:
    trained = train_tokenizer(corpus, VOCAB)  # same corpus again: deterministic
    auto = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert auto.get_vocab() == trained.get_vocab()
    for text in [SNIPPET] + [doc.text for doc in corpus.documents[:5]]:
        assert auto(text)["input_ids"] == trained(text)["input_ids"]
    assert tokenizer_hash(trained) == tokenizer_hash(tokenizer_dir) == tokenizer_hash(auto)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_pretokenizer_splits_as_the_papers_tokenizer(corpus: Corpus) -> None:
    from sparse_lm.tokenizer import PRETOKENIZERS

    paper = train_tokenizer(corpus, VOCAB)  # the default split: the paper's tinypython_2k regex
    gpt2 = train_tokenizer(corpus, VOCAB, pretokenizer="gpt2")
    pieces = [p for p, _ in paper.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x = [[a, b]]\n    s.add(y)  \n")]
    # Punctuation keeps the newlines after it and one mark joins the letters after it (GPT-2's bytes: Ġ space, Ċ newline).
    assert pieces == ["x", "Ġ=", "Ġ[[", "a", ",", "Ġb", "]]Ċ", "ĠĠĠ", "Ġs", ".add", "(y", ")", "ĠĠĊ"]
    odd = SNIPPET + "x = 'é'\n\n\t]]\r\n  \n" + "\u00a0\u2028end"
    for tok in (paper, gpt2):  # still byte-level: any text encodes and decodes exactly
        assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd
    assert paper.get_vocab() != gpt2.get_vocab()
    assert set(PRETOKENIZERS) == {"tinypython", "gpt2"}
    with pytest.raises(ValueError, match="unknown pretokenizer 'bert'"):
        train_tokenizer(corpus, VOCAB, pretokenizer="bert")


def test_tokenizer_refuses_vocab_the_corpus_cannot_fill() -> None:
    tiny = Corpus(documents=[Document("a.py", "x = 1\n")], skipped=0, source="tiny")
    with pytest.raises(ValueError, match="fewer than vocab_size 2048"):
        train_tokenizer(tiny, 2048)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(tiny, 100)


# ---------------------------------------------------------------------------- datasets


def token_stream(docs: list[Document], tokenizer) -> list[int]:
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream


def test_split_is_by_file_and_deterministic(corpus: Corpus) -> None:
    train, val = split_documents(corpus, 0.1, seed=3)
    assert len(val) == round(0.1 * len(corpus)) and len(train) + len(val) == len(corpus)
    assert not {d.name for d in train} & {d.name for d in val}
    assert split_documents(corpus, 0.1, seed=3) == (train, val)
    assert split_documents(corpus, 0.1, seed=4)[1] != val
    assert len(split_documents(corpus, 0.0001, seed=0)[1]) == 1  # always at least one validation file


def test_blocks_have_block_size_and_preserve_the_stream(built, corpus: Corpus, tokenizer) -> None:
    dataset_dict, _ = built
    assert set(dataset_dict) == {"train", "validation"}
    train_docs, val_docs = split_documents(corpus, 0.1, seed=3)
    for split, docs in (("train", train_docs), ("validation", val_docs)):
        ds = dataset_dict[split]
        assert ds.column_names == ["input_ids"]
        assert ds.features["input_ids"] == datasets.List(datasets.Value("int32"), length=BLOCK)
        blocks = np.stack([np.asarray(row, dtype=np.int64) for row in ds["input_ids"]])
        assert blocks.shape == (len(ds), BLOCK) and len(ds) > 0
        expected = token_stream(docs, tokenizer)
        assert len(expected) - blocks.size < BLOCK  # only the remainder is dropped
        assert blocks.ravel().tolist() == expected[: blocks.size]


def test_datasets_cache_stays_in_cache_dir(built, hf_cache: Path) -> None:
    _, cache_dir = built
    # One cache file per split and worker (num_proc=2), all inside cache_dir.
    assert {p.name.split("-")[1] for p in cache_dir.glob("tokens-*.arrow")} == {"train", "validation"}
    assert list(hf_cache.iterdir()) == []


def test_prepare_and_load_data(built, corpus: Corpus, tokenizer, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    meta = prepare_data(corpus, tokenizer, out, block_size=BLOCK, val_fraction=0.1, seed=3)
    assert sorted(p.name for p in out.iterdir()) == sorted(["train", "validation", META_FILE])  # no staging or cache left
    assert json.loads((out / META_FILE).read_text()) == meta

    train, val, loaded_meta = load_data(out, block_size=BLOCK, tokenizer_hash=tokenizer_hash(tokenizer_dir))
    assert loaded_meta == meta
    assert train.dtype == val.dtype == torch.int32
    assert train.shape == (meta["num_blocks"]["train"], BLOCK) and val.shape == (meta["num_blocks"]["validation"], BLOCK)
    dataset_dict, _ = built  # same split and packing as the in-memory build
    assert train.tolist() == [list(row) for row in dataset_dict["train"]["input_ids"]]

    train_docs, val_docs = split_documents(corpus, 0.1, seed=3)
    assert meta["num_documents"] == {"train": len(train_docs), "validation": len(val_docs)}
    assert meta["validation_names"] == [d.name for d in val_docs]
    assert meta["num_tokens"]["train"] == len(token_stream(train_docs, tokenizer))
    assert meta["vocab_size"] == VOCAB and meta["block_size"] == BLOCK and meta["skipped_files"] == corpus.skipped
    assert meta["source"] == "stdlib" and meta["tokenizer_hash"] == tokenizer_hash(tokenizer)
    counts = torch.bincount(train.ravel().long(), minlength=VOCAB)
    assert meta["unigram_entropy_nats"] == pytest.approx(unigram_entropy(counts))
    assert 0 < meta["unigram_entropy_nats"] < math.log(VOCAB)
    train_bytes = sum(len(d.text.encode()) for d in train_docs)
    assert meta["bytes_per_token"] == pytest.approx(train_bytes / (meta["num_tokens"]["train"] - len(train_docs)))

    with pytest.raises(ValueError, match=f"block_size {BLOCK}, not 128"):
        load_data(out, block_size=128)
    with pytest.raises(ValueError, match="tokenized with tokenizer"):
        load_data(out, tokenizer_hash="0" * 64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(tmp_path / "missing")
    (out / META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="run prepare_data again"):
        load_data(out)


def test_prepare_data_refuses_too_few_tokens(corpus: Corpus, tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fewer than one block"):
        prepare_data(corpus, tokenizer, tmp_path / "d", block_size=10**7, num_proc=1)


# ---------------------------------------------------------------------------- statistics


def test_unigram_entropy_by_hand() -> None:
    # p = (1/4, 1/4, 1/2): H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2
    assert unigram_entropy([1, 1, 2]) == pytest.approx(1.5 * math.log(2), abs=1e-12)
    assert unigram_entropy(np.array([0, 5, 0, 5])) == pytest.approx(math.log(2), abs=1e-12)
    assert unigram_entropy({"a": 3}) == 0.0
    assert unigram_entropy(torch.tensor([2, 2, 2, 2])) == pytest.approx(math.log(4), abs=1e-12)
    with pytest.raises(ValueError):
        unigram_entropy([0, 0])
    with pytest.raises(ValueError):
        unigram_entropy([1, -1])
