"""pytest options and fixtures of the benchmark suite (``pytest benchmarks``).

``--quick`` runs fewer cycles, skips the larger CPU op sizes and shrinks the ImageNet-size
workload's batch and probes; with ``--benchmark-disable`` every benchmarked call runs once,
untimed, which is CI's smoke test of this code. ``-m gpu`` selects the CUDA benchmarks, which
skip without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

import curvkern
from curvkern._model_state import ieee_float32

from .common import CUDA

LOADAVG_AT_START = pytest.StashKey[tuple[float, float, float]]()


def pytest_addoption(parser):
    parser.addoption(
        "--quick",
        action="store_true",
        default=False,
        help="curvkern benchmarks: fewer cycles, no large CPU op sizes, a smaller ImageNet batch",
    )
    parser.addoption(
        "--torch-threads",
        type=int,
        default=None,
        help="curvkern benchmarks: torch.set_num_threads for the run (default: torch's). On a "
        "machine shared with other busy processes, fewer threads than cores avoid the stalls "
        "of parallel regions waiting for a descheduled thread.",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "full_only: skipped under --quick")


def pytest_collection_modifyitems(config, items):
    if not curvkern.has_kernels():
        skip = pytest.mark.skip(reason="curvkern's compiled ops are not built")
        for item in items:
            item.add_marker(skip)
    if config.getoption("--quick"):
        skip = pytest.mark.skip(reason="--quick: full runs only")
        for item in items:
            if item.get_closest_marker("full_only"):
                item.add_marker(skip)


def pytest_sessionstart(session):
    session.config.stash[LOADAVG_AT_START] = os.getloadavg()
    threads = session.config.getoption("--torch-threads")
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["CURVKERN_BENCH_THREADS"] = str(threads)  # for the peak-memory subprocesses


def pytest_benchmark_update_machine_info(config, machine_info):
    """Adds what the timings depend on to the JSON's machine_info (summarize.py prints it)."""
    # Other processes' CPU load (1, 5 and 15 minute averages): on a shared machine, the first
    # thing to look at when CPU timings move between runs.
    machine_info["loadavg_at_start"] = config.stash.get(LOADAVG_AT_START, None)
    machine_info["loadavg_at_end"] = os.getloadavg()
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["curvkern_cuda_version"] = (
        curvkern.ops.cuda_version() if curvkern.has_kernels() else None
    )
    machine_info["gpu"] = torch.cuda.get_device_name() if CUDA else None
    machine_info["quick"] = config.getoption("--quick")
    machine_info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")


@pytest.fixture(scope="session")
def quick(pytestconfig) -> bool:
    return pytestconfig.getoption("--quick")


@pytest.fixture(scope="session", autouse=True)
def _float32_without_tf32():
    """IEEE float32 (no TF32) in CUDA convolutions and matmuls, for the whole session.

    PyTorch lets cuDNN run float32 convolutions in TF32 by default (10-bit mantissa, relative
    rounding about 5e-4). Finite differences g(x + h r) - g(x) are about h = 1e-3 times smaller
    than g, so in TF32 they would be rounding noise: the scorer's fd and zo methods switch to
    IEEE float32 themselves, and every variant here, the published algorithm and the floor
    included, is measured in that same precision.
    """
    with ieee_float32("cuda"):
        yield
