"""Duplicates with conflicting labels: where do they rank by curvature, and by loss?

The paper's new failure mode: the same image twice in a training set, with two different labels.
No network fits both; a network that memorizes tries, and bends its loss around the image. This
example copies a fraction of a real image data set (--duplicates, default 3%) and gives each
copy another class, trains an MLP until it memorizes everything it can, scores every image with
CurvatureTracker after every epoch, and reports where the pair members (the original, with its
true label, and the copy, with the other one) rank by curvature, by loss and by the training-
dynamics baselines of the same run (tracker.baselines()): AUROC, how many of the top 2m are pair
members (m pairs), and their median percentile ranks (100 = highest), as the mean and standard
deviation over --seeds runs.

Writes, under --out (default outputs/conflicting_duplicates), files named after the data set:
  <dataset>_pairs.png   duplicated images with both labels and the ranks of both copies
  <dataset>_found.png   per score, the fraction of pair members among the r highest (recall),
                        against r
  <dataset>_scores.csv  every image's label, role (original, copy or -), pair and scores
  (all three from the first seed), and <dataset>_seeds.csv: every seed's results

    python3 examples/conflicting_duplicates.py --seeds 5                     # digits
    python3 examples/conflicting_duplicates.py --dataset mnist-5k --seeds 5  # 5,000 MNIST digits

(docs/results.md, "Results on real data", gives the measured times and tables.)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from data import ImageData, add_data_arguments, load_or_exit
from models import add_training_arguments, describe, recipe_for, train_and_track
from plots import draw_image, line_styles, markdown_table, mean_sd, pyplot, write_csv
from scores import compared, percentile_ranks

from curvkern.metrics import auroc, topk

QUICK = {"subset": 500, "epochs": 25}  # --quick, for the tests (explicit flags still win)
ROLES = ("-", "original", "copy")


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    add_data_arguments(parser)
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    args.recipe = recipe_for(parser, args, "pairs", **(QUICK if args.quick else {}))
    if not 0 < args.duplicates <= 0.5:
        parser.error(f"--duplicates must lie in (0, 0.5], got {args.duplicates}")
    return parser, args


def with_conflicting_copies(data: ImageData, fraction: float, seed: int):
    """The images and labels with a random ``fraction`` of the images appended once more, each
    copy with another class. Returns x, y, the source index of each copy (m,), and role (N + m,):
    0 not duplicated, 1 original, 2 copy."""
    gen = torch.Generator().manual_seed(seed)
    n, m = len(data), max(1, round(fraction * len(data)))
    source = torch.randperm(n, generator=gen)[:m]
    shift = torch.randint(1, data.num_classes, (m,), generator=gen)
    x = torch.cat([data.x, data.x[source]])
    y = torch.cat([data.y, (data.y[source] + shift) % data.num_classes])
    role = np.zeros(n + m, dtype=int)
    role[source.numpy()], role[n:] = 1, 2
    return x, y, source, role


def run(data: ImageData, args: argparse.Namespace, seed: int) -> dict:
    """One seed: adds the conflicting copies, trains and tracks, scores."""
    recipe = args.recipe
    data = data.subset(recipe.subset, seed)
    x, y, source, role = with_conflicting_copies(data, args.duplicates, seed)
    start = time.perf_counter()

    # The training loop, with the curvature tracked after every epoch (or every k-th).
    tracker = train_and_track(x, y, data.num_classes, recipe, seed, args.track_every,
                              n_probes=args.probes)  # fmt: skip
    values, ranking, names = compared(tracker)

    # The trained model: the loop scores the last epoch.
    fitted = tracker.field_history("correct")[-1].numpy()
    print(
        f"seed {seed}: train accuracy on the images not duplicated {fitted[role == 0].mean():.1%};"
        f" on the pairs (one label at most of each can be fitted): originals "
        f"{fitted[role == 1].mean():.1%}, copies {fitted[role == 2].mean():.1%}; training and "
        f"tracking {time.perf_counter() - start:.0f} s"
    )
    return {"data": data, "y": y, "source": source, "role": role, "values": values,
            "ranking": ranking, "names": names}  # fmt: skip


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
        draw_image(ax, image, text)
    for ax in axes[len(images) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_found_curves(
    path: str, columns: dict[str, np.ndarray], members: np.ndarray, title: str
) -> None:
    """Per score, the recall among the r highest-scored images: the fraction of all pair members
    that they hold, against r."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    n, positives = len(members), int(members.sum())
    r = np.arange(1, n + 1)
    for (name, values), style in zip(columns.items(), line_styles(len(columns)), strict=True):
        order = np.argsort(-values, kind="stable")
        ax.plot(r, np.cumsum(members[order]) / positives, lw=1.4, label=name, **style)
    ax.plot(r, np.minimum(r, positives) / positives, color="black", lw=0.8, ls=":", label="ideal")
    ax.plot(r, r / n, color="gray", lw=0.8, ls="--", label="chance")
    ax.axvline(positives, color="gray", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlim(1, n)
    ax.set_xlabel(f"r: the highest-scored images inspected (log scale; line at r = {positives})")
    ax.set_ylabel("recall: fraction of all pair members found")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_pictures(prefix: str, first: dict, pairs: int) -> None:
    """The first seed's CSV of scores, pictures of pairs and recall curves."""
    data, y, source, role = first["data"], first["y"], first["source"], first["role"]
    values, ranking, names = first["values"], first["ranking"], first["names"]
    n, m = len(data), len(source)
    pair = np.full(n + m, -1)
    pair[source.numpy()], pair[n:] = np.arange(m), np.arange(m)
    labels = y.numpy()
    write_csv(
        f"{prefix}_scores.csv",
        {"id": np.arange(n + m), "label": labels, "role": np.array(ROLES)[role], "pair": pair,
         "dataset_index": np.concatenate([data.index, data.index[source.numpy()]]), **values},
    )  # fmt: skip
    shown = np.arange(min(pairs, m))
    originals, copies = source.numpy()[shown], n + shown
    curvature = percentile_ranks(ranking["curvature_mean"])
    loss = percentile_ranks(ranking["loss_mean"])
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
        {names[key]: v for key, v in ranking.items()},
        role > 0,
        f"{data.name}: finding the {2 * m} members of {m} conflicting pairs among {n + m} images "
        f"(first seed)",
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the example; returns each score's AUROC for the pair members (mean over seeds), by
    CSV column name."""
    parser, args = parse_args(argv)
    start = time.perf_counter()
    data = load_or_exit(parser, args)
    seeds = range(args.seed, args.seed + args.seeds)
    print(
        f"{data.name}: {min(len(data), args.recipe.subset or len(data))} images, "
        f"{args.duplicates:.0%} of them copied with another label; "
        f"{describe(args.recipe, data.x[0].numel(), data.num_classes)}; seeds {seeds.start}.."
        f"{seeds.stop - 1}"
    )
    runs = [run(data, args, seed) for seed in seeds]

    names, m = runs[0]["names"], len(runs[0]["source"])
    results = {key: {"auroc": [], "top": [], "originals": [], "copies": []} for key in names}
    for r in runs:
        members = r["role"] > 0
        for key, values in r["ranking"].items():
            percentile = percentile_ranks(values)
            results[key]["auroc"].append(auroc(values, members))
            results[key]["top"].append(int(members[topk(values, 2 * m).indices.numpy()].sum()))
            results[key]["originals"].append(np.median(percentile[r["role"] == 1]))
            results[key]["copies"].append(np.median(percentile[r["role"] == 2]))
    spread = f"mean ± sd over {len(runs)} seeds" if len(runs) > 1 else f"seed {args.seed}"
    n = len(runs[0]["y"])
    print(
        f"\nWhere the {2 * m} members of {m} conflicting pairs rank among {n} images ({spread}):\n"
    )
    header = (
        "score", "AUROC", f"pair members in the top {2 * m}",
        "median percentile, originals", "median percentile, copies",
    )  # fmt: skip
    top_digits = 1 if len(runs) > 1 else 0
    rows = [
        (names[key], mean_sd(v["auroc"]), mean_sd(v["top"], top_digits),
         mean_sd(v["originals"], 1), mean_sd(v["copies"], 1))
        for key, v in results.items()
    ]  # fmt: skip
    print(markdown_table(header, rows))

    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, data.name)
    save_pictures(prefix, runs[0], args.pairs)
    keys = [(i, key) for i in range(len(runs)) for key in names]
    write_csv(
        f"{prefix}_seeds.csv",
        {"seed": [seeds[i] for i, _ in keys], "score": [key for _, key in keys],
         **{field: [results[key][field][i] for i, key in keys] for field in results[keys[0][1]]}},
    )  # fmt: skip
    print(f"\nwrote {prefix}_pairs.png, _found.png, _scores.csv, _seeds.csv")
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return {key: float(np.mean(v["auroc"])) for key, v in results.items()}


if __name__ == "__main__":
    main()
