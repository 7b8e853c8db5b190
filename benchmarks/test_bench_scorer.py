"""End to end, one batch: the published algorithm, the scorer on both backends, and the floor.

Per workload (benchmarks.workloads.WORKLOADS) one group, all rows on the same model, batch and
probes:

- ``published``: curvkern.reference.paper_curvature, the algorithm of the paper's code;
- ``scorer-torch``, ``scorer-kernels``: CurvatureScorer.score with that backend, defaults else;
- ``floor``: n + 1 forward and backward passes of the batch, input gradients only, which any
  finite-difference implementation must make; ``floor-stacked`` (CUDA), the same rows in the
  two passes the scorer makes on CUDA.

Outputs are checked equal before timing (CheckedWorkload.verify), and each variant's peak
memory is recorded in extra_info (peak_memory.py says how it is measured). A second group,
"... interleaved", times the same calls in round-robin cycles (common.time_interleaved).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch

from .common import device_param, time_call, time_interleaved
from .peak_memory import RssPeakJob, cuda_peak_bytes
from .workloads import WORKLOADS, CheckedWorkload, Workload, make_variant, variants_for

# (workload, device) pairs; the ResNet-18 at B = 256 only on a GPU.
SETUPS = [
    device_param(device, (name, device), id=f"{name}-{device}")
    for name, device in [("small_cnn", "cpu"), ("small_cnn", "cuda"), ("resnet18", "cuda")]
]
VARIANTS = variants_for("cuda")  # all of them; those not measured on a device skip there


@pytest.fixture(scope="module")
def setup(request) -> Iterator[CheckedWorkload]:
    """The workload (on the CPU, its peak-memory subprocess starts meanwhile)."""
    # With --benchmark-disable (CI's smoke run) nothing is recorded: no memory measurement.
    measure = not request.config.getoption("benchmark_disable")
    checked = CheckedWorkload(*request.param, measure_memory=measure)
    yield checked
    checked.close()


def _group(w: Workload) -> str:
    return f"end-to-end {w.name} B={w.batch} n={w.n_probes} {w.device.type}"


def _info(w: Workload) -> dict:
    return {
        "workload": w.name,
        "description": WORKLOADS[w.name].description,
        "device": w.device.type,
        "batch": w.batch,
        "n_probes": w.n_probes,
        "h": w.h,
    }


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("setup", SETUPS, indirect=True)
def test_end_to_end(benchmark, setup: CheckedWorkload, variant: str, quick: bool):
    w = setup.w32
    if variant not in variants_for(w.device.type):
        pytest.skip(f"{variant} is not measured on {w.device.type} (see variants_for)")
    errors = setup.verify(variant)  # before timing: raises if the variant disagrees
    peak = setup.peak_memory(variant)  # before timing
    benchmark.group = _group(w)
    benchmark.extra_info.update(
        kind="end-to-end",
        variant=variant,
        peak_memory_bytes=peak["peak_bytes"],
        peak_memory_method=peak["method"],
        check_max_rel_err=errors,
        **_info(w),
    )
    time_call(benchmark, make_variant(w, variant), w.device, "end-to-end", quick)


@pytest.mark.parametrize("setup", SETUPS, indirect=True)
def test_end_to_end_interleaved(benchmark, setup: CheckedWorkload, quick: bool):
    w = setup.w32
    variants = variants_for(w.device.type)
    for variant in variants:
        setup.verify(variant)  # before timing (cached when test_end_to_end ran)
    setup.settle()
    benchmark.group = f"{_group(w)} interleaved"
    benchmark.extra_info.update(kind="end-to-end-interleaved", variants=list(variants), **_info(w))
    fns = {variant: make_variant(w, variant) for variant in variants}
    benchmark.extra_info["interleaved"] = time_interleaved(
        benchmark, fns, w.device, "end-to-end", quick
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_rss_measures_a_known_allocation():
    """The CPU peak-memory method, on a call that allocates and touches exactly 64 MiB."""
    size = 64 << 20
    result = RssPeakJob("known", str(size)).result()[str(size)]
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
