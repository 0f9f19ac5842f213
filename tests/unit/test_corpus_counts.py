"""benchmarks/corpus_counts.py: token-sequence counts in a packed corpus, checked against a plain loop."""

from __future__ import annotations

import importlib.util
import json

import numpy as np

from conftest import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("corpus_counts", ROOT / "benchmarks" / "corpus_counts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_count_sequence_matches_a_plain_loop():
    cc = _module()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, size=(7, 50))
    for seq in ([1], [2, 3], [0, 0, 1], list(range(60))):
        expected = sum(1 for row in ids for i in range(len(row) - len(seq) + 1)
                       if list(row[i:i + len(seq)]) == seq)
        assert cc.count_sequence(ids, seq) == expected
    # a sequence is not counted across two blocks
    assert cc.count_sequence(np.array([[5, 1], [2, 5]]), [1, 2]) == 0


def test_counts_on_a_real_packed_corpus(small_data, tmp_path):
    cc = _module()
    out = tmp_path / "counts.json"
    assert cc.main([str(small_data), "--pattern", "\n", "--pattern", "def", "--json", str(out)]) == 0
    res = json.loads(out.read_text())[0]
    from datasets import load_from_disk
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(small_data / "tokenizer"))
    ids = np.asarray(load_from_disk(str(small_data / "train")).with_format("numpy")["input_ids"])
    assert res["train_tokens"] == ids.size
    for row in res["patterns"]:
        seq = tok(row["pattern"], add_special_tokens=False)["input_ids"]
        assert row["count"] == cc.count_sequence(ids, seq) > 0
        assert abs(row["per_million"] - row["count"] / ids.size * 1e6) < 1e-9
    assert cc.main([str(tmp_path / "missing")]) == 2  # not a data folder: a clear error, no traceback
