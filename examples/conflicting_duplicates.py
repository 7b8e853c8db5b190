"""Duplicates with conflicting labels: where do they rank by curvature, and by loss?

The paper's new failure mode: the same image twice in a training set, with two different labels.
No network fits both; a network that memorizes tries, and bends its loss around the image. This
example copies a fraction of a real image data set (--duplicates, default 3%) and gives each
copy another class, trains an MLP until it memorizes everything it can, scores every image with
CurvatureTracker after every epoch, and reports where the pair members (the original, with its
true label, and the copy, with the other one) rank by curvature and by loss: AUROC, how many of
the top 2m are pair members (m pairs), and their median percentile ranks (100 = highest).

Writes, under --out (default outputs/conflicting_duplicates), files named after the data set:
  <dataset>_pairs.png   duplicated images with both labels and the ranks of both copies
  <dataset>_found.png   per score, the fraction of pair members among the r highest, against r
  <dataset>_scores.csv  every image's label, role (original, copy or -), pair and scores

    python3 examples/conflicting_duplicates.py                    # digits: 15 s on 2 CPU cores
    python3 examples/conflicting_duplicates.py --dataset mnist-5k # 5,000 MNIST digits: 2 minutes
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from common import (
    check_positive,
    describe,
    draw_image,
    example_parser,
    load_or_exit,
    markdown_table,
    mlp,
    percentile_ranks,
    pyplot,
    recipe_for,
    tracked_scores,
    train_tracked,
    write_csv,
)

from curvkern import CurvatureScorer, CurvatureTracker
from curvkern.metrics import auroc, topk

QUICK = {"subset": 500, "epochs": 25}  # --quick, for the tests (explicit flags still win)
ROLES = ("-", "original", "copy")


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = example_parser(__doc__)
    parser.add_argument(
        "--duplicates", type=float, default=0.03,
        help="fraction of the images copied with another label (default: 0.03)",
    )  # fmt: skip
    parser.add_argument("--pairs", type=int, default=16, help="pairs in the picture (default: 16)")
    parser.add_argument(
        "--out", default="outputs/conflicting_duplicates",
        help="output folder (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help=f"a seconds-long run for tests: {QUICK['subset']} images, {QUICK['epochs']} epochs",
    )  # fmt: skip
    args = parser.parse_args(argv)
    check_positive(parser, args, "pairs")
    if not 0 < args.duplicates <= 0.5:
        parser.error(f"--duplicates must lie in (0, 0.5], got {args.duplicates}")
    return parser, args


def plot_pairs(
    path: str, images: list[np.ndarray], titles: list[str], title: str, columns: int = 8
) -> None:
    """One panel per duplicated image: its two labels and both copies' percentile ranks."""
    plt = pyplot()
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(1.45 * columns, 1.75 * rows + 0.6), layout="constrained"
    )
    axes = np.atleast_1d(axes).ravel()
    for ax, image, text in zip(axes, images, titles, strict=False):
        draw_image(ax, image, text, marked=False)
    for ax in axes[len(images) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_found_curves(
    path: str, columns: dict[str, np.ndarray], members: np.ndarray, title: str
) -> None:
    """Per score, the fraction of pair members among the r highest-scored images, against r."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.9), layout="constrained")
    n, positives = len(members), int(members.sum())
    r = np.arange(1, n + 1)
    for name, values in columns.items():
        order = np.argsort(-values, kind="stable")
        ax.plot(r, np.cumsum(members[order]) / positives, lw=1.6, label=name)
    ax.plot(r, np.minimum(r, positives) / positives, color="black", lw=0.8, ls=":", label="ideal")
    ax.plot(r, r / n, color="gray", lw=0.8, ls="--", label="chance")
    ax.axvline(positives, color="gray", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlim(1, n)
    ax.set_xlabel(f"r: the highest-scored images inspected (log scale; line at r = {positives})")
    ax.set_ylabel("pair members found (fraction)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the example; returns each score's AUROC for the pair members, by CSV column name."""
    parser, args = parse_args(argv)
    recipe = recipe_for(args, **(QUICK if args.quick else {}))
    start = time.perf_counter()
    data = load_or_exit(parser, args, recipe)

    # The copies: m distinct images, each given a class other than its own.
    gen = torch.Generator().manual_seed(args.seed)
    n, m = len(data), max(1, round(args.duplicates * len(data)))
    source = torch.randperm(n, generator=gen)[:m]
    other = (data.y[source] + torch.randint(1, data.num_classes, (m,), generator=gen)) % (
        data.num_classes
    )
    x = torch.cat([data.x, data.x[source]])
    y = torch.cat([data.y, other])
    role = np.zeros(n + m, dtype=int)  # 0: not duplicated, 1: original, 2: copy
    role[source.numpy()], role[n:] = 1, 2
    pair = np.full(n + m, -1)
    pair[source.numpy()], pair[n:] = np.arange(m), np.arange(m)
    print(
        f"{data.name}: {n} images and {m} copies of them with another label "
        f"({args.duplicates:.0%}); {describe(recipe, data)}"
    )

    torch.manual_seed(args.seed)
    model = mlp(x[0].numel(), data.num_classes, recipe.hidden)
    tracker = CurvatureTracker(CurvatureScorer(model, n_probes=args.probes, seed=args.seed), n + m)
    train_start = time.perf_counter()
    fitted = train_tracked(model, x, y, recipe, tracker, args.track_every, args.seed).numpy()
    print(
        f"training and tracking: {time.perf_counter() - train_start:.0f} s; train accuracy on the "
        f"images not duplicated: {fitted[role == 0].mean():.1%}; on the pairs (one label at most "
        f"of each can be fitted): originals {fitted[role == 1].mean():.1%}, copies "
        f"{fitted[role == 2].mean():.1%}"
    )

    columns, names = tracked_scores(tracker)
    members = role > 0
    percentiles = {key: percentile_ranks(values) for key, values in columns.items()}
    aurocs = {key: auroc(values, members) for key, values in columns.items()}
    rows = [
        (
            names[key],
            f"{aurocs[key]:.3f}",
            f"{int(members[topk(values, 2 * m).indices.numpy()].sum())}/{2 * m}",
            f"{np.median(percentiles[key][role == 1]):.1f}",
            f"{np.median(percentiles[key][role == 2]):.1f}",
        )
        for key, values in columns.items()
    ]
    print(f"\nWhere the {2 * m} members of the {m} conflicting pairs rank among {n + m} images:\n")
    header = (
        "score", "AUROC", f"pair members in the top {2 * m}",
        "median percentile, originals", "median percentile, copies",
    )  # fmt: skip
    print(markdown_table(header, rows))

    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, data.name)
    labels = y.numpy()
    write_csv(
        f"{prefix}_scores.csv",
        {
            "id": np.arange(n + m),
            "dataset_index": np.concatenate([data.index, data.index[source.numpy()]]),
            "label": labels,
            "role": np.array(ROLES)[role],
            "pair": pair,
            **columns,
        },
    )
    shown = np.arange(min(args.pairs, m))
    originals, copies = source.numpy()[shown], n + shown
    curvature, loss = percentiles["curvature_mean"], percentiles["loss_mean"]
    plot_pairs(
        f"{prefix}_pairs.png",
        [data.raw[i] for i in originals],
        [
            f"labels {data.classes[labels[o]]} | {data.classes[labels[c]]}\n"
            f"curv. pct {curvature[o]:.0f} | {curvature[c]:.0f}\n"
            f"loss pct {loss[o]:.0f} | {loss[c]:.0f}"
            for o, c in zip(originals, copies, strict=True)
        ],
        f"{data.name}: {len(shown)} of the {m} images present twice with different labels "
        f"(original | copy); percentile ranks among {n + m} by epoch-averaged curvature and loss",
    )
    plot_found_curves(
        f"{prefix}_found.png",
        {names[key]: values for key, values in columns.items()},
        members,
        f"{data.name}: finding the {2 * m} members of {m} conflicting pairs among {n + m} images",
    )
    print(f"\nwrote {prefix}_pairs.png, {prefix}_found.png, {prefix}_scores.csv")
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return aurocs


if __name__ == "__main__":
    main()
