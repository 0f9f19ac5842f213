"""How often a packed corpus shows each answer of the circuit tasks: occurrences per million train tokens.

A model learns a binary next-token task only as well as its corpus shows the contrast. Each pattern
is a string, encoded with the data folder's own tokenizer, and counted as that token sequence in the
train split (the blocks as packed, so a sequence that straddles two blocks is not counted)::

    python benchmarks/corpus_counts.py runs/default/data
    python benchmarks/corpus_counts.py runs/default/data runs/long/data --pattern "]]\\n" --pattern "]\\n"

The defaults are the closing lines the three circuit tasks compare: ``'\\n`` against ``"\\n``
(single_double_quote), ``]]\\n`` against ``]\\n`` (bracket_counting; every ``]]\\n`` also ends in
``]\\n``) and ``.add`` against `` +=`` (set_or_string).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_PATTERNS = ["'\n", '"\n', "]]\n", "]\n", ".add", " +="]


def count_sequence(ids: np.ndarray, seq: list[int]) -> int:
    """Occurrences of the token sequence `seq` in the rows of `ids` (blocks, tokens)."""
    n = ids.shape[1] - len(seq) + 1
    if n <= 0:
        return 0
    hit = np.ones((ids.shape[0], n), dtype=bool)
    for j, t in enumerate(seq):
        hit &= ids[:, j:j + n] == t
    return int(hit.sum())


def corpus_counts(data_dir: Path, patterns: list[str]) -> dict:
    from datasets import load_from_disk
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(data_dir / "tokenizer"))
    train = load_from_disk(str(data_dir / "train")).with_format("numpy")
    ids = np.asarray(train["input_ids"])  # (blocks, block_size)
    millions = ids.size / 1e6
    rows = []
    for p in patterns:
        seq = tok(p, add_special_tokens=False)["input_ids"]
        n = count_sequence(ids, seq)
        rows.append({"pattern": p, "tokens": tok.convert_ids_to_tokens(seq), "count": n, "per_million": n / millions})
    return {"data": str(data_dir), "train_tokens": int(ids.size), "patterns": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", nargs="+", type=Path, help="packed data folders (sparse-lm data --out DIR)")
    p.add_argument("--pattern", action="append", default=None, help="a string to count (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = p.parse_args(argv)
    patterns = args.pattern or DEFAULT_PATTERNS
    out = []
    for d in args.data:
        if not (d / "train").is_dir() or not (d / "tokenizer").is_dir():
            print(f"{d}: not a packed data folder (no train/ and tokenizer/); make one with `sparse-lm data --out {d}`",
                  file=sys.stderr)
            return 2
        res = corpus_counts(d, patterns)
        out.append(res)
        print(f"{d}: {res['train_tokens'] / 1e6:.1f}M train tokens")
        for r in res["patterns"]:
            print(f"  {r['pattern']!r:10} {' '.join(r['tokens']):16} {r['count']:>9,}  {r['per_million']:8.1f} per M")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
