"""curvkern.ops.probe_reduce against the unfused PyTorch ops it replaces, and a copy.

Group per (device, batch), n = 10 probes, D = 3072, float32:

- ``kernels``: ``curvkern.ops.probe_reduce(g0, g, ids, seed, h)``: one pass over g, probes
  regenerated in the kernel;
- ``torch``: the same statistics by plain PyTorch ops with the probes already materialized:
  dg = g - g0, the norms ||dg_k||, the dot products r_k . dg_k, and their sums over k;
- ``copy``: a device copy of the same number of bytes, the bandwidth ceiling.

A second group, "... interleaved", times the same calls in round-robin cycles.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import curvkern

from .bandwidth import (
    N_PROBES,
    OP_SIZES,
    SAMPLE_SHAPE,
    SEED,
    Copy,
    H,
    OpInputs,
    OpSize,
    bench_op,
    bench_op_interleaved,
)

VARIANTS = ("kernels", "torch", "copy")
D = SAMPLE_SHAPE[0] * SAMPLE_SHAPE[1] * SAMPLE_SHAPE[2]


def probe_reduce_unfused(g0: Tensor, g: Tensor, r: Tensor, h: float) -> Tensor:
    """What curvkern.ops.probe_reduce computes, in plain PyTorch ops.

    Args:
        g0: (B, D) gradients at x.
        g: (n, B, D) gradients at x + h r_k.
        r: (n, B, D) the probes, materialized.
        h: step.
    Returns:
        (B, 4): per sample the sums over k of ||dg_k|| / h, ||dg_k||^2 / h^2, r_k . dg_k / h and
        (r_k . dg_k / h)^2.
    """
    dg = g - g0  # (n, B, D)
    c = torch.linalg.vector_norm(dg, dim=-1) / h  # (n, B)
    t = (r * dg).sum(-1) / h  # (n, B)
    return torch.stack([c.sum(0), (c * c).sum(0), t.sum(0), (t * t).sum(0)], dim=-1)


class ProbeReduceInputs(OpInputs):
    """g0 (B, D), g (n, B, D), ids (B,) and the materialized probes r (n, B, D) on a device."""

    op = "probe_reduce"

    # Each float32 result is a sum over D = 3072 terms: relative rounding of order
    # sqrt(D) * 6e-8 = 3e-6 in either implementation (the kernel's eight float lanes and
    # torch's vectorized reductions alike). r . dg cancels, so errors are measured against
    # each column's largest magnitude, as in tests/test_probe_reduce.py.
    RTOL = 1e-5

    def __init__(self, size: OpSize) -> None:
        self.size = size
        device = torch.device(size.device)
        gen = torch.Generator(device).manual_seed(0)
        self.g0 = torch.randn(size.batch, D, generator=gen, device=device)
        # probe gradients close to g0, as finite differences are: dg ~ h g
        noise = torch.randn(N_PROBES, size.batch, D, generator=gen, device=device)
        self.g = noise.mul_(H).add_(self.g0)
        self.ids = torch.arange(size.batch, device=device)
        self.r = curvkern.ops.rademacher(SEED, self.ids, N_PROBES, (D,))
        # The least any implementation moves: g0 and g read once, ids read, (B, 4) written.
        self.bytes = self.g0.nbytes + self.g.nbytes + self.ids.nbytes + 4 * size.batch * 4
        self.copy = Copy(self.bytes, self.g.dtype, device)

    def fn(self, variant: str):
        g0, g, r, ids = self.g0, self.g, self.r, self.ids
        if variant == "kernels":
            return lambda: curvkern.ops.probe_reduce(g0, g, ids, SEED, H)  # (B, 4)
        if variant == "torch":
            return lambda: probe_reduce_unfused(g0, g, r, H)  # (B, 4)
        if variant == "copy":
            return self.copy
        raise ValueError(f"unknown variant {variant!r}")

    def check(self, variant: str) -> None:
        """Within float32 rounding of the float64 result on the same values."""
        if variant == "copy":
            self.copy.check()
            return
        got = self.fn(variant)().double()
        want = probe_reduce_unfused(self.g0.double(), self.g.double(), self.r.double(), H)
        scale = want.abs().amax(dim=0, keepdim=True)  # (1, 4)
        err = (got - want).abs() / scale
        assert bool((err <= self.RTOL).all()), f"{variant}: error {float(err.max()):.2e}"


@pytest.fixture(scope="module")
def inputs(request) -> ProbeReduceInputs:
    return ProbeReduceInputs(request.param)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("inputs", OP_SIZES, indirect=True)
def test_probe_reduce(benchmark, inputs: ProbeReduceInputs, variant: str, quick: bool):
    bench_op(benchmark, inputs, variant, quick)


@pytest.mark.parametrize("inputs", OP_SIZES, indirect=True)
def test_probe_reduce_interleaved(benchmark, inputs: ProbeReduceInputs, quick: bool):
    bench_op_interleaved(benchmark, inputs, VARIANTS, quick)
