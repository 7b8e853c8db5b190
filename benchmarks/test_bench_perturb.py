"""curvkern.ops.perturb against the plain-PyTorch ops it replaces, and a copy of the same bytes.

One group per (device, batch), n = 10 probes of 3x32x32 float32 samples, timed interleaved:

- ``kernels``: ``curvkern.ops.perturb(x, ids, seed, n, h)``, probes generated in the kernel;
- ``torch``: ``x + h * r`` with the probes r already materialized, as curvkern's torch twin
  computes it (two element-wise kernels);
- ``torch-add``: ``torch.add(x, r, alpha=h)``, the same in one element-wise kernel;
- ``copy``: a device copy of the same number of bytes, the bandwidth ceiling.
"""

from __future__ import annotations

import pytest
import torch

import curvkern

from .bandwidth import N_PROBES, OP_SIZES, SAMPLE_SHAPE, SEED, Copy, H, OpSize, bench_op


@pytest.mark.parametrize("size", OP_SIZES)
def test_perturb(benchmark, size: OpSize, quick: bool):
    device = torch.device(size.device)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(size.batch, *SAMPLE_SHAPE, generator=gen, device=device)
    ids = torch.arange(size.batch, device=device)
    r = curvkern.ops.rademacher(SEED, ids, N_PROBES, SAMPLE_SHAPE)  # (n, B, 3, 32, 32)
    # The least any implementation moves: x and the ids read once, the n * B rows written once.
    op_bytes = (1 + N_PROBES) * x.nbytes + ids.nbytes
    copy = Copy(op_bytes, x.dtype, device)
    fns = {
        "kernels": lambda: curvkern.ops.perturb(x, ids, SEED, N_PROBES, H),  # (n * B, 3, 32, 32)
        "torch": lambda: (x.unsqueeze(0) + H * r).reshape(-1, *SAMPLE_SHAPE),
        "torch-add": lambda: torch.add(x.unsqueeze(0), r, alpha=H).reshape(-1, *SAMPLE_SHAPE),
        "copy": copy,
    }
    want = (x.unsqueeze(0) + H * r).reshape(-1, *SAMPLE_SHAPE)

    def check(variant: str) -> None:
        """Bit for bit: h * (+-1) is exact, so every variant rounds x +- h once, the same way."""
        if variant == "copy":
            copy.check()
            return
        got = fns[variant]()
        assert got.shape == want.shape and torch.equal(got, want), variant

    bench_op(benchmark, "perturb", size, fns, check, op_bytes, quick)
