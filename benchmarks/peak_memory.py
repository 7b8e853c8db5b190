"""Peak memory of one call: CUDA allocator statistics on a GPU, resident set size on the CPU.

On the CPU, torch allocates tensors with malloc/posix_memalign, which tracemalloc does not see,
so the CPU measure is the process's resident set size (Linux /proc/self/status):

1. in a separate Python process (``python -m benchmarks.workloads WORKLOAD VARIANT ...``, started
   by :class:`RssPeakJob`), whose allocator maps every allocation of 64 KiB or more on its own
   (FIXED_MMAP_THRESHOLD) and so returns it to the OS when freed, build the workload; then for
   each variant, run the call once (one-time allocations: oneDNN primitives, autograd's worker
   threads);
2. return freed memory to the OS (gc, the scorer's kept pass memory with
   ``curvkern.empty_cpu_cache``, then glibc's malloc_trim), and take the resident size as the
   baseline;
3. reset the kernel's high-water mark (write "5" to /proc/self/clear_refs, Linux >= 4.0), run
   the call again, and read the high-water mark VmHWM.

Peak = VmHWM - baseline: every byte the call touched beyond what was resident before it, at the
moment the most was. The variants of a workload share one process: measured in either order,
or each in a fresh process, their peaks agreed within 0.3 MiB (RESULTS.md). This module's own
entry point (``python -m benchmarks.peak_memory BYTES``) measures a call that allocates a known
number of bytes, so that the suite can check the method (test_bench_scorer.py does). Where
clear_refs cannot be written, the high-water mark since the process started (ru_maxrss) is
used, which hides a call's peak below the peak of the imports; the result's "method" then says
so.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import re
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import curvkern

__all__ = ["RssPeakJob", "cuda_peak_bytes", "rss_peak_bytes"]

REPO = Path(__file__).resolve().parents[1]
# glibc serves allocations above a threshold with mmap, and returns them to the OS on free. By
# default the threshold rises (up to 32 MiB) after each large free, so later tensors come from
# the heap, where freed memory can stay resident: the same call then measured 45 to 62 MiB from
# run to run. A fixed 64 KiB threshold maps every tensor of 64 KiB or more on its own, so the
# resident size follows the live tensors (measured spread: see RESULTS.md).
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10)}


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Most bytes the CUDA caching allocator had allocated during fn(), beyond those before it.

    The allocator counts every tensor exactly, so this is measured in the benchmark's process.
    """
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak


def _status_bytes(key: str) -> int:
    """A "kB" line of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key} line")
    return int(match.group(1)) * 1024


def _release_free_memory() -> None:
    gc.collect()
    # The blocks the scorer keeps for its next passes on the CPU (curvkern._pass_memory): the
    # measured call must allocate its passes' memory, as a first call would.
    curvkern.empty_cpu_cache()
    libc_name = ctypes.util.find_library("c")
    if libc_name is not None:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):  # glibc: unmaps free pages of every arena
            libc.malloc_trim(0)


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rss_peak_bytes(fn: Callable[[], Any]) -> dict[str, Any]:
    """Peak resident bytes of fn() beyond the baseline, in this process (see the module doc).

    Meant for a process run with FIXED_MMAP_THRESHOLD. Calls fn twice: a warm-up, then the
    measured call.
    Returns:
        {"peak_bytes": int, "baseline_bytes": int, "method": str}.
    """
    out = fn()  # warm-up: one-time allocations are not the call's
    del out
    _release_free_memory()
    baseline = _status_bytes("VmRSS")
    if _reset_high_water_mark():
        method = "VmHWM - VmRSS before the call (fresh process, high-water mark reset)"
        out = fn()
        peak = _status_bytes("VmHWM")
    else:
        method = "ru_maxrss - VmRSS before the call (fresh process; a lower bound)"
        out = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    del out
    return {"peak_bytes": max(0, peak - baseline), "baseline_bytes": baseline, "method": method}


class RssPeakJob:
    """``python -m MODULE *args`` with FIXED_MMAP_THRESHOLD, started now; :meth:`result` waits
    for it and reads the JSON the module prints last: {name: rss_peak_bytes result}.

    Its own resident memory is all it measures, so it may run beside other work: that changes
    how long it takes, not what it finds.
    """

    def __init__(self, module: str, *args: str) -> None:
        self.args = (module, *args)
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path, **FIXED_MMAP_THRESHOLD)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", *self.args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._result: dict[str, Any] | None = None

    def close(self) -> None:
        """Stops the process if it still runs (nobody asked for its result)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.communicate()

    def result(self, timeout: float = 1800) -> dict[str, Any]:
        """{name: rss_peak_bytes result}, as the module printed it."""
        if self._result is None:
            stdout, stderr = self._proc.communicate(timeout=timeout)
            if self._proc.returncode != 0:
                raise RuntimeError(
                    f"peak-memory subprocess {' '.join(self.args)} failed "
                    f"({self._proc.returncode}):\n{stderr[-4000:]}"
                )
            self._result = json.loads(stdout.strip().splitlines()[-1])
        return self._result


def main(argv: Sequence[str] | None = None) -> None:
    """Prints {BYTES: rss_peak_bytes result} of a call that allocates and touches BYTES bytes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bytes", type=int, help="bytes the measured call allocates")
    size = parser.parse_args(argv).bytes
    call = lambda: torch.ones(size, dtype=torch.uint8)  # noqa: E731 (touches every byte)
    print(json.dumps({str(size): rss_peak_bytes(call)}))


if __name__ == "__main__":
    main()
