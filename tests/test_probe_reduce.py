"""curvkern::probe_reduce against its twin, on every device and dtype."""

import pytest
import torch

from curvkern import ops, torch_ops

from .conftest import requires_kernels

pytestmark = requires_kernels


def _inputs(n, batch, dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g0 = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    # probe gradients close to g0, as finite differences are: dg ~ 1e-3 g
    g = g0 + 1e-3 * torch.randn(n, batch, dim, generator=gen, dtype=torch.float64)
    return g0.to(device, dtype), g.to(device, dtype)


@pytest.mark.parametrize("n,batch,dim", [(1, 1, 1), (3, 5, 7), (10, 8, 3072), (4, 3, 300)])
def test_matches_twin(device, dtype, n, batch, dim):
    g0, g = _inputs(n, batch, dim, dtype, device)
    ids = torch.arange(100, 100 + batch, device=device)
    h = 1e-3
    got = ops.probe_reduce(g0, g, ids, 5, h, probe_offset=3)
    assert got.shape == (batch, 4) and got.dtype == torch.float64
    # The twin in float64 on the same values is the reference. The kernel reads the same values
    # and accumulates in the input's precision (float32: relative rounding of order
    # sqrt(D) * 6e-8 per sum, 3e-6 for D = 3072); the differences dg are exact in both.
    want = torch_ops.probe_reduce(g0.double(), g.double(), ids, 5, h, 3)
    scale = want.abs().amax(dim=0, keepdim=True)  # per column: r . dg can cancel to ~0
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert ((got.double() - want).abs() <= tol * scale).all(), (got, want)


def test_columns_are_probe_sums(device):
    g0, g = _inputs(6, 4, 50, torch.float64, device)
    ids = torch.tensor([3, 8, 1, 0], device=device)
    h = 0.5
    stats = ops.probe_reduce(g0, g, ids, 2, h)
    r = ops.rademacher(2, ids, 6, (50,), dtype=torch.float64)
    dg = g - g0
    c = dg.norm(dim=-1) / h
    t = (r * dg).sum(-1) / h
    want = torch.stack([c.sum(0), (c**2).sum(0), t.sum(0), (t**2).sum(0)], dim=-1)
    torch.testing.assert_close(stats, want, rtol=1e-12, atol=0)


def test_row_result_does_not_depend_on_batch(device, dtype):
    g0, g = _inputs(5, 6, 777, dtype, device)
    ids = torch.tensor([10, 11, 12, 13, 14, 15], device=device)
    full = ops.probe_reduce(g0, g, ids, 1, 1e-3)
    perm = torch.tensor([3, 0, 5, 1], device=device)
    part = ops.probe_reduce(g0[perm], g[:, perm], ids[perm], 1, 1e-3)
    assert torch.equal(part, full[perm])  # bit for bit: each row's sums have a fixed order


def test_probe_offset_splits_add_up(device):
    g0, g = _inputs(6, 3, 40, torch.float64, device)
    ids = torch.arange(3, device=device)
    whole = ops.probe_reduce(g0, g, ids, 4, 1e-3)
    halves = ops.probe_reduce(g0, g[:2], ids, 4, 1e-3) + ops.probe_reduce(
        g0, g[2:], ids, 4, 1e-3, probe_offset=2
    )
    torch.testing.assert_close(halves, whole, rtol=1e-13, atol=0)


def test_non_contiguous(device):
    g0, g = _inputs(3, 4, 64, torch.float32, device)
    ids = torch.arange(4, device=device)
    gt = g.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not gt.is_contiguous()
    g0t = g0.t().contiguous().t()
    assert torch.equal(
        ops.probe_reduce(g0t, gt, ids, 0, 1e-3), ops.probe_reduce(g0, g, ids, 0, 1e-3)
    )


def test_empty(device):
    g0, g = _inputs(2, 3, 5, torch.float32, device)
    ids = torch.arange(3, device=device)
    empty = ops.probe_reduce(g0, g[:0], ids, 0, 1e-3)
    assert torch.equal(empty, torch.zeros(3, 4, dtype=torch.float64, device=device))
    assert ops.probe_reduce(g0[:0], g[:, :0], ids[:0], 0, 1e-3).shape == (0, 4)


def test_bad_arguments():
    g0, g = _inputs(2, 3, 5, torch.float32, "cpu")
    ids = torch.arange(3)
    with pytest.raises(RuntimeError, match=r"g must have shape \(n_probes, B, D\)"):
        ops.probe_reduce(g0, g[0], ids, 0, 1e-3)
    with pytest.raises(RuntimeError, match=r"g0 must have shape \(B, D\) = \(3, 5\)"):
        ops.probe_reduce(g0[:, :4], g, ids, 0, 1e-3)
    with pytest.raises(RuntimeError, match="g0 must have the dtype of g"):
        ops.probe_reduce(g0.double(), g, ids, 0, 1e-3)
    with pytest.raises(RuntimeError, match="h must be positive and finite"):
        ops.probe_reduce(g0, g, ids, 0, 0.0)
    with pytest.raises(RuntimeError, match=r"ids must have shape \(B,\) with B = 3"):
        ops.probe_reduce(g0, g, torch.arange(2), 0, 1e-3)
    with pytest.raises(RuntimeError, match="ids must be int64"):
        torch.ops.curvkern.probe_reduce(g0, g, ids.int(), 0, 1e-3)


def test_opcheck(device, dtype):
    g0, g = _inputs(3, 4, 33, dtype, device)
    ids = torch.tensor([1, 5, 2, 8], device=device)
    torch.library.opcheck(torch.ops.curvkern.probe_reduce.default, (g0, g, ids, 7, 1e-3, 2))
