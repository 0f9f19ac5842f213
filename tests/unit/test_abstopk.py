"""AbsTopK and the weight top-k mask: exact selection, gradients, autocast.

Every selection path (the compiled C++ op, the pure-torch histogram, torch.topk
on integer keys) must keep exactly the set torch.topk keeps, up to which of
several equal |x| at the k-th value is kept; every check compares against a
plain topk + scatter reference, and the fixture below runs each test on each path.
"""

from __future__ import annotations

import pytest
import torch

from sparse_lm import topk as topk_impl
from sparse_lm import sparsity as sp
from sparse_lm.sites import abs_topk
from sparse_lm.topk import _sparse_nonzero


def reference_abs_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """The textbook AbsTopK: autograd through topk + gather + scatter."""
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def kept_values(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Sorted |x| of the kept entries of every row (-1 fills the rest): equal iff the sets match up to ties."""
    a = x.detach().abs().double().reshape(-1, x.shape[-1])
    return a.masked_fill(~kept.reshape(a.shape), -1).sort(-1).values


def check_against_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    y = abs_topk(x, k)
    # Exact zeros may be kept (a row with fewer than k nonzeros), so y != 0 does not show every
    # kept entry; the gradient of sum(y) does: 1 exactly on the kept entries, 0 elsewhere.
    xg = x.detach().clone().requires_grad_()
    abs_topk(xg, k).sum().backward()
    kept = xg.grad != 0
    assert (kept.reshape(-1, x.shape[-1]).sum(-1) == k).all(), "not exactly k kept in every row"
    assert torch.equal(y, torch.where(kept, x, torch.zeros_like(x))), "output is not x on the kept entries, 0 elsewhere"
    ref = reference_abs_topk(x, k) != 0
    ref = ref | ((x == 0) & kept)  # the reference output cannot show which zeros it kept
    assert torch.equal(kept_values(x, kept), kept_values(x, ref)), "kept set differs from torch.topk's beyond ties"
    return kept


def inputs(dist: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    if dist == "zeros":  # most entries exactly zero: many rows have fewer than k nonzeros
        x = x * (torch.rand(shape, generator=gen) < 0.15)
    elif dist == "ties":  # a handful of values: ties at the k-th |x| in nearly every row
        x = torch.randint(-3, 4, shape, generator=gen).float()
    elif dist == "heavy":  # heavy tails and very different row scales
        x = x ** 3 * torch.exp(3 * torch.randn(shape[:-1] + (1,), generator=gen))
    elif dist == "close":  # values within a few ulps of each other
        x = 1 + 1e-6 * x
    elif dist == "zero_rows":
        x[..., ::3, :] = 0
    return x.to(dtype)


DISTS = ["gauss", "zeros", "ties", "heavy", "close", "zero_rows"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dist", DISTS)
def test_keeps_exactly_the_k_largest_abs_like_topk(dtype, dist):
    gen = torch.Generator().manual_seed(0)
    for n in (7, 64, 256, 1024):
        for k in sorted({1, n // 4, n - 1} - {0}):
            check_against_reference(inputs(dist, (3, 40, n), dtype, gen), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_sized_inputs(dtype):
    """Activation-sized batches (thousands of rows) go through the bucketed path, including its ranking."""
    gen = torch.Generator().manual_seed(1)
    for dist in ("gauss", "heavy", "ties"):
        check_against_reference(inputs(dist, (8, 256, 256), dtype, gen), 64)
        check_against_reference(torch.nn.functional.gelu(inputs(dist, (4, 256, 1024), dtype, gen)), 256)



@pytest.fixture(autouse=True, params=["cpp", "histogram", "torch.topk"])
def selection_path(request, monkeypatch):
    """Run every test through every exact selection (narrow rows normally skip the histogram)."""
    monkeypatch.setenv(topk_impl.PATH_ENV, {"cpp": "cpp", "histogram": "histogram", "torch.topk": "torch"}[request.param])
    monkeypatch.setattr(topk_impl, "_MIN_HISTOGRAM_WIDTH", 0 if request.param == "histogram" else 1 << 30)
    return request.param


def test_ties_at_the_kth_value_go_to_the_lowest_index(selection_path):
    """The exact paths keep the lowest tied column; torch.topk keeps one of the tied columns, whichever it returns."""
    gen = torch.Generator().manual_seed(0)
    k, rows = 256, 64
    x = 1 + 0.4 * torch.rand(rows, 1024, generator=gen)  # below the tie
    perm = torch.stack([torch.randperm(1024, generator=gen) for _ in range(rows)])
    tied, above = perm[:, :3].sort(1).values, perm[:, 3:k + 2]
    x.scatter_(1, above, 1.6 + 0.3 * torch.rand(rows, k - 1, generator=gen))  # k - 1 entries above 1.5
    x.scatter_(1, tied, 1.5)  # the k-th largest, three times in every row
    x = x * torch.where(torch.rand(rows, 1024, generator=gen) < 0.5, -1.0, 1.0)
    kept = abs_topk(x, k) != 0
    assert kept.gather(1, above).all()
    if selection_path == "torch.topk":
        assert torch.equal(kept.gather(1, tied).sum(1), torch.ones(rows, dtype=torch.long))
    else:
        assert torch.equal(kept.gather(1, tied), torch.tensor([[True, False, False]]).expand(rows, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_same_mask_and_grads_as_pure_torch(dtype, selection_path):
    """On data without ties every path keeps exactly torch.topk's entries, forward and backward."""
    gen = torch.Generator().manual_seed(3)
    for rows, n, k in ((4096, 256, 64), (512, 1024, 256), (64, 96, 24), (33, 5, 1), (33, 5, 4)):
        # distinct magnitudes in every row (a permutation), random signs, then the dtype: exact in
        # all three for n <= 256 (bf16 has 8 significant bits), so scale into distinct binades beyond
        mag = torch.stack([torch.randperm(n, generator=gen) for _ in range(rows)]).float() + 1
        if n > 256:
            mag = torch.pow(2.0, mag // 128) * (128 + mag % 128)
        x = (mag * torch.where(torch.rand(rows, n, generator=gen) < 0.5, -1.0, 1.0)).to(dtype)
        assert torch.equal(x.abs().float().sort(-1).values.diff(dim=-1) > 0, torch.ones(rows, n - 1, dtype=torch.bool))
        ref = torch.zeros(rows, n, dtype=torch.bool).scatter_(1, x.float().abs().topk(k, -1).indices, True)
        xg = x.clone().requires_grad_()
        y = abs_topk(xg, k)
        g = torch.randn(rows, n, generator=gen).to(dtype)
        y.backward(g)
        assert torch.equal(y, torch.where(ref, x, torch.zeros_like(x)))
        assert torch.equal(xg.grad, torch.where(ref, g, torch.zeros_like(g)))


def test_cpp_build_failure_falls_back_once(monkeypatch, tmp_path):
    """No compiler or no source: 'auto' warns once and uses pure torch; 'cpp' says what to do."""
    monkeypatch.setattr(topk_impl, "_cpp_state", {})
    monkeypatch.setattr(topk_impl, "_CPP_SOURCE", tmp_path / "missing.cpp")
    monkeypatch.setenv(topk_impl.PATH_ENV, "auto")
    x = torch.randn(64, 256)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        check_against_reference(x, 64)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        check_against_reference(x, 16)
    monkeypatch.setenv(topk_impl.PATH_ENV, "cpp")
    with pytest.raises(RuntimeError, match="SPARSE_LM_ABSTOPK=histogram"):
        abs_topk(x, 64)
    monkeypatch.setenv(topk_impl.PATH_ENV, "fast")
    with pytest.raises(ValueError, match="choose one of"):
        abs_topk(x, 64)


def test_non_finite_and_degenerate_inputs():
    x = torch.randn(4, 32)
    x[0, 3], x[1, 5], x[2], x[3, :10] = float("inf"), float("nan"), 0.0, -float("inf")
    y = abs_topk(x, 8)
    assert y[0, 3] == float("inf") and torch.isnan(y[1, 5])  # inf and nan rank above every finite |x|
    assert int(torch.isnan(y).sum()) == 1 and int((y[3] == -float("inf")).sum()) == 8  # dropped infs are 0
    assert abs_topk(x, 32) is x and not abs_topk(x, 0).any()
    xg = x.clone().requires_grad_()
    g = torch.full_like(x, float("nan"))
    abs_topk(xg, 8).backward(g)
    assert int(torch.isnan(xg.grad).sum()) == 4 * 8 and not (xg.grad[~torch.isnan(xg.grad)] != 0).any()
    check_against_reference(torch.zeros(16, 64), 5)
    check_against_reference(torch.full((16, 64), 1e-40), 5)  # subnormal maxima: the scale overflows


def test_integer_bucket_offsets(monkeypatch):
    """Past 2**24 buckets in all (about 65k rows) row offsets are added in int64 instead of float32."""
    monkeypatch.setattr(topk_impl, "_FLOAT_OFFSETS_LIMIT", 0)
    gen = torch.Generator().manual_seed(2)
    for dist in ("gauss", "ties"):
        check_against_reference(inputs(dist, (4, 100, 256), torch.float32, gen), 64)


def test_non_contiguous_input():
    """q, k and v reach their sites as views of one projection."""
    qkv = torch.randn(2, 128, 3 * 256)
    for part in qkv.split(256, dim=2):
        check_against_reference(part, 64)
    check_against_reference(torch.randn(256, 300).t(), 16)


def test_gradient_flows_only_through_kept_entries():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 256, requires_grad=True)  # continuous values: no ties, one right answer
    g = torch.randn(4, 64, 256)
    abs_topk(x, 64).backward(g)
    xr = x.detach().clone().requires_grad_()
    reference_abs_topk(xr, 64).backward(g)
    assert torch.equal(x.grad, xr.grad)
    assert torch.equal(x.grad != 0, abs_topk(x, 64) != 0)


def test_gradcheck():
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: abs_topk(t, 4), (x,))


