"""Probe masks in the ops and their twins: as_mask, and m * r / m * (g - g0) on every device."""

import pytest
import torch

from curvkern import ops, torch_ops

from .conftest import requires_kernels
from .probe_stats import assert_stats_close

# (sample shape, mask prefix p): a value per sample, per position of a sequence of embeddings
# (runs of 48 and of 130 elements: shorter than, and straddling, the 128-element probe blocks), per
# channel of an image (runs of 300), per element.
CASES = [
    ((7,), ()),
    ((5, 48), (5,)),
    ((3, 130), (3,)),
    ((3, 10, 30), (3,)),
    ((3, 10, 30), (3, 10)),
    ((2, 129), (2, 129)),
]


def _mask(batch, prefix, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(batch, *prefix, generator=gen) < 0.6
    m.view(batch, -1)[:, 0] = True  # every sample keeps a coordinate
    return m.to(device=device, dtype=dtype)


def _expanded(mask, sample_shape):
    """The (B, *sample_shape) weights of a (B, *p) mask, by plain broadcasting."""
    extra = len(sample_shape) - (mask.dim() - 1)
    return mask.reshape(*mask.shape, *([1] * extra)).expand(mask.shape[0], *sample_shape)


# as_mask


def test_as_mask_forms():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    assert torch_ops.as_mask(None, x) is None
    bool_mask = torch.tensor([[True, False, True]] * 4)
    m = torch_ops.as_mask(bool_mask, x)
    assert m.shape == (4, 3) and m.dtype == torch.float64 and m.is_contiguous()
    assert torch.equal(m, bool_mask.double())
    per_sample = torch_ops.as_mask(torch.tensor([1.0, 0.0, 1.0, 1.0]), x)
    assert per_sample.shape == (4, 1)
    full = torch_ops.as_mask(torch.ones(4, 3, 5, dtype=torch.float32), x)
    assert full.shape == (4, 15) and full.dtype == torch.float64
    # a non-contiguous mask keeps its values
    wide = torch.rand(4, 6) < 0.5
    assert torch.equal(torch_ops.as_mask(wide[:, ::2], x), wide[:, ::2].double())


def test_as_mask_errors():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match=r"probe_mask must have shape \(B, \*p\) with B = 4"):
        torch_ops.as_mask(torch.ones(3, 3), x)
    with pytest.raises(ValueError, match=r"a prefix of the sample shape \(3, 5\)"):
        torch_ops.as_mask(torch.ones(4, 5), x)
    with pytest.raises(ValueError, match="prefix"):
        torch_ops.as_mask(torch.ones(4, 3, 5, 1), x)
    with pytest.raises(ValueError, match="probe_mask must have shape"):
        torch_ops.as_mask(torch.tensor(1.0), x)
    with pytest.raises(TypeError, match=r"bool or floating .* got torch.int64.*\.bool\(\)"):
        torch_ops.as_mask(torch.ones(4, 3, dtype=torch.int64), x)
    with pytest.raises(TypeError, match="probe_mask must be a tensor"):
        torch_ops.as_mask([[1, 0, 1]] * 4, x)
    with pytest.raises(ValueError, match=r"only 0 and 1, got 0.5 at index \(2, 1\)"):
        bad = torch.ones(4, 3)
        bad[2, 1] = 0.5
        torch_ops.as_mask(bad, x)
    with pytest.raises(ValueError, match="only 0 and 1, got nan"):
        torch_ops.as_mask(torch.full((4,), float("nan")), x)


# The twins' semantics, against the formulas of the interface


@pytest.mark.parametrize("shape,prefix", CASES)
def test_twin_perturb_is_x_plus_h_m_r(shape, prefix, dtype):
    x = torch.randn(3, *shape, dtype=dtype)
    ids = torch.tensor([7, 2, 11])
    mask = _mask(3, prefix, dtype, "cpu")
    h = 0.25  # a power of two: x + h m r is exact
    got = torch_ops.perturb(x, ids, 5, 4, h, 1, torch_ops.as_mask(mask, x))
    r = torch_ops.rademacher(5, ids, 4, shape, 1, 0, dtype)
    assert torch.equal(got.reshape(4, 3, *shape), x + h * _expanded(mask, shape) * r)


