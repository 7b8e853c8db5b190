"""Validate curvature against memorization scores estimated from hundreds of networks.

Feldman & Zhang (2020) define the memorization of a training image i as

    mem(i) = P[a network predicts i's label | i in its training set]
           - P[a network predicts i's label | i not in its training set],

estimated from many networks, each trained on a random subset of the data. The paper validates
curvature by its cosine similarity with such scores. Here, on a data set small enough for it:

  - K networks (--models, default 256), each trained on its own random 70% (--fraction) of the
    images with the same MLP and recipe as the other examples, give mem(i);
  - one network trained on all the images, scored by CurvatureTracker after every epoch, gives
    the epoch-averaged curvature (as the paper), the last epoch's, and the final and mean loss;
  - the example reports each score's cosine similarity and Spearman correlation with mem, and
    its AUROC for the images with mem >= 0.5 (those the networks memorized).

The K networks are trained as one batched model: K MLPs with stacked weights (K, in, out),
applied with torch.baddbmm, each on batches drawn from its own subset only (--chunk networks at
a time). Each is trained as it would be alone (Adam is elementwise), up to rounding, in less
time per network than one after another: the run prints both. Their inclusion masks and
per-image correctness are cached under --out, keyed by the settings: an interrupted run
resumes, a rerun takes seconds.

Writes, under --out (default outputs/memorization_validation), files named after the data set:
  <dataset>_scatter.png        mem against each score
  <dataset>_top_memorized.png  the most memorized images, with their curvature percentile
  <dataset>_scores.csv         every image's mem, in/out counts and scores (first seed)
  <dataset>_seeds.csv          every seed's agreement of every score with mem
  <dataset>_fz_<key>.npz       the cache of the K networks' results

    python3 examples/memorization_validation.py --seeds 5
    python3 examples/memorization_validation.py --seeds 5 --flip 0.1 --out outputs/memorization_flip

mem is estimated once (with --seed); --seeds repeats the tracked network only. Digits is the
data set where hundreds of networks are affordable on a CPU: minutes on 2 cores, seconds from
the cache (docs/results.md, "Results on real data", gives the measured times and tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time

import numpy as np
import torch
from data import add_data_arguments, flip_labels, load_or_exit
from models import (
    BatchedMLP,
    Recipe,
    adam,
    add_training_arguments,
    describe,
    mlp,
    recipe_for,
    train,
    train_and_track,
)
from plots import markdown_table, mean_sd, pyplot, save_image_grid, write_csv
from scores import compared, percentile_ranks

from curvkern.io import atomic_write
from curvkern.metrics import auroc, cosine_similarity, spearman, topk

QUICK = {"subset": 300, "epochs": 10}  # --quick, for the tests (explicit flags still win)
QUICK_MODELS = 16
MEMORIZED = 0.5  # mem at which the table counts an image as memorized
CACHE_FORMAT = 1  # part of the cache key: bump it when the networks' training changes


def network_seed(seed: int, k: int) -> int:
    """The seed of network k: its subset, initial weights and batch order depend on it only."""
    return 1_000_003 * (seed + 1) + k


def train_on_subsets(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, size: int, recipe: Recipe,
    seeds: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Trains one MLP per seed on its own random ``size`` of the images, all at once.

    Every network trains as models.train would train it alone, up to rounding: Adam,
    mini-batches of recipe.batch_size in a random order per epoch (the last one shorter), the
    recipe's learning rate schedule; the loss summed over networks gives each its own batch-mean
    gradient, and Adam's update is elementwise.

    Args:
        x: (N, ...) images; y: (N,) labels.
        num_classes: C.
        size: images per network.
        recipe: the training recipe.
        seeds: one per network (K in all).
    Returns:
        masks (K, N) bool, which images each network trained on, and correct (K, N) bool,
        whether each network predicts each image's label after training.
    """
    flat = x.flatten(1)  # (N, D)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    members = torch.stack([torch.randperm(len(x), generator=g)[:size] for g in generators])
    model = BatchedMLP(flat.shape[1], num_classes, recipe.hidden, generators)
    # The fused kernel updates the stacked weights in one pass; measured on 2 cores, the default
    # (foreach) took about twice as long per network, in temporary buffers the size of a stack.
    optimizer, schedule = adam(model, recipe, size, fused=True)
    for _ in range(recipe.epochs):
        order = torch.stack([torch.randperm(size, generator=g) for g in generators])
        batches = members.gather(1, order)  # (K, size): each network's epoch order
        model.train_epoch(optimizer, flat, y, batches, recipe.batch_size, schedule)
    masks = torch.zeros(len(seeds), len(x), dtype=torch.bool)
    masks.scatter_(1, members, True)
    with torch.no_grad():
        logits = torch.cat([model(part.expand(len(seeds), -1, -1)) for part in flat.split(512)], 1)
    return masks, logits.argmax(2) == y  # (K, N) each


