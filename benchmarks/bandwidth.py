"""Shared by the op benchmarks: sizes, the bandwidth-ceiling copy, and how bytes are counted.

Every row of an op group does the same useful work on the same tensors, and records in
extra_info["bytes"] the bytes that work must move at least: each input read once, each output
written once. bytes / median is then an effective bandwidth, comparable across the rows and
with the ``copy`` row, a plain device copy moving the same number of bytes (half read, half
written), the ceiling for a memory-bound op.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .common import device_param, time_call, time_interleaved

__all__ = [
    "OpSize",
    "OP_SIZES",
    "SAMPLE_SHAPE",
    "N_PROBES",
    "H",
    "SEED",
    "Copy",
    "OpInputs",
    "bench_op",
    "bench_op_interleaved",
]

SAMPLE_SHAPE = (3, 32, 32)  # D = 3072, as in the end-to-end workloads
N_PROBES = 10
H = 1e-3
SEED = 0


@dataclasses.dataclass(frozen=True)
class OpSize:
    """A device, a batch size, and the size's role: ``scorer`` (the batch of the end-to-end
    group on that device) or ``bandwidth`` (large enough that the bytes moved dwarf the caches
    and the per-call overhead: the size the GPU bandwidth targets are read at)."""

    device: str
    batch: int
    role: str


# CPU: the small CNN's batch (8.7 MB moved per call, in this machine's L3), and 8x that (69 MB).
# There, an op that returns a new tensor of more than glibc's largest mmap threshold (32 MiB:
# perturb at B = 512) also pays the page faults of fresh memory on every call; the copy row
# writes a preallocated tensor.
# GPU: the ResNet-18's batch (35 MB: about 7 us of H200 bandwidth, so launch and synchronization
# overhead dominate), and 16,384 samples (2.2 GB, 40 times the 50 MB L2; about 0.5 ms).
OP_SIZES = [
    device_param("cpu", OpSize("cpu", 64, "scorer"), id="cpu-B64"),
    device_param("cpu", OpSize("cpu", 512, "bandwidth"), id="cpu-B512", full_only=True),
    device_param("cuda", OpSize("cuda", 256, "scorer"), id="cuda-B256"),
    device_param("cuda", OpSize("cuda", 16384, "bandwidth"), id="cuda-B16384"),
]


class Copy:
    """dst.copy_(src) of ``bytes_target`` bytes in all: n_elem elements read and written.

    Args:
        bytes_target: the bytes the op under comparison moves.
        dtype, device: of the copied tensors.
    """

    def __init__(self, bytes_target: int, dtype: torch.dtype, device: torch.device) -> None:
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.n_elem = bytes_target // (2 * itemsize)
        self.src = torch.randn(self.n_elem, dtype=dtype, device=device)  # (n_elem,)
        self.dst = torch.empty_like(self.src)  # (n_elem,), preallocated: no allocation timed
        self.bytes = 2 * self.n_elem * itemsize

    def __call__(self) -> Tensor:
        return self.dst.copy_(self.src)

    def check(self) -> None:
        """The copy copies (the 'output checked' of the ceiling row)."""
        self()
        assert torch.equal(self.dst, self.src)


class OpInputs:
    """Inputs of one op at one size, and its variants. Subclasses set ``op``, ``size``, ``bytes``
    (the least bytes the op moves), ``copy`` (a Copy of those bytes) and ``r`` (the materialized
    probes the torch variants read), and define fn and check."""

    op: str
    size: OpSize
    bytes: int
    copy: Copy
    r: Tensor

    def fn(self, variant: str) -> Callable[[], Any]:
        """The zero-argument call of ``variant``."""
        raise NotImplementedError

    def check(self, variant: str) -> None:
        """Raises AssertionError unless ``variant`` computes the op's result."""
        raise NotImplementedError

    def group(self) -> str:
        s = self.size
        return f"{self.op} B={s.batch} n={N_PROBES} D={math.prod(SAMPLE_SHAPE)} {s.device}"

    def bytes_of(self, variant: str) -> int:
        return self.copy.bytes if variant == "copy" else self.bytes

    def info(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "device": self.size.device,
            "size_role": self.size.role,
            "batch": self.size.batch,
            "n_probes": N_PROBES,
        }


def bench_op(benchmark, inputs: OpInputs, variant: str, quick: bool) -> None:
    """One row of an op group: checked, then timed; bytes in extra_info."""
    inputs.check(variant)  # before timing
    benchmark.group = inputs.group()
    benchmark.extra_info.update(
        kind="op",
        variant=variant,
        bytes=inputs.bytes_of(variant),
        # what the torch rows read beyond that: the materialized probes
        extra_bytes_read=inputs.r.nbytes if variant.startswith("torch") else 0,
        **inputs.info(),
    )
    time_call(benchmark, inputs.fn(variant), inputs.size.device, "op", quick)


def bench_op_interleaved(benchmark, inputs: OpInputs, variants: Sequence[str], quick: bool) -> None:
    """All rows of an op group, checked, then timed in round-robin cycles (time_interleaved)."""
    for variant in variants:
        inputs.check(variant)
    benchmark.group = f"{inputs.group()} interleaved"
    benchmark.extra_info.update(
        kind="op-interleaved",
        variants=list(variants),
        bytes={variant: inputs.bytes_of(variant) for variant in variants},
        **inputs.info(),
    )
    fns = {variant: inputs.fn(variant) for variant in variants}
    benchmark.extra_info["interleaved"] = time_interleaved(
        benchmark, fns, inputs.size.device, "op", quick
    )
