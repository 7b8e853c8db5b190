"""The compiled ops trace under torch.compile (through their register_fake kernels)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from curvkern import ops

from .conftest import requires_kernels

pytestmark = requires_kernels


def _fd_stats(x, ids, weight):
    # A whole finite-difference round in one graph: perturb, model, gradients, reduction.
    def grad_at(inp):
        return 2 * (inp @ weight) @ weight.T  # gradient of ||x W||^2

    xp = ops.perturb(x, ids, 3, 4, 1e-3)
    g0 = grad_at(x)
    g = grad_at(xp).reshape(4, x.shape[0], -1)
    return ops.probe_reduce(g0, g, ids, 3, 1e-3) + ops.rademacher(3, ids, 1, (4,))[0]


def test_fullgraph_compile_matches_eager(device):
    x = torch.randn(5, 8, device=device)
    ids = torch.arange(10, 15, device=device)
    weight = torch.randn(8, 3, device=device)
    eager = _fd_stats(x, ids, weight)
    compiled = torch.compile(_fd_stats, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, ids, weight), eager)
    # another batch size retraces (or runs a dynamic graph) through the fakes
    torch.testing.assert_close(compiled(x[:3], ids[:3], weight), _fd_stats(x[:3], ids[:3], weight))


def test_compile_zo_copies(device):
    x = torch.randn(3, 2, 4, device=device)

    def copies(inp):
        return ops.perturb_zo(inp, None, 1, 2, 1e-2).sum(0)

    compiled = torch.compile(copies, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), copies(x))


def test_inductor_compile(device):
    # The default backend generates code around the opaque ops; once, as a smoke test.
    x = torch.randn(4, 5, device=device)

    def step(inp):
        g = 2 * ops.perturb(inp, None, 1, 3, 1e-3).reshape(3, inp.shape[0], -1)
        return ops.probe_reduce(2 * inp, g, None, 1, 1e-3)

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x), step(x))


def test_compile_with_masks(device):
    # The fakes take the (B, P) masks, and the compiled graph gives the eager results.
    x = torch.randn(3, 4, 10, device=device)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]], device=device)

    def masked(inp, m):
        xp = ops.perturb(inp, None, 2, 3, 1e-3, mask=m)
        g = (xp**2).reshape(3, inp.shape[0], -1)
        zo = ops.perturb_zo(inp, None, 2, 1, 1e-3, mask=m).sum()
        return ops.probe_reduce(inp.reshape(3, -1) ** 2, g, None, 2, 1e-3, mask=m) + zo

    compiled = torch.compile(masked, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, mask), masked(x, mask), rtol=0, atol=0)


def test_fakes_reject_what_kernels_reject():
    def perturb(h=1e-3, mask=None):
        with FakeTensorMode():
            x = torch.empty(3, 4, 5)
            ids = torch.empty(3, dtype=torch.int64)
            m = None if mask is None else torch.empty(*mask)
            return torch.ops.curvkern.perturb(x, ids, 0, 2, h, 0, m)

    for h in (float("inf"), float("nan")):
        with pytest.raises(RuntimeError, match="h must be finite"):
            perturb(h=h)
    with pytest.raises(RuntimeError, match="P dividing the 20 elements"):
        perturb(mask=(3, 3))
    with pytest.raises(RuntimeError, match=r"mask must have shape \(B, P\) with B = 3"):
        perturb(mask=(2, 4))
    assert perturb(mask=(3, 4)).shape == (6, 4, 5)

    with FakeTensorMode():
        g0, g = torch.empty(3, 20), torch.empty(2, 3, 20)
        ids = torch.empty(3, dtype=torch.int64)
        assert torch.ops.curvkern.probe_reduce(g0, g, ids, 0, 1e-3).dtype == torch.float64
        for h in (float("inf"), 0.0, -1.0):
            with pytest.raises(RuntimeError, match="h must be positive and finite"):
                torch.ops.curvkern.probe_reduce(g0, g, ids, 0, h)
        with pytest.raises(RuntimeError, match="mask must have dtype torch.float32"):
            torch.ops.curvkern.probe_reduce(
                g0, g, ids, 0, 1e-3, 0, torch.empty(3, 4, dtype=torch.float64)
            )
        with pytest.raises(RuntimeError, match="dtype must be float32 or float64"):
            torch.ops.curvkern.rademacher(0, ids, 1, [4], 0, 0, torch.float16)
        with pytest.raises(RuntimeError, match="sample_shape must be non-negative"):
            torch.ops.curvkern.rademacher(0, ids, 1, [4, -1], 0, 0, None)
        with pytest.raises(RuntimeError, match="n_probes must be >= 0"):
            torch.ops.curvkern.perturb_zo(torch.empty(3, 5), ids, 0, -1, 1e-3)
    # and the real kernels say the same
    ids = torch.arange(3)
    with pytest.raises(RuntimeError, match="dtype must be float32 or float64"):
        torch.ops.curvkern.rademacher(0, ids, 1, [4], 0, 0, torch.float16)
    with pytest.raises(RuntimeError, match="sample_shape must be non-negative"):
        torch.ops.curvkern.rademacher(0, ids, 1, [4, -1], 0, 0, None)
    with pytest.raises(RuntimeError, match="h must be finite"):
        torch.ops.curvkern.perturb(torch.randn(3, 5), ids, 0, 1, float("inf"))
    with pytest.raises(RuntimeError, match="P dividing the 5 elements"):
        torch.ops.curvkern.perturb(torch.randn(3, 5), ids, 0, 1, 1e-3, 0, torch.ones(3, 2))