@dataclasses.dataclass
class SubsetRuns:
    """The K networks' results: masks (K, N) (trained on) and correct (K, N) (predicted right)."""

    masks: np.ndarray
    correct: np.ndarray

    def memorization(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """mem (N,) = P[correct | in] - P[correct | out], and the in and out counts (N,)."""
        n_in, n_out = self.masks.sum(0), (~self.masks).sum(0)
        hit_in = (self.correct & self.masks).sum(0)
        hit_out = (self.correct & ~self.masks).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN where never in (or out)
            return hit_in / n_in - hit_out / n_out, n_in, n_out


def subset_runs(
    path: str, settings: dict, x: torch.Tensor, y: torch.Tensor, num_classes: int,
    recipe: Recipe, models: int, size: int, chunk: int, seed: int,
) -> SubsetRuns:  # fmt: skip
    """The K = ``models`` networks' results, from the cache at ``path`` where it has them.

    Trains the missing networks ``chunk`` at a time, saving the cache after every chunk
    (written to a temporary file, then renamed) so that an interrupted run resumes.
    """
    runs = SubsetRuns(np.zeros((0, len(x)), bool), np.zeros((0, len(x)), bool))
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as cache:
            if json.loads(cache["settings"].tobytes()) == settings:
                runs = SubsetRuns(cache["masks"], cache["correct"])
    done = len(runs.masks)
    if done >= models:
        print(f"memorization: the {models} networks' results are cached in {path}")
        return SubsetRuns(runs.masks[:models], runs.correct[:models])
    start = time.perf_counter()
    for first in range(done, models, chunk):
        seeds = [network_seed(seed, k) for k in range(first, min(first + chunk, models))]
        masks, correct = train_on_subsets(x, y, num_classes, size, recipe, seeds)
        runs = SubsetRuns(
            np.concatenate([runs.masks, masks.numpy()]),
            np.concatenate([runs.correct, correct.numpy()]),
        )
        _save_atomically(path, runs, settings)
        print(f"  {len(runs.masks)} of {models} networks trained", flush=True)
    seconds = time.perf_counter() - start
    print(
        f"memorization: trained {models - done} networks in {seconds:.0f} s "
        f"({seconds / (models - done):.2f} s each, {chunk} at a time; one alone with "
        f"models.train: {_one_network_seconds(x, y, num_classes, size, recipe):.2f} "
        f"s); cached in {path}"
    )
    return runs


def _one_network_seconds(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, size: int, recipe: Recipe
) -> float:
    """Seconds to train one network of the same recipe alone, for comparison."""
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:size]
    model = mlp(x[0].numel(), num_classes, recipe.hidden)
    start = time.perf_counter()
    train(model, x[index], y[index], recipe, seed=0)
    return time.perf_counter() - start


def _save_atomically(path: str, runs: SubsetRuns, settings: dict) -> None:
    with atomic_write(path) as f:
        np.savez_compressed(
            f, masks=runs.masks, correct=runs.correct,
            settings=np.frombuffer(json.dumps(settings).encode(), dtype=np.uint8),
        )  # fmt: skip


def cache_path(folder: str, settings: dict) -> str:
    """<folder>/<dataset>_fz_<first 12 hex digits of the settings' SHA-256>.npz"""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(folder, f"{settings['dataset']}_fz_{key}.npz")