@pytest.mark.parametrize("shape,prefix", CASES[:3])
def test_twin_perturb_zo_masks_both_probes(shape, prefix, dtype):
    x = torch.randn(3, *shape, dtype=dtype)
    ids = torch.tensor([7, 2, 11])
    mask = _mask(3, prefix, dtype, "cpu")
    h = 0.25
    got = torch_ops.perturb_zo(x, ids, 5, 2, h, 0, torch_ops.as_mask(mask, x))
    got = got.reshape(4, 2, 3, *shape)
    m = _expanded(mask, shape)
    r = torch_ops.rademacher(5, ids, 2, shape, 0, 0, dtype)
    s = torch_ops.rademacher(5, ids, 2, shape, 0, 1, dtype)
    for c, (sr, ss) in enumerate([(1, 1), (-1, 1), (1, -1), (-1, -1)]):
        assert torch.equal(got[c], x + sr * h * m * r + ss * h * m * s)


@pytest.mark.parametrize("shape,prefix", CASES)
def test_twin_probe_reduce_masks_differences_and_probes(shape, prefix, dtype):
    gen = torch.Generator().manual_seed(3)
    dim = torch.Size(shape).numel()
    g0 = torch.randn(3, dim, generator=gen, dtype=torch.float64).to(dtype)
    g = (g0.double() + 1e-2 * torch.randn(5, 3, dim, generator=gen, dtype=torch.float64)).to(dtype)
    ids = torch.tensor([7, 2, 11])
    mask = _mask(3, prefix, dtype, "cpu")
    h = 1e-2
    x_like = g0.reshape(3, *shape)
    got = torch_ops.probe_reduce(g0, g, ids, 9, h, 2, torch_ops.as_mask(mask, x_like))
    assert got.dtype == torch.float64
    m = _expanded(mask, shape).reshape(3, dim).double()
    r = torch_ops.rademacher(9, ids, 5, (dim,), 2, 0, torch.float64)
    dg = (g - g0).double() * m  # the difference in the input dtype, then weighted
    c = dg.norm(dim=-1) / h
    t = (m * r * dg).sum(-1) / h
    want = torch.stack([c.sum(0), (c * c).sum(0), t.sum(0), (t * t).sum(0)], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_twin_all_ones_mask_is_no_mask(dtype):
    x = torch.randn(3, 4, 40, dtype=dtype)
    ones = torch.ones(3, 4, dtype=dtype)
    assert torch.equal(
        torch_ops.perturb(x, None, 1, 3, 1e-3, 0, ones), torch_ops.perturb(x, None, 1, 3, 1e-3)
    )
    g0, g = x.reshape(3, -1), x.reshape(1, 3, -1) + 1e-3
    torch.testing.assert_close(
        torch_ops.probe_reduce(g0, g, None, 1, 1e-3, 0, ones),
        torch_ops.probe_reduce(g0, g, None, 1, 1e-3),
        rtol=1e-13,
        atol=0,
    )


def test_twin_mask_errors():
    x = torch.randn(3, 4, 10)
    with pytest.raises(RuntimeError, match=r"perturb: mask must have shape \(B, P\) with B = 3"):
        torch_ops.perturb(x, None, 0, 1, 1e-3, 0, torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="P dividing the 40 elements"):
        torch_ops.perturb(x, None, 0, 1, 1e-3, 0, torch.ones(3, 3))
    with pytest.raises(RuntimeError, match="mask must have dtype torch.float32"):
        torch_ops.perturb_zo(x, None, 0, 1, 1e-3, 0, torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"probe_reduce: mask must have shape \(B, P\)"):
        g0 = x.reshape(3, -1)
        torch_ops.probe_reduce(g0, g0[None], None, 0, 1e-3, 0, torch.ones(3))


# The ops against their twins, with masks


@requires_kernels
@pytest.mark.parametrize("shape,prefix", CASES)
def test_perturb_matches_twin(device, dtype, shape, prefix):
    x = torch.randn(4, *shape, dtype=dtype, device=device)
    ids = torch.tensor([4, 0, 2**40 + 9, 3], device=device)
    mask = torch_ops.as_mask(_mask(4, prefix, dtype, device), x)
    got = ops.perturb(x, ids, 99, 5, 1e-3, 2, mask=mask)
    assert torch.equal(got, torch_ops.perturb(x, ids, 99, 5, 1e-3, 2, mask))
    got_zo = ops.perturb_zo(x, ids, 99, 3, 1e-3, 2, mask=mask)
    assert torch.equal(got_zo, torch_ops.perturb_zo(x, ids, 99, 3, 1e-3, 2, mask))


@requires_kernels
@pytest.mark.parametrize("shape,prefix", CASES)
def test_probe_reduce_matches_twin(device, dtype, shape, prefix):
    gen = torch.Generator().manual_seed(1)
    dim = torch.Size(shape).numel()
    g0 = torch.randn(4, dim, generator=gen, dtype=torch.float64)
    g = g0 + 1e-3 * torch.randn(6, 4, dim, generator=gen, dtype=torch.float64)
    g0, g = g0.to(device, dtype), g.to(device, dtype)
    ids = torch.tensor([4, 0, 2**40 + 9, 3], device=device)
    mask = torch_ops.as_mask(_mask(4, prefix, dtype, device), g0.reshape(4, *shape))
    got = ops.probe_reduce(g0, g, ids, 5, 1e-3, 3, mask=mask)
    want = torch_ops.probe_reduce(g0, g, ids, 5, 1e-3, 3, mask)
    assert_stats_close(got, want, dtype, dim)


@requires_kernels
@pytest.mark.parametrize("run", [1, 3, 7, 100, 127, 128, 129, 256, 1000, 4097])
def test_every_run_length(run):
    # Runs shorter than, equal to, longer than and straddling the 128-element probe blocks: the
    # kernels find element j's mask column j // run with a multiply-and-shift divider (csrc/mask.h)
    # shared by the CPU and CUDA kernels, checked here against the twin's repeat_interleave.
    parts = 5
    x = torch.randn(2, parts, run, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0, 1, 0, 1], [0, 1, 1, 0, 0]], dtype=torch.float64)
    assert torch.equal(
        ops.perturb(x, None, 1, 2, 0.5, mask=mask), torch_ops.perturb(x, None, 1, 2, 0.5, 0, mask)
    )
    g0 = x.reshape(2, -1)
    g = g0 + torch.randn(3, 2, parts * run, dtype=torch.float64)
    assert_stats_close(
        ops.probe_reduce(g0, g, None, 1, 1.0, mask=mask),
        torch_ops.probe_reduce(g0, g, None, 1, 1.0, 0, mask),
        torch.float64,
        parts * run,
    )


