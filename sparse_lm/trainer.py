"""One trainer for every job: a DeepSpeed engine, a batch schedule, and a step.

Sparse pretraining and dense training differ only in the model and in
whether weight sparsity runs after each optimizer step; both go through
:class:`Trainer`. DeepSpeed is wrapped here and nowhere else.

Training state lives in the DeepSpeed checkpoint: weights, optimizer moments,
the step (which fixes the data position, the L0 fraction and the learning
rate, all pure functions of it) and the RNG states, so a resumed run continues
exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

# DeepSpeed picks its accelerator at first use; say it outright so CPU runs are quiet.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from sparse_lm import config as configlib  # noqa: E402
from sparse_lm import sparsity as sp  # noqa: E402
from sparse_lm.io import atomic_dir, atomic_write_text, read_jsonl  # noqa: E402


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, unreadable checkpoint, ...); says what to do."""


class UnsafeCheckpointError(TrainingError):
    """A checkpoint file holds Python objects beyond tensors and plain data: refused unread."""


# ---------------------------------------------------------------------------
# safe checkpoint loading
#
# A DeepSpeed checkpoint is a pickle. DeepSpeed itself unpickles it with weights_only=False, which
# runs whatever a crafted file asks for. Every checkpoint read here goes through safe_torch_load
# instead: torch's weights-only unpickler (tensors, containers, numbers, strings) plus the three
# plain-data DeepSpeed classes its ZeRO-1/2 and bf16 optimizer states name (found by saving
# checkpoints under every layout the trainer allows; the checkpoint tests load each of them).


def _checkpoint_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's plain-data classes allowed; nothing else is built.

    Raises :class:`UnsafeCheckpointError` for a file that names any other global (a crafted pickle
    is refused before any of it runs) and :class:`TrainingError` for an unreadable one.
    """
    import pickle

    try:
        with torch.serialization.safe_globals(_checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"refused to load {path}: it holds more than tensors and plain data ({first}). Nothing in it was "
            f"run. Only resume checkpoints this toolkit wrote; if you made this one with another tool, "
            f"start a new run instead"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # truncated zip, missing file, foreign format
        raise TrainingError(f"checkpoint file {path} could not be read ({type(e).__name__}: {e}); it is "
                            f"corrupt or truncated") from e


def latest_tag(ckpt_dir: str | Path) -> str:
    """The tag ``ckpt_dir/latest`` names; it must be a folder inside ``ckpt_dir`` (no path of its own)."""
    latest = Path(ckpt_dir) / "latest"
    tag = latest.read_text(errors="replace").strip()
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or not (Path(ckpt_dir) / tag).is_dir():
        raise TrainingError(f"{latest} names {tag[:80]!r}, which is not a checkpoint folder in {ckpt_dir}: write "
                            f"the name of one of its step* folders into it, or delete it to start afresh")
    return tag


def _make_checkpoint_loads_safe(engine) -> None:
    """Route every file DeepSpeed's ``load_checkpoint`` reads through :func:`safe_torch_load`.

    DeepSpeed reads the model states (all stages) and the ZeRO/bf16 optimizer partitions through
    ``engine.checkpoint_engine.load`` and nowhere else on this path.
    """
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None or not hasattr(ckpt_engine, "load"):
        raise TrainingError(f"this DeepSpeed ({deepspeed.__version__}) has no checkpoint engine to make safe; "
                            f"install the version in pyproject.toml")
    ckpt_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location=map_location)


# ---------------------------------------------------------------------------
# distributed set-up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join (or create) the process group; a bare ``python`` call becomes rank 0 of 1."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed(clean: bool = True) -> None:
    """Barrier then destroy: without it ZeRO-2 runs sometimes abort at exit."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
        # DeepSpeed caches a clone of the world group; a second engine in this process
        # (tests, notebooks) would find it unregistered.
        import deepspeed.utils.groups as ds_groups

        ds_groups._WORLD_GROUP = None


