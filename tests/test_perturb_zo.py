"""curvkern::perturb_zo against its twin, on every device and dtype."""

import pytest
import torch

from curvkern import ops, torch_ops

from .conftest import requires_kernels

pytestmark = requires_kernels


@pytest.mark.parametrize("shape", [(5,), (3, 7, 11), (2, 130)])
def test_matches_twin(device, dtype, shape):
    x = torch.randn(6, *shape, dtype=dtype, device=device)
    ids = torch.tensor([4, 0, 9, 2**33, 17, 3], device=device)
    got = ops.perturb_zo(x, ids, 99, 5, 1e-3, probe_offset=2)
    want = torch_ops.perturb_zo(x, ids, 99, 5, 1e-3, 2)
    assert got.shape == (4 * 5 * 6, *shape) and got.dtype == dtype
    assert torch.equal(got, want)


def test_copies_are_the_four_sign_patterns(device, dtype):
    x = torch.randn(4, 3, 5, dtype=dtype, device=device)
    ids = torch.tensor([8, 1, 5, 2], device=device)
    h = 0.25  # a power of two: every sum is exact
    xp = ops.perturb_zo(x, ids, 3, 2, h).reshape(4, 2, 4, 3, 5)
    r = ops.rademacher(3, ids, 2, (3, 5), stream=0, dtype=dtype)
    s = ops.rademacher(3, ids, 2, (3, 5), stream=1, dtype=dtype)
    for c, (sr, ss) in enumerate([(1, 1), (-1, 1), (1, -1), (-1, -1)]):
        torch.testing.assert_close(xp[c], x + sr * h * r + ss * h * s, rtol=0, atol=0)


def test_non_contiguous(device):
    x = torch.randn(4, 3, 20, device=device)[..., ::3]
    assert torch.equal(
        ops.perturb_zo(x, None, 0, 2, 1e-2), ops.perturb_zo(x.contiguous(), None, 0, 2, 1e-2)
    )


def test_empty(device):
    x = torch.randn(3, 5, device=device)
    assert ops.perturb_zo(x, None, 0, 0, 1e-3).shape == (0, 5)
    assert ops.perturb_zo(x[:0], None, 0, 4, 1e-3).shape == (0, 5)


def test_bad_arguments():
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        ops.perturb_zo(x.to(torch.bfloat16), None, 0, 1, 1e-3)
    with pytest.raises(RuntimeError, match=r"ids must have shape \(B,\) with B = 3"):
        ops.perturb_zo(x, torch.arange(2), 0, 1, 1e-3)


def test_opcheck(device, dtype):
    x = torch.randn(3, 2, 5, dtype=dtype, device=device)
    ids = torch.tensor([1, 5, 2], device=device)
    torch.library.opcheck(torch.ops.curvkern.perturb_zo.default, (x, ids, 7, 3, 1e-2, 4))
