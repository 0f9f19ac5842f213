"""A tiny real DeepSpeed run whose final state the tests inspect.

Started by the tests through the ``deepspeed`` launcher (2 ranks) or as a bare
process (1 rank). Each rank writes ``rank{r}.pt`` with its module weights, the
full fp32 master weights, the per-step losses, whether its own fragment
of the optimizer moments is zero wherever the weights are, and per step the
RMS of the gradient that AdamW.step itself received (measured by wrapping
torch's AdamW.step, so independent of the trainer's own bookkeeping; summed
over parameter groups and, where each rank holds a partition, over ranks).

    python tests/integration/dist_worker.py DATA_DIR OUT_DIR --zero 2 --steps 6 [--stop-at 3] [--resume]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.distributed as dist

from sparse_lm.data import load_data
from sparse_lm.jobs import OptimSection, TrainSection
from sparse_lm.model import SparseGPT, SparseGPTConfig
from sparse_lm.sparsity import SparsityConfig
from sparse_lm.trainer import Trainer, init_distributed, shutdown_distributed

p = argparse.ArgumentParser()
p.add_argument("data_dir")
p.add_argument("out_dir")
p.add_argument("--zero", type=int, default=0)
p.add_argument("--precision", default="fp32")
p.add_argument("--steps", type=int, default=6)
p.add_argument("--stop-at", type=int, default=None, help="save a checkpoint after this step and exit (a 'kill')")
p.add_argument("--resume", action="store_true")
p.add_argument("--global-batch", type=int, default=8)
p.add_argument("--micro-batch", type=int, default=4)
p.add_argument("--grad-rms-mode", default="clip")
args = p.parse_args()

received: list[tuple[float, int]] = []  # (sum of squares, entries) per AdamW.step call since the last step
_adamw_step = torch.optim.AdamW.step


def _recording_step(self, *a, **kw):
    grads = [q.grad for g in self.param_groups for q in g["params"] if q.grad is not None]
    received.append((sum(float(g.double().pow(2).sum()) for g in grads), sum(g.numel() for g in grads)))
    return _adamw_step(self, *a, **kw)


torch.optim.AdamW.step = _recording_step


def adam_grad_rms(n_params: int) -> float:
    """RMS of the whole gradient AdamW received this step, from every rank's partition or full copy."""
    t = torch.tensor([sum(s for s, _ in received), sum(n for _, n in received)], dtype=torch.float64)
    received.clear()
    dist.all_reduce(t)
    copies = max(round(float(t[1]) / n_params), 1)  # world full copies (ZeRO-0) or 1 partitioned copy (+ padding)
    return math.sqrt(float(t[0]) / copies / n_params)

rank, world = init_distributed()
train, val, meta = load_data(args.data_dir)
torch.manual_seed(0)
cfg = SparseGPTConfig(vocab_size=meta["vocab_size"], block_size=train.shape[1], n_layer=2, n_head=4, d_head=8,
                      d_model=32, d_mlp=64, afrac=0.25, sink=True, enable_bigram_table=True)
model = SparseGPT(cfg)
tc = TrainSection(steps=args.steps, micro_batch=args.micro_batch, global_batch=args.global_batch,
                  precision=args.precision, zero_stage=args.zero, eval_every=0, log_every=1, checkpoint_every=0,
                  eval_batches=2, threads=1)
oc = OptimSection(lr=3e-3, grad_rms_mode=args.grad_rms_mode)
sc = SparsityConfig(target_fraction=0.25, anneal_start=0.0, anneal_end=0.5, min_fan=2, zero_moments=True)
trainer = Trainer(model=model, run_dir=Path(args.out_dir), train_cfg=tc, optim_cfg=oc, train_tokens=train,
                  val_tokens=val, sparsity=sc)
if args.resume:
    assert trainer.load_checkpoint(), "no checkpoint to resume from"
losses, adam_rms, grad_rms = [], [], []
received.clear()  # bf16 ZeRO-0's wrapper runs one zero-gradient step at set-up to create the Adam state
n_params = sum(q.numel() for q in trainer.module.parameters() if q.requires_grad)
while trainer.step < (args.stop_at or args.steps):
    losses.append(trainer.train_step())
    adam_rms.append(adam_grad_rms(n_params))
    grad_rms.append(trainer.optimizer.last_grad_rms)
if args.stop_at:
    trainer.save_checkpoint()

moments_zero = True
for name, p in trainer.matrices.items():
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        continue
    addr = mapping.lp_fragment_address
    zero = (p.detach().reshape(-1).narrow(0, addr.start, addr.numel) == 0)
    for state in (mapping.optim_fragment or {}).values():
        moments_zero &= bool((state[zero] == 0).all())
    moments_zero &= bool((mapping.get_hp_fragment()[zero] == 0).all())

master = trainer.full_fp32_state()
module = {n: p.detach().float().cpu().clone() for n, p in trainer.module.named_parameters()}
torch.save({"rank": rank, "world": world, "module": module, "master": master, "losses": losses,
            "matrices": list(trainer.matrices), "moments_zero": moments_zero, "step": trainer.step,
            "adam_grad_rms": adam_rms, "grad_rms": grad_rms},
           Path(args.out_dir) / f"rank{rank}.pt")
shutdown_distributed()
