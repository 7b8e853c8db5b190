"""curvkern::perturb against its twin, on every device and dtype."""

import pytest
import torch

from curvkern import ops, torch_ops

from .conftest import requires_kernels

pytestmark = requires_kernels

SHAPES = [(5,), (3, 7, 11), (2, 130)]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_twin(device, dtype, shape):
    x = torch.randn(6, *shape, dtype=dtype, device=device)
    ids = torch.tensor([4, 0, 9, 2**33, 17, 3], device=device)
    got = ops.perturb(x, ids, 99, 5, 1e-3, probe_offset=2)
    want = torch_ops.perturb(x, ids, 99, 5, 1e-3, 2)
    assert got.shape == (5 * 6, *shape) and got.dtype == dtype
    assert torch.equal(got, want)


def test_rows_are_x_plus_h_times_probe(device, dtype):
    x = torch.randn(4, 3, 5, dtype=dtype, device=device)
    ids = torch.tensor([8, 1, 5, 2], device=device)
    h = 0.25  # a power of two: x + h r is exact
    xp = ops.perturb(x, ids, 3, 3, h).reshape(3, 4, 3, 5)
    r = ops.rademacher(3, ids, 3, (3, 5), dtype=dtype)
    torch.testing.assert_close(xp, x + h * r, rtol=0, atol=0)


def test_ids_default_to_positions(device):
    x = torch.randn(3, 10, device=device)
    assert torch.equal(
        ops.perturb(x, None, 1, 2, 1e-2), ops.perturb(x, torch.arange(3), 1, 2, 1e-2)
    )


def test_non_contiguous_and_channels_last(device, dtype):
    base = torch.randn(4, 3, 8, 8, dtype=dtype, device=device)
    ids = torch.arange(4, device=device)
    want = ops.perturb(base, ids, 0, 2, 1e-3)
    assert torch.equal(
        ops.perturb(base.to(memory_format=torch.channels_last), ids, 0, 2, 1e-3), want
    )
    strided = torch.randn(4, 3, 8, 16, dtype=dtype, device=device)[..., ::2]
    assert not strided.is_contiguous()
    assert torch.equal(
        ops.perturb(strided, ids, 0, 2, 1e-3), ops.perturb(strided.contiguous(), ids, 0, 2, 1e-3)
    )


def test_empty(device):
    x = torch.randn(3, 5, device=device)
    assert ops.perturb(x, None, 0, 0, 1e-3).shape == (0, 5)
    assert ops.perturb(x[:0], None, 0, 4, 1e-3).shape == (0, 5)
    assert ops.perturb(torch.randn(2, 0, device=device), None, 0, 3, 1e-3).shape == (6, 0)


def test_bad_arguments():
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        ops.perturb(x.half(), None, 0, 1, 1e-3)
    with pytest.raises(RuntimeError, match=r"ids must have shape \(B,\) with B = 3"):
        ops.perturb(x, torch.arange(4), 0, 1, 1e-3)
    with pytest.raises(RuntimeError, match="ids must lie in"):
        ops.perturb(x, torch.tensor([0, -2, 1]), 0, 1, 1e-3)
    with pytest.raises(RuntimeError, match="h must be finite"):
        ops.perturb(x, None, 0, 1, float("inf"))
    with pytest.raises(RuntimeError, match="n_probes must be >= 0"):
        ops.perturb(x, None, 0, -1, 1e-3)
    with pytest.raises(RuntimeError, match="x must have shape"):
        ops.perturb(torch.tensor(1.0), None, 0, 1, 1e-3)


def test_opcheck(device, dtype):
    x = torch.randn(3, 2, 5, dtype=dtype, device=device)
    ids = torch.tensor([1, 5, 2], device=device)
    torch.library.opcheck(torch.ops.curvkern.perturb.default, (x, ids, 7, 3, 1e-3, 4))