@requires_kernels
def test_mask_non_contiguous_and_empty(device, dtype):
    x = torch.randn(3, 4, 40, dtype=dtype, device=device)
    wide = (torch.rand(3, 8, device=device) < 0.5).to(dtype)
    mask = wide[:, ::2]
    assert not mask.is_contiguous()
    assert torch.equal(
        ops.perturb(x, None, 0, 2, 1e-3, mask=mask),
        ops.perturb(x, None, 0, 2, 1e-3, mask=mask.contiguous()),
    )
    g0 = x.reshape(3, -1)
    g = (g0 + 1e-3).expand(2, 3, 160)  # non-contiguous g too
    assert torch.equal(
        ops.probe_reduce(g0, g, None, 0, 1e-3, mask=mask),
        ops.probe_reduce(g0, g.contiguous(), None, 0, 1e-3, mask=mask.contiguous()),
    )
    empty = torch.zeros(0, 4, dtype=dtype, device=device)
    assert ops.perturb(x[:0], None, 0, 2, 1e-3, mask=empty).shape == (0, 4, 40)
    assert ops.perturb_zo(x, None, 0, 0, 1e-3, mask=mask).shape == (0, 4, 40)
    stats = ops.probe_reduce(g0[:0], g[:, :0], None, 0, 1e-3, mask=empty)
    assert stats.shape == (0, 4) and stats.dtype == torch.float64
    # D = 0: any P
    none = torch.zeros(3, 0, dtype=dtype, device=device)
    assert ops.perturb(
        none, None, 0, 2, 1e-3, mask=torch.ones(3, 0, dtype=dtype, device=device)
    ).shape == (6, 0)


@requires_kernels
def test_all_zero_mask(device):
    x = torch.randn(2, 3, 10, device=device)
    zero = torch.zeros(2, 3, device=device)
    assert torch.equal(ops.perturb(x, None, 0, 3, 1e-3, mask=zero), x.repeat(3, 1, 1))
    g0 = x.reshape(2, -1)
    stats = ops.probe_reduce(g0, g0[None] + 1, None, 0, 1e-3, mask=zero)
    assert torch.equal(stats, torch.zeros(2, 4, dtype=torch.float64, device=device))


# (sample shape, mask prefix) whose masked-out elements fill whole 128-element probe blocks (runs of
# 300: the CPU kernel skips such a block) or share blocks with kept ones (runs of 1 and of 7: it
# weighs those element by element), so that both of its paths and the CUDA kernel are covered.
MASKED_OUT_CASES = [((3, 300), (3,)), ((2, 7), (2, 7)), ((5, 7), (5,))]


