"""How many probes does a score need? Adaptive probing and the estimators, on a trained model.

Trains an MLP on scikit-learn's digits (10% of the labels flipped) until it memorizes them, then
scores every sample with

  - fixed numbers of probes (n = 5, 10, 20),
  - adaptive probing (rounds of 5 probes until curvature_stderr <= rtol * curvature, at most 200),
  - the exact Hessian-vector estimator (method="hvp") and the zeroth-order one (method="zo"),

and compares each with a reference run of 100 probes under another seed (independent probes):
Spearman rank correlation, mean probes per sample, AUROC for the flipped labels, and time.

    python examples/adaptive_probes.py [--epochs 60] [--quick]
"""

import argparse
import time

import torch
from data import flip_labels, load_digits
from models import Recipe, mlp, train

from curvkern import CurvatureScorer
from curvkern.metrics import auroc, spearman


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--flip", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true", help="a small run for tests")
    args = parser.parse_args()
    torch.manual_seed(0)

    data = load_digits()
    x, y = data.x, data.y
    if args.quick:
        x, y, args.epochs = x[:300], y[:300], 5
    noisy, flipped = flip_labels(y, args.flip, data.num_classes)
    recipe = Recipe(hidden=256, epochs=args.epochs, lr=1e-3, batch_size=64, decay=0, subset=None)
    model = train(mlp(x[0].numel(), data.num_classes), x, noisy, recipe, seed=0)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == noisy).float().mean()
    print(
        f"digits, {len(x)} images, {int(flipped.sum())} flipped labels; "
        f"train accuracy on the noisy labels: {accuracy:.1%}"
    )

    ids = torch.arange(len(x))
    reference_probes = 20 if args.quick else 100
    reference = CurvatureScorer(model, n_probes=reference_probes, seed=12345).score(x, noisy, ids)

    runs = [(f"fd, n = {n}", dict(n_probes=n)) for n in (5, 10, 20)]
    runs += [
        (f"fd, adaptive rtol = {rtol}", dict(n_probes=5, rtol=rtol, max_probes=200))
        for rtol in (0.2, 0.1, 0.05)
    ]
    runs += [
        ("hvp, n = 10", dict(n_probes=10, method="hvp")),
        ("zo, n = 10, h = 1e-2", dict(n_probes=10, method="zo", h=1e-2)),
        ("zo, n = 10, h = 1e-3", dict(n_probes=10, method="zo", h=1e-3)),
    ]
    print(
        f"\nreference: fd, {reference_probes} probes, another seed; "
        f"AUROC {auroc(reference.curvature, flipped):.3f}\n"
    )
    print(
        "| scores | probes per sample (mean) | Spearman vs reference | AUROC flipped | time (s) |"
    )
    print("|---|---|---|---|---|")
    for name, kwargs in runs:
        start = time.perf_counter()
        s = CurvatureScorer(model, **kwargs).score(x, noisy, ids)
        seconds = time.perf_counter() - start
        print(
            f"| {name} | {s.n_probes.double().mean():.1f} | "
            f"{spearman(s.curvature, reference.curvature):.3f} | "
            f"{auroc(s.curvature, flipped):.3f} | {seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
