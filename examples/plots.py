"""Output of the examples: markdown tables of mean and spread over seeds, CSV files, pictures."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np


def mean_sd(values: Sequence[float], digits: int = 3) -> str:
    """One result over seeds as "mean ± sample standard deviation (ddof 1)", with ``digits``
    decimals; just the value for one seed."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}" if digits else f"{values[0]:.0f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table of ``rows`` (cells formatted with str) under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: str | os.PathLike, columns: dict[str, Sequence | np.ndarray]) -> None:
    """One row per sample, one column per entry of ``columns`` (floats with 6 digits)."""
    arrays = {name: np.asarray(values) for name, values in columns.items()}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(arrays)
        for row in zip(*arrays.values(), strict=True):
            writer.writerow(f"{v:.6g}" if isinstance(v, np.floating) else v for v in row)


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_styles(count: int) -> list[dict]:
    """``count`` distinguishable line styles (colors, then dashes) for one plot's curves."""
    colors = pyplot().get_cmap("tab10").colors
    dashes = ("-", "--", ":")
    return [{"color": colors[i % 10], "ls": dashes[i // 10 % 3]} for i in range(count)]


def draw_image(ax, image: np.ndarray, title: str, marked: bool = False) -> None:
    """One image without axes; ``marked`` draws its frame and title in red."""
    color = "crimson" if marked else "black"
    ax.imshow(image, cmap="gray_r", interpolation="nearest")
    ax.set_title(title, fontsize=7, color=color)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(2.0 if marked else 0.5)


def save_image_grid(
    path: str | os.PathLike,
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    marked: Sequence[bool],
    title: str,
    columns: int = 8,
) -> None:
    """A grid of images with a title each; ``marked`` ones framed in red."""
    plt = pyplot()
    rows = max(1, math.ceil(len(images) / columns))
    height = 1.45 + 0.3 * max(text.count("\n") for text in titles) if titles else 1.45
    fig, axes = plt.subplots(
        rows, columns, figsize=(1.45 * columns, height * rows + 0.6), layout="constrained"
    )
    axes = np.atleast_1d(axes).ravel()
    for ax, image, text, mark in zip(axes, images, titles, marked, strict=False):
        draw_image(ax, image, text, bool(mark))
    for ax in axes[len(images) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)
