"""What every benchmark file shares: devices, rounds, synchronized timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

import curvkern

__all__ = [
    "CUDA",
    "GPU_MARKS",
    "device_param",
    "rounds_for",
    "synchronize",
    "time_call",
    "time_interleaved",
]

CUDA = torch.cuda.is_available() and curvkern.has_cuda_kernels()
GPU_MARKS = (
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA device and curvkern's CUDA kernels"),
)

# (rounds, warmup rounds) per (kind, device), for --quick and for a full run. Every timed call
# is one round (iterations=1): an end-to-end call takes 0.1 to 1 s, an op call 10 us to 50 ms,
# far above the timer's resolution. Medians over these rounds are what summarize.py compares;
# the CPU figures need the most rounds, as two cores shared with the OS are noisy.
ROUNDS = {
    ("end-to-end", "cpu"): {"quick": (7, 1), "full": (21, 2)},
    ("end-to-end", "cuda"): {"quick": (10, 2), "full": (30, 3)},
    ("op", "cpu"): {"quick": (30, 3), "full": (100, 5)},
    ("op", "cuda"): {"quick": (100, 10), "full": (500, 20)},
}


def device_param(device: str, value: Any, *, id: str, full_only: bool = False):
    """pytest.param(value) for a benchmark on ``device``: GPU-marked (and skipped without one) on
    "cuda"; with ``full_only``, skipped under --quick (see conftest.py)."""
    marks = list(GPU_MARKS) if device == "cuda" else []
    if full_only:
        marks.append(pytest.mark.full_only)
    return pytest.param(value, id=id, marks=marks)


def rounds_for(kind: str, device: str, quick: bool) -> tuple[int, int]:
    """(rounds, warmup rounds) for a benchmark of ``kind`` ("end-to-end" or "op")."""
    return ROUNDS[(kind, device)]["quick" if quick else "full"]


def synchronize(device: torch.device | str) -> None:
    """Waits for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(benchmark, fn: Callable[[], Any], device: torch.device | str, kind: str, quick: bool):
    """Times fn() with pytest-benchmark, the device synchronized inside every timed call.

    Returns:
        The result of the last call (with --benchmark-disable: of the single call).
    """

    def timed():
        out = fn()
        synchronize(device)  # CUDA calls return when queued; the round ends when they finish
        return out

    rounds, warmup = rounds_for(kind, torch.device(device).type, quick)
    return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)


def time_interleaved(
    benchmark,
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device | str,
    kind: str,
    quick: bool,
) -> dict[str, dict[str, float]]:
    """Times the calls of a group in round-robin cycles, for ratios that load changes spare.

    On a shared machine the load changes over seconds, so one call timed a minute after another
    can see a different machine; ratios of sequential medians then carry that drift. Here every
    cycle runs each call once (in an order rotated from cycle to cycle, so that no call always
    follows the same one), each timed alone with the device synchronized. pytest-benchmark times
    the whole cycle; the per-call times are returned for extra_info.

    Returns:
        Per call name: {"median_s", "min_s", "q1_s", "q3_s", "rounds"} over the timed (non-warm-up)
        cycles; with --benchmark-disable, over the single cycle.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    cycles = 0

    def cycle() -> None:
        nonlocal cycles
        first = cycles % len(names)
        cycles += 1
        for name in names[first:] + names[:first]:
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)

    rounds, warmup = rounds_for(kind, torch.device(device).type, quick)
    benchmark.pedantic(cycle, rounds=rounds, warmup_rounds=warmup, iterations=1)
    summary = {}
    for name, values in times.items():
        values = values[warmup:] if len(values) > warmup else values  # drop the warm-up cycles
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        summary[name] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "q1_s": q1,
            "q3_s": q3,
            "rounds": len(values),
        }
    return summary
