"""The CPU memory of the scorer's passes: blocks kept from one pass for the next.

A scoring call makes the same passes, with the same activations, call after call. On CUDA the
caching allocator keeps their blocks. On the CPU, glibc gives blocks above its (at first small)
thresholds back to the system when they are freed, and the next pass faults them in again page by
page: for a small model that was a third of a call's time (docs/method.md, "The CPU pass
size"). Inside :func:`pass_memory`, the compiled library's pool (csrc/cpu/pass_memory.cpp)
serves this thread's requests of 64 KiB and more from the blocks earlier passes freed; after the
last scoring call ends it keeps at most :data:`CPU_KEEP_BYTES`, which :func:`empty_cpu_cache`
gives back. Other threads, and everything outside a scoring call, allocate as before.

``CURVKERN_CPU_POOL=0`` in the environment (read at import) leaves torch's allocator alone: the
scores are the same; for measuring what the pool saves, or for an allocator of your own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ._extension import has_kernels

__all__ = ["CPU_KEEP_BYTES", "pass_memory", "empty_cpu_cache", "cpu_cache_stats"]

# What the pool keeps between scoring calls: glibc's own largest trim threshold (64 MiB on 64-bit
# systems, twice its largest dynamic mmap threshold), i.e. no more free memory than glibc itself
# may keep after a process has freed a large tensor. A small model's passes fit (the MLP of the
# benchmarks: about 10 MiB at 2,560 rows); a large model's passes, which the pool then serves
# only in part, take so long that their page faults no longer matter.
CPU_KEEP_BYTES = 64 << 20

ENABLED = os.environ.get("CURVKERN_CPU_POOL", "1") != "0"


@contextlib.contextmanager
def pass_memory(device: torch.device | None) -> Iterator[bool]:
    """A scoring call's passes on ``device``: on the CPU, with the pool (nothing elsewhere, for
    None, or without the compiled library); yields whether the pool serves them."""
    if not ENABLED or device is None or device.type != "cpu" or not has_kernels():
        yield False
        return
    entered = bool(torch.ops.curvkern.pool_enter(CPU_KEEP_BYTES))
    try:
        yield entered
    finally:
        if entered:
            torch.ops.curvkern.pool_exit()


def empty_cpu_cache() -> int:
    """Frees the CPU memory the scorer keeps for its next passes (at most 64 MiB, after a call on
    the CPU); returns the bytes freed. Like ``torch.cuda.empty_cache``: scores do not change."""
    return int(torch.ops.curvkern.pool_release()) if has_kernels() else 0


def cpu_cache_stats() -> dict[str, int]:
    """The pool's counters: bytes and blocks kept now, requests served from kept blocks (hits)
    and newly allocated (misses) since the process started, whether the pool is torch's CPU
    allocator (installed by the first scoring call on the CPU, unless another allocator than
    torch's default was already installed), and the scoring calls inside it now."""
    if not has_kernels():
        return {}
    names = ("kept_bytes", "kept_blocks", "hits", "misses", "installed", "open_calls")
    return dict(zip(names, (int(v) for v in torch.ops.curvkern.pool_stats()), strict=True))
