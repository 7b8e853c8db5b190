"""curvkern.ops.perturb against the plain-PyTorch ops it replaces, and a copy of the same bytes.

Group per (device, batch), n = 10 probes of 3x32x32 float32 samples:

- ``kernels``: ``curvkern.ops.perturb(x, ids, seed, n, h)``, probes generated in the kernel;
- ``torch``: ``x + h * r`` with the probes r already materialized, as curvkern's torch twin
  computes it (two element-wise kernels);
- ``torch-add``: ``torch.add(x, r, alpha=h)``, the same in one element-wise kernel;
- ``copy``: a device copy of the same number of bytes, the bandwidth ceiling.

A second group, "... interleaved", times the same calls in round-robin cycles.
"""

from __future__ import annotations

import pytest
import torch

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

VARIANTS = ("kernels", "torch", "torch-add", "copy")


class PerturbInputs(OpInputs):
    """x (B, 3, 32, 32), ids (B,) and the materialized probes r (n, B, 3, 32, 32) on a device."""

    op = "perturb"

    def __init__(self, size: OpSize) -> None:
        self.size = size
        device = torch.device(size.device)
        gen = torch.Generator(device).manual_seed(0)
        self.x = torch.randn(size.batch, *SAMPLE_SHAPE, generator=gen, device=device)
        self.ids = torch.arange(size.batch, device=device)
        self.r = curvkern.ops.rademacher(SEED, self.ids, N_PROBES, SAMPLE_SHAPE)
        # The least any implementation moves: x and the ids read once, the n * B perturbed rows
        # written once.
        self.bytes = (1 + N_PROBES) * self.x.nbytes + self.ids.nbytes
        self.copy = Copy(self.bytes, self.x.dtype, device)

    def fn(self, variant: str):
        x, r, ids = self.x, self.r, self.ids
        if variant == "kernels":
            return lambda: curvkern.ops.perturb(x, ids, SEED, N_PROBES, H)  # (n * B, 3, 32, 32)
        if variant == "torch":
            return lambda: (x.unsqueeze(0) + H * r).reshape(-1, *SAMPLE_SHAPE)
        if variant == "torch-add":
            return lambda: torch.add(x.unsqueeze(0), r, alpha=H).reshape(-1, *SAMPLE_SHAPE)
        if variant == "copy":
            return self.copy
        raise ValueError(f"unknown variant {variant!r}")

    def check(self, variant: str) -> None:
        """Bit for bit: h * (+-1) is exact, so every variant rounds x +- h once, the same way."""
        if variant == "copy":
            self.copy.check()
            return
        got = self.fn(variant)()
        want = (self.x.unsqueeze(0) + H * self.r).reshape(-1, *SAMPLE_SHAPE)
        assert got.shape == want.shape and torch.equal(got, want), variant


@pytest.fixture(scope="module")
def inputs(request) -> PerturbInputs:
    return PerturbInputs(request.param)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("inputs", OP_SIZES, indirect=True)
def test_perturb(benchmark, inputs: PerturbInputs, variant: str, quick: bool):
    bench_op(benchmark, inputs, variant, quick)


@pytest.mark.parametrize("inputs", OP_SIZES, indirect=True)
def test_perturb_interleaved(benchmark, inputs: PerturbInputs, quick: bool):
    bench_op_interleaved(benchmark, inputs, VARIANTS, quick)
