"""What every benchmark file shares: devices, rounds, and the one timing mode (interleaved)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

import curvkern

__all__ = ["CUDA", "device_param", "rounds_for", "synchronize", "time_interleaved"]

CUDA = torch.cuda.is_available() and curvkern.has_cuda_kernels()
GPU_MARKS = (
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA device and curvkern's CUDA kernels"),
)

# (cycles, warm-up cycles) per (kind, device), for --quick and for a full run. A cycle runs every
# variant of a group once; each call is one timed sample, far above the timer's resolution (an
# end-to-end call takes 0.1 to 10 s, an op call 10 us to 50 ms). The CPU needs the most cycles:
# two cores shared with other processes are noisy.
ROUNDS = {
    ("end-to-end", "cpu"): {"quick": (5, 1), "full": (15, 1)},
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
    """(cycles, warm-up cycles) for a group of ``kind`` ("end-to-end" or "op") on ``device``."""
    return ROUNDS[(kind, device)]["quick" if quick else "full"]


def synchronize(device: torch.device | str) -> None:
    """Waits for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    benchmark,
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device | str,
    rounds: tuple[int, int],
) -> dict[str, dict[str, Any]]:
    """Times the variants of a group in round-robin cycles; the one timing mode of the suite.

    On a shared machine the load changes over seconds, so a variant timed a minute after another
    can see a different machine, and a ratio of two sequential medians carries that drift. Here
    every cycle runs each variant once (in an order rotated from cycle to cycle, so that none
    always follows the same one), each timed alone with the device synchronized inside the timed
    interval (CUDA calls return when queued). pytest-benchmark times the whole cycle; the
    per-variant times go to extra_info, where summarize.py reads them.

    Each call's process CPU time is recorded too: with one torch thread (--torch-threads 1) it
    is the work done, whatever share of the cores other processes left this one, so on a loaded
    machine CPU-time ratios hold where wall-clock ones drift.

    Args:
        benchmark: pytest-benchmark's fixture.
        fns: variant name -> zero-argument call.
        device: the device the calls run on.
        rounds: (timed cycles, warm-up cycles); with --benchmark-disable, one cycle.
    Returns:
        Per variant: {"median_s", "q1_s", "q3_s", "min_s", "times_s", "cpu_times_s"} over the
        timed cycles, the lists in cycle order (index i of every variant is the same cycle).
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    cycles = 0

    def cycle() -> None:
        nonlocal cycles
        first = cycles % len(names)
        cycles += 1
        for name in names[first:] + names[:first]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - start_cpu)

    timed, warmup = rounds
    benchmark.pedantic(cycle, rounds=timed, warmup_rounds=warmup, iterations=1)
    summary = {}
    for name, values in times.items():
        skip = warmup if len(values) > warmup else 0  # drop the warm-up cycles
        values = values[skip:]
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        summary[name] = {
            "median_s": statistics.median(values),
            "q1_s": q1,
            "q3_s": q3,
            "min_s": min(values),
            "times_s": values,
            "cpu_times_s": cpu_times[name][skip:],
        }
    return summary
