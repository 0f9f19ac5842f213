"""Attribution pruning, the baseline (``--method attribution``): rank nodes by a first-order estimate.

Mean-ablating node n in example e changes its loss by about

    delta(e, n) = sum over positions t of  dL_e/dx[t, n] * (mean[n] - x[t, n])

(attribution patching toward the mean ablation; every position is ablated, so
every position counts, and causal attention means only positions up to the
prompt's last one carry a gradient). A node's score is ``sum_e |delta(e, n)|``
over the task's train examples, with L_e the example's term of the
family-averaged task loss. The nodes are then ordered by score and the same
bisection, calibration and checks as the learned masks give the circuit.

The gradient with respect to a site's value is taken through an additive zero
(``x + z`` with ``z`` a leaf) installed with the named sites, so the gradient at
a site includes every path through later sites.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruning.forward import device_chunks, last_logits
from pruning.graph import NodeIndex
from sparse_lm.adapters import sites_of
from tasks.loss import TaskBatch, margins


def attribution_scores(model: nn.Module, index: NodeIndex, mean_vec: torch.Tensor, batch: TaskBatch, *,
                       chunk_tokens: int = 8192, fast: bool = True,
                       example_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> torch.Tensor:
    """sum over examples of |grad . (activation - mean)| per node, (N,) float32 on the model's device.

    `example_loss(model, batch)`, when given, replaces the binary task loss (a multi-class objective,
    `pruning.objective`): a scalar that sums each example's own term of the task loss (examples must
    not interact, so each example's gradient is its own); the batch is then scored in one pass.
    """
    sites = sites_of(model)
    means = index.split(mean_vec)
    device = batch.input_ids.device
    scores = torch.zeros(index.total, dtype=torch.float64, device=device)
    if example_loss is None:
        per_family = torch.bincount(batch.family, minlength=2)[:2]
        # Each example's weight in the family-averaged loss, so per-example gradients stay separate.
        weight_of_family = torch.where(per_family > 0, 1.0 / per_family.clamp(min=1) / int((per_family > 0).sum()),
                                       0.0)
    names = [s.name for s in index]
    for idx in (device_chunks(batch, chunk_tokens) if example_loss is None else [None]):
        mb = batch.select(idx) if idx is not None else batch
        zeros: dict[str, torch.Tensor] = {}
        values: dict[str, torch.Tensor] = {}

        def make(name: str):
            def fn(x: torch.Tensor) -> torch.Tensor:
                z = torch.zeros_like(x, requires_grad=True)
                zeros[name] = z
                values[name] = x.detach()
                return x + z

            return fn

        with torch.enable_grad(), sites.replace({n: make(n) for n in names}):
            if example_loss is not None:
                loss = example_loss(model, mb)
            else:
                last = last_logits(model, mb, fast=fast)  # (b, V)
                m = margins(last, mb.target_ids, mb.distractor_ids)
                loss = (F.softplus(-m) * weight_of_family[mb.family].to(m.dtype)).sum()
            grads = torch.autograd.grad(loss, [zeros[n] for n in names], allow_unused=True)
        for name, g in zip(names, grads):
            if g is None:  # a site after the last position's dependence (cannot happen for node sites)
                continue
            site = index.by_name[name]
            delta = (g * (values[name] - means[name].to(g.dtype))).sum(dim=1)  # (b, T, W) -> (b, W)
            scores[site.offset : site.offset + site.width] += delta.abs().double().sum(dim=0)
    return scores.float()
