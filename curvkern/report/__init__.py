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

import datetime
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import io
from ..baselines import BASELINES
from ..data import Data
from ..metrics import spearman
from ..tracker import CurvatureTracker
from .pictures import thumbnails
from .svg import MAX_POINTS, histogram_svg, scatter_svg

__all__ = ["ReportScores", "load_scores", "build_report", "format_ranges", "MAX_ROWS", "MAX_POINTS"]

MAX_ROWS = 10_000  # table and CSV rows embedded (the tracker file holds every sample)
MAX_CLASSES = 50  # classes with a picture grid
TABLE_ROWS = 300  # rows the table shows at first (the rest behind "show more")


@dataclass
class ReportScores:
    """What the report shows of a tracker file.

    Attributes:
        path: the tracker file.
        num_samples: N.
        epochs: the scored epochs.
        curvature: (N,) curvature averaged over the epochs.
        curvature_stderr: (N,) mean over epochs of the per-epoch standard error.
        baselines: name -> (N,) training-dynamics baselines the tracker has (see
            curvkern.baselines.BASELINES).
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


# -- the page -----------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    if not np.isfinite(value):
        return "inf" if value == np.inf else ("-inf" if value == -np.inf else "")
    return f"{value:.4g}"


def build_report(
    scores: ReportScores,
    data: Data,
    out: str | os.PathLike,
    *,
    top: int = 12,
    title: str | None = None,
) -> int:
    """Writes the HTML report of ``scores`` on ``data`` to ``out``.

    Args:
        scores: from load_scores.
        data: curvkern.data.Data (labels, class names, pictures or image files).
        out: the .html file to write.
        top: K, the samples shown per class.
        title: the page's title (default: the tracker file's name).
    Returns:
        The size of the written file in bytes.
    """
    labels = np.asarray(data.labels)
    order, rank = _ranking(scores.curvature)
    per_class, shown_classes = _top_per_class(
        scores.curvature, labels, order, len(data.classes), top
    )
    pictured = sorted({int(i) for c in shown_classes for i in per_class[c]})
    uris, pixelated, picture_note = thumbnails(data, pictured)
    # The highlighted "top" set of the plots: as many samples as the grids show.
    threshold = float(np.min(scores.curvature[pictured])) if pictured else None
    hist, scatter = _plots(scores, pictured, threshold)
    columns, rows = _table(scores, data, order, rank)
    grids = _grids(scores, data, per_class, shown_classes, uris, rank)
    title = title or f"curvkern report: {Path(scores.path).name}"
    template = (Path(__file__).parent / "template.html").read_text()
    page = _fill(
        template,
        {
            "TITLE": html.escape(title),
            "SUBTITLE": html.escape(_subtitle(scores, data)),
            "SOURCE": html.escape(
                f"scores: {scores.path} · data: {data.source} · generated "
                f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}"
            ),
            "TOP": str(top),
            "PICTURE_NOTE": html.escape(picture_note),
            "PIXELATED": " pixelated" if pixelated else "",
            "GRIDS": grids,
            "HISTOGRAMS": "".join(f"<figure class='plot'>{h}</figure>" for h in hist),
            "THRESHOLD": _fmt(threshold) if threshold is not None else "",
            "SCATTER": "".join(
                f"<figure class='plot'><figcaption><b>{html.escape(label)}</b><br>{rho} · "
                f"{drawn:,} points{' · ' + html.escape(note) if note else ''}</figcaption>"
                f"{svg}</figure>"
                for label, svg, drawn, rho, note in scatter
            )
            or "<p class='note'>The tracker file holds no baseline to plot against.</p>",
            "SCATTER_NOTE": html.escape(_missing_baselines_note(scores)),
            "ROWS_NOTE": _rows_note(scores, len(rows)),
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


def _ranking(curvature: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scored samples' ids by decreasing curvature, and each sample's rank (1 = highest,
    -1 = not scored)."""
    scored = np.isfinite(curvature)
    order = np.argsort(np.where(scored, -curvature, np.inf), kind="stable")
    order = order[: int(scored.sum())]
    rank = np.full(len(curvature), -1, dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    return order, rank


def _top_per_class(curvature, labels, order, num_classes: int, top: int) -> tuple[dict, list]:
    """The top K of each class, and the classes given a grid: all, or the MAX_CLASSES with the
    highest top score when there are more."""
    per_class = {}
    for c in range(num_classes):
        members = order[labels[order] == c]
        per_class[c] = members[:top]
    shown_classes = list(range(num_classes))
    if len(shown_classes) > MAX_CLASSES:
        shown_classes = sorted(
            shown_classes,
            key=lambda c: -curvature[per_class[c][0]] if len(per_class[c]) else np.inf,
        )[:MAX_CLASSES]
        shown_classes.sort()
    return per_class, shown_classes


def _plots(scores: ReportScores, pictured: list[int], threshold) -> tuple[list, list]:
    """The histograms (SVG), and per baseline (label, SVG, points drawn, Spearman text, note)
    of curvature against it, the pictured samples highlighted."""
    curvature = scores.curvature
    top_mask = np.zeros(scores.num_samples, dtype=bool)
    top_mask[pictured] = True
    rng = np.random.default_rng(0)
    hist = [histogram_svg(curvature, True, "mean curvature", threshold)]
    if "loss_mean" in scores.baselines:
        hist.append(histogram_svg(scores.baselines["loss_mean"], True, "mean loss", None))
    scatter = []
    for name, values in scores.baselines.items():
        label, log = BASELINES[name].label, BASELINES[name].log
        note = ""
        if name == "forgetting" and np.isinf(values).any():
            note = f"{int(np.isinf(values).sum()):,} samples never learned (infinite) left out"
        svg, drawn = scatter_svg(
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
    return hist, scatter


def _table(scores: ReportScores, data: Data, order, rank) -> tuple[list[str], list[list]]:
    """The columns and rows of the table and the CSV: in rank order, then the unscored samples,
    at most MAX_ROWS."""
    labels = np.asarray(data.labels)
    curvature = scores.curvature
    named = any(name != str(c) for c, name in enumerate(data.classes))
    columns = ["rank", "id", "label", *(["class"] if named else []), "curvature"]
    columns += ["curvature_stderr", *scores.baselines]
    unscored = np.flatnonzero(~np.isfinite(curvature))
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
    return columns, rows


def _grids(scores: ReportScores, data: Data, per_class, shown_classes, uris, rank) -> str:
    """Each shown class's grid of its top samples (picture, rank, id, curvature, loss), and a
    note on the classes left out."""
    labels = np.asarray(data.labels)
    curvature = scores.curvature
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
    return "".join(grid_html) + hidden_note


def _subtitle(scores: ReportScores, data: Data) -> str:
    """N, classes, the scored epochs and the scorer's settings."""
    settings = scores.settings
    setting_text = ", ".join(
        f"{k} {settings[k]}" for k in ("method", "h", "n_probes", "seed") if k in settings
    )
    epochs = scores.epochs
    epoch_text = f"{len(epochs)} epochs ({format_ranges(epochs)})" if epochs else "no epoch scored"
    return f"{scores.num_samples:,} samples · {len(data.classes)} classes · {epoch_text}" + (
        f" · {setting_text}" if setting_text else ""
    )


def _missing_baselines_note(scores: ReportScores) -> str:
    missing = [b.label for k, b in BASELINES.items() if k not in scores.baselines]
    return "Not recorded in this tracker file: " + ", ".join(missing) + "." if missing else ""


def _rows_note(scores: ReportScores, shown: int) -> str:
    n = scores.num_samples
    return (
        f"all {n:,} samples"
        if shown == n
        else f"the {shown:,} highest-scored of {n:,} samples (every sample is in the "
        f"tracker file, {html.escape(Path(scores.path).name)})"
    )


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
