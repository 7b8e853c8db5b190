"""The compiled ops trace under torch.compile (through their register_fake kernels)."""

import torch

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
