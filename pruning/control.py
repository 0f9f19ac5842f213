"""The random-weights control: a model of the same shape that learned nothing.

A circuit means something only against a model that does not solve the task.
`random_weights_like` builds a freshly initialised model of the same class and
config (so the same node sites and node count) with, for a weight-sparse
model, the same number of nonzero weights in every matrix: each matrix keeps
its largest-magnitude fresh weights, as the sparsity projection of training
does. Pruning it for a task must fail with "the model does not solve this
task" (`pruning.pruner.prune` checks the model's validation accuracy first),
never return an (empty) circuit.

    control = random_weights_like(model, seed=0)
    circuit = prune(control, tokenizer, cfg)      # circuit.failed, circuit.reason
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["random_weights_like"]


def random_weights_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """A fresh initialisation of `model`'s class and config, with its per-matrix weight sparsity, in eval mode.

    The new model is on the same device and dtype as `model` and has no gradients. The
    bigram table, norm gains and biases take their initial values (a SparseGPT's bigram table
    starts at zero, so the control cannot read the task off bigram statistics either).
    """
    config = copy.deepcopy(model.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(config)
    param = next(model.parameters(), None)
    if param is not None:
        fresh.to(device=param.device, dtype=param.dtype)
    old = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            ref = old.get(name)
            if ref is None or p.ndim != 2 or ref.shape != p.shape or name.endswith("bigram_table"):
                continue
            kept = int(torch.count_nonzero(ref))
            if kept == ref.numel():
                continue  # a dense matrix stays dense
            flat = p.reshape(-1)
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[flat.abs().topk(kept).indices] = True  # the largest fresh weights, as the sparsity projection keeps
            flat.mul_(keep)
    fresh.eval()
    for p in fresh.parameters():
        p.requires_grad_(False)
    return fresh
