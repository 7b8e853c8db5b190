"""Markdown summary of a benchmark run: medians, ratios, GB/s, peak memory.

Usage::

    pytest benchmarks --benchmark-json=bench.json
    python benchmarks/summarize.py bench.json [--out summary.md]

Reads the per-variant times that every group records in extra_info (common.time_interleaved),
prints the summary and, with ``--out``, writes it. A ratio between two variants is the median
over cycles of their ratio within a cycle (both timed seconds apart), with its quartiles; for
end-to-end groups also in process CPU time, the figure to read on a loaded machine with one torch
thread (common.time_interleaved). The targets these ratios are read against are in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MIB = 1 << 20
# (numerator, denominator) variants of the ratios each kind of group reports
RATIOS = {
    "end-to-end": [("published", "scorer-kernels"), ("scorer-kernels", "floor")],
    "op": [("torch", "kernels"), ("kernels", "copy")],
}


def cycle_ratio(
    variants: dict[str, Any], a: str, b: str, key: str = "times_s"
) -> tuple[float, float, float] | None:
    """(median, q1, q3) over cycles of time(a) / time(b) in the same cycle; None if absent.
    ``key``: "times_s" (wall clock) or "cpu_times_s" (process CPU time)."""
    if a not in variants or b not in variants or key not in variants[a]:
        return None
    ratios = [x / y for x, y in zip(variants[a][key], variants[b][key], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return statistics.median(ratios), q1, q3


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _group_table(bench: dict[str, Any]) -> list[str]:
    info = bench["extra_info"]
    variants = info["variants"]
    e2e = info["kind"] == "end-to-end"
    scale, unit = (1e3, "ms") if e2e else (1e6, "us")
    lines = [f"## {bench['group']}", ""]
    if e2e:
        lines += [info.get("description", ""), ""]
        lines.append(
            f"| variant | median {unit} | q1-q3 {unit} | cycles | peak memory MiB "
            "| checked: max rel. error f64 / f32 |"
        )
        lines.append("|---|---:|---:|---:|---:|---|")
    else:
        lines.append(f"| variant | median {unit} | q1-q3 {unit} | cycles | GB/s |")
        lines.append("|---|---:|---:|---:|---:|")
    for name, t in variants.items():
        head = (
            f"| {name} | {t['median_s'] * scale:.1f} "
            f"| {t['q1_s'] * scale:.1f}-{t['q3_s'] * scale:.1f} | {len(t['times_s'])} "
        )
        if e2e:
            peak = info.get("peak_memory_bytes", {}).get(name)
            peak_mib = None if peak is None else peak / MIB
            checks = _check(info.get("check_max_rel_err", {}).get(name, {}))
            lines.append(f"{head}| {_fmt(peak_mib, '.1f')} | {checks} |")
        else:
            lines.append(f"{head}| {info['bytes'][name] / t['median_s'] / 1e9:.1f} |")
    lines.append("")
    for a, b in RATIOS[info["kind"]]:
        r = cycle_ratio(variants, a, b)
        if r is None:
            continue
        line = f"- {a} / {b}: {r[0]:.2f} (quartiles over cycles {r[1]:.2f}-{r[2]:.2f})"
        c = cycle_ratio(variants, a, b, "cpu_times_s")
        if e2e and c is not None:  # op calls are too short for the CPU-time clock
            line += f"; in process CPU time {c[0]:.2f} ({c[1]:.2f}-{c[2]:.2f})"
        lines.append(line)
    return [*lines, ""]


def _check(errors: dict[str, float]) -> str:
    """The checked outputs' largest errors against float64, e.g. 'curvature 4e-16 / 4e-07'."""
    parts = []
    for name in ("curvature", "trace", "grad_norm"):
        if f"{name}_float64_rel_err" in errors:
            f64, f32 = errors[f"{name}_float64_rel_err"], errors[f"{name}_float32_rel_err"]
            parts.append(f"{name} {f64:.0e} / {f32:.0e}")
    return ", ".join(parts) or "-"


def render(data: dict[str, Any]) -> str:
    """The markdown summary of pytest-benchmark's JSON ``data``."""
    machine = data.get("machine_info", {})
    lines = [
        "# curvkern benchmarks",
        "",
        f"Run {data.get('datetime', '?')}; CPU {machine.get('cpu', {}).get('brand_raw', '?')}, "
        f"torch {machine.get('torch', '?')} ({machine.get('torch_threads', '?')} threads), "
        f"GPU {machine.get('gpu') or 'none'}, quick={machine.get('quick')}; "
        f"load average at start {machine.get('loadavg_at_start')}, "
        f"at end {machine.get('loadavg_at_end')}.",
        "",
        "Every group's variants were timed in the same round-robin cycles.",
        "",
    ]
    benches = [b for b in data.get("benchmarks", []) if "variants" in b.get("extra_info", {})]
    for kind in ("end-to-end", "op"):
        for bench in benches:
            if bench["extra_info"]["kind"] == kind:
                lines += _group_table(bench)
    if not benches:
        lines.append("(no timed groups in this JSON: run without --benchmark-disable)")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark's --benchmark-json file")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    text = render(json.loads(args.json.read_text()))
    sys.stdout.write(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
