"""Find the mislabeled images a network memorized, by their input curvature.

Flips a fraction of the labels of a real image data set (--flip, default 10%), trains an MLP
until it memorizes them (training accuracy on the noisy labels near 100%), scores every image
with CurvatureTracker after every epoch (or every k-th: --track-every), and reports how well each
score finds the flipped labels: AUROC, and how many of the k highest-scored images are flipped
(k = the number flipped), as the mean and standard deviation over --seeds runs. The scores:

  - input curvature averaged over the scored epochs (the paper's memorization score),
  - input curvature after the last epoch, and the final loss,
  - the training-dynamics baselines the tracker records in the same run (tracker.baselines():
    mean loss, mean input-gradient norm, AUM, confidence, variability, forgetting, EL2N),
  - cleanlab's label-quality score, when cleanlab is installed, from out-of-sample predicted
    probabilities: K-fold cross-validation (--folds) with the same network and recipe.

Writes, under --out (default outputs/find_mislabeled), files named after the data set:
  <dataset>_top_curvature.png  the first seed's highest-curvature images, flipped ones in red
  <dataset>_roc.png            the first seed's ROC curves of all the scores
  <dataset>_scores.csv         the first seed's labels and scores of every image
  <dataset>_seeds.csv          every seed's AUROC and top-k count of every score

    python3 examples/find_mislabeled.py --seeds 5                          # digits
    python3 examples/find_mislabeled.py --dataset fashion-mnist --seeds 5  # 10,000 images each

(on an idle 2-core CPU, cleanlab's cross-validation included: about 24 s per digits seed and
5 minutes per Fashion-MNIST seed; docs/results.md, "Results on real data", gives the tables.)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from data import ImageData, add_data_arguments, flip_labels, load_or_exit
from models import (
    Recipe,
    add_training_arguments,
    describe,
    mlp,
    recipe_for,
    train,
    train_and_track,
)
from plots import line_styles, markdown_table, mean_sd, pyplot, save_image_grid, write_csv
from scores import compared

from curvkern.metrics import auroc, roc_curve, topk

# --quick: a seconds-long run for the tests (flags given explicitly still win).
QUICK = {"subset": 500, "epochs": 15}
QUICK_FOLDS = 2


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    add_data_arguments(parser)
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    args.recipe = recipe_for(parser, args, "h", "top", **(QUICK if args.quick else {}))
    if args.folds is None:
        args.folds = QUICK_FOLDS if args.quick else 5
    if not 0 < args.flip < 1:
        parser.error(f"--flip must lie in (0, 1), got {args.flip}")
    if args.folds == 1 or args.folds < 0:
        parser.error(f"--folds must be 0 (no cleanlab) or at least 2, got {args.folds}")
    return parser, args


def cleanlab_quality(
    data: ImageData, labels: torch.Tensor, recipe: Recipe, folds: int, seed: int
) -> np.ndarray | None:
    """cleanlab's label-quality score per image (low: likely mislabeled), from out-of-sample
    probabilities: each image predicted by a network trained with ``recipe`` on the other
    folds. None without cleanlab."""
    try:
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        print("cleanlab is not installed: `pip install cleanlab` adds its label-quality score.")
        return None
    from sklearn.model_selection import StratifiedKFold

    probabilities = np.zeros((len(data), data.num_classes))
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(data.raw, labels)
    for fold, (fit, held_out) in enumerate(splits):
        torch.manual_seed(seed + 1 + fold)
        model = mlp(data.x[0].numel(), data.num_classes, recipe.hidden)
        train(model, data.x[fit], labels[fit], recipe, seed + 1 + fold)
        with torch.no_grad():
            probabilities[held_out] = model(data.x[held_out]).softmax(1).numpy()
    print(
        f"  cleanlab: {folds}-fold held-out accuracy "
        f"{np.mean(probabilities.argmax(1) == labels.numpy()):.1%} on the given labels"
    )
    return get_label_quality_scores(labels.numpy(), probabilities)


def run(data: ImageData, args: argparse.Namespace, seed: int) -> dict:
    """One seed: flips labels, trains and tracks, scores. Returns the run's data, labels,
    flipped mask, and its score values, ranking and names (scores.compared)."""
    recipe = args.recipe
    data = data.subset(recipe.subset, seed)
    noisy, flipped = flip_labels(data.y, args.flip, data.num_classes, seed=seed)
    start = time.perf_counter()

    # The training loop, with the curvature tracked after every epoch (or every k-th).
    tracker = train_and_track(data.x, noisy, data.num_classes, recipe, seed, args.track_every,
                              h=args.h, n_probes=args.probes)  # fmt: skip
    values, ranking, names = compared(tracker)

    # The trained model: the loop scores the last epoch.
    fitted = tracker.field_history("correct")[-1].bool()
    print(
        f"seed {seed}: train accuracy on the noisy labels {fitted.float().mean():.1%} (flipped "
        f"ones: {fitted[flipped].float().mean():.1%} memorized); training and tracking "
        f"{time.perf_counter() - start:.0f} s"
    )
    quality = cleanlab_quality(data, noisy, recipe, args.folds, seed) if args.folds else None
    if quality is not None:
        values["cleanlab_label_quality"] = quality
        ranking["cleanlab_label_quality"] = -quality
        names["cleanlab_label_quality"] = f"cleanlab label quality ({args.folds}-fold, low first)"
    return {"data": data, "noisy": noisy, "flipped": flipped.numpy(), "values": values,
            "ranking": ranking, "names": names}  # fmt: skip


def plot_roc(path: str, scores: dict[str, np.ndarray], flipped: np.ndarray, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    for (name, values), style in zip(scores.items(), line_styles(len(scores)), strict=True):
        curve = roc_curve(values, flipped)
        label = f"{name}: {auroc(values, flipped):.3f}"
        ax.plot(curve.fpr, curve.tpr, lw=1.4, label=label, **style)
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--", label="chance: 0.5")
    ax.set_xlabel("false positive rate (clean labels flagged)")
    ax.set_ylabel("true positive rate (flipped labels found)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="score: AUROC", fontsize=6.5, title_fontsize=7, loc="lower right")
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_pictures(prefix: str, first: dict, top: int) -> None:
    """The first seed's CSV of scores, ROC curves and top-curvature images."""
    data, noisy, positives = first["data"], first["noisy"], first["flipped"]
    values, ranking, names = first["values"], first["ranking"], first["names"]
    k = int(positives.sum())
    write_csv(
        f"{prefix}_scores.csv",
        {"id": np.arange(len(data)), "dataset_index": data.index, "given_label": noisy.numpy(),
         "true_label": data.y.numpy(), "flipped": positives.astype(int), **values},
    )  # fmt: skip
    plot_roc(
        f"{prefix}_roc.png",
        {names[key]: v for key, v in ranking.items()},
        positives,
        f"{data.name}: finding {k} flipped labels among {len(data)} images (first seed)",
    )
    shown = topk(values["curvature_mean"], min(top, len(data))).indices.numpy()
    save_image_grid(
        f"{prefix}_top_curvature.png",
        [data.raw[i] for i in shown],
        [
            f"#{rank + 1} given {data.classes[noisy[i]]}"
            + (f"\ntrue {data.classes[data.y[i]]}" if positives[i] else "")
            for rank, i in enumerate(shown)
        ],
        positives[shown],
        f"{data.name}: the {len(shown)} images of highest epoch-averaged curvature among "
        f"{len(data)} (first seed); red: flipped label ({int(positives[shown].sum())} of "
        f"{len(shown)})",
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the example; returns each score's AUROC, the mean over seeds, by CSV column name."""
    parser, args = parse_args(argv)
    start = time.perf_counter()
    data = load_or_exit(parser, args)
    seeds = range(args.seed, args.seed + args.seeds)
    size = min(len(data), args.recipe.subset or len(data))
    print(
        f"{data.name}: {size} images, {args.flip:.0%} of labels flipped; "
        f"{describe(args.recipe, data.x[0].numel(), data.num_classes)}; curvature scored every "
        f"{args.track_every} epoch(s) with {args.probes} probes; seeds {seeds.start}.."
        f"{seeds.stop - 1}"
    )
    runs = [run(data, args, seed) for seed in seeds]

    names = runs[0]["names"]
    k = int(runs[0]["flipped"].sum())
    aurocs = {key: [auroc(r["ranking"][key], r["flipped"]) for r in runs] for key in names}
    found = {
        key: [int(r["flipped"][topk(r["ranking"][key], k).indices.numpy()].sum()) for r in runs]
        for key in names
    }
    spread = f"mean ± sd over {len(runs)} seeds" if len(runs) > 1 else f"seed {args.seed}"
    print(f"\nFinding the {k} flipped labels among {size} {data.name} images ({spread}):\n")
    header = ("score", "AUROC", f"flipped among the top {k}")
    rows = [
        (names[key], mean_sd(aurocs[key]), mean_sd(found[key], 1 if len(runs) > 1 else 0))
        for key in names
    ]
    print(markdown_table(header, rows))
    top = min(args.top, size)
    in_picture = [
        int(r["flipped"][topk(r["values"]["curvature_mean"], top).indices.numpy()].sum())
        for r in runs
    ]
    print(
        f"\nflipped labels among the {top} images of highest epoch-averaged curvature: "
        f"{mean_sd(in_picture, 1)} ({spread}; per seed {in_picture})"
    )

    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, data.name)
    save_pictures(prefix, runs[0], args.top)
    write_csv(
        f"{prefix}_seeds.csv",
        {"seed": [s for s in seeds for _ in names], "score": [key for _ in seeds for key in names],
         "auroc": [aurocs[key][i] for i in range(len(runs)) for key in names],
         f"flipped_in_top_{k}": [found[key][i] for i in range(len(runs)) for key in names]},
    )  # fmt: skip
    print(f"\nwrote {prefix}_top_curvature.png, _roc.png, _scores.csv, _seeds.csv")
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return {key: float(np.mean(v)) for key, v in aurocs.items()}


if __name__ == "__main__":
    main()