def lock_run(run_dir: Path, rank: int) -> None:
    """Every rank: rank 0 takes the run folder's OS lock (see :func:`sparse_lm.io.lock_run_folder`).

    When another process holds it, every rank raises the same TrainingError (naming the owner's PID)
    instead of rank 0 failing while the others wait at the next barrier.
    """
    from sparse_lm.io import RunFolderBusy, lock_run_folder

    err = None
    if rank == 0:
        try:
            lock_run_folder(run_dir)
        except RunFolderBusy as e:
            err = str(e)
    flag = torch.tensor([0 if err is None else 1], device=device())
    if dist.is_initialized():
        dist.broadcast(flag, 0)
    if int(flag):
        raise TrainingError(err or f"{run_dir} is in use by another run (see rank 0's message)")


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def set_threads(threads: int | None, world: int) -> None:
    if torch.cuda.is_available():
        return
    n = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------
# the trainer


@dataclass
class Batches:
    """Deterministic data order: sample i of the run is ``perm_epoch[i % N]``.

    The global batch of step s is samples [s*G, (s+1)*G); rank r's micro-batch m
    is a fixed slice of it, so any split into ranks and micro-batches sees the
    same global batch, and a resumed run the same data.
    """

    tokens: torch.Tensor  # (N, block_size) int32
    global_batch: int
    micro_batch: int
    rank: int
    world: int
    seed: int

    def __post_init__(self) -> None:
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(len(self.tokens), generator=g)
            self._perm_epoch = epoch
        return self._perm

    def micro(self, step: int, m: int) -> torch.Tensor:
        start = step * self.global_batch + (m * self.world + self.rank) * self.micro_batch
        pos = torch.arange(start, start + self.micro_batch)
        n = len(self.tokens)
        rows = torch.stack([self._perm_for(int(p) // n)[int(p) % n] for p in pos])
        return self.tokens[rows].long()


class GradRMSAdamW(torch.optim.AdamW):
    """AdamW that first holds the RMS of the whole gradient: ``normalize``, ``clip`` or ``none``.

    The bound acts inside ``step()`` because that is the one place where, under
    every DeepSpeed layout, the gradients are final: averaged over ranks and
    micro-batches, unscaled, and in fp32. What ``step()`` sees differs by layout:

    - ZeRO-0 (fp32, bf16-autocast, and bf16 whose wrapper hands over fp32 master
      grads): the full gradient, identical on every rank, in one call; the norm
      is computed here.
    - ZeRO-1/2: this rank's fp32 partition only, one parameter group per call.
      The norm of the *full* gradient (all ranks, all groups, padding excluded)
      is then taken from the DeepSpeed wrapper, which computes it before
      stepping any group (``global_norm``).

    Either way every rank and every group scales by the same factor, so the
    gradient Adam receives has RMS ``bound`` (normalize) or at most ``bound`` (clip).
    ``n_params`` is the true count of trainable entries, so partition padding never
    dilutes the RMS. Only instance attributes are added: the state dict stays AdamW's.
    """

    def __init__(self, params, *, mode: str, bound: float | None, n_params: int, **kwargs):
        super().__init__(params, **kwargs)
        if mode not in ("normalize", "clip", "none"):
            raise ValueError(f"optim.grad_rms_mode must be normalize, clip or none, got {mode!r}")
        if mode != "none" and not (bound and bound > 0):
            raise ValueError(f"optim.grad_rms_mode={mode} needs optim.grad_rms_bound > 0, got {bound}; "
                             f"set a bound or grad_rms_mode=none")
        self.rms_mode, self.rms_bound, self.n_params = mode, bound, n_params
        # Set by the trainer when DeepSpeed wraps this optimizer (None: step() sees the full gradient).
        self.global_norm = None
        self.last_grad_rms = float("nan")  # RMS of the full gradient before the bound, at the last step

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.global_norm is None:
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        else:
            norm = float(self.global_norm())
        rms = norm / math.sqrt(max(self.n_params, 1))
        self.last_grad_rms = rms
        scale = 1.0
        if self.rms_mode != "none" and math.isfinite(rms) and rms > 0:
            scale = self.rms_bound / rms
            if self.rms_mode == "clip":
                scale = min(scale, 1.0)
        if scale != 1.0:
            torch._foreach_mul_(grads, scale)
        return super().step(closure)


class Trainer:
    """Trains ``model`` with DeepSpeed; weight sparsity when ``sparsity`` is given and enabled."""

    def __init__(self, *, model: torch.nn.Module, run_dir: Path, train_cfg, optim_cfg,
                 train_tokens: torch.Tensor, val_tokens: torch.Tensor,
                 sparsity: sp.SparsityConfig | None = None, job_config: Any = None, job: str = "pretrain"):
        self.rank, self.world = init_distributed()
        # One writer per run folder (a no-op when the job took the lock already).
        lock_run(Path(run_dir), self.rank)
        set_threads(train_cfg.threads, self.world)
        self.tc, self.oc, self.sc = train_cfg, optim_cfg, sparsity
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.job_config, self.job = job_config, job
        self.device = device()
        per_step = self.tc.micro_batch * self.world
        if self.tc.global_batch % per_step:
            raise TrainingError(
                f"train.global_batch {self.tc.global_batch} is not divisible by world size {self.world} "
                f"x micro batch {self.tc.micro_batch}: choose a global batch that is a multiple of {per_step}"
            )
        self.grad_accum = self.tc.global_batch // per_step
        self.block_size = train_tokens.shape[1]
        self.batches = Batches(train_tokens, self.tc.global_batch, self.tc.micro_batch, self.rank, self.world,
                               self.tc.seed)
        self.val_tokens = val_tokens
        self.sparse = sparsity is not None and sparsity.enabled
        if self.sparse:
            sp.check_fan_budget(model.weight_matrices(), sparsity)
        self.engine = self._make_engine(model.to(self.device))
        self.module = self.engine.module
        self.matrices = self.module.weight_matrices() if self.sparse else {}
        self.step = 0

    # -- engine --------------------------------------------------------------
    def _param_groups(self, model: torch.nn.Module) -> list[dict]:
        matrices = set(model.weight_matrices().values()) if hasattr(model, "weight_matrices") else {
            p for n, p in model.named_parameters() if p.ndim == 2}
        # Frozen parameters (a dense teacher, a sparse model whose bridges train alone) stay out.
        trainable = [p for p in model.parameters() if p.requires_grad]
        # A model may ask for other learning rates for some parameters (a bridged pair: its maps), as
        # multiples of the schedule's lr (`lr_scales()`: {parameter: multiple}).
        scales = model.lr_scales() if hasattr(model, "lr_scales") else {}
        # The first two groups are always there (a checkpoint's optimizer state lists its groups).
        groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
        for p in trainable:
            groups.setdefault((p in matrices, float(scales.get(p, 1.0))), []).append(p)
        return [{"params": ps, "weight_decay": self.oc.weight_decay if decay else 0.0, "lr_scale": scale}
                for (decay, scale), ps in groups.items()]

    def _make_engine(self, model: torch.nn.Module):
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        mode = self.oc.grad_rms_mode if self.oc.grad_rms_bound else "none"
        # fused: one kernel per parameter instead of ~10 tensor ops; on CPU ~4x faster (the bigram
        # table makes AdamW a tenth of a SparseGPT step), the same update up to float rounding.
        optimizer = GradRMSAdamW(self._param_groups(model), mode=mode, bound=self.oc.grad_rms_bound,
                                 n_params=n_params, lr=self.oc.lr, betas=(self.oc.beta1, self.oc.beta2),
                                 eps=self.oc.eps, fused=self.device.type in ("cpu", "cuda"))
        ds_config = {
            "train_batch_size": self.tc.global_batch,
            "train_micro_batch_size_per_gpu": self.tc.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            # The RMS bound (clip or normalize) is applied by GradRMSAdamW.step, never by DeepSpeed.
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": self.tc.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.tc.precision == "bf16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        _make_checkpoint_loads_safe(engine)
        wrapper = engine.optimizer
        if wrapper is not optimizer:
            from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
            from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
            from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
            from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

            if isinstance(wrapper, (BF16_Optimizer, DeepSpeedZeroOptimizer)):
                # ZeRO-1/2 (fp32, bf16): step() sees this rank's partition, one group at a time. Both
                # wrappers set _global_grad_norm, the norm of the full, all-reduced, unscaled gradient,
                # before they call step() (the trainer tests check the RMS Adam receives).
                optimizer.global_norm = lambda: wrapper._global_grad_norm
            elif not isinstance(wrapper, (FP16_Optimizer, FP16_UnfusedOptimizer)):
                # (bf16 ZeRO-0 lands in these two: step() gets the whole unscaled fp32 gradient at once.)
                raise TrainingError(f"DeepSpeed wrapped the optimizer in {type(wrapper).__name__}, which this trainer "
                                    f"cannot read the gradient norm from: use train.zero_stage 0, 1 or 2 with "
                                    f"precision fp32, bf16-autocast or bf16")
        self.optimizer = optimizer
        return engine

    def _autocast(self):
        if self.tc.precision == "bf16-autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- schedules -------------------------------------------------------------
    def fraction_at(self, step: int) -> float:
        if not self.sparse:
            return 1.0
        progress = sp.anneal_progress(step, self.tc.steps, self.sc.anneal_start, self.sc.anneal_end)
        return sp.kept_fraction(self.sc.target_fraction, progress)

    def lr_at(self, step: int) -> float:
        if self.oc.schedule == "constant":
            return self.oc.lr
        current = self.fraction_at(step) if self.oc.schedule == "sharkfin" else 1.0
        return sp.sharkfin_lr(step, self.tc.steps, self.oc.lr, self.oc.warmup, current)

    # -- one step --------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step over the global batch; returns the mean loss over all ranks."""
        lr = self.lr_at(self.step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        total = torch.zeros((), device=self.device)
        for m in range(self.grad_accum):
            ids = self.batches.micro(self.step, m).to(self.device)
            with self._autocast():
                loss = self.engine(input_ids=ids, labels=ids).loss
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        if self.sparse:
            # After EVERY optimizer step: project each matrix to its L0 for the next step.
            sp.project(self.matrices, self.sc, self.step + 1, self.tc.steps, self.engine.optimizer,
                       zero_moments=self.sc.zero_moments)
        dist.all_reduce(total)
        mean = float(total) / (self.grad_accum * self.world)
        if not math.isfinite(mean):
            raise TrainingError(
                f"loss became {mean} at step {self.step} (lr {lr:.3g}); nothing of this step was saved. "
                + self._newest_checkpoint_hint() + " Keeping optim.grad_rms_bound set or precision=fp32 may help too."
            )
        self.step += 1
        return mean

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (token mean) and, for a SparseGPT, the share of MLP neurons that never fired."""
        self.module.eval()
        n = min(len(self.val_tokens), max(self.tc.eval_batches * self.tc.micro_batch, self.world))
        rows = list(range(self.rank, n, self.world))
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        sites = getattr(self.module, "sites", None)
        names = [s for s in sites.names() if s.endswith("mlp.post_act")] if sites is not None else []
        fired = {s: torch.zeros(sites.width(s), dtype=torch.bool, device=self.device) for s in names}
        part_sums: dict[str, torch.Tensor] = {}
        for i in range(0, len(rows), self.tc.micro_batch):
            ids = self.val_tokens[rows[i:i + self.tc.micro_batch]].long().to(self.device)
            ctx = sites.record(names) if names else nullcontext({})
            with self._autocast(), ctx as acts:
                output = self.module(input_ids=ids, labels=ids)
            for s, a in acts.items():
                fired[s] |= (a != 0).flatten(0, -2).any(0)
            tokens = ids.numel() - ids.shape[0]
            loss_sum += output.loss.float() * tokens
            count += tokens
            # a module whose loss has parts (the bridge's NMSEs and KLs) gets each part on validation too
            for name, value in sorted((getattr(output, "components", None) or {}).items()):
                part_sums[name] = part_sums.get(name, 0) + value.detach().float() * tokens
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
        out = {"val_loss": float(loss_sum / count.clamp(min=1))}
        if part_sums:  # same names on every rank: every rank runs the same module on its share of the rows
            parts = torch.stack([torch.as_tensor(v, device=self.device) for v in part_sums.values()])
            dist.all_reduce(parts)
            out.update({f"val_{k}": float(v / count.clamp(min=1)) for k, v in zip(part_sums, parts)})
        if fired:
            stacked = torch.cat(list(fired.values())).to(torch.int32)
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
            out["dead_neuron_share"] = float(1 - stacked.float().mean())
        self.module.train()
        return out

    # -- checkpoints -------------------------------------------------------------
    def weights_finite(self) -> bool:
        """Whether every parameter on every rank is finite (a collective)."""
        bad = torch.zeros((), device=self.device)
        for p in self.module.parameters():
            if not bool(torch.isfinite(p).all()):
                bad += 1
                break
        dist.all_reduce(bad)
        return bool(bad == 0)

    def _newest_checkpoint_hint(self) -> str:
        latest = self.ckpt_dir / "latest"
        lower = min(self.oc.lr / 10, 1e-2)
        if latest.is_file():
            return (f"The newest checkpoint ({latest.read_text().strip()}) holds finite weights: resume from it with "
                    f"a lower learning rate, e.g. `--resume {self.run_dir} optim.lr={lower:g}`.")
        return f"No checkpoint was written yet: start again with a lower optim.lr (e.g. {lower:g})."

    @torch.no_grad()
    def probe_loss(self) -> float:
        """Loss of the current weights on the first validation micro-batch (the worst over ranks)."""
        self.module.eval()
        ids = self.val_tokens[: self.tc.micro_batch].long().to(self.device)
        with self._autocast():
            loss = self.module(input_ids=ids, labels=ids).loss.detach().float()
        self.module.train()
        loss = torch.nan_to_num(loss, nan=float("inf")).reshape(1)
        dist.all_reduce(loss, op=dist.ReduceOp.MAX)
        return float(loss)

    def check_state(self) -> None:
        """Raise TrainingError when the current weights must not be saved: any NaN or infinite
        weight, or (language-model jobs) a loss over twice that of a uniform guess, ln(vocab),
        where a fresh model starts: the run has diverged and its weights are useless to resume from.

        The loss is probed on the weights about to be saved: the step's own loss is measured before
        its update, and one update at a huge learning rate ruins the weights while that loss still
        looks fine.
        """
        where = f"by step {self.step} (lr {self.lr_at(max(self.step - 1, 0)):.3g})"
        if not self.weights_finite():
            raise TrainingError(f"the weights became NaN or infinite {where}; that state was not saved. "
                                + self._newest_checkpoint_hint())
        vocab = getattr(getattr(self.module, "config", None), "vocab_size", None)
        if self.job in ("pretrain", "dense") and vocab:
            loss, limit = self.probe_loss(), 2 * math.log(vocab)
            if not loss <= limit:
                raise TrainingError(f"the run diverged {where}: the loss of the current weights is {loss:.4g}, "
                                    f"over twice that of a uniform guess ({limit / 2:.2f}); that state was not "
                                    f"saved. " + self._newest_checkpoint_hint())

    def save_checkpoint(self) -> None:
        """Save the state at ``self.step``; refuses (TrainingError) a non-finite or diverged state.

        A poisoned state is never written, so ``latest`` always names a good checkpoint and the
        advised resume with a lower learning rate starts from sane weights.
        """
        self.check_state()
        tag = f"step{self.step:07d}"
        # The resolved job config rides in the checkpoint (plain JSON types), so a resume rebuilds the
        # architecture from the checkpoint itself, not from a config.json that may be gone or edited.
        config = json.loads(json.dumps(configlib.to_dict(self.job_config))) if self.job_config is not None else None
        state = {"step": self.step, "torch_rng": torch.get_rng_state(), "job": self.job, "job_config": config}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=state)
        dist.barrier()
        if self.rank == 0:
            # Only this run's tags (step + 7 digits) at or before the one just saved; --fresh has moved an
            # earlier run's aside, and the tag ``latest`` names is always kept.
            tags = sorted(p for p in self.ckpt_dir.glob("step*") if p.is_dir() and p.name[4:].isdigit()
                          and len(p.name) == 11 and p.name <= tag)
            for old in tags[: max(len(tags) - max(self.tc.keep_checkpoints, 1), 0)]:
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load_checkpoint(self) -> bool:
        """Resume from the newest checkpoint in the run folder; False when there is none."""
        latest = self.ckpt_dir / "latest"
        if not latest.is_file():
            return False
        tag = latest_tag(self.ckpt_dir)
        try:
            path, state = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # DeepSpeed raises many types for a bad file; all mean the same to a user
            raise TrainingError(
                f"checkpoint {self.ckpt_dir / tag} could not be loaded ({type(e).__name__}: {e}). It is corrupt "
                f"or from another architecture or world layout: delete it (or set {latest} to an earlier tag) "
                f"and resume again, or start a new run."
            ) from e
        if path is None or state is None:
            raise TrainingError(f"checkpoint {self.ckpt_dir / tag} is incomplete: delete it and resume again")
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        return True

    # -- metrics ---------------------------------------------------------------
    def _log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _read_metrics(self) -> tuple[list[dict], int]:
        """The rows of metrics.jsonl that parse, and how many lines did not (a line torn by a kill)."""
        return read_jsonl(self.metrics_path)

    def _trim_metrics(self) -> dict:
        """On resume, drop metric lines past the restored step so curves never double back.

        A line a kill tore in half is dropped (and said so). Returns the logged values as of the
        restored step (the last value of each key), so a run resumed at its end still reports them.
        """
        rows, torn = self._read_metrics()
        rows = [r for r in rows if r.get("step", 0) <= self.step]
        if self.rank == 0 and self.metrics_path.exists():
            if torn:
                print(f"{self.metrics_path}: dropped {torn} unreadable line(s) (cut off when the run was stopped)",
                      flush=True)
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        last: dict[str, Any] = {}
        for r in rows:
            last.update(r)
        return last

    def sparsity_row(self) -> dict:
        if not self.sparse:
            return {}
        fr = sp.nonzero_fractions(self.matrices)
        block = [v for k, v in fr.items() if ".h." in k]
        return {"kept_fraction_target": self.fraction_at(self.step),
                "kept_fraction_blocks": sum(block) / max(len(block), 1), "kept_fraction": fr}

    # -- the loop ---------------------------------------------------------------
    def fit(self, resume: bool = True, progress: bool = True, on_snapshot: Callable[[int], Any] | None = None) -> dict:
        """Train to ``train.steps``; returns the last logged values (restored from metrics.jsonl on a resume).

        ``self.start_step`` tells the caller where training began (== ``self.step`` when nothing was left).
        """
        last: dict[str, Any] = {}
        if resume and self.load_checkpoint():
            last = self._trim_metrics()
            if self.rank == 0:
                print(f"resumed from step {self.step} of {self.tc.steps}", flush=True)
        elif self.rank == 0:
            # A fresh start over an earlier run: its checkpoints and metrics are moved aside, never
            # deleted and never mixed with this run's (retention would sort both runs' tags together).
            from sparse_lm.io import set_aside

            if any(self.ckpt_dir.glob("step*")):
                stale = [n for n in ("checkpoints", "metrics.jsonl") if (self.run_dir / n).exists()]
                moved = set_aside(self.run_dir, stale)
                print(f"earlier {', '.join(stale)} moved to {moved}", flush=True)
            else:  # the metrics of an attempt that never saved a checkpoint: nothing to keep them for
                self.metrics_path.unlink(missing_ok=True)
        dist.barrier()
        self.start_step = self.step
        tokens_per_step = self.tc.global_batch * self.block_size
        bar = None
        if progress and self.rank == 0:
            from tqdm import tqdm

            import sys

            # In a log file (not a terminal) a bar redrawn every step would bury everything else.
            bar = tqdm(total=self.tc.steps, initial=self.step, desc=f"{self.job} {self.run_dir.name}",
                       unit="step", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)
        t_last, steps_since = time.perf_counter(), 0
        self.module.train()
        while self.step < self.tc.steps:
            loss = self.train_step()
            steps_since += 1
            done = self.step == self.tc.steps
            row: dict[str, Any] = {}
            if self.step % self.tc.log_every == 0 or done:
                dt = time.perf_counter() - t_last
                row = {"step": self.step, "loss": loss, **getattr(self.module, "last_components", {}),
                       "lr": self.lr_at(self.step - 1), "grad_rms": self.optimizer.last_grad_rms,
                       "tokens": self.step * tokens_per_step, "tokens_per_s": steps_since * tokens_per_step / dt,
                       **self.sparsity_row()}
                t_last, steps_since = time.perf_counter(), 0
            if (self.tc.eval_every and self.step % self.tc.eval_every == 0) or done:
                row = {"step": self.step, **row, **self.evaluate()}
            if row:
                self._log(row)
                last.update(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", **({"val": f"{last['val_loss']:.3f}"} if "val_loss" in last else {}))
            if (self.tc.checkpoint_every and self.step % self.tc.checkpoint_every == 0) or done:
                self.save_checkpoint()
            snapshot_every = getattr(self.tc, "snapshot_every", 0)
            if on_snapshot is not None and snapshot_every and self.step % snapshot_every == 0 and not done:
                on_snapshot(self.step)  # a collective (the export gathers the master weights): every rank calls it
        if bar is not None:
            bar.close()
        return last

    # -- export ------------------------------------------------------------------
    def full_fp32_state(self) -> dict[str, torch.Tensor]:
        """Every parameter in fp32 from the master copy (a collective: call on all ranks)."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, p in self.module.named_parameters():
            # A collective on every rank: ZeRO marks params outside a rank's partition with
            # _hp_mapping = None, so test for the attribute, not its value.
            full = safe_get_full_fp32_param(p) if hasattr(p, "_hp_mapping") else None
            state[name] = (full if full is not None else p.detach()).float().cpu().clone()
        for name, b in self.module.named_buffers():
            state[name] = b.detach().float().cpu().clone()
        return state


def export_model(trainer: Trainer, model_factory, out_dir: Path, tokenizer=None) -> Path | None:
    """Write ``save_pretrained`` weights (+ tokenizer) atomically; returns the folder on rank 0."""
    state = trainer.full_fp32_state()
    if trainer.rank != 0:
        return None
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise TrainingError(f"not exporting {out_dir}: {len(bad)} tensor(s) hold NaN or infinite values "
                            f"({', '.join(bad[:3])}); " + trainer._newest_checkpoint_hint())
    model = model_factory()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith(("attn.bias", "attn.masked_bias"))]:
        raise TrainingError(f"export mismatch: missing {missing}, unexpected {unexpected}")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def checkpoint_job_config(ckpt_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """(job, resolved config dict) saved in the newest checkpoint of ``ckpt_dir``; None when there is none.

    Read without DeepSpeed (the model to load into is built from this config). Checkpoints written
    before the config rode along return None: the caller falls back to the run's config.json.
    """
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag_dir = Path(ckpt_dir) / latest_tag(ckpt_dir)
    # ZeRO 0-2 keep the client state in rank 0's model-states file; mmap: the weights are not read.
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise TrainingError(f"checkpoint {tag_dir} has no {path.name}: it is incomplete; delete it and resume again")
    try:
        state = safe_torch_load(path, map_location="cpu", mmap=True)
    except UnsafeCheckpointError:
        raise
    except TrainingError as e:  # a truncated or foreign file; the message says what to do either way
        raise TrainingError(f"checkpoint {tag_dir} could not be read ({e.__cause__ or e}): delete it (or set "
                            f"{latest} to an earlier tag) and resume again") from e
    if not isinstance(state, dict):
        raise TrainingError(f"{path} is not a DeepSpeed checkpoint (a {type(state).__name__}, not a dict)")
    config = state.get("job_config")
    if config is None:
        return None
    return str(state.get("job", "pretrain")), config


def save_job_config(cfg: Any, job: str, run_dir: Path) -> None:
    configlib.save(cfg, run_dir / "config.json", job=job)

