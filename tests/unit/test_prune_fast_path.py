"""The pruner's fast mask step equals the plain one: same task loss, same mask gradients.

The fast path (`pruning.forward`, `pruning.pruner.Ablation`) trims a SparseGPT's last
block to the last positions, groups prompts by length into the chunks that pad least,
and applies mean ablation with a hand-written backward. Each is compared here against
the plain path (full forward pass, greedy length groups, autograd's addcmul) on small
real SparseGPTs with AbsTopK, an attention sink and a bigram table, with a mask that
closes about a third of the nodes and means that are not zero, so every piece of the
gradient is exercised.
"""

from __future__ import annotations

import pytest
import torch

from pruning.config import PruneConfig
from pruning.forward import (
    batch_margins,
    fast_head_ok,
    last_logits,
    min_padding_chunks,
    precision_context,
    task_loss,
)
from pruning.graph import NodeIndex
from pruning.pruner import Ablation, frozen, heaviside_ste
from sparse_lm.model import SparseGPT, SparseGPTConfig
from tasks.loss import TaskBatch, length_chunks

torch.set_num_threads(1)

VOCAB = 64


def small_model(sink: bool = True, relu_resid: bool = False, n_layer: int = 2, seed: int = 0) -> SparseGPT:
    cfg = SparseGPTConfig(vocab_size=VOCAB, block_size=48, n_layer=n_layer, n_head=4, d_head=8, d_model=32,
                          d_mlp=64, afrac=0.25, sink=sink, enable_bigram_table=True,
                          residual_activation_type="relu" if relu_resid else "identity")
    torch.manual_seed(seed)
    model = SparseGPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the init so that attention and AbsTopK matter
            p.normal_(0.0, 0.3)
        for name, p in model.weight_matrices().items():
            if name.startswith("transformer.h."):
                p.mul_(torch.rand_like(p) < 0.25)  # weight-sparse, as the pruned models are
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_batch(n: int = 24, seed: int = 1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (n,), generator=g)
    ids = torch.randint(0, VOCAB, (n, int(lengths.max())), generator=g)
    ids[torch.arange(ids.shape[1])[None, :] >= lengths[:, None]] = 0  # right padding
    target = torch.randint(0, VOCAB, (n,), generator=g)
    distractor = (target + 1 + torch.randint(0, VOCAB - 1, (n,), generator=g)) % VOCAB
    return TaskBatch(input_ids=ids, lengths=lengths, target_ids=target, distractor_ids=distractor,
                     family=torch.randint(0, 2, (n,), generator=g))


def mask_step(model: SparseGPT, batch: TaskBatch, *, fast_path: bool, precision: str = "fp32",
              chunk_tokens: int = 200, open_sites: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(task loss, d loss / d tau) of one mask step, by the fast path or the plain one; the first
    `open_sites` node sites have every node open (the fast path passes them through)."""
    index = NodeIndex.build(model, PruneConfig().node_sites)
    mean_vec = 0.5 * torch.randn(index.total, generator=torch.Generator().manual_seed(2))
    tau = torch.randn(index.total, generator=torch.Generator().manual_seed(3)) + 0.4  # ~1/3 closed
    for site in index.sites[:open_sites]:
        tau[site.offset : site.offset + site.width] = tau[site.offset : site.offset + site.width].abs() + 0.1
    tau.requires_grad_(True)
    ablation = Ablation(model, index, mean_vec, fused=fast_path)
    with frozen(model), ablation.installed(torch.ones(index.total), all_sites=True), \
            precision_context(precision, "cpu", model):
        mask = heaviside_ste(tau, 1.0)
        ablation.set(mask)
        if fast_path:  # the fused path knows which sites are all open (and passes them through)
            assert sum(ablation._open.values()) == open_sites
        margin = batch_margins(model, batch, chunk_tokens=chunk_tokens, fast=fast_path, trim=fast_path,
                               min_padding=fast_path)[0]
        loss = task_loss(margin, batch.family)
        loss.backward()
    assert tau.grad is not None and bool((tau.grad != 0).any())
    return loss.detach(), tau.grad


@pytest.mark.parametrize("sink,relu_resid,n_layer", [(True, False, 2), (False, True, 2), (True, False, 1)])
def test_fast_mask_step_matches_plain(sink, relu_resid, n_layer):
    model = small_model(sink=sink, relu_resid=relu_resid, n_layer=n_layer)
    batch = random_batch()
    loss_ref, grad_ref = mask_step(model, batch, fast_path=False)
    loss, grad = mask_step(model, batch, fast_path=True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5 * float(grad_ref.abs().max()))


def test_fast_mask_step_with_open_sites_matches_plain():
    """Sites with every node open take the pass-through path of the fused ablation; their masks still get
    the gradient of the plain path (and the sites after them see exactly the same values)."""
    model = small_model()
    batch = random_batch()
    index = NodeIndex.build(model, PruneConfig().node_sites)
    n_open = len(index.sites) // 2
    loss_ref, grad_ref = mask_step(model, batch, fast_path=False, open_sites=n_open)
    loss, grad = mask_step(model, batch, fast_path=True, open_sites=n_open)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5 * float(grad_ref.abs().max()))
    first_open = index.sites[0]
    assert bool((grad[first_open.offset : first_open.offset + first_open.width] != 0).any())


def test_fast_mask_step_matches_plain_in_bf16():
    """In bf16 both paths round the same products; the fast one must not drift further than that."""
    model = small_model()
    batch = random_batch()
    loss_ref, grad_ref = mask_step(model, batch, fast_path=False, precision="bf16")
    loss, grad = mask_step(model, batch, fast_path=True, precision="bf16")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-3, atol=1e-4)
    assert float(torch.nn.functional.cosine_similarity(grad, grad_ref, dim=0)) > 0.999
    torch.testing.assert_close(grad, grad_ref, rtol=2e-2, atol=2e-2 * float(grad_ref.abs().max()))


def test_trimmed_last_block_gives_full_logits():
    model = small_model()
    batch = random_batch()
    full = last_logits(model, batch, fast=False)
    torch.testing.assert_close(last_logits(model, batch, trim=True), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_logits(model, batch, trim=False), full, rtol=1e-5, atol=1e-5)
    assert fast_head_ok(model, batch)


def test_fast_forward_in_bf16_gives_the_models_logits():
    """Inside precision bf16 the pruner's forward (blocks with `_qkv`: the bf16 query, key and value cast
    one by one) computes the values the model's own forward does, up to the order of float sums."""
    model = small_model(n_layer=3)
    batch = random_batch()
    with frozen(model), precision_context("bf16", "cpu", model):
        full = last_logits(model, batch, fast=False)
        fast = last_logits(model, batch)
    torch.testing.assert_close(fast, full, rtol=1e-3, atol=1e-3)