def plot_scatter(
    path: str, mem: np.ndarray, scores: dict[str, np.ndarray], stats: dict, title: str
) -> None:
    """mem against each score (log scale), with the cosine similarity and Spearman in titles."""
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(scores), figsize=(2.9 * len(scores), 3.1), sharey=True, layout="constrained"
    )
    for ax, (name, values) in zip(axes, scores.items(), strict=True):
        ax.scatter(values, mem, s=4, alpha=0.4, lw=0)
        ax.set_xscale("log")
        cos, rho = stats[name]
        ax.set_title(f"{name}\ncosine {cos:.2f}, Spearman {rho:.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("memorization mem(i)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", type=int,
        help=f"networks on random subsets for mem (default: 256, {QUICK_MODELS} with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--fraction", type=float, default=0.7,
        help="fraction of the images each of them trains on (default: 0.7)",
    )  # fmt: skip
    parser.add_argument(
        "--chunk", type=int, default=32,
        help="networks trained at once as one batched model (default: 32; the results do not "
        "depend on it)",
    )  # fmt: skip
    parser.add_argument(
        "--flip", type=float, default=0.0,
        help="fraction of labels flipped, with --seed (default: 0, clean labels as in the paper)",
    )  # fmt: skip
    parser.add_argument(
        "--out", default="outputs/memorization_validation",
        help="output folder, and the cache's (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help=f"a seconds-long run for tests: {QUICK['subset']} images, {QUICK['epochs']} epochs, "
        f"{QUICK_MODELS} networks",
    )  # fmt: skip
    add_data_arguments(parser)
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    args.recipe = recipe_for(parser, args, **(QUICK if args.quick else {}))
    if args.models is None:
        args.models = QUICK_MODELS if args.quick else 256
    if args.models < 2 or args.chunk < 1 or not 0 < args.fraction < 1 or not 0 <= args.flip < 1:
        parser.error(
            "--models must be at least 2, --chunk at least 1, --fraction in (0, 1), --flip in "
            "[0, 1)"
        )
    return parser, args


def tracked_run(x: torch.Tensor, labels: torch.Tensor, num_classes: int, args, seed: int):
    """One network trained on all the images with the curvature tracked: the scores of
    scores.compared (values, ranking, names)."""
    recipe = args.recipe
    start = time.perf_counter()
    tracker = train_and_track(x, labels, num_classes, recipe, seed, args.track_every,
                              n_probes=args.probes)  # fmt: skip
    # The trained model: the loop scores the last epoch.
    accuracy = tracker.field_history("correct")[-1].mean()
    print(
        f"seed {seed}: one network on all {len(x)} images, train accuracy {accuracy:.1%}, "
        f"{len(tracker.epochs)} epochs scored ({time.perf_counter() - start:.0f} s)"
    )
    return compared(tracker)


