"""End to end, one batch: the published algorithm, the scorer on both backends, and the floor.

Per (workload, device) one group, every variant on the same model, batch and probes, timed in
round-robin cycles (common.time_interleaved):

- ``published``: curvkern.reference.paper_curvature, the algorithm of the paper's code;
- ``scorer-torch``, ``scorer-kernels``: CurvatureScorer.score with that backend, defaults else;
- ``floor``: n + 1 forward and backward passes of the batch, input gradients only, which any
  finite-difference implementation must make; ``floor-stacked`` (CUDA), the same rows in the
  two passes the scorer makes on CUDA.

Outputs are checked against each other before timing (workloads.CheckedWorkload.verify), and each
variant's peak memory goes to extra_info (peak_memory.py says how it is measured).
"""

from __future__ import annotations

import sys

import pytest
import torch

from .common import device_param, rounds_for, time_interleaved
from .peak_memory import RssPeakJob, cuda_peak_bytes
from .workloads import WORKLOADS, CheckedWorkload, build_workload, make_variant, variants_for

SETUPS = [
    device_param(device, (name, device), id=f"{name}-{device}")
    for name, device in [
        ("small_cnn", "cpu"),
        ("mlp", "cpu"),
        ("resnet18_imagenet", "cpu"),
        ("small_cnn", "cuda"),
        ("resnet18", "cuda"),
    ]
]


@pytest.mark.parametrize("setup", SETUPS)
def test_end_to_end(benchmark, setup: tuple[str, str], quick: bool, pytestconfig):
    name, device = setup
    if name == "resnet18_imagenet":
        pytest.importorskip("torchvision")
    variants = variants_for(device)
    # With --benchmark-disable (CI's smoke run) nothing is recorded: no memory measurement. On
    # the CPU it runs in a subprocess, started now, beside the checks.
    measure = not pytestconfig.getoption("benchmark_disable")
    args = [name, *variants] + (["--quick"] if quick else [])
    job = RssPeakJob("benchmarks.workloads", *args) if measure and device == "cpu" else None
    try:
        checked = CheckedWorkload(build_workload(name, device, quick))
        errors = {v: checked.verify(v) for v in variants}  # raises if a variant disagrees
        w = checked.w32
        if not measure:
            peaks = {}
        elif job is not None:
            peaks = {
                v: r["peak_bytes"] for v, r in job.result().items()
            }  # waits: not beside timing
        else:
            peaks = {v: cuda_peak_bytes(make_variant(w, v), w.device) for v in variants}
    finally:
        if job is not None:
            job.close()
    shape = "x".join(map(str, w.x.shape[1:]))
    benchmark.group = f"end-to-end {name} {shape} B={w.batch} n={w.n_probes} {device}"
    benchmark.extra_info.update(
        kind="end-to-end",
        workload=name,
        description=WORKLOADS[name].description,
        device=device,
        batch=w.batch,
        n_probes=w.n_probes,
        h=w.h,
        check_max_rel_err=errors,
        peak_memory_bytes=peaks,
    )
    fns = {v: make_variant(w, v) for v in variants}
    rounds = rounds_for("end-to-end", device, quick)
    if name == "resnet18_imagenet" and not quick:
        # fewer cycles: at B = 8 the floor took 2.3 s on two quiet cores, published about 2x
        # the scorer (CPU times in RESULTS.md), so a cycle is over 10 s
        rounds = (7, 1)
    if name == "mlp":
        # a call takes milliseconds: many cycles are cheap, and a loaded machine needs them
        rounds = (60, 5) if quick else (200, 10)
    benchmark.extra_info["variants"] = time_interleaved(benchmark, fns, w.device, rounds)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_rss_measures_a_known_allocation():
    """The CPU peak-memory method, on a call that allocates and touches exactly 64 MiB."""
    size = 64 << 20
    result = RssPeakJob("benchmarks.peak_memory", str(size)).result()[str(size)]
    # Within 1 MiB: allocator bookkeeping and pages that happened to be resident already; a
    # method that missed the allocation (tracemalloc) or counted the imports (ru_maxrss since
    # the process started) would be off by far more.
    assert abs(result["peak_bytes"] - size) <= 1 << 20, result
    assert "high-water mark reset" in result["method"], result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_measures_a_known_allocation():
    size = 64 << 20
    peak = cuda_peak_bytes(lambda: torch.ones(size, dtype=torch.uint8, device="cuda"), "cuda")
    assert peak == size  # the caching allocator rounds to 2 MiB blocks, 64 MiB is a multiple
