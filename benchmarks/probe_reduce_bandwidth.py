"""probe_reduce's bandwidth at ImageNet size, against the device's own memory peak.

For B in {1, 8, 128, 512} samples of D = 150,528 elements (3 x 224 x 224), n = 10 probes,
float32: the op's result is first checked against the twin (curvkern.torch_ops.probe_reduce), then
timed with CUDA events (median of --repeats calls after a warm-up). The least the op must move is
g read once and g0 read once, (n + 1) B D 4 bytes; bytes / median is its effective bandwidth,
reported as a fraction of the device's datasheet peak (benchmarks/gpu_peak.py: 3.35 TB/s on an
H100 SXM, 4.8 TB/s on an H200; --peak-tbps overrides it, and a GPU not in the table needs it).
A row with a per-channel mask (3 runs of 50,176 elements) shows the mask's cost.

    python3 -m benchmarks.probe_reduce_bandwidth --out results.md   # from the repo root; a GPU

Writes a Markdown table (and prints it) plus a JSON file next to it (or at --json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from curvkern import ops, torch_ops

from .gpu_peak import peak_tbps

D = 3 * 224 * 224
N_PROBES = 10
H = 1e-3
SEED = 0


def _inputs(batch: int, device: torch.device):
    gen = torch.Generator(device).manual_seed(batch)
    g0 = torch.randn(batch, D, generator=gen, device=device)
    g = torch.randn(N_PROBES, batch, D, generator=gen, device=device).mul_(H).add_(g0)
    return g0, g, torch.arange(batch, device=device)


def _check(g0, g, ids, mask) -> float:
    """Largest error of the op on the first 8 samples against the twin, relative to each column's
    largest magnitude. Both take g - g0 in float32; the CUDA kernel sums in float64 (error about
    D * 2^-53 = 2e-11), the CPU kernel each 128-element block in float32 (about sqrt(D) 2^-24 =
    2e-5); the bound is 4 sqrt(D) 2^-24, as in tests/probe_stats.py. A sample's result does not
    depend on its batch (tested), so the first samples stand for all."""
    sub = slice(0, min(8, g0.shape[0]))
    m = None if mask is None else mask[sub]
    got = ops.probe_reduce(g0, g, ids, SEED, H, 0, mask)[sub]
    want = torch_ops.probe_reduce(g0[sub], g[:, sub], ids[sub], SEED, H, 0, m)
    scale = want.abs().amax(dim=0, keepdim=True)
    error = float(((got - want).abs() / scale).max())
    if not error <= 4 * 2.0**-24 * D**0.5:
        raise AssertionError(f"probe_reduce differs from its twin by {error:.2e} (B = {len(ids)})")
    return error


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    for _ in range(3):  # warm-up: the caching allocator's workspace, clocks
        fn()
    times = []
    if device.type != "cuda":
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    torch.cuda.synchronize()
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def _measure(batch: int, masked: bool, device: torch.device, repeats: int, peak_tbps: float):
    """One row of the table: check, then time probe_reduce on B samples."""
    g0, g, ids = _inputs(batch, device)
    mask = None
    if masked:  # channels 0 and 2 of 3
        channels = (torch.arange(3, device=device) != 1).float().expand(batch, 3)
        mask = torch_ops.as_mask(channels, g0.reshape(batch, 3, 224, 224))
    error = _check(g0, g, ids, mask)
    seconds = _median_seconds(
        lambda: ops.probe_reduce(g0, g, ids, SEED, H, 0, mask), repeats, device
    )
    moved = g.nbytes + g0.nbytes
    return {
        "batch": batch,
        "mask": "per channel" if masked else "none",
        "bytes": moved,
        "median_us": seconds * 1e6,
        "floor_us": moved / (peak_tbps * 1e12) * 1e6,
        "tbps": moved / seconds / 1e12,
        "fraction_of_peak": moved / seconds / (peak_tbps * 1e12),
        "check_error": error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 128, 512])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--peak-tbps",
        type=float,
        default=None,
        help="memory peak in TB/s (default: the datasheet figure for the device's name)",
    )
    parser.add_argument("--out", default="probe_reduce_bandwidth.md")
    parser.add_argument("--json", default=None, help="JSON path (default: --out's, as .json)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("probe_reduce_bandwidth: no GPU; nothing measured", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if args.peak_tbps is None:
        args.peak_tbps = peak_tbps(name)
        if args.peak_tbps is None:
            print(f"probe_reduce_bandwidth: no datasheet peak for {name!r}; pass --peak-tbps")
            return 2
    cases = [(b, False) for b in args.batches] + [(max(args.batches), True)]
    rows = []
    for batch, masked in cases:
        rows.append(_measure(batch, masked, device, args.repeats, args.peak_tbps))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = [
        f"probe_reduce, float32, n = {N_PROBES}, D = {D}, on {name}; median of {args.repeats} "
        f"calls; floor = bytes / {args.peak_tbps} TB/s (the device's peak)",
        "",
        "| B | mask | MB moved | median (us) | floor (us) | TB/s | of peak |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['mask']} | {r['bytes'] / 1e6:.1f} | {r['median_us']:.1f} | "
            f"{r['floor_us']:.1f} | {r['tbps']:.2f} | {100 * r['fraction_of_peak']:.0f}% |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    with open(args.out, "w") as f:
        f.write(table)
    with open(args.json or args.out.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump({"device": name, "peak_tbps": args.peak_tbps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