def test_trimmed_attention_reads_the_sink():
    """The test models are sensitive to what the trimmed block computes: without the sink it differs."""
    model = small_model()
    batch = random_batch()
    attn = model.transformer.h[-1].attn
    sink = attn.sink_logit
    attn.sink_logit = None
    try:
        trimmed = last_logits(model, batch)
    finally:
        attn.sink_logit = sink
    assert not torch.allclose(trimmed, last_logits(model, batch, fast=False), atol=1e-3)


@pytest.mark.parametrize("chunk_tokens", [30, 200, 100_000])
def test_min_padding_chunks(chunk_tokens):
    lengths = torch.randint(1, 60, (200,), generator=torch.Generator().manual_seed(0))
    chunks = min_padding_chunks(lengths, chunk_tokens)
    rows = torch.cat(chunks)
    assert sorted(rows.tolist()) == list(range(len(lengths)))  # every row exactly once
    for c in chunks:
        assert len(c) == 1 or len(c) * int(lengths[c].max()) <= chunk_tokens
    padded = lambda cs: sum(len(c) * int(lengths[c].max()) for c in cs)
    greedy = length_chunks(lengths, chunk_tokens)
    overhead = 256
    assert padded(chunks) + overhead * len(chunks) <= padded(greedy) + overhead * len(greedy)
    if chunk_tokens == 100_000:  # room for one chunk of everything, but the padding of it costs more
        assert padded(chunks) < padded(greedy) and len(chunks) > 1


def test_bucketed_rows_are_few_and_waste_little():
    """The bf16 products see one of few row counts (oneDNN compiles one per shape): at most 8 per doubling
    past 256 and multiples of 32 below, never fewer rows than asked, at most 12.5% more past 256."""
    from pruning.forward import bucket_rows

    sizes = {bucket_rows(m) for m in range(1, 16385)}
    assert all(bucket_rows(m) >= m for m in range(1, 16385))
    assert max(bucket_rows(m) / m for m in range(257, 16385)) <= 1.125
    assert len({s for s in sizes if 1024 < s <= 2048}) == 8 and len({s for s in sizes if s <= 256}) == 8
    assert len(sizes) <= 8 + 8 * 6


@pytest.mark.parametrize("parts", [1, 3])
def test_padded_bf16_linear_equals_the_plain_cast_product(parts):
    """`bf16_linear` (rows zero-padded to a bucket inside the cast) gives the plain bf16 product and its input
    gradient; with parts, the same values split into contiguous parts."""
    from pruning.forward import bf16_linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g).bfloat16()
    b = torch.randn(24, generator=g).bfloat16()
    x = torch.randn(3, 37, 16, generator=g, requires_grad=True)  # 111 rows: padded to 128
    ref = torch.nn.functional.linear(x.to(torch.bfloat16), w, b).float()
    up = torch.randn(ref.shape, generator=g)
    (ref_grad,) = torch.autograd.grad((ref * up).sum(), x)
    out = bf16_linear(x, w, b, parts=parts)
    out = out if parts == 1 else torch.cat(out, dim=-1)
    if parts == 3:
        assert all(p.is_contiguous() and p.shape == (3, 37, 8) for p in bf16_linear(x, w, b, parts=3))
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    (grad,) = torch.autograd.grad((out * up).sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-2, atol=2e-2)
    assert out.dtype == grad.dtype == torch.float32
