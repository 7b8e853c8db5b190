"""How many probes does a score need? Adaptive probing and the estimators, on a trained model.

Trains an MLP on scikit-learn's digits (10% of the labels flipped) until it memorizes them, then
scores every sample with

  - fixed numbers of probes (n = 5, 10, 20),
  - adaptive probing (rounds of 5 probes until curvature_stderr <= rtol * curvature, at most 200),
  - the exact Hessian-vector estimator (method="hvp") and the zeroth-order one (method="zo"),

and compares each with a reference run of 100 probes under another seed (independent probes):
Spearman rank correlation, mean probes per sample, AUROC for the flipped labels, and time.
With --seeds S the whole comparison is repeated with seeds --seed .. --seed+S-1 (the flipped
labels, the network's initial weights and batch order, and the probes) and the table gives the
mean and standard deviation over them.

    python examples/adaptive_probes.py [--epochs 60] [--seeds 5] [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from data import flip_labels, load_digits
from models import Recipe, mlp, train
from plots import markdown_table, mean_sd

from curvkern import CurvatureScorer, SampleWarning
from curvkern.metrics import auroc, spearman

# The reference's probe seed is REFERENCE_SEED + seed: probes independent of the scored runs'.
REFERENCE_SEED = 12345
SETTINGS = [(f"fd, n = {n}", dict(n_probes=n)) for n in (5, 10, 20)]
SETTINGS += [
    (f"fd, adaptive rtol = {rtol}", dict(n_probes=5, rtol=rtol, max_probes=200))
    for rtol in (0.2, 0.1, 0.05)
]
SETTINGS += [
    ("hvp, n = 10", dict(n_probes=10, method="hvp")),
    ("zo, n = 10, h = 1e-2", dict(n_probes=10, method="zo", h=1e-2)),
    ("zo, n = 10, h = 1e-3", dict(n_probes=10, method="zo", h=1e-3)),
]


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--flip", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true", help="a small run for tests")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default: 0)")
    parser.add_argument(
        "--seeds", type=int, default=1, metavar="S",
        help="runs with seeds --seed .. --seed+S-1; the table gives mean ± sd (default: 1)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    return args


def run(args: argparse.Namespace, seed: int) -> dict:
    """One seed: trains, scores every sample each way. Returns the training accuracy, the
    reference's AUROC, and per setting (mean probes, Spearman vs reference, AUROC, seconds,
    samples the zo rounding warning flagged)."""
    torch.manual_seed(seed)
    data = load_digits()
    x, y = data.x, data.y
    epochs = args.epochs
    if args.quick:
        x, y, epochs = x[:300], y[:300], 5
    noisy, flipped = flip_labels(y, args.flip, data.num_classes, seed=seed)
    recipe = Recipe(hidden=256, epochs=epochs, lr=1e-3, batch_size=64, decay=0, subset=None)
    model = train(mlp(x[0].numel(), data.num_classes), x, noisy, recipe, seed=seed)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == noisy).float().mean())

    ids = torch.arange(len(x))
    reference_probes = 20 if args.quick else 100
    reference = CurvatureScorer(model, n_probes=reference_probes, seed=REFERENCE_SEED + seed)
    reference = reference.score(x, noisy, ids)
    rows = {}
    for name, kwargs in SETTINGS:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SampleWarning)
            s = CurvatureScorer(model, seed=seed, **kwargs).score(x, noisy, ids)
        seconds = time.perf_counter() - start
        for w in caught:  # anything but the sample warnings counted below is shown
            if not isinstance(w.message, SampleWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        noisy_zo = sum(
            w.message.count for w in caught
            if isinstance(w.message, SampleWarning) and w.message.kind.startswith("zo rounding")
        )  # fmt: skip
        rows[name] = {
            "probes": float(s.n_probes.double().mean()),
            "spearman": spearman(s.curvature, reference.curvature),
            "auroc": auroc(s.curvature, flipped),
            "seconds": seconds,
            "zo_flagged": noisy_zo,
        }
    print(
        f"seed {seed}: digits, {len(x)} images, {int(flipped.sum())} flipped labels; train "
        f"accuracy on the noisy labels {accuracy:.1%}; reference AUROC "
        f"{auroc(reference.curvature, flipped):.3f}"
    )
    return {"accuracy": accuracy, "reference_probes": reference_probes, "rows": rows}


def main(argv=None) -> dict[str, dict[str, float]]:
    """Runs the example; returns per setting the means over seeds of its table's columns."""
    args = parse(argv)
    seeds = range(args.seed, args.seed + args.seeds)
    runs = [run(args, seed) for seed in seeds]
    spread = f"mean ± sd over {len(runs)} seeds" if len(runs) > 1 else f"seed {args.seed}"
    print(f"\nreference: fd, {runs[0]['reference_probes']} probes under other seeds; {spread}\n")
    header = ["scores", "probes per sample (mean)", "Spearman vs reference", "AUROC flipped",
              "time (s)", "flagged by the zo rounding warning"]  # fmt: skip
    table, means = [], {}
    for name, _ in SETTINGS:
        column = {key: [r["rows"][name][key] for r in runs] for key in runs[0]["rows"][name]}
        means[name] = {key: sum(v) / len(v) for key, v in column.items()}
        table.append([
            name, mean_sd(column["probes"], 1), mean_sd(column["spearman"]),
            mean_sd(column["auroc"]), mean_sd(column["seconds"], 2),
            mean_sd(column["zo_flagged"], 0 if len(runs) == 1 else 1) if "zo" in name else "—",
        ])  # fmt: skip
    print(markdown_table(header, table))
    return means


if __name__ == "__main__":
    main()
