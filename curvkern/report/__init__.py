"""The HTML report: one self-contained page a person reads in a browser, with no network.

``build_report(scores, data, out)`` writes the highest-scored samples of each class as pictures,
histograms of the scores, curvature against the loss and the training-dynamics baselines, a
sortable table and a CSV download. CSS, JavaScript and pictures are inline (pictures as data
URIs); the JavaScript is this package's own (template.html), a few dozen lines.

What is embedded is capped so that the page stays small whatever N is: pictures only for the
top-K samples of at most MAX_CLASSES classes, histograms as binned SVG, scatter plots as SVG of
at most MAX_POINTS points (the highest-scored ones always among them), and table/CSV rows for at
most MAX_ROWS samples (all of them below that).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ReportScores", "load_scores", "build_report", "format_ranges", "MAX_ROWS", "MAX_POINTS"]

MAX_ROWS = 10_000  # table and CSV rows embedded (the tracker file holds every sample)
MAX_POINTS = 2_000  # points per scatter plot
MAX_CLASSES = 50  # classes with a picture grid
TABLE_ROWS = 300  # rows the table shows at first (the rest behind "show more")
THUMB = 96  # longest side, pixels, of a picture from an image file

# Baselines and how to draw them: (label, log axis).
BASELINES = {
    "loss_mean": ("mean loss", True),
    "grad_norm_mean": ("mean input-gradient norm", True),
    "el2n": ("EL2N (mean)", False),
    "aum": ("area under the margin", False),
    "confidence": ("confidence (mean p of the label)", False),
    "variability": ("variability (std of p over epochs)", False),
    "forgetting": ("forgetting events", False),
}


@dataclass
class ReportScores:
    """What the report shows of a tracker file.

    Attributes:
        path: the tracker file.
        num_samples: N.
        epochs: the scored epochs.
        curvature: (N,) curvature averaged over the epochs.
        curvature_stderr: (N,) mean over epochs of the per-epoch standard error.
        baselines: name -> (N,) training-dynamics baselines the tracker has (see BASELINES).
        settings: scorer settings saved with the file (method, h, n_probes, ...), if any.
    """

    path: str
    num_samples: int
    epochs: list[int]
    curvature: np.ndarray
    curvature_stderr: np.ndarray
    baselines: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


def load_scores(path: str | os.PathLike) -> ReportScores:
    """Reads a tracker file written by CurvatureTracker (or ``curvkern score``).

    Args:
        path: the tracker file (either layout, keep_history True or False).
    Returns:
        ReportScores with the curvature mean and every baseline the file has values for.
    """
    from curvkern import CurvatureTracker, io

    tracker = CurvatureTracker.load(path)
    metadata, _ = io.read_arrays(path)
    baselines = {k: v.double().numpy() for k, v in tracker.baselines().items()}
    # A baseline that is NaN everywhere (e.g. margins of a model without class logits, or a
    # file from before margins were recorded) is left out rather than drawn empty.
    baselines = {k: v for k, v in baselines.items() if k in BASELINES and np.isfinite(v).any()}
    return ReportScores(
        path=str(path),
        num_samples=int(tracker.num_samples),
        epochs=list(tracker.epochs),
        curvature=tracker.field_mean("curvature").double().numpy(),
        curvature_stderr=tracker.field_mean("curvature_stderr").double().numpy(),
        baselines=baselines,
        settings=metadata.get("settings", metadata),
    )


# -- pictures -----------------------------------------------------------------------------------


def _picture_layout(x: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(N, H, W, C) float pictures (C 1 or 3) from an array of samples, or None, and why."""
    shape = x.shape[1:]
    if len(shape) == 1:
        d = shape[0]
        side = math.isqrt(d)
        if side * side == d:
            return x.reshape(len(x), side, side, 1), f"{side}x{side} grey, from {d} values"
        side = math.isqrt(d // 3)
        if 3 * side * side == d:
            pics = x.reshape(len(x), 3, side, side).transpose(0, 2, 3, 1)
            return pics, f"{side}x{side} colour, from {d} values"
        return None, f"samples of {d} values are not drawn as pictures"
    if len(shape) == 2:
        return x[..., None], f"{shape[0]}x{shape[1]} grey"
    if len(shape) == 3 and shape[0] in (1, 3):
        kind = "grey" if shape[0] == 1 else "colour"
        return x.transpose(0, 2, 3, 1), f"{shape[1]}x{shape[2]} {kind} (channels first)"
    if len(shape) == 3 and shape[2] in (1, 3):
        kind = "grey" if shape[2] == 1 else "colour"
        return x, f"{shape[0]}x{shape[1]} {kind} (channels last)"
    return None, f"samples of shape {tuple(shape)} are not drawn as pictures"


def _data_uri(image, fmt: str) -> str:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=85)
    else:
        image.save(buffer, "PNG", optimize=True)
    kind = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _thumbnails(data, ids: list[int]) -> tuple[dict[int, str], bool, str]:
    """Data URIs of the pictures of ``ids``; whether they are small (drawn pixelated); a note."""
    from PIL import Image

    if data.files is not None:
        uris = {}
        for i in ids:
            with Image.open(data.files[i]) as image:
                image = image.convert("RGB")
                image.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
                uris[i] = _data_uri(image, "JPEG")
        return uris, False, f"from the image files, at most {THUMB} px"
    pictures, note = _picture_layout(np.asarray(data.images))
    if pictures is None:
        return {}, False, note
    # One intensity scale for the whole data set (0.5 and 99.5 percentiles), so that pictures
    # compare with each other; per-picture stretching would make a faint sample look bold.
    sample = pictures[:: max(1, len(pictures) // 2000)].astype(np.float64)
    low, high = np.nanpercentile(sample, [0.5, 99.5])
    scale = 255.0 / (high - low) if high > low else 1.0
    height, width = pictures.shape[1:3]
    small = max(height, width) <= 48
    uris = {}
    for i in ids:
        pixels = np.clip((pictures[i].astype(np.float64) - low) * scale, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
        if small:  # a few hundred bytes as PNG; the browser enlarges it pixelated
            uris[i] = _data_uri(image, "PNG")
        else:
            image.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
            uris[i] = _data_uri(image.convert("RGB"), "JPEG")
    return uris, small, note


# -- SVG plots ----------------------------------------------------------------------------------


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


def _histogram_svg(values: np.ndarray, log: bool, label: str, mark: float | None) -> str:
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


def _scatter_svg(x, y, top: np.ndarray, xlabel, ylabel, xlog, ylog, rng) -> tuple[str, int]:
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


# -- the page -----------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    if not np.isfinite(value):
        return "inf" if value == np.inf else ("-inf" if value == -np.inf else "")
    return f"{value:.4g}"


def build_report(
    scores: ReportScores, data, out: str | os.PathLike, *, top: int = 12, title: str | None = None
) -> int:
    """Writes the HTML report of ``scores`` on ``data`` to ``out``.

    Args:
        scores: from load_scores.
        data: curvkern.cli.Data (labels, class names, pictures or image files).
        out: the .html file to write.
        top: K, the samples shown per class.
        title: the page's title (default: the tracker file's name).
    Returns:
        The size of the written file in bytes.
    """
    from curvkern.metrics import spearman

    n = scores.num_samples
    labels = np.asarray(data.labels)
    curvature = scores.curvature
    scored = np.isfinite(curvature)
    order = np.argsort(np.where(scored, -curvature, np.inf), kind="stable")
    order = order[: int(scored.sum())]
    rank = np.full(n, -1, dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)

    # Per-class grids: the top K of each class; classes with the highest top score first when
    # there are more than MAX_CLASSES.
    per_class = {}
    for c in range(len(data.classes)):
        members = order[labels[order] == c]
        per_class[c] = members[:top]
    shown_classes = list(range(len(data.classes)))
    if len(shown_classes) > MAX_CLASSES:
        shown_classes = sorted(
            shown_classes,
            key=lambda c: -curvature[per_class[c][0]] if len(per_class[c]) else np.inf,
        )[:MAX_CLASSES]
        shown_classes.sort()
    pictured = sorted({int(i) for c in shown_classes for i in per_class[c]})
    uris, pixelated, picture_note = _thumbnails(data, pictured)

    # The highlighted "top" set of the plots: as many samples as the grids show.
    top_mask = np.zeros(n, dtype=bool)
    top_mask[pictured] = True
    threshold = float(np.min(curvature[pictured])) if pictured else None

    rng = np.random.default_rng(0)
    hist = [_histogram_svg(curvature, True, "mean curvature", threshold)]
    if "loss_mean" in scores.baselines:
        hist.append(_histogram_svg(scores.baselines["loss_mean"], True, "mean loss", None))
    scatter = []
    for name, values in scores.baselines.items():
        label, log = BASELINES[name]
        note = ""
        if name == "forgetting" and np.isinf(values).any():
            note = f"{int(np.isinf(values).sum()):,} samples never learned (infinite) left out"
        svg, drawn = _scatter_svg(
            values, curvature, top_mask, label, "mean curvature", log, True, rng
        )
        try:
            rho = spearman(
                np.where(np.isinf(values), np.nan, values) if name == "forgetting" else values,
                curvature,
            )
            rho_text = f"Spearman ρ = {rho:.2f}"
        except ValueError:
            rho_text = "Spearman ρ undefined"
        scatter.append((label, svg, drawn, rho_text, note))

    # Rows for the table and the CSV, in rank order (then the unscored samples).
    named = any(name != str(c) for c, name in enumerate(data.classes))
    columns = ["rank", "id", "label", *(["class"] if named else []), "curvature"]
    columns += ["curvature_stderr", *scores.baselines]
    unscored = np.flatnonzero(~scored)
    row_ids = np.concatenate([order, unscored])[:MAX_ROWS]
    rows = []
    for i in row_ids:
        i = int(i)
        rows.append(
            [
                int(rank[i]) if rank[i] > 0 else None,
                i,
                int(labels[i]),
                *([data.classes[labels[i]]] if named else []),
                _json_number(curvature[i]),
                _json_number(scores.curvature_stderr[i]),
                *(_json_number(scores.baselines[k][i]) for k in scores.baselines),
            ]
        )

    # Grids.
    grid_html = []
    for c in shown_classes:
        members = per_class[c]
        in_class = int((labels == c).sum())
        median = np.nanmedian(curvature[labels == c]) if in_class else np.nan
        name = data.classes[c]
        heading = html.escape(name if name == str(c) else f"{c} · {name}")
        figures = []
        for i in members:
            i = int(i)
            loss = scores.baselines.get("loss_mean")
            loss_text = f"<br>loss {_fmt(loss[i])}" if loss is not None else ""
            img = (
                f'<img src="{uris[i]}" alt="sample {i}">'
                if i in uris
                else '<div class="noimg">no picture</div>'
            )
            figures.append(
                f'<figure id="s{i}">{img}<figcaption><b>#{rank[i]:,}</b> · id {i}<br>'
                f"curv {_fmt(curvature[i])}{loss_text}</figcaption></figure>"
            )
        grid_html.append(
            f'<div class="cls"><h3>label {heading} <span class="muted">{in_class:,} samples, '
            f"median curvature {_fmt(median)}</span></h3>"
            f'<div class="grid">{"".join(figures) or "<p class=note>no scored sample</p>"}'
            "</div></div>"
        )
    hidden = len(data.classes) - len(shown_classes)
    hidden_note = (
        (
            f"<p class='note'>{hidden:,} more classes are not pictured (those whose "
            "highest score is lowest); every sample is in the table and the tracker "
            "file.</p>"
        )
        if hidden
        else ""
    )

    settings = scores.settings
    setting_text = ", ".join(
        f"{k} {settings[k]}" for k in ("method", "h", "n_probes", "seed") if k in settings
    )
    epochs = scores.epochs
    epoch_text = f"{len(epochs)} epochs ({format_ranges(epochs)})" if epochs else "no epoch scored"
    missing_baselines = [BASELINES[k][0] for k in BASELINES if k not in scores.baselines]
    scatter_note = (
        "Not recorded in this tracker file: " + ", ".join(missing_baselines) + "."
        if missing_baselines
        else ""
    )
    rows_note = (
        f"all {n:,} samples"
        if len(row_ids) == n
        else f"the {len(row_ids):,} highest-scored of {n:,} samples (every sample is in the "
        f"tracker file, {html.escape(Path(scores.path).name)})"
    )
    title = title or f"curvkern report: {Path(scores.path).name}"

    template = (Path(__file__).parent / "template.html").read_text()
    page = _fill(
        template,
        {
            "TITLE": html.escape(title),
            "SUBTITLE": html.escape(
                f"{n:,} samples · {len(data.classes)} classes · {epoch_text}"
                + (f" · {setting_text}" if setting_text else "")
            ),
            "SOURCE": html.escape(
                f"scores: {scores.path} · data: {data.source} · generated "
                f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}"
            ),
            "TOP": str(top),
            "PICTURE_NOTE": html.escape(picture_note),
            "PIXELATED": " pixelated" if pixelated else "",
            "GRIDS": "".join(grid_html) + hidden_note,
            "HISTOGRAMS": "".join(f"<figure class='plot'>{h}</figure>" for h in hist),
            "THRESHOLD": _fmt(threshold) if threshold is not None else "",
            "SCATTER": "".join(
                f"<figure class='plot'><figcaption><b>{html.escape(label)}</b><br>{rho} · "
                f"{drawn:,} points{' · ' + html.escape(note) if note else ''}</figcaption>"
                f"{svg}</figure>"
                for label, svg, drawn, rho, note in scatter
            )
            or "<p class='note'>The tracker file holds no baseline to plot against.</p>",
            "SCATTER_NOTE": html.escape(scatter_note),
            "ROWS_NOTE": rows_note,
            "DATA": json.dumps(
                {"columns": columns, "rows": rows, "tableRows": TABLE_ROWS}, separators=(",", ":")
            ).replace("</", "<\\/"),
            "CSV_NAME": html.escape(Path(scores.path).stem + ".csv"),
        },
    )
    # The page states its own size: measured with the placeholder, then filled in (a few
    # bytes' difference, below the figure's precision).
    encoded = page.encode()
    encoded = encoded.replace(b"@@PAGE_SIZE@@", _size_text(len(encoded)).encode())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(encoded)
    return len(encoded)


def _size_text(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"


def _json_number(value) -> float | None:
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(f"{value:.5g}")


def _fill(template: str, values: dict[str, str]) -> str:
    """Replaces the {{NAME}} placeholders in one pass (so that filled-in text is never read as
    a placeholder; the template's CSS and JS keep their single braces)."""
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], template)


def format_ranges(values) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, start = [], None
    values = list(values)
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)