@pytest.mark.parametrize("backend", ["kernels", "twin"])
@pytest.mark.parametrize("shape,prefix", MASKED_OUT_CASES)
def test_masked_out_non_finite_never_contributes(device, dtype, shape, prefix, backend):
    # One rule on every device and in the twin (csrc/mask.h): an element whose weight is 0 does
    # not contribute, whatever it holds; NaN * 0 would be NaN, so the kernels select.
    if backend == "kernels" and not ops.has_kernels():
        pytest.skip("curvkern's compiled ops are not built")
    reduce = ops.probe_reduce if backend == "kernels" else torch_ops.probe_reduce
    gen = torch.Generator().manual_seed(3)
    dim = torch.Size(shape).numel()
    g0 = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    g = g0 + 1e-2 * torch.randn(4, 3, dim, generator=gen, dtype=torch.float64)
    g0, g = g0.to(device, dtype), g.to(device, dtype)
    keep = _mask(3, prefix, dtype, device, seed=4)
    mask = torch_ops.as_mask(keep, g0.reshape(3, *shape))
    weights = _expanded(keep, shape).reshape(3, dim)
    out = weights == 0
    assert bool(out.any()) and bool((~out).any())
    bad_g0, bad_g = g0.clone(), g.clone()
    bad_g0[out] = float("nan")
    bad_g[:, out] = torch.tensor([float("inf"), float("nan")], dtype=dtype, device=device).repeat(
        int(out.sum())
    )[: int(out.sum())]
    want = reduce(g0, g, None, 5, 1e-2, 0, mask)
    got = reduce(bad_g0, bad_g, None, 5, 1e-2, 0, mask)
    assert bool(torch.isfinite(want).all())
    assert torch.equal(got, want)
    # A non-finite value the mask keeps still reaches its sample's statistics, and only them.
    kept = int((~out[1]).nonzero()[0, 0])
    bad_g[0, 1, kept] = float("nan")
    got = reduce(bad_g0, bad_g, None, 5, 1e-2, 0, mask)
    assert bool(torch.isnan(got[1]).all())
    assert torch.equal(got[[0, 2]], want[[0, 2]])


@requires_kernels
@pytest.mark.parametrize("shape,prefix", [((5, 48), (5,)), ((2, 129), (2, 129)), ((300,), ())])
def test_fractional_mask_same_bits_as_twin(device, dtype, shape, prefix):
    # The ops take any weights; with fractional ones, x + (h m) r is rounded twice (product, then
    # sum) on every device: the CUDA kernels round the product on its own (no FMA contraction,
    # which would round once and differ from the twin in the last bit).
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, *shape, generator=gen, dtype=dtype).to(device)
    weights = torch.rand(3, *prefix, generator=gen, dtype=dtype).to(device)
    weights.view(3, -1)[:, 0] = 0
    mask = weights.reshape(3, -1).contiguous()
    h = 0.37  # not a power of two: h * m is rounded
    got = ops.perturb(x, None, 8, 4, h, 1, mask=mask)
    assert torch.equal(got, torch_ops.perturb(x, None, 8, 4, h, 1, mask))
    got_zo = ops.perturb_zo(x, None, 8, 2, h, 1, mask=mask)
    assert torch.equal(got_zo, torch_ops.perturb_zo(x, None, 8, 2, h, 1, mask))


@requires_kernels
def test_op_mask_errors():
    x = torch.randn(3, 4, 10)
    with pytest.raises(RuntimeError, match=r"perturb: mask must have shape \(B, P\) with B = 3"):
        ops.perturb(x, None, 0, 1, 1e-3, mask=torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="P dividing the 40 elements"):
        ops.perturb_zo(x, None, 0, 1, 1e-3, mask=torch.ones(3, 3))
    with pytest.raises(RuntimeError, match="mask must have dtype Float"):
        ops.perturb(x, None, 0, 1, 1e-3, mask=torch.ones(3, 4, dtype=torch.float64))
    g0 = x.reshape(3, -1)
    with pytest.raises(RuntimeError, match=r"probe_reduce: mask must have shape \(B, P\)"):
        ops.probe_reduce(g0, g0[None], None, 0, 1e-3, mask=torch.ones(3))


@requires_kernels
def test_opcheck_with_masks(device, dtype):
    x = torch.randn(3, 4, 33, dtype=dtype, device=device)
    ids = torch.tensor([1, 5, 2], device=device)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=dtype, device=device)
    for op in (torch.ops.curvkern.perturb.default, torch.ops.curvkern.perturb_zo.default):
        torch.library.opcheck(op, (x, ids, 7, 3, 1e-3, 4, mask))
    g0 = x.reshape(3, -1)
    g = g0 + 1e-3 * torch.randn(2, 3, 132, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.curvkern.probe_reduce.default, (g0, g, ids, 7, 1e-3, 2, mask))