def test_under_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 256)
    x = torch.randn(8, 32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        y = abs_topk(h, 64)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert ((y != 0).sum(-1) == 64).all()
    assert torch.equal(kept_values(h, y != 0), kept_values(h, reference_abs_topk(h, 64) != 0))
    y.float().pow(2).sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_sparse_nonzero_finds_every_one():
    gen = torch.Generator().manual_seed(0)
    for n, p in ((8, 1.0), (64, 0.0), (4096, 0.01), (4096, 0.5), (13, 0.3)):
        m = (torch.rand(n, generator=gen) < p).to(torch.uint8)
        assert torch.equal(_sparse_nonzero(m).sort().values, m.nonzero().squeeze(1))


# -- the weight L0 projection -----------------------------------------------------------


def reference_topk_mask(w: torch.Tensor, k: int, fan_dims=(), min_fan: int = 0) -> torch.Tensor:
    """Force the top min_fan of every slice (torch.topk), then the k largest |w| overall."""
    score = w.abs().float()
    forced = torch.zeros_like(score, dtype=torch.bool)
    for dim in fan_dims if min_fan else ():
        forced.scatter_(dim, score.topk(min(min_fan, score.shape[dim]), dim=dim).indices, True)
    score = score.masked_fill(forced, float("inf"))
    k = max(k, int(forced.sum()))
    return torch.zeros(score.numel(), dtype=torch.bool).scatter_(0, score.view(-1).topk(k).indices, True).view_as(w)


@pytest.mark.parametrize("fan_dims", [[], [0], [1], [0, 1]])
@pytest.mark.parametrize("dist", ["gauss", "ties", "zeros"])
def test_topk_mask_keeps_exactly_k_after_forcing(fan_dims, dist):
    gen = torch.Generator().manual_seed(0)
    for rows, cols in ((4, 10), (64, 16), (48, 200)):
        w = inputs(dist, (rows, cols), torch.float32, gen)
        for min_fan in (0, 1, 3):
            for k in (1, rows * cols // 16, rows * cols // 2, rows * cols):
                mask = sp.topk_mask(w, k, fan_dims, min_fan)
                ref = reference_topk_mask(w, k, fan_dims, min_fan)
                assert mask.dtype == torch.bool and mask.shape == w.shape
                assert int(mask.sum()) == int(ref.sum())  # k, or every forced entry when they are more
                for dim in fan_dims if min_fan else ():
                    assert (mask.sum(dim) >= min(min_fan, w.shape[dim])).all()
                if not (fan_dims and min_fan):
                    assert torch.equal(kept_values(w.view(1, -1), mask.view(1, -1)),
                                       kept_values(w.view(1, -1), ref.view(1, -1)))


def test_topk_mask_bf16_weights():
    w = torch.randn(64, 32).bfloat16()
    mask = sp.topk_mask(w, 200, [1], 2)
    assert int(mask.sum()) == 200 and (mask.sum(1) >= 2).all()


def _projection_matrices(dist: str, gen: torch.Generator) -> dict[str, torch.nn.Parameter]:
    """Matrices named as SparseGPT's (so each gets its fan dims), shaped so slices are short and long."""
    shapes = {"transformer.wte.weight": (96, 32), "lm_head.weight": (96, 32),
              "transformer.h.0.attn.c_attn.weight": (96, 32), "transformer.h.0.attn.c_proj.weight": (32, 32),
              "transformer.h.0.mlp.c_fc.weight": (128, 32), "transformer.h.0.mlp.c_proj.weight": (32, 128),
              "transformer.h.1.mlp.c_fc.weight": (40, 17), "transformer.h.1.mlp.c_proj.weight": (17, 40)}
    return {n: torch.nn.Parameter(inputs(dist, s, torch.float32, gen)) for n, s in shapes.items()}


@pytest.mark.parametrize("dist", ["gauss", "ties", "zeros", "heavy", "close"])
@pytest.mark.parametrize("min_fan", [0, 1, 4])
def test_fused_projection_equals_masks_then_apply(dist, min_fan):
    """`sparsity.project` (the compiled one-call op where it applies) leaves every matrix with the bits that
    compute_masks + apply_masks leave, through the annealing and at the target, ties and zeros included."""
    gen = torch.Generator().manual_seed(0)
    cfg = sp.SparsityConfig(target_fraction=1 / 8, embed_fraction=0.5, min_fan=min_fan)
    for step in (5, 40, 100):
        a = _projection_matrices(dist, gen)
        b = {n: torch.nn.Parameter(p.detach().clone()) for n, p in a.items()}
        sp.apply_masks(a, sp.compute_masks(a, cfg, step, 100))
        sp.project(b, cfg, step, 100)
        for name in a:
            assert torch.equal(a[name].data.view(torch.int32), b[name].data.view(torch.int32)), (name, step)


def test_fused_projection_declines_what_it_does_not_handle():
    """A non-finite weight, forced entries over the budget, and bf16 weights take the mask path, with its result."""
    cfg = sp.SparsityConfig(target_fraction=1 / 8, min_fan=4)
    gen = torch.Generator().manual_seed(1)
    a = _projection_matrices("gauss", gen)
    a["transformer.h.0.mlp.c_fc.weight"].data[3, 5] = float("inf")
    a["transformer.h.0.mlp.c_proj.weight"].data[0, 0] = float("nan")
    a["transformer.h.1.mlp.c_fc.weight"].data = a["transformer.h.1.mlp.c_fc.weight"].data.bfloat16()
    b = {n: torch.nn.Parameter(p.detach().clone()) for n, p in a.items()}
    sp.apply_masks(a, sp.compute_masks(a, cfg, 100, 100))
    sp.project(b, cfg, 100, 100)
    for name in a:
        assert torch.equal(torch.nan_to_num(a[name].data), torch.nan_to_num(b[name].data)), name
    over = sp.SparsityConfig(target_fraction=1 / 64, min_fan=4)  # 4 per row of c_fc is over 1/64 of it
    a = _projection_matrices("gauss", gen)
    b = {n: torch.nn.Parameter(p.detach().clone()) for n, p in a.items()}
    sp.apply_masks(a, sp.compute_masks(a, over, 100, 100))
    sp.project(b, over, 100, 100)
    for name in a:
        assert torch.equal(a[name].data, b[name].data), name


def test_fused_projection_keeps_the_fan_and_the_budget(selection_path):
    """Whatever path runs, every fan slice keeps min_fan entries and each matrix exactly its target count (or
    every forced entry, when they are more: h.1's 40 rows of 17 force 120 of 680, over 1/8 of it)."""
    gen = torch.Generator().manual_seed(2)
    cfg = sp.SparsityConfig(target_fraction=1 / 8, embed_fraction=0.5, min_fan=3)
    mats = _projection_matrices("gauss", gen)
    sp.project(mats, cfg, 100, 100)
    for name, p in mats.items():
        frac = sp.matrix_fraction(name, cfg, cfg.target_fraction, 1.0)
        dims = sp.fan_constraints(name, cfg.min_fan)
        forced = sum(3 * p.shape[1 - d] for d in dims)
        assert int((p.data != 0).sum()) == max(sp.target_count(p.numel(), frac), forced), name
        for dim in dims:
            assert ((p.data != 0).sum(dim) >= 3).all(), name


@pytest.mark.parametrize("shape", [(3, 7, 256), (5, 1024), (1, 1, 32), (0, 64)])
@pytest.mark.parametrize("need_grad_x", [True, False])
def test_gate_backward_compiled_equals_torch(shape, need_grad_x):
    """The pruner's ablation backward in one compiled pass gives torch's four-pass gradients."""
    from sparse_lm.topk import gate_backward

    g = torch.Generator().manual_seed(0)
    grad, x = torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g) + 1
    m, mean = torch.rand(shape[-1], generator=g), torch.randn(shape[-1], generator=g)
    ref_x, ref_m = gate_backward(grad, x, m, mean, need_grad_x=need_grad_x, compiled=False)
    got_x, got_m = gate_backward(grad, x, m, mean, need_grad_x=need_grad_x)
    exact = (grad.double() * (x.double() - mean.double())).reshape(-1, shape[-1]).sum(0)
    assert got_m.shape == (shape[-1],) and got_m.dtype == torch.float32
    torch.testing.assert_close(got_m.double(), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_m, ref_m, rtol=1e-5, atol=1e-4)
    if need_grad_x:
        assert torch.equal(got_x, ref_x) and torch.equal(got_x, grad * m)
    else:
        assert got_x is None and ref_x is None


def test_gate_backward_on_strided_inputs_and_other_dtypes():
    """A transposed grad is read in its logical order; bf16 takes the torch path with its own result."""
    from sparse_lm.topk import gate_backward

    g = torch.Generator().manual_seed(1)
    grad = torch.randn(256, 40, generator=g).t()  # (40, 256), not contiguous
    x, m, mean = torch.randn(40, 256, generator=g), torch.rand(256, generator=g), torch.randn(256, generator=g)
    got = gate_backward(grad, x, m, mean)
    ref = gate_backward(grad.contiguous(), x, m, mean, compiled=False)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-4)
    bf = [t.bfloat16() for t in (grad, x, m, mean)]
    gx, gm = gate_backward(*bf)
    assert gx.dtype == gm.dtype == torch.bfloat16
    torch.testing.assert_close(gm.float(), ref[1], rtol=5e-2, atol=0.5)


def test_gate_backward_follows_the_path_and_is_deterministic(selection_path):
    """The compiled op runs on the cpp path (and only there), twice with the same bits; the others are torch's."""
    from sparse_lm.topk import cpp_ops, gate_backward

    ops = cpp_ops(required=True)
    g = torch.Generator().manual_seed(2)
    grad, x = torch.randn(300, 512, generator=g), torch.randn(300, 512, generator=g)
    m, mean = torch.rand(512, generator=g), torch.randn(512, generator=g)
    direct = ops.gate_backward(grad, x, m, mean, False)
    assert direct[0].numel() == 0 and torch.equal(direct[1], ops.gate_backward(grad, x, m, mean, True)[1])
    got = gate_backward(grad, x, m, mean)[1]
    reference = gate_backward(grad, x, m, mean, compiled=False)[1]
    assert torch.equal(got, direct[1] if selection_path == "cpp" else reference)
    assert not torch.equal(direct[1], reference)  # so the line above tells the two paths apart
