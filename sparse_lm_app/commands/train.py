"""Subcommands ``tokenizer``, ``data``, ``pretrain``, ``train-dense`` and ``info``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="stdlib",
                   help="'stdlib' (default: this interpreter's standard library), a folder, a glob, or hf:NAME[:CONFIG]")
    p.add_argument("--pattern", default="**/*.py", help="file pattern inside a folder source")
    p.add_argument("--text-column", default="text", help="text column of a datasets source")
    p.add_argument("--split", default="train", help="split of a datasets source")
    p.add_argument("--max-documents", type=int, default=None, help="keep only the first N documents")


def _corpus(args):
    from sparse_lm.corpus import load_corpus

    corpus = load_corpus(args.source, pattern=args.pattern, text_column=args.text_column, split=args.split,
                         max_documents=args.max_documents)
    print(f"corpus {args.source}: {len(corpus)} documents, {corpus.num_bytes() / 1e6:.1f} MB, "
          f"{corpus.skipped} skipped (not UTF-8)")
    return corpus


# -- tokenizer ----------------------------------------------------------------


def add_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    _add_corpus_args(p)
    p.add_argument("--vocab-size", type=int, default=2048)
    _add_pretokenizer_arg(p)
    p.add_argument("--out", required=True, help="folder for tokenizer.json (AutoTokenizer-loadable)")


def _add_pretokenizer_arg(p: argparse.ArgumentParser) -> None:
    from sparse_lm.tokenizer import PRETOKENIZERS

    p.add_argument("--pretokenizer", choices=sorted(PRETOKENIZERS), default="tinypython",
                   help="split before BPE: tinypython (the paper's tokenizer) or gpt2 (when a tokenizer is trained)")


def run_tokenizer(args) -> int:
    from sparse_lm.tokenizer import train_tokenizer

    tok = train_tokenizer(_corpus(args), vocab_size=args.vocab_size, pretokenizer=args.pretokenizer, out_dir=args.out,
                          show_progress=True)
    sample = "def f(x):\n    return x['key']\n"
    print(f"tokenizer: {len(tok)} tokens -> {args.out}")
    print(f"example: {sample!r} -> {tok.convert_ids_to_tokens(tok(sample)['input_ids'])}")
    return 0


# -- data ---------------------------------------------------------------------


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    _add_corpus_args(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train one into OUT/tokenizer)")
    p.add_argument("--vocab-size", type=int, default=2048, help="vocabulary when a tokenizer is trained")
    _add_pretokenizer_arg(p)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--out", required=True, help="data folder (use it with data.data_dir=OUT)")


def run_data(args) -> int:
    from sparse_lm.data import prepare_data
    from sparse_lm.tokenizer import load_tokenizer, train_tokenizer

    corpus = _corpus(args)
    out = Path(args.out)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
        tok.save_pretrained(out / "tokenizer")
    else:
        tok = train_tokenizer(corpus, vocab_size=args.vocab_size, pretokenizer=args.pretokenizer, out_dir=out / "tokenizer")
    meta = prepare_data(corpus, tok, out, block_size=args.block_size, val_fraction=args.val_fraction,
                        seed=args.seed, num_proc=args.num_proc)
    print(json.dumps(meta, indent=2))
    return 0


# -- pretrain / train-dense ------------------------------------------------------


def _add_train_arguments(p: argparse.ArgumentParser, job: str) -> None:
    from sparse_lm.config import list_presets

    presets = ", ".join(list_presets(job)) or "none"
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.steps=200 model.d_model=128 (see --print-config)")
    p.add_argument("--preset", default=None, help=f"named preset or a JSON path ({presets})")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest checkpoint (its config; overrides may "
                        "change train.steps and other non-architecture keys)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: an earlier run's checkpoints, metrics and model in the run folder are moved "
                        "to RUN_DIR.before-TIME (never deleted)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")


def _resolve(args, job: str, cls):
    from sparse_lm import config as configlib
    from sparse_lm.pretrain import load_run_config

    if args.resume:
        saved_job, cfg = load_run_config(args.resume)
        expected = "pretrain" if job == "pretrain" else "dense"
        if saved_job != expected:
            raise ValueError(f"{args.resume} is a {saved_job!r} run; resume it with the matching command")
        data = configlib.to_dict(cfg)
        for o in args.overrides:
            upd = configlib.parse_override(o)
            if "model" in upd:
                raise ValueError(f"{o}: a resume takes the architecture from the checkpoint; model.* cannot change")
            data = configlib.merge(data, upd)
        cfg = configlib.from_dict(cls, data)
        run_dir = Path(args.resume)
        cfg.out_dir, cfg.run_name = str(run_dir.parent), run_dir.name
        return cfg
    return configlib.resolve(cls, job, args.preset, args.overrides)


def _train(args, job: str) -> int:
    from sparse_lm import config as configlib
    from sparse_lm.jobs import DenseConfig, PretrainConfig
    from sparse_lm.pretrain import run

    cls = PretrainConfig if job == "pretrain" else DenseConfig
    cfg = _resolve(args, job, cls)
    if args.print_config:
        print(configlib.describe(cfg))
        return 0
    run(cfg, job, resume=not args.fresh, progress=not args.no_progress)
    return 0


def add_pretrain_arguments(p):
    _add_train_arguments(p, "pretrain")


def run_pretrain(args) -> int:
    return _train(args, "pretrain")


def add_train_dense_arguments(p):
    _add_train_arguments(p, "dense")


def run_train_dense(args) -> int:
    return _train(args, "dense")


# -- info -----------------------------------------------------------------------


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="a model folder (save_pretrained) or a run folder")


def run_info(args) -> int:
    if args.path is None:
        return _env_info()
    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    summary = path / "summary.json"
    if summary.exists():
        print(summary.read_text())
    from sparse_lm.loading import load_causal_lm, model_dir

    if (path / "summary.json").exists() and not (path / "model" / "config.json").is_file():
        raise FileNotFoundError(f"{path} is a run folder without its model ({path / 'model'} is missing): the run "
                                f"did not finish; resume it with `sparse-lm pretrain --resume {path}` (or "
                                f"train-dense)")
    path = model_dir(path)
    model = load_causal_lm(path)
    n = sum(p.numel() for p in model.parameters())
    print(f"{path}: {type(model).__name__}, {n / 1e6:.2f}M parameters")
    print(json.dumps(model.config.to_diff_dict(), indent=2, default=str))
    if hasattr(model, "weight_matrices"):
        print(f"{'matrix':48s} {'shape':>14s} {'nonzero':>10s} {'fraction':>9s}")
        for name, p in model.weight_matrices().items():
            nz = int((p != 0).sum())
            print(f"{name:48s} {str(tuple(p.shape)):>14s} {nz:10d} {nz / p.numel():9.4f}")
        print(f"{len(model.sites)} sites: {', '.join(model.sites.names()[:11])}, ...")
    return 0


def _env_info() -> int:
    import os

    import torch

    from sparse_lm.config import list_presets

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
          f"cpu cores {os.cpu_count()}")
    for mod in ("deepspeed", "transformers", "datasets", "tokenizers", "safetensors"):
        try:
            print(f"{mod} {__import__(mod).__version__}")
        except Exception as e:  # a broken optional install should not hide the rest
            print(f"{mod}: not importable ({e})")
    print(f"presets: pretrain: {', '.join(list_presets('pretrain'))}; dense: {', '.join(list_presets('dense'))}")
    return 0
