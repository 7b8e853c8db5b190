"""Find the mislabeled images a network memorized, by their input curvature.

Flips a fraction of the labels of a real image data set (--flip, default 10%), trains an MLP
until it memorizes them (training accuracy on the noisy labels near 100%), scores every image
with CurvatureTracker after every epoch (or every k-th: --track-every), and reports how well each
score finds the flipped labels: AUROC, and how many of the k highest-scored images are flipped
(k = the number flipped). The scores:

  - input curvature averaged over the scored epochs (the paper's memorization score),
  - input curvature after the last epoch,
  - the final loss, and the loss averaged over the scored epochs (the tracker records both),
  - cleanlab's label-quality score, when cleanlab is installed, from out-of-sample predicted
    probabilities: K-fold cross-validation (--folds) with the same network and recipe.

Writes, under --out (default outputs/find_mislabeled), files named after the data set:
  <dataset>_top_curvature.png  the highest-curvature images, flipped ones in red
  <dataset>_roc.png            the ROC curves of all the scores
  <dataset>_scores.csv         every image's labels and scores

    python3 examples/find_mislabeled.py                          # digits: 25 s on 2 CPU cores
    python3 examples/find_mislabeled.py --dataset fashion-mnist  # 10,000 images: 5 minutes

(Times measured on a 2-core x86_64 CPU, cleanlab's cross-validation included; see
examples/RESULTS.md.)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from common import (
    ImageData,
    Recipe,
    accuracy,
    check_positive,
    describe,
    example_parser,
    flip_labels,
    load_or_exit,
    markdown_table,
    mlp,
    predict_proba,
    progress_bar,
    pyplot,
    recipe_for,
    save_image_grid,
    tracked_scores,
    train_classifier,
    train_tracked,
    write_csv,
)

from curvkern import CurvatureScorer, CurvatureTracker
from curvkern.metrics import auroc, roc_curve, topk

# --quick: a seconds-long run for the tests (flags given explicitly still win).
QUICK = {"subset": 500, "epochs": 15}
QUICK_FOLDS = 2


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = example_parser(__doc__)
    parser.add_argument(
        "--flip", type=float, default=0.1, help="fraction of labels flipped (default: 0.1)"
    )
    parser.add_argument(
        "--h", type=float, default=1e-3,
        help="finite-difference step in the normalized input space (default: 1e-3, the paper's)",
    )  # fmt: skip
    parser.add_argument(
        "--folds", type=int,
        help=f"cross-validation folds for cleanlab's out-of-sample probabilities; 0 skips "
        f"cleanlab (default: 5, {QUICK_FOLDS} with --quick)",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=40, help="images in the picture (default: 40)")
    parser.add_argument(
        "--out", default="outputs/find_mislabeled", help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"a seconds-long run for tests: {QUICK['subset']} images, {QUICK['epochs']} epochs, "
        f"{QUICK_FOLDS} folds",
    )  # fmt: skip
    args = parser.parse_args(argv)
    check_positive(parser, args, "h", "top")
    if args.folds is None:
        args.folds = QUICK_FOLDS if args.quick else 5
    if not 0 < args.flip < 1:
        parser.error(f"--flip must lie in (0, 1), got {args.flip}")
    if args.folds == 1 or args.folds < 0:
        parser.error(f"--folds must be 0 (no cleanlab) or at least 2, got {args.folds}")
    return parser, args


def cross_validated_probabilities(
    data: ImageData, labels: torch.Tensor, recipe: Recipe, folds: int, seed: int
) -> np.ndarray:
    """Out-of-sample predicted probabilities (N, C): each image scored by a network trained
    with ``recipe`` on the other folds (stratified by ``labels``)."""
    from sklearn.model_selection import StratifiedKFold

    probabilities = np.zeros((len(data), data.num_classes))
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(data.raw, labels.numpy())
    with progress_bar(folds, "cleanlab folds") as bar:
        for fold, (train, held_out) in enumerate(splits):
            torch.manual_seed(seed + 1 + fold)
            model = mlp(data.x[0].numel(), data.num_classes, recipe.hidden)
            train_classifier(
                model, data.x[train], labels[train], recipe.epochs, recipe.lr,
                recipe.batch_size, seed + 1 + fold, decay=recipe.decay,
            )  # fmt: skip
            probabilities[held_out] = predict_proba(model, data.x[held_out]).numpy()
            bar.update()
    return probabilities


def cleanlab_quality(
    data: ImageData, labels: torch.Tensor, recipe: Recipe, folds: int, seed: int
) -> np.ndarray | None:
    """cleanlab's label-quality score per image (low: likely mislabeled), None without cleanlab."""
    try:
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        print("cleanlab is not installed: `pip install cleanlab` adds its label-quality score.")
        return None
    start = time.perf_counter()
    probabilities = cross_validated_probabilities(data, labels, recipe, folds, seed)
    predicted = probabilities.argmax(1)
    print(
        f"cleanlab: out-of-sample probabilities from {folds}-fold cross-validation with the same "
        f"network and recipe ({time.perf_counter() - start:.0f} s); held-out accuracy "
        f"{np.mean(predicted == labels.numpy()):.1%} on the given labels, "
        f"{np.mean(predicted == data.y.numpy()):.1%} on the true ones"
    )
    return get_label_quality_scores(labels.numpy(), probabilities)


