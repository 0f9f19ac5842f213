"""The ``bridge`` job: data, the two models, :class:`Trainer`, export; and loading a bridge back.

An output folder holds::

    OUT/config.json            resolved BridgeConfig (job "bridge")
    OUT/data/                  packed blocks (unless data.data_dir names prepared ones)
    OUT/checkpoints/           DeepSpeed checkpoints (exact resume)
    OUT/metrics.jsonl          weighted total loss per logged step (Trainer); val_loss is the same total on
                               validation blocks with every site in the KL terms
    OUT/eval_before.json       every loss component per site before training
    OUT/bridge_metrics.json    before / after, per component and per site; the quality gate
    OUT/bridges.safetensors    encoder and decoder weights (encoders.i.*, decoders.i.*)
    OUT/bridge_config.json     config, mode, pairing, site names, widths, model paths, the gate
    OUT/sparse_model/          the sparse model as bridged, in modes 'joint' and 'finetune' (save_pretrained +
                               tokenizer): its new weights, the model to prune circuits from
    OUT/summary.json           before / after and ``gate`` ({passed, kl_d2s, kl_s2d, kl_no_bridge, nmse_enc,
                               nmse_dec, reasons}: a bridge is only called trained when it passed)
    OUT/curves.png
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save
from torch import nn

from bridges.bridge import (
    BridgedPair,
    BridgeError,
    evaluate_bridges,
    format_gate,
    init_least_squares,
    quality_gate,
)
from bridges.config import BridgeConfig, BridgeSection
from bridges.models import (
    check_same_tokenizer,
    check_vocab_sizes,
    load_dense,
    load_sparse,
)
from sparse_lm import config as configlib
from sparse_lm.adapters import residual_sites
from sparse_lm.arch import context_length, n_layers
from sparse_lm.data import prepare
from sparse_lm.io import atomic_dir, atomic_write_bytes, remove_stale_temporaries, write_json
from sparse_lm.jobs import PretrainConfig, sparse_model_config
from sparse_lm.model import SparseGPT
from sparse_lm.plots import plot_training
from sparse_lm.tokenizer import load_tokenizer, tokenizer_hash
from sparse_lm.trainer import (
    Trainer,
    device,
    init_distributed,
    lock_run,
    set_threads,
    shutdown_distributed,
)

BRIDGES_FILE = "bridges.safetensors"
BRIDGE_CONFIG = "bridge_config.json"
SPARSE_DIR = "sparse_model"


def _check_block_size(block: int, **models) -> None:
    for name, m in models.items():
        limit = context_length(m)
        if limit is not None and block > limit:
            raise BridgeError(f"data.block_size {block} is longer than the {name} model's context {limit}")


def pairing_indices(pair: BridgedPair) -> list[int]:
    names = residual_sites(pair.dense_sites, n_layers(pair.dense))
    return [names.index(p.dense) for p in pair.pairs]


def save_bridges(bridges_state: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write_bytes(path, save({k: v.detach().float().contiguous().cpu() for k, v in bridges_state.items()}))


def describe_bridge(pair: BridgedPair, cfg: BridgeConfig, dense_dir: Path, sparse_ref: str, tokenizer) -> dict:
    b = pair.bridges
    return {
        "job": "bridge",
        "mode": cfg.mode,
        "dense_model": str(dense_dir),
        "dense_type": pair.dense.config.model_type,
        "sparse_model": sparse_ref,
        "pairing": pairing_indices(pair),
        "pairs": [{"sparse": p.sparse, "dense": p.dense, "d_sparse": p.d_sparse, "d_dense": p.d_dense,
                   "encoder_k": b.k(i)} for i, p in enumerate(pair.pairs)],
        "sparse_sites": residual_sites(pair.sites, n_layers(pair.sparse)),
        "dense_sites": residual_sites(pair.dense_sites, n_layers(pair.dense)),
        "widths": {"sparse": pair.pairs[0].d_sparse, "dense": pair.pairs[0].d_dense},
        "afrac": b.afrac,
        "tokenizer_hash": tokenizer_hash(tokenizer) if hasattr(tokenizer, "backend_tokenizer") else None,
        "config": configlib.to_dict(cfg),
    }


def format_metrics(before: dict | None, after: dict) -> str:
    keys = ["total", "lm", "nmse_enc", "nmse_dec", "kl_d2s", "kl_s2d", "kl_dense_sparse", "dense_lm"]
    lines = [f"   {'component':<16}{'before':>10}{'after':>10}"]
    for k in keys:
        b = f"{before[k]:10.4f}" if before and k in before else f"{'':>10}"
        lines.append(f"   {k:<16}{b}{after[k]:10.4f}")
    return "\n".join(lines)


def run(cfg: BridgeConfig, *, resume: bool = True, progress: bool = True) -> dict:
    """Train bridges alone, or a (new or trained) sparse model with its bridges; export; returns the summary."""
    if not cfg.dense:
        raise BridgeError("no dense model: pass --dense DIR (a train-dense run folder or a save_pretrained folder)")
    rank, world = init_distributed()
    set_threads(cfg.train.threads, world)
    ok = False
    try:
        run_dir = Path(cfg.out_dir) / cfg.run_name
        dense, dense_tok, dense_dir, sparse = _load_models(cfg, rank)
        if cfg.mode == "finetune":
            _finetune_sparsity(cfg, rank)
        # The run folder's lock first: a second run into the same folder must fail before it writes anything.
        lock_run(run_dir, rank)
        resuming = resume and (run_dir / "checkpoints" / "latest").is_file()
        if rank == 0:
            remove_stale_temporaries(run_dir)
            configlib.save(cfg, run_dir / "config.json", job="bridge")
        dist.barrier()
        tokenizer, train, val, meta = prepare(cfg, run_dir, rank)
        check_same_tokenizer(dense_tok, tokenizer, "dense", "data")
        pair = _build_pair(cfg, dense, sparse, tokenizer, rank)
        before = _start_maps(cfg, pair, train, val, run_dir, rank, resuming)
        trainer = Trainer(model=pair, run_dir=run_dir, train_cfg=cfg.train, optim_cfg=cfg.optim, train_tokens=train,
                          val_tokens=val, sparsity=cfg.sparsity if cfg.trains_sparse else None, job_config=cfg,
                          job="bridge")
        t0 = time.perf_counter()
        last = trainer.fit(resume=resume, progress=progress)
        seconds = time.perf_counter() - t0
        finished = run_dir / "summary.json"
        if trainer.start_step == trainer.step and finished.is_file():
            # Nothing was left to train: the finished run's results stay as they are (not rewritten).
            ok = True
            return json.loads(finished.read_text())
        state = trainer.full_fp32_state()  # a collective: every rank
        summary: dict[str, Any] = {}
        if rank == 0:
            summary = _export(cfg, trainer, state, tokenizer, dense_dir, val, before, last, seconds, world)
        ok = True
        return summary
    finally:
        shutdown_distributed(clean=ok)


def _load_models(cfg: BridgeConfig, rank: int = 0) -> tuple[nn.Module, Any, Path, nn.Module | None]:
    """(dense model, its tokenizer, its folder, the trained sparse model or None in mode 'joint'); the tokenizers
    checked and ``cfg.dense``, ``cfg.sparse`` and ``cfg.data.tokenizer`` resolved."""
    dense, dense_tok, dense_dir = load_dense(cfg.dense)
    cfg.dense = str(dense_dir.resolve())
    sparse = None
    if cfg.sparse:
        sparse, sparse_tok, sparse_dir = load_sparse(cfg.sparse)
        cfg.sparse = str(sparse_dir.resolve())
        if sparse_tok is not None:
            check_same_tokenizer(dense_tok, sparse_tok, "dense", "sparse")
    if cfg.data.tokenizer:  # refused before any data is tokenized with it
        check_same_tokenizer(dense_tok, load_tokenizer(cfg.data.tokenizer), "dense", "data")
    elif dense_dir.is_file():  # a GGUF file: its tokenizer is saved in the run folder to prepare data with
        tok_dir = Path(cfg.out_dir) / cfg.run_name / "dense_tokenizer"
        if rank == 0 and not (tok_dir / "tokenizer.json").is_file():
            with atomic_dir(tok_dir) as tmp:
                dense_tok.save_pretrained(tmp)
        cfg.data.tokenizer = str(tok_dir.resolve())
    else:
        if not (dense_dir / "tokenizer.json").is_file():
            raise BridgeError(f"the dense model folder {dense_dir} has no tokenizer.json to prepare data with: "
                              f"set data.tokenizer (or data.data_dir) to the dense model's tokenizer")
        cfg.data.tokenizer = str(dense_dir)
    return dense, dense_tok, dense_dir, sparse


def _finetune_sparsity(cfg: BridgeConfig, rank: int) -> None:
    """Mode 'finetune': hold the trained model's L0 from step 0.

    The fractions come from the sparse model's own run config (``<run>/config.json`` beside
    ``<run>/model``) when there is one, so the projection keeps what pretraining kept; annealing is
    off because the model starts at its target.
    """
    own = Path(cfg.sparse).parent / "config.json"
    if own.is_file() and json.loads(own.read_text()).get("job") == "pretrain":
        trained = configlib.load(PretrainConfig, own).sparsity
        keys = ("enabled", "target_fraction", "embed_fraction", "unembed_fraction", "min_fan")
        changed = [k for k in keys if getattr(cfg.sparsity, k) != getattr(trained, k)]
        if changed and rank == 0:
            print(f"bridge (finetune): sparsity {', '.join(changed)} from the sparse model's run config {own}",
                  flush=True)
        for k in keys:
            setattr(cfg.sparsity, k, getattr(trained, k))
    cfg.sparsity.anneal_start = cfg.sparsity.anneal_end = 0.0


def _build_pair(cfg: BridgeConfig, dense: nn.Module, sparse: nn.Module | None, tokenizer, rank: int) -> BridgedPair:
    """The pair on the device (a new SparseGPT in mode 'joint'), after the vocabulary and context checks."""
    torch.manual_seed(cfg.train.seed)
    if sparse is None:
        sparse = SparseGPT(sparse_model_config(cfg, len(tokenizer), tokenizer))
    check_vocab_sizes(sparse, dense, tokenizer)
    _check_block_size(cfg.data.block_size, sparse=sparse, dense=dense)
    pair = BridgedPair(sparse, dense, cfg.bridge, train_sparse=cfg.trains_sparse).to(device())
    n_train = sum(p.numel() for p in pair.parameters() if p.requires_grad)
    if rank == 0:
        what = {"joint": "a new sparse model trains with its bridges",
                "finetune": "the trained sparse model trains on with its bridges",
                "bridges": "bridges alone, both models frozen"}[cfg.mode]
        print(f"bridge (mode {cfg.mode}: {what}): "
              f"dense {type(dense).__name__} {n_layers(dense)} layers x {pair.pairs[0].d_dense}, sparse "
              f"{n_layers(sparse)} layers x {pair.pairs[0].d_sparse}, {len(pair.pairs)} site pairs "
              f"({', '.join(f'{p.sparse}<->{p.dense}' for p in pair.pairs)}), {n_train / 1e6:.2f}M trainable "
              f"parameters, {cfg.train.steps} steps", flush=True)
    return pair


def _start_maps(cfg: BridgeConfig, pair: BridgedPair, train: torch.Tensor, val: torch.Tensor, run_dir: Path,
                rank: int, resuming: bool) -> dict | None:
    """Initialise the maps (a fresh run) and measure every component before training (or read it back)."""
    if cfg.bridge.init == "lstsq" and not resuming:
        used = init_least_squares(pair, train, batch_size=cfg.train.micro_batch, max_batches=4)
        if rank == 0:
            print(f"bridge maps initialised by ridge regression on {used} tokens", flush=True)
    before_path = run_dir / "eval_before.json"
    before = None
    if resuming and before_path.is_file():
        before = json.loads(before_path.read_text())
    elif not resuming:
        before = evaluate_bridges(pair, val, batch_size=cfg.train.micro_batch, max_batches=cfg.train.eval_batches)
        if rank == 0:
            write_json(before_path, before)
    return before


def _export(cfg: BridgeConfig, trainer: Trainer, state: dict[str, torch.Tensor], tokenizer, dense_dir: Path,
            val: torch.Tensor, before: dict | None, last: dict, seconds: float, world: int) -> dict:
    """Rank 0: measure after training, the gate; write the bridges (and the trained sparse model), metrics, summary,
    curves."""
    run_dir = Path(cfg.out_dir) / cfg.run_name
    module: BridgedPair = trainer.module
    last_components = dict(module.last_components)
    after = evaluate_bridges(module, val, batch_size=cfg.train.micro_batch, max_batches=cfg.train.eval_batches)
    gate = quality_gate(after, cfg.bridge.gate_nmse)
    save_bridges({k[len("bridges."):]: v for k, v in state.items() if k.startswith("bridges.")}, run_dir / BRIDGES_FILE)
    sparse_ref = cfg.sparse
    if cfg.trains_sparse:  # the model as bridged: its new weights, the one circuits are pruned from
        model = SparseGPT(module.sparse.config)
        model.load_state_dict({k[len("sparse."):]: v for k, v in state.items() if k.startswith("sparse.")})
        with atomic_dir(run_dir / SPARSE_DIR) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        sparse_ref = SPARSE_DIR
    meta = describe_bridge(module, cfg, dense_dir.resolve(), sparse_ref, tokenizer)
    if cfg.mode == "finetune":
        meta["sparse_start"] = cfg.sparse  # the trained model it started from
    meta["gate"] = gate
    write_json(run_dir / BRIDGE_CONFIG, meta)
    write_json(run_dir / "bridge_metrics.json", {"before": before, "after": after,
                                                 "last_train_step": last_components, "gate": gate})
    summary = {"job": "bridge", "mode": cfg.mode, "run_dir": str(run_dir), "steps": trainer.step, "gate": gate,
               "trained": gate["passed"],
               "world_size": world, "train_seconds": seconds,
               "before": {k: v for k, v in (before or {}).items() if k != "per_site"},
               "after": {k: v for k, v in after.items() if k != "per_site"},
               "last_train_step": last_components,
               **{k: v for k, v in last.items() if k != "kept_fraction"}}
    if trainer.sparse:
        summary["kept_fraction"] = last.get("kept_fraction")
    write_json(run_dir / "summary.json", summary)
    plot_training(run_dir / "metrics.jsonl", run_dir / "curves.png", title=f"bridge {cfg.run_name}",
                  gate_nmse=cfg.bridge.gate_nmse)
    print(f"== bridge finished: {run_dir} ({trainer.step} steps in {seconds:.0f}s)\n"
          f"{format_metrics(before, after)}\n"
          f"   (KL in nats/token; kl_dense_sparse: KL(dense || sparse) without any bridge, the yardstick)\n"
          f"   {format_gate(gate)}\n"
          f"   bridges: {run_dir / BRIDGES_FILE}" + (f", sparse model: {run_dir / SPARSE_DIR}"
                                                    if cfg.trains_sparse else ""), flush=True)
    return summary


def _moved_model(recorded: str, folder: Path) -> str:
    """A model path recorded in a bridge folder, or, when that path is gone but the same layout sits beside
    the bridge (a run folder that was moved or copied: <run>/bridge next to <run>/sparse/model), that one."""
    path = Path(recorded)
    if not path.is_absolute() or path.exists():
        return recorded  # a hub name, a relative path, or still there
    for base in (folder.parent, folder):
        for depth in (2, 1):
            candidate = base.joinpath(*path.parts[-depth:])
            if candidate.is_dir():
                print(f"bridge: {recorded} is gone; using {candidate} (same place relative to the bridge)")
                return str(candidate)
    return recorded  # the loader says what is missing


def load_bridge(folder: str | Path, device: str | torch.device = "cpu") -> tuple[BridgedPair, Any, dict]:
    """(frozen BridgedPair in eval mode, the shared tokenizer, bridge_config.json) of a bridge folder."""
    folder = Path(folder)
    meta_path = folder / BRIDGE_CONFIG
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a bridge folder (no {BRIDGE_CONFIG}); make one with "
                                f"`sparse-lm bridge`")
    meta = json.loads(meta_path.read_text())
    dense, dense_tok, _ = load_dense(_moved_model(meta["dense_model"], folder), device)
    sparse_path = Path(meta["sparse_model"])
    sparse_path = sparse_path if sparse_path.is_absolute() else folder / sparse_path
    sparse, sparse_tok, _ = load_sparse(_moved_model(str(sparse_path), folder), device)
    if sparse_tok is not None:
        check_same_tokenizer(dense_tok, sparse_tok, "dense", "sparse")
    section = configlib.from_dict(BridgeSection, {**meta["config"]["bridge"], "pairing": meta["pairing"]},
                                  prefix="bridge.")
    pair = BridgedPair(sparse, dense, section, train_sparse=False)
    state = load_file(str(folder / BRIDGES_FILE))
    pair.bridges.load_state_dict(state)
    return pair.to(device).eval(), dense_tok, meta
