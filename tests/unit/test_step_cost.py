"""The cheaper paths of the training step compute what the paths they replace compute.

Speed is measured in benchmarks/train_step.py (``--dense-preset``); these tests pin the numerics.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparse_lm.model import CausalSelfAttention, SparseGPTConfig


def _attention(seed: int = 0) -> CausalSelfAttention:
    torch.manual_seed(seed)
    att = CausalSelfAttention(SparseGPTConfig(n_head=4, d_head=8, d_model=32, afrac=None), 0)
    with torch.no_grad():
        att.sink_logit.normal_(0, 2)  # a sink that takes a real share of the attention
    return att


def _run(att, fn, precision: str):
    """Output and gradients (q, k, v, sink_logit) of ``fn`` on fixed inputs under ``precision``."""
    att.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(1)
    qkv = [torch.randn(2, 4, 16, 8, generator=g).requires_grad_() for _ in range(3)]
    weight = torch.randn(2, 4, 16, 8, generator=g)
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(*[t.bfloat16() for t in qkv], 1 / math.sqrt(8))
    else:
        y = fn(*qkv, 1 / math.sqrt(8))
    (y.float() * weight).sum().backward()
    return y, [t.grad for t in qkv] + [att.sink_logit.grad]


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_cpu_sink_attention_matches_masked_sdpa(precision, tol):
    att = _attention()
    y, grads = _run(att, att._attend_with_sink, precision)
    y_ref, grads_ref = _run(att, att._attend_with_sink_sdpa, precision)
    assert y.dtype == y_ref.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=tol, rtol=tol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref.float(), atol=tol, rtol=tol)
    assert grads[-1].abs().max() > 1e-3  # the sink logit does get a gradient


def test_cpu_sink_attention_is_causal_and_sinks():
    att = _attention()
    q, k, v = (torch.randn(1, 4, 6, 8) for _ in range(3))
    y = att._attend_with_sink(q, k, v, 1 / math.sqrt(8))
    v2 = v.clone()
    v2[:, :, 3:] += 5  # later positions change: earlier outputs must not
    y2 = att._attend_with_sink(q, k, v2, 1 / math.sqrt(8))
    torch.testing.assert_close(y[:, :, :3], y2[:, :, :3])
    assert not torch.allclose(y[:, :, 3:], y2[:, :, 3:])
    with torch.no_grad():
        att.sink_logit.fill_(50.0)  # all attention on the sink, whose value is zero
    assert att._attend_with_sink(q, k, v, 1 / math.sqrt(8)).abs().max() < 1e-6


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_training_sink_attention_runs_on_the_flash_kernel(precision):
    """The reason for the CPU training path: with the sink as a key seen through `is_causal`, SDPA can take
    its flash kernel (no mask; q, k and v of one width). Allowed only that kernel, it must not refuse."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    att = _attention()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        y, grads = _run(att, att._attend_with_sink, precision)
        with pytest.raises(RuntimeError, match="No available kernel"):  # the masked path cannot (math only)
            _run(att, att._attend_with_sink_sdpa, precision)
    assert torch.isfinite(y.float()).all() and grads[-1].abs().max() > 1e-3