def agreement(mem: np.ndarray, values: np.ndarray) -> tuple[float, float, float]:
    """(cosine similarity, Spearman, AUROC for mem >= MEMORIZED) of a score with mem, over the
    images some network held out (mem is NaN for the others). The cosine similarity is NaN for
    a score with negative or infinite values (it compares magnitudes)."""
    held_out = np.isfinite(mem)
    mem, values = mem[held_out], values[held_out]
    usable = np.isfinite(values).all() and (values >= 0).all()
    cosine = cosine_similarity(mem, values) if usable else float("nan")
    return cosine, spearman(mem, values), auroc(values, mem >= MEMORIZED)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    """Runs the example; returns (cosine similarity, Spearman) with mem, means over seeds, by
    CSV column name."""
    parser, args = parse_args(argv)
    recipe = args.recipe
    start = time.perf_counter()
    data = load_or_exit(parser, args).subset(recipe.subset, args.seed)
    labels, flipped = flip_labels(data.y, args.flip, data.num_classes, seed=args.seed)
    size = round(args.fraction * len(data))
    seeds = range(args.seed, args.seed + args.seeds)
    print(
        f"{data.name}: {len(data)} images ({int(flipped.sum())} labels flipped); "
        f"{describe(recipe, data.x[0].numel(), data.num_classes)}; mem from {args.models} "
        f"networks on random {size}-image subsets; tracked networks with seeds {seeds.start}.."
        f"{seeds.stop - 1}"
    )

    os.makedirs(args.out, exist_ok=True)
    # What the networks' results depend on; not their number: more networks extend the cache.
    settings = {
        "format": CACHE_FORMAT, "dataset": data.name, "images": len(data), "flip": args.flip,
        "seed": args.seed, "size": size, **dataclasses.asdict(recipe),
    }  # fmt: skip
    runs = subset_runs(
        cache_path(args.out, settings), settings, data.x, labels, data.num_classes, recipe,
        args.models, size, args.chunk, args.seed,
    )  # fmt: skip
    mem, n_in, n_out = runs.memorization()
    print(
        f"each image was held out by {n_out.min()} to {n_out.max()} networks (mean "
        f"{n_out.mean():.0f}); accuracy on their own training images "
        f"{runs.correct[runs.masks].mean():.1%}, on the held-out ones "
        f"{runs.correct[~runs.masks].mean():.1%}; mean mem {np.nanmean(mem):.3f}"
    )

    tracked = [tracked_run(data.x, labels, data.num_classes, args, seed) for seed in seeds]
    values, ranking, names = tracked[0]
    stats = {key: np.array([agreement(mem, r[1][key]) for r in tracked]) for key in names}
    memorized = int((mem[np.isfinite(mem)] >= MEMORIZED).sum())
    spread = f"mean ± sd over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {args.seed}"
    print(
        f"\nAgreement with memorization scores mem(i) from {args.models} networks "
        f"(the tracked network's {spread}):\n"
    )
    header = (
        "score", "cosine similarity", "Spearman",
        f"AUROC for the {memorized} images with mem >= {MEMORIZED}",
    )  # fmt: skip
    rows = [
        (names[key], *(mean_sd(s[:, j]) if np.isfinite(s[:, j]).all() else "—" for j in range(3)))
        for key, s in stats.items()
    ]
    print(markdown_table(header, rows))

    prefix = os.path.join(args.out, data.name)
    write_csv(
        f"{prefix}_scores.csv",
        {
            "id": np.arange(len(data)), "dataset_index": data.index, "label": labels.numpy(),
            "flipped": flipped.numpy().astype(int), "mem": mem, "networks_in": n_in,
            "networks_out": n_out, **values,
        },
    )  # fmt: skip
    keys = [(i, key) for i in range(len(seeds)) for key in names]
    write_csv(
        f"{prefix}_seeds.csv",
        {"seed": [seeds[i] for i, _ in keys], "score": [key for _, key in keys],
         **{field: [stats[key][i, j] for i, key in keys]
            for j, field in enumerate(("cosine", "spearman", "auroc_memorized"))}},
    )  # fmt: skip
    shown = ("curvature_mean", "curvature_last", "loss_final", "loss_mean")
    plot_scatter(
        f"{prefix}_scatter.png",
        mem,
        {names[key]: values[key] for key in shown},
        {names[key]: stats[key][0, :2] for key in shown},
        f"{data.name}: memorization from {args.models} networks against one network's scores "
        f"(first seed)",
    )
    curvature_pct = percentile_ranks(values["curvature_mean"])
    top = topk(mem, min(32, int(np.isfinite(mem).sum()))).indices.numpy()  # NaN: never out
    save_image_grid(
        f"{prefix}_top_memorized.png",
        [data.raw[i] for i in top],
        [
            f"mem {mem[i]:.2f}, label {data.classes[labels[i]]}\ncurv. pct {curvature_pct[i]:.0f}"
            for i in top
        ],
        flipped.numpy()[top],
        f"{data.name}: the {len(top)} most memorized images (mem from {args.models} networks) "
        f"and the percentile of their epoch-averaged curvature (first seed)"
        + ("; red: flipped label" if args.flip else ""),
    )
    print(f"\nwrote {prefix}_scatter.png, _top_memorized.png, _scores.csv, _seeds.csv")
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return {key: (float(s[:, 0].mean()), float(s[:, 1].mean())) for key, s in stats.items()}


if __name__ == "__main__":
    main()
