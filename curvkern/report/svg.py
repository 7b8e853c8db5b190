"""The report's plots as inline SVG: histograms and scatter plots, with their axes."""

from __future__ import annotations

import html
import math

import numpy as np

MAX_POINTS = 2_000  # points per scatter plot


def _nice_ticks(low: float, high: float, count: int = 5, log: bool = False) -> list[float]:
    """Round tick positions in [low, high]; on a log10 axis, whole decades (or 1-2-5 steps
    within a decade when the range spans less than two)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    if log:
        decades = list(range(math.ceil(low), math.floor(high) + 1))
        if len(decades) >= 2:
            step = max(1, math.ceil(len(decades) / count))
            return decades[::step]
        ticks = [
            e + math.log10(m)
            for e in range(math.floor(low), math.ceil(high) + 1)
            for m in (1, 2, 5)
        ]
        return [t for t in ticks if low <= t <= high]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for mult in (1, 2, 5, 10):
        if (high - low) / (step * mult) <= count:
            step *= mult
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _tick_label(value: float, log: bool) -> str:
    if log:
        number = 10.0**value
        return f"{number:.3g}" if 1e-3 <= number < 1e5 else f"{number:.0e}".replace("e+0", "e")
    return f"{value:.3g}"


class _Axes:
    """Maps data to an SVG plot area: W x H pixels, margins for the tick labels."""

    W, H, LEFT, RIGHT, TOP, BOTTOM = 360, 230, 50, 12, 10, 40

    def __init__(self, xlim, ylim):
        self.x0, self.x1 = xlim
        self.y0, self.y1 = ylim

    def px(self, x):
        span = self.x1 - self.x0 or 1.0
        return self.LEFT + (np.asarray(x) - self.x0) / span * (self.W - self.LEFT - self.RIGHT)

    def py(self, y):
        span = self.y1 - self.y0 or 1.0
        return (
            self.H
            - self.BOTTOM
            - (np.asarray(y) - self.y0) / span * (self.H - self.TOP - self.BOTTOM)
        )

    def frame(self, xlabel: str, ylabel: str, xlog: bool, ylog: bool) -> list[str]:
        parts = []
        bottom, left = self.H - self.BOTTOM, self.LEFT
        for t in _nice_ticks(self.x0, self.x1, 5, xlog):
            x = float(self.px(t))
            parts.append(
                f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{self.TOP}" '
                f'y2="{bottom}"/><text x="{x:.1f}" y="{bottom + 14}" '
                f'text-anchor="middle">{_tick_label(t, xlog)}</text>'
            )
        for t in _nice_ticks(self.y0, self.y1, 4, ylog):
            y = float(self.py(t))
            parts.append(
                f'<line class="grid" x1="{left}" x2="{self.W - self.RIGHT}" '
                f'y1="{y:.1f}" y2="{y:.1f}"/><text x="{left - 4}" y="{y + 4:.1f}" '
                f'text-anchor="end">{_tick_label(t, ylog)}</text>'
            )
        parts.append(
            f'<line class="axis" x1="{left}" x2="{self.W - self.RIGHT}" y1="{bottom}" '
            f'y2="{bottom}"/><line class="axis" x1="{left}" x2="{left}" '
            f'y1="{self.TOP}" y2="{bottom}"/>'
        )
        parts.append(
            f'<text class="label" x="{(left + self.W - self.RIGHT) / 2:.0f}" '
            f'y="{self.H - 6}" text-anchor="middle">{html.escape(xlabel)}</text>'
        )
        parts.append(
            f'<text class="label" transform="translate(12 {(self.TOP + bottom) / 2:.0f}) '
            f'rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>'
        )
        return parts

    def svg(self, parts: list[str], title: str) -> str:
        return (
            f'<svg viewBox="0 0 {self.W} {self.H}" role="img" aria-label="{html.escape(title)}"'
            f">{''.join(parts)}</svg>"
        )


def _log10(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)


def histogram_svg(values: np.ndarray, log: bool, label: str, mark: float | None) -> str:
    """A histogram (40 bins) of the finite values; ``mark``: a vertical line (e.g. the top-K
    threshold), in the same units as values."""
    v = _log10(values) if log else values.astype(np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "<p class='note'>no finite values</p>"
    low, high = float(v.min()), float(v.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(v, bins=40, range=(low, high))
    axes = _Axes((low, high), (0, float(counts.max()) * 1.05))
    parts = axes.frame(label + (" (log scale)" if log else ""), "samples", log, False)
    xs, tops = axes.px(edges), axes.py(counts)
    base = axes.py(0)
    bars = "".join(
        f"M{xs[i]:.1f} {base:.1f}V{tops[i]:.1f}H{xs[i + 1]:.1f}V{base:.1f}Z"
        for i in range(len(counts))
        if counts[i] > 0
    )
    parts.append(f'<path class="bar" d="{bars}"/>')
    if mark is not None and np.isfinite(mark) and (not log or mark > 0):
        m = math.log10(mark) if log else mark
        x = float(axes.px(m))
        parts.append(
            f'<line class="mark" x1="{x:.1f}" x2="{x:.1f}" y1="{axes.TOP}" y2="{base:.1f}"/>'
        )
    return axes.svg(parts, f"histogram of {label}")


def scatter_svg(x, y, top: np.ndarray, xlabel, ylabel, xlog, ylog, rng) -> tuple[str, int]:
    """Scatter of y against x: at most MAX_POINTS points, the ``top`` (bool (N,)) ones always in
    and drawn in the accent colour. Returns the SVG and the number of points drawn."""
    xv = _log10(x) if xlog else x.astype(np.float64)
    yv = _log10(y) if ylog else y.astype(np.float64)
    ok = np.isfinite(xv) & np.isfinite(yv)
    chosen_top = np.flatnonzero(ok & top)
    rest = np.flatnonzero(ok & ~top)
    room = max(0, MAX_POINTS - len(chosen_top))
    if len(rest) > room:
        rest = np.sort(rng.choice(rest, room, replace=False))
    if len(chosen_top) + len(rest) == 0:
        return "<p class='note'>no finite pairs</p>", 0

    def limits(v):
        lo, hi = float(np.min(v[ok])), float(np.max(v[ok]))
        pad = (hi - lo) * 0.04 or 0.5
        return lo - pad, hi + pad

    axes = _Axes(limits(xv), limits(yv))
    parts = axes.frame(
        xlabel + (" (log)" if xlog else ""), ylabel + (" (log)" if ylog else ""), xlog, ylog
    )
    for cls, idx in (("dot", rest), ("dot top", chosen_top)):
        if len(idx):
            px, py = axes.px(xv[idx]), axes.py(yv[idx])
            d = "".join(f"M{a:.1f} {b:.1f}h0" for a, b in zip(px, py, strict=True))
            parts.append(f'<path class="{cls}" d="{d}"/>')
    return axes.svg(parts, f"{ylabel} against {xlabel}"), len(chosen_top) + len(rest)
