"""curvkern.ops.probe_reduce against its plain-PyTorch twin, and a copy of the same bytes.

One group per (device, batch), n = 10 probes, D = 3072, float32, timed interleaved:

- ``kernels``: ``curvkern.ops.probe_reduce(g0, g, ids, seed, h)``: one pass over g, probes
  regenerated in the kernel;
- ``torch``: ``curvkern.torch_ops.probe_reduce``, the twin the torch backend runs: probes
  materialized, then dg = g - g0, the norms ||dg_k||, the dot products r_k . dg_k, and their sums
  over k, each a separate PyTorch op;
- ``copy``: a device copy of the same number of bytes, the bandwidth ceiling.
"""

from __future__ import annotations

import pytest
import torch

import curvkern
from curvkern import torch_ops

from .bandwidth import N_PROBES, OP_SIZES, SAMPLE_SHAPE, SEED, Copy, H, OpSize, bench_op

D = SAMPLE_SHAPE[0] * SAMPLE_SHAPE[1] * SAMPLE_SHAPE[2]
# Each float32 result is a sum over D = 3072 terms: relative rounding of order sqrt(D) * 6e-8 =
# 3e-6 in either implementation. r . dg cancels, so errors are measured against each column's
# largest magnitude, as in tests/test_probe_reduce.py.
RTOL = 1e-5


@pytest.mark.parametrize("size", OP_SIZES)
def test_probe_reduce(benchmark, size: OpSize, quick: bool):
    device = torch.device(size.device)
    gen = torch.Generator(device).manual_seed(0)
    g0 = torch.randn(size.batch, D, generator=gen, device=device)  # (B, D)
    # probe gradients close to g0, as finite differences are: dg ~ h g
    g = torch.randn(N_PROBES, size.batch, D, generator=gen, device=device).mul_(H).add_(g0)
    ids = torch.arange(size.batch, device=device)
    # The least any implementation moves: g0 and g read once, ids read, (B, 4) float32 written.
    op_bytes = g0.nbytes + g.nbytes + ids.nbytes + 4 * size.batch * 4
    copy = Copy(op_bytes, g.dtype, device)
    fns = {
        "kernels": lambda: curvkern.ops.probe_reduce(g0, g, ids, SEED, H),  # (B, 4)
        "torch": lambda: torch_ops.probe_reduce(g0, g, ids, SEED, H),  # (B, 4)
        "copy": copy,
    }
    want = torch_ops.probe_reduce(g0.double(), g.double(), ids, SEED, H)  # (B, 4) float64
    scale = want.abs().amax(dim=0, keepdim=True)  # (1, 4)

    def check(variant: str) -> None:
        """Within float32 rounding of the float64 result on the same values."""
        if variant == "copy":
            copy.check()
            return
        err = (fns[variant]().double() - want).abs() / scale
        assert bool((err <= RTOL).all()), f"{variant}: error {float(err.max()):.2e}"

    bench_op(benchmark, "probe_reduce", size, fns, check, op_bytes, quick)
