"""The ``pretrain`` and ``train-dense`` jobs: data, model, :class:`Trainer`, export.

A run folder holds everything a run made::

    runs/<name>/config.json      resolved config (the architecture of a resume comes from here)
    runs/<name>/tokenizer/       BPE tokenizer (AutoTokenizer-loadable)
    runs/<name>/data/            packed train/validation blocks + data_meta.json
    runs/<name>/checkpoints/     DeepSpeed checkpoints (exact resume)
    runs/<name>/metrics.jsonl    one JSON line per logged step
    runs/<name>/model/           final save_pretrained model + tokenizer
    runs/<name>/curves.png       training curves
    runs/<name>/summary.json     final numbers
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sparse_lm import config as configlib
from sparse_lm.jobs import DenseConfig, PretrainConfig
from sparse_lm.trainer import (Trainer, TrainingError, export_model, init_distributed, save_job_config,
                               shutdown_distributed, write_json)


def sparse_model_config(cfg: PretrainConfig, vocab_size: int, tokenizer=None):
    from sparse_lm.model import SparseGPTConfig

    m = cfg.model
    eos = tokenizer.eos_token_id if tokenizer is not None else 0
    return SparseGPTConfig(
        vocab_size=vocab_size, block_size=max(cfg.data.block_size, 1024), n_layer=m.n_layer, n_head=m.n_head,
        d_head=m.d_head, d_model=m.d_model, d_mlp=m.d_mlp, bias=m.bias, afrac=m.afrac,
        afrac_loctypes=",".join(m.afrac_loctypes), sink=m.sink, enable_bigram_table=m.bigram_table,
        learnable_bigram_table=True, activation_type=m.activation_type, tied_unembed=m.tied_unembed,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )


def dense_model_config(cfg: DenseConfig, vocab_size: int, tokenizer=None):
    from transformers import GPT2Config

    m = cfg.model
    eos = tokenizer.eos_token_id if tokenizer is not None else 0
    return GPT2Config(
        vocab_size=vocab_size, n_positions=max(cfg.data.block_size, 1024), n_embd=m.n_embd, n_layer=m.n_layer,
        n_head=m.n_head, n_inner=m.n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False,
    )


def build_model(cfg, job: str, vocab_size: int, tokenizer=None) -> torch.nn.Module:
    if job == "pretrain":
        from sparse_lm.model import SparseGPT

        return SparseGPT(sparse_model_config(cfg, vocab_size, tokenizer))
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(dense_model_config(cfg, vocab_size, tokenizer))


def prepare(cfg, run_dir: Path, rank: int):
    """Tokenizer and packed data for the run (made by rank 0, read by all)."""
    from sparse_lm.corpus import load_corpus
    from sparse_lm.data import load_data, prepare_data
    from sparse_lm.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer

    d = cfg.data
    tok_dir = Path(d.tokenizer) if d.tokenizer else run_dir / "tokenizer"
    data_dir = Path(d.data_dir) if d.data_dir else run_dir / "data"
    if d.data_dir and not d.tokenizer:
        tok_dir = data_dir / "tokenizer"
    if rank == 0:
        need_data = not (data_dir / "data_meta.json").exists()
        need_tok = not (tok_dir / "tokenizer.json").exists()
        if (need_tok or need_data) and (d.data_dir and need_data):
            raise FileNotFoundError(f"data.data_dir {data_dir} has no data_meta.json: run `sparse-lm data` first")
        if need_tok and d.tokenizer:
            raise FileNotFoundError(f"data.tokenizer {tok_dir} has no tokenizer.json")
        if need_tok or need_data:
            corpus = load_corpus(d.source, pattern=d.pattern, text_column=d.text_column, split=d.split,
                                 max_documents=d.max_documents)
            print(f"corpus {d.source}: {len(corpus)} documents, {corpus.num_bytes() / 1e6:.1f} MB, "
                  f"{corpus.skipped} skipped (not UTF-8)", flush=True)
            if need_tok:
                t0 = time.perf_counter()
                train_tokenizer(corpus, vocab_size=d.vocab_size, out_dir=tok_dir)
                print(f"tokenizer: BPE {d.vocab_size} trained in {time.perf_counter() - t0:.1f}s -> {tok_dir}",
                      flush=True)
            if need_data:
                prepare_data(corpus, load_tokenizer(tok_dir), data_dir, block_size=d.block_size,
                             val_fraction=d.val_fraction, seed=cfg.train.seed, num_proc=d.num_proc)
    dist.barrier()
    tokenizer = load_tokenizer(tok_dir)
    train, val, meta = load_data(data_dir, block_size=d.block_size, tokenizer_hash=tokenizer_hash(tokenizer))
    return tokenizer, train, val, meta


def run(cfg: PretrainConfig | DenseConfig, job: str, *, resume: bool = True, progress: bool = True) -> dict:
    """Run a training job to completion and export it; returns the summary (on every rank)."""
    rank, world = init_distributed()
    ok = False
    try:
        run_dir = Path(cfg.out_dir) / cfg.run_name
        saved = run_dir / "config.json"
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            if saved.exists() and resume and (run_dir / "checkpoints" / "latest").exists():
                old = configlib.load(type(cfg), saved)
                if configlib.to_dict(old)["model"] != configlib.to_dict(cfg)["model"]:
                    raise TrainingError(
                        f"{run_dir} holds a run of another architecture ({saved}); resume with "
                        f"`--resume {run_dir}` (which takes the architecture from the checkpoint) or pick another "
                        f"run_name"
                    )
            save_job_config(cfg, job, run_dir)
        dist.barrier()
        tokenizer, train, val, meta = prepare(cfg, run_dir, rank)
        vocab = len(tokenizer)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, job, vocab, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        if rank == 0:
            print(f"{job}: {type(model).__name__} {n_params / 1e6:.2f}M parameters, {world} rank(s), "
                  f"{len(train)} train blocks x {cfg.data.block_size} tokens, {cfg.train.steps} steps of "
                  f"{cfg.train.global_batch} sequences, precision {cfg.train.precision}, ZeRO-{cfg.train.zero_stage}",
                  flush=True)
        trainer = Trainer(model=model, run_dir=run_dir, train_cfg=cfg.train, optim_cfg=cfg.optim,
                          train_tokens=train, val_tokens=val, sparsity=getattr(cfg, "sparsity", None),
                          job_config=cfg, job=job)
        t0 = time.perf_counter()
        last = trainer.fit(resume=resume, progress=progress)
        seconds = time.perf_counter() - t0
        out = export_model(trainer, lambda: build_model(cfg, job, vocab, tokenizer), run_dir / "model", tokenizer)
        summary = {"job": job, "run_dir": str(run_dir), "model_dir": str(run_dir / "model"), "steps": trainer.step,
                   "world_size": world, "parameters": n_params, "train_seconds": seconds,
                   "unigram_entropy_nats": meta.get("unigram_entropy_nats"),
                   **{k: v for k, v in last.items() if k != "kept_fraction"}}
        if trainer.sparse:
            summary["kept_fraction"] = last.get("kept_fraction")
        if rank == 0 and out is not None:
            write_json(run_dir / "summary.json", summary)
            from sparse_lm.plots import plot_training

            plot_training(run_dir / "metrics.jsonl", run_dir / "curves.png",
                          title=f"{job} {cfg.run_name}", unigram_entropy=meta.get("unigram_entropy_nats"))
            print(format_summary(summary), flush=True)
        ok = True
        return summary
    finally:
        shutdown_distributed(clean=ok)


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"== {s['job']} finished: {s['run_dir']}",
             f"   steps {s['steps']} on {s['world_size']} rank(s) in {s['train_seconds']:.0f}s, "
             f"{s.get('tokens_per_s', 0):.0f} tokens/s (last interval)",
             f"   train loss {s.get('loss', float('nan')):.3f}, validation loss {s.get('val_loss', float('nan')):.3f} nats "
             f"(unigram entropy of the corpus: {s.get('unigram_entropy_nats') or float('nan'):.3f})"]
    if "kept_fraction_blocks" in s:
        lines.append(f"   kept fraction of block weights {s['kept_fraction_blocks']:.4f} "
                     f"(target {s.get('kept_fraction_target', float('nan')):.4f}), "
                     f"dead neurons {100 * s.get('dead_neuron_share', 0):.1f}%")
    lines.append(f"   model: {s['model_dir']}  (AutoModelForCausalLM.from_pretrained)")
    return "\n".join(lines)


def load_run_config(run_dir: Path):
    """Config of an existing run (for ``--resume``): the job and its resolved config."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    job = json.loads(path.read_text()).get("job", "pretrain")
    cls = PretrainConfig if job == "pretrain" else DenseConfig
    return job, configlib.load(cls, path)
