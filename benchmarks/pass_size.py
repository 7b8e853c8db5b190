"""Scorer time against the floor for given CPU pass sizes (max_batch), to choose the default.

    python3 -m benchmarks.pass_size WORKLOAD ROWS... [--cycles N] [--threads T]

WORKLOAD is a CPU workload of workloads.WORKLOADS or ``deep_mlp`` (64-256-256-10 with ReLU,
B = 256, n = 10). A ROWS is a number (the scorer, kernels backend, with that max_batch) or a
variant of workloads.make_variant (``published``, ``scorer-kernels`` with the default pass size,
...). Every cycle runs the floor and each ROWS, interleaved (common's rotation); prints each
one's median wall and process CPU time, the median over cycles of its ratio to the floor in the
same cycle with the smallest and largest, and its median page faults a call (minor faults: pages
the allocator gave back and the call touched again). With one thread (the default here) the CPU
time is the work done, however loaded the machine is.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from torch import nn

from curvkern import CurvatureScorer

from .workloads import WORKLOADS, Workload, build_workload, make_variant


def _deep_mlp() -> Workload:
    gen = torch.Generator().manual_seed(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        ).eval()
    x = torch.randn(256, 64, generator=gen)
    y = torch.randint(0, 10, (256,), generator=gen)
    ids = torch.arange(256)
    return Workload("deep_mlp", model, x, y, ids, torch.empty(10, 256, 64), check_samples=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=[*sorted(WORKLOADS), "deep_mlp"])
    parser.add_argument("rows", nargs="+", help="max_batch values or variant names")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    w = _deep_mlp() if args.workload == "deep_mlp" else build_workload(args.workload, "cpu")
    fns = {"floor": make_variant(w, "floor")}
    for rows in args.rows:
        if not rows.isdigit():
            fns[rows] = make_variant(w, rows)
            continue
        scorer = CurvatureScorer(
            w.model, n_probes=w.n_probes, max_batch=int(rows), backend="kernels"
        )
        fns[f"rows={rows}"] = lambda s=scorer: s.score(w.x, w.y, w.ids)
    names = list(fns)
    for fn in fns.values():  # warm-up
        fn()
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    faults = {name: [] for name in names}
    for cycle in range(args.cycles):
        first = cycle % len(names)
        for name in names[first:] + names[:first]:
            start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
    print(
        f"{args.workload}: B={w.batch} n={w.n_probes} threads={args.threads} cycles={args.cycles}"
    )
    for name in names:
        ratios = [a / b for a, b in zip(cpu[name], cpu["floor"], strict=True)]
        print(
            f"{name:>10}: wall {statistics.median(wall[name]) * 1e3:9.1f} ms, "
            f"CPU {statistics.median(cpu[name]) * 1e3:9.1f} ms, CPU / floor "
            f"{statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}], "
            f"page faults {statistics.median(faults[name]):.0f}"
        )


if __name__ == "__main__":
    main()
