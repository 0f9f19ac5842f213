"""The main job: from the embedded corpus to trained models (and, as stages land, circuits).

    python -m sparse_lm.demo [--quick] [--name NAME] [--out runs] [--nproc 2] [--redo STAGE ...]

Each stage writes ``runs/<name>/stages/<stage>.json`` when it finishes; a
second run skips finished stages, and a stage that was interrupted resumes
(training resumes from its newest checkpoint). The plan with a time estimate
is printed first, an ETA after every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sparse_lm.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stage:
    name: str
    what: str
    minutes: float  # estimate on a 2-core CPU machine (full size)
    quick_minutes: float
    run: Callable[["Pipeline"], dict]


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.run_dir = Path(args.out) / args.name
        self.stage_dir = self.run_dir / "stages"
        self.data_dir = self.run_dir / "data"
        self.results: dict[str, dict] = {}

    # -- helpers used by stages -------------------------------------------------
    def training_overrides(self) -> list[str]:
        common = [f"out_dir={self.run_dir}", f"data.data_dir={self.data_dir}"]
        if self.quick:
            common += ["train.steps=40", "train.eval_every=20", "train.checkpoint_every=20", "train.log_every=5",
                       "train.global_batch=8", "train.micro_batch=4", "data.block_size=128"]
        return common

    def launch(self, command: str, preset: str, run_name: str, extra: list[str] = ()) -> dict:
        """A training job on ``--nproc`` ranks through scripts/pretrain.sh."""
        model = {"pretrain": ["model.n_layer=2", "model.d_model=64", "model.d_mlp=256", "model.n_head=4"],
                 "train-dense": ["model.n_layer=2", "model.n_embd=64", "model.n_inner=256", "model.n_head=4"]}
        cmd = ["bash", str(ROOT / "scripts" / "pretrain.sh"), "--nproc", str(self.args.nproc), "--command", command,
               "--", "--preset", preset, f"run_name={run_name}", *self.training_overrides(),
               *(model[command] if self.quick else []), *extra]
        env = dict(os.environ, PYTHON=sys.executable)
        res = subprocess.run(cmd, env=env)
        if res.returncode:
            raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {res.returncode}; fix the error above and "
                               f"run the demo again (finished stages are kept)")
        return json.loads((self.run_dir / run_name / "summary.json").read_text())


# -- stages ------------------------------------------------------------------------


def stage_data(p: Pipeline) -> dict:
    from sparse_lm.corpus import load_corpus
    from sparse_lm.data import prepare_data
    from sparse_lm.tokenizer import train_tokenizer

    corpus = load_corpus("stdlib", max_documents=300 if p.quick else None)
    print(f"corpus: the standard library of this Python ({len(corpus)} files, {corpus.num_bytes() / 1e6:.1f} MB, "
          f"{corpus.skipped} not UTF-8 and skipped)", flush=True)
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus, vocab_size=2048, out_dir=p.data_dir / "tokenizer")
    print(f"tokenizer: byte-level BPE {len(tok)} in {time.perf_counter() - t0:.1f}s", flush=True)
    meta = prepare_data(corpus, tok, p.data_dir, block_size=128 if p.quick else 256, num_proc=2)
    return {"documents": meta["num_documents"], "tokens": meta["num_tokens"],
            "unigram_entropy_nats": meta["unigram_entropy_nats"], "skipped_files": meta["skipped_files"]}


def stage_sparse(p: Pipeline) -> dict:
    return p.launch("pretrain", "tiny", "sparse")


def stage_dense(p: Pipeline) -> dict:
    return p.launch("train-dense", "tiny-dense", "dense")


def stage_eval(p: Pipeline) -> dict:
    import torch

    from sparse_lm.loading import load_model_and_tokenizer
    from tasks import evaluate_tasks_or_report, format_table

    out = {}
    for key in ("sparse", "dense"):
        model, tok = load_model_and_tokenizer(p.results[key]["model_dir"])
        with torch.no_grad():
            rows = evaluate_tasks_or_report(model, tok, split="test", n=128 if p.quick else 512)
        print(f"\ntasks, {key} model ({p.results[key]['model_dir']}), test split:\n{format_table(rows)}", flush=True)
        out[key] = rows
    return out


def stage_report(p: Pipeline) -> dict:
    from sparse_lm.report import write_report

    md, page = write_report(p.results, p.run_dir)
    print(f"report: {page} and {md}", flush=True)
    return {"report_html": str(page), "report_md": str(md)}


STAGES = [
    Stage("data", "train the BPE tokenizer and pack the standard library", 1.0, 0.3, stage_data),
    Stage("sparse", "weight-sparse SparseGPT `tiny`, 2 ranks via scripts/pretrain.sh", 12.0, 1.5, stage_sparse),
    Stage("dense", "dense GPT-2 baseline `tiny-dense`, 2 ranks", 6.0, 1.0, stage_dense),
    Stage("eval", "binary next-token tasks on both models (test split)", 1.0, 0.3, stage_eval),
    Stage("report", "runs/<name>/report.html and report.md", 0.1, 0.1, stage_report),
]


def _fmt(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes >= 1 else f"{minutes * 60:.0f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparse_lm.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the same stages at toy size (smoke test, a few minutes)")
    ap.add_argument("--name", default=None, help="run folder name under --out (default: default, or quick)")
    ap.add_argument("--out", default="runs")
    ap.add_argument("--nproc", type=int, default=2, help="ranks for the training stages")
    ap.add_argument("--redo", nargs="*", default=[], metavar="STAGE", help="run these stages again")
    args = ap.parse_args(argv)
    args.name = args.name or ("quick" if args.quick else "default")
    p = Pipeline(args)
    p.stage_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(args.redo) - {s.name for s in STAGES}
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(s.name for s in STAGES)}")

    todo = []
    print(f"== sparse-lm main job -> {p.run_dir}  ({'quick' if p.quick else 'full'} size)")
    for s in STAGES:
        marker = p.stage_dir / f"{s.name}.json"
        done = marker.exists() and s.name not in args.redo and s.name != "report"
        est = s.quick_minutes if p.quick else s.minutes
        print(f"   {'[done]' if done else '[todo]'} {s.name:8s} ~{_fmt(est):>7s}  {s.what}")
        if done:
            p.results[s.name] = json.loads(marker.read_text())
        else:
            todo.append((s, est))
    remaining = sum(e for _, e in todo)
    print(f"   estimated time: {_fmt(remaining)} on a 2-core CPU machine", flush=True)

    t_start = time.perf_counter()
    for s, est in todo:
        print(f"\n== stage {s.name}: {s.what}", flush=True)
        t0 = time.perf_counter()
        result = s.run(p)
        result["seconds"] = time.perf_counter() - t0
        atomic_write_text(p.stage_dir / f"{s.name}.json", json.dumps(result, indent=2, default=str) + "\n")
        p.results[s.name] = result
        remaining -= est
        print(f"== stage {s.name} done in {_fmt(result['seconds'] / 60)}; elapsed {_fmt((time.perf_counter() - t_start) / 60)}, "
              f"ETA {_fmt(remaining)}", flush=True)
    print_summary(p)
    return 0


def print_summary(p: Pipeline) -> None:
    r = p.results
    print(f"\n== summary ({p.run_dir})")
    if "data" in r:
        d = r["data"]
        print(f"   corpus: {d['documents']['train']} train / {d['documents']['validation']} validation files, "
              f"{d['tokens']['train'] / 1e6:.1f}M train tokens; unigram entropy {d['unigram_entropy_nats']:.3f} nats")
    for key in ("sparse", "dense"):
        if key in r:
            s = r[key]
            line = (f"   {key:6s} model: val loss {s.get('val_loss', float('nan')):.3f} nats after {s['steps']} steps "
                    f"({s['train_seconds'] / 60:.1f} min, {s['world_size']} ranks)")
            if "kept_fraction_blocks" in s:
                line += f", {100 * s['kept_fraction_blocks']:.2f}% of block weights nonzero"
            print(line + f" -> {s['model_dir']}")
    if "eval" in r:
        from tasks import format_table

        rows = []
        by_task = {row["task"]: row for row in r["eval"]["dense"]}
        for row in r["eval"]["sparse"]:
            dense = by_task.get(row["task"], {})
            rows.append({"task": row["task"], "sparse_acc": row.get("accuracy", float("nan")),
                         "sparse_loss": row.get("loss", float("nan")), "dense_acc": dense.get("accuracy", float("nan")),
                         "dense_loss": dense.get("loss", float("nan"))})
        print("   task accuracy and loss (test split):")
        print("\n".join("   " + line for line in format_table(rows).splitlines()))


if __name__ == "__main__":
    sys.exit(main())