def plot_roc(path: str, scores: dict[str, np.ndarray], flipped: np.ndarray, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for name, values in scores.items():
        curve = roc_curve(values, flipped)
        ax.plot(curve.fpr, curve.tpr, lw=1.6, label=f"{name}: {auroc(values, flipped):.3f}")
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--", label="chance: 0.5")
    ax.set_xlabel("false positive rate (clean labels flagged)")
    ax.set_ylabel("true positive rate (flipped labels found)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="score: AUROC", fontsize=7, title_fontsize=7, loc="lower right")
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the example; returns the AUROC of each score by its CSV column name."""
    parser, args = parse_args(argv)
    recipe = recipe_for(args, **(QUICK if args.quick else {}))
    start = time.perf_counter()
    data = load_or_exit(parser, args, recipe)
    noisy, flipped = flip_labels(data.y, args.flip, data.num_classes, seed=args.seed)
    print(
        f"{data.name}: {len(data)} images, {int(flipped.sum())} labels flipped ({args.flip:.0%}); "
        f"{describe(recipe, data)}; curvature scored every {args.track_every} epoch(s) with "
        f"{args.probes} probes"
    )

    torch.manual_seed(args.seed)
    model = mlp(data.x[0].numel(), data.num_classes, recipe.hidden)
    tracker = CurvatureTracker(
        CurvatureScorer(model, h=args.h, n_probes=args.probes, seed=args.seed), len(data)
    )
    train_start = time.perf_counter()
    fitted = train_tracked(model, data.x, noisy, recipe, tracker, args.track_every, args.seed)
    print(
        f"training and tracking: {time.perf_counter() - train_start:.0f} s; train accuracy on "
        f"the noisy labels: {fitted.float().mean():.1%} (flipped ones: "
        f"{fitted[flipped].float().mean():.1%} memorized); accuracy on the true labels: "
        f"{accuracy(model, data.x, data.y):.1%}"
    )

    columns, names = tracked_scores(tracker)
    ranking = dict(columns)  # each score ranks suspicious images high; cleanlab's quality, low
    quality = cleanlab_quality(data, noisy, recipe, args.folds, args.seed) if args.folds else None
    if quality is not None:
        columns["cleanlab_label_quality"] = quality
        ranking["cleanlab_label_quality"] = -quality
        names["cleanlab_label_quality"] = f"cleanlab label quality ({args.folds}-fold, low first)"

    positives = flipped.numpy()
    k = int(positives.sum())
    aurocs = {key: auroc(values, positives) for key, values in ranking.items()}
    rows = [
        (names[key], f"{aurocs[key]:.3f}", f"{int(positives[topk(values, k).indices].sum())}/{k}")
        for key, values in ranking.items()
    ]
    print(f"\nFinding the {k} flipped labels among {len(data)} {data.name} images:\n")
    print(markdown_table(("score", "AUROC", f"flipped among the top {k}"), rows))

    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, data.name)
    write_csv(
        f"{prefix}_scores.csv",
        {
            "id": np.arange(len(data)),
            "dataset_index": data.index,
            "given_label": noisy.numpy(),
            "true_label": data.y.numpy(),
            "flipped": positives.astype(int),
            **columns,
        },
    )
    plot_roc(
        f"{prefix}_roc.png",
        {names[key]: values for key, values in ranking.items()},
        positives,
        f"{data.name}: finding {k} flipped labels among {len(data)} images",
    )
    top = topk(columns["curvature_mean"], min(args.top, len(data))).indices.numpy()
    save_image_grid(
        f"{prefix}_top_curvature.png",
        [data.raw[i] for i in top],
        [
            f"#{rank + 1} given {data.classes[noisy[i]]}"
            + (f"\ntrue {data.classes[data.y[i]]}" if positives[i] else "")
            for rank, i in enumerate(top)
        ],
        positives[top],
        f"{data.name}: the {len(top)} images of highest epoch-averaged curvature among "
        f"{len(data)}; red: flipped label ({int(positives[top].sum())} of {len(top)})",
    )
    print(f"\nwrote {prefix}_top_curvature.png, {prefix}_roc.png, {prefix}_scores.csv")
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return aurocs


if __name__ == "__main__":
    main()
