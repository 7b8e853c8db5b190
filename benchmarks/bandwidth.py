"""Shared by the op benchmarks: sizes, the bandwidth-ceiling copy, and one group's run.

Every variant of an op group does the same useful work on the same tensors; extra_info["bytes"]
holds the bytes that work must move at least (each input read once, each output written once).
bytes / median is then an effective bandwidth, comparable across the variants and with the
``copy`` variant, a plain device copy of the same number of bytes (half read, half written), the
ceiling for a memory-bound op.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .common import device_param, rounds_for, time_interleaved

__all__ = ["OpSize", "OP_SIZES", "SAMPLE_SHAPE", "N_PROBES", "H", "SEED", "Copy", "bench_op"]

SAMPLE_SHAPE = (3, 32, 32)  # D = 3072, as the small CNN's inputs
N_PROBES = 10
H = 1e-3
SEED = 0


@dataclasses.dataclass(frozen=True)
class OpSize:
    """A device and a batch size."""

    device: str
    batch: int


# CPU: the small CNN's batch (8.7 MB moved per call, in this machine's L3), and 8x that (69 MB),
# where an op returning a new tensor over glibc's largest mmap threshold (32 MiB: perturb at
# B = 512) also pays the page faults of fresh memory on every call (the copy writes a
# preallocated tensor). GPU: 256 samples (35 MB: about 7 us of H200 bandwidth, so launch and
# synchronization dominate) and 16,384 (2.2 GB, 40 times the 50 MB L2; about 0.5 ms).
OP_SIZES = [
    device_param("cpu", OpSize("cpu", 64), id="cpu-B64"),
    device_param("cpu", OpSize("cpu", 512), id="cpu-B512", full_only=True),
    device_param("cuda", OpSize("cuda", 256), id="cuda-B256"),
    device_param("cuda", OpSize("cuda", 16384), id="cuda-B16384"),
]


class Copy:
    """dst.copy_(src) moving ``bytes_target`` bytes in all (n_elem elements read and written).

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


def bench_op(
    benchmark,
    op: str,
    size: OpSize,
    fns: dict[str, Callable[[], Any]],
    check: Callable[[str], None],
    op_bytes: int,
    quick: bool,
) -> None:
    """One op group: every variant checked, then all timed in round-robin cycles.

    Args:
        op: the op's name.
        size: device and batch.
        fns: variant -> zero-argument call; a ``copy`` variant (a Copy) is the ceiling.
        check: check(variant) raises AssertionError unless the variant computes the op's result.
        op_bytes: the least bytes the op moves.
    """
    for variant in fns:
        check(variant)  # before timing
    benchmark.group = f"{op} B={size.batch} n={N_PROBES} D={math.prod(SAMPLE_SHAPE)} {size.device}"
    copy = fns.get("copy")
    benchmark.extra_info.update(
        kind="op",
        op=op,
        device=size.device,
        batch=size.batch,
        n_probes=N_PROBES,
        bytes={v: copy.bytes if v == "copy" else op_bytes for v in fns},  # type: ignore[union-attr]
    )
    rounds = rounds_for("op", size.device, quick)
    benchmark.extra_info["variants"] = time_interleaved(benchmark, fns, size.device, rounds)
