"""Membership inference with shadow models: does input-loss curvature beat LiRA?

"Curvature Clues" (Ravikumar, Soufleri & Roy, NeurIPS 2024) attacks a model's privacy with the
curvature of its loss around a sample, estimated from loss values only (zeroth order), and
calibrates it per sample with shadow models as LiRA does (Carlini et al., S&P 2022). On
CIFAR-100 it reports AUROC 93.5 (its NLL variant) against 88.9 for LiRA, and a TPR at 0.1% FPR
of 23.4% (its LR variant) against 15.8%. This example runs the same comparison on data that
ships offline:

  - K = M shadow + T target networks (MLPs), each trained on its own random half of the
    images, all at once as one batched model (stacked weights, torch.baddbmm, fused Adam;
    as examples/memorization_validation.py);
  - for every network and image, three signals from curvkern.privacy: the zeroth-order
    curvature (curvature_signal: CurvatureScorer(method="zo"), forward passes only, the
    paper's log(h * curvature + 1e-22)), LiRA's logit-scaled confidence and the loss;
  - the attacks, each on every target network with the M shadow networks: curvature LR
    (likelihood_ratio: online, with a fixed variance, offline), curvature NLL (nll_ratio, the
    paper's variant), LiRA (the same three forms, logit confidence), and global thresholds on
    the curvature and on the loss (Yeom et al.), which need no shadow networks;
  - per attack, AUROC, balanced accuracy and TPR at 1% and 0.1% FPR (curvkern.metrics,
    step convention), mean and standard deviation over the T targets, plus the TPR at 0.1%
    FPR of all targets' scores pooled (LiRA's plot.py pools its test models the same way),
    and a log-log ROC picture of the pooled scores.

Scoring runs in float64. In float32, the four-point loss differences of the zeroth-order
estimator (about 4 h^2 = 4e-6 times the curvature, with the paper's h = 1e-3) drown in the
rounding of the losses: measured on one digits network of this recipe, the float32 curvature
of the same samples with the same probes differed from the float64 one by 100% (median over
the images, members and non-members alike) and by a factor of 80 to 100 at the 90th
percentile.

    python3 examples/membership_inference.py                  # digits, 32 + 8 networks
    python3 examples/membership_inference.py --dataset fashion-mnist   # 1,000 images, 16 + 8

Writes <out>/<dataset>_roc.png (log-log ROC, targets pooled), <out>/<dataset>_results.md (the
table) and <out>/<dataset>_signals_<key>.npz (every network's signals and training sets, keyed
by the settings: a rerun with the same settings skips training and scoring); default out:
outputs/membership_inference. On 2 CPU cores the runs take about 3 minutes of CPU time each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
from data import read_idx
from models import BatchedMLP
from torch import nn

from curvkern import privacy
from curvkern.metrics import auroc, balanced_accuracy, tpr_at_fpr

FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
QUICK = {"shadow": 8, "targets": 2, "subset": 300, "epochs": 15, "probes": 2}
DEFAULTS = {
    "digits": {
        "subset": None,
        "shadow": 32,
        "targets": 8,
        "hidden": 256,
        "epochs": 40,
        "lr": 3e-3,
        "batch": 128,
    },
    "fashion-mnist": {
        "subset": 1000,
        "shadow": 16,
        "targets": 8,  # mean ± sd over at least 5 independent targets
        "hidden": 256,
        "epochs": 40,
        "lr": 1e-3,
        "batch": 128,
    },
}
FPRS = (0.01, 0.001)
CACHE_FORMAT = 1  # part of the signal cache's key: bump it when training or scoring changes


# ----------------------------------------------------------------------------------------------
# Data


def load(name: str, subset: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float64 standardized images and (N,) labels, N even; a random ``subset``."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels = digits.data, digits.target
    else:
        path = os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")
        if not os.path.isfile(path):
            raise SystemExit(
                f"Fashion-MNIST is not installed ({path} is missing): "
                f"`sudo apt-get install dataset-fashion-mnist`, or use --dataset digits"
            )
        images = read_idx(path).reshape(-1, 784)
        labels = read_idx(os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz"))
    x = torch.from_numpy(images.astype(np.float64))
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(labels.astype(np.int64))
    size = len(x) if subset is None else min(subset, len(x))
    size -= size % 2  # even: complementary halves of equal size (digits: 1,796 of 1,797)
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
    return x[index], y[index]


# ----------------------------------------------------------------------------------------------
# K networks trained at once


def halves(n: int, shadow: int, targets: int, seed: int) -> torch.Tensor:
    """keep (shadow + targets, n) bool: which images each network trains on, n/2 each.

    The shadow networks come in complementary pairs (one trains on a random half, the next on
    the other half), so every image is in exactly shadow/2 shadow networks and out of as many:
    every per-image Gaussian gets the same number of in and out scores (LiRA's train.py
    balances its inclusion matrix the same way). Targets take independent random halves.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(shadow // 2):
        half = torch.zeros(n, dtype=torch.bool)
        half[torch.randperm(n, generator=gen)[: n // 2]] = True
        rows += [half, ~half]
    for _ in range(targets):
        half = torch.zeros(n, dtype=torch.bool)
        half[torch.randperm(n, generator=gen)[: n // 2]] = True
        rows.append(half)
    return torch.stack(rows)


def train_networks(
    x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, hidden: int, epochs: int, lr: float,
    batch: int, seed: int,
) -> list[nn.Module]:  # fmt: skip
    """K networks, network k trained with Adam on the images where keep[k] (n/2 each).

    Returns:
        the K networks, each a float64 nn.Module.
    """
    k = keep.shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    members = torch.stack([row.nonzero().flatten() for row in keep])  # (K, n/2)
    size = members.shape[1]
    model = BatchedMLP(x.shape[1], int(y.max()) + 1, hidden, [gen] * k)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    flat = x.float()
    for _ in range(epochs):
        order = torch.stack([torch.randperm(size, generator=gen) for _ in range(k)])
        model.train_epoch(optimizer, flat, y, members.gather(1, order), batch)
    return [model.network(i).double() for i in range(k)]


# ----------------------------------------------------------------------------------------------
# Attacks and their evaluation


def attacks(signals: dict[str, torch.Tensor], keep: torch.Tensor, m: int, t: int) -> dict:
    """The attacks' (N,) scores on target network m + t, higher = member."""
    shadow_keep = keep[:m]
    curv, conf, loss = signals["curvature"], signals["confidence"], signals["loss"]
    target = m + t
    return {
        "curvature LR (online)": privacy.likelihood_ratio(curv[:m], shadow_keep, curv[target]),
        "curvature NLL (Curvature Clues)": privacy.nll_ratio(curv[:m], shadow_keep, curv[target]),
        "curvature, offline (one-sided)": privacy.likelihood_ratio(
            curv[:m], shadow_keep, curv[target], online=False, alternative="less"
        ),
        "curvature LR (online, fixed variance)": privacy.likelihood_ratio(
            curv[:m], shadow_keep, curv[target], fix_variance=True
        ),
        "LiRA (online, logit confidence)": privacy.likelihood_ratio(
            conf[:m], shadow_keep, conf[target]
        ),
        "LiRA (online, fixed variance)": privacy.likelihood_ratio(
            conf[:m], shadow_keep, conf[target], fix_variance=True
        ),
        "LiRA, offline (one-sided)": privacy.likelihood_ratio(
            conf[:m], shadow_keep, conf[target], online=False
        ),
        "curvature threshold (no shadow models)": -curv[target],
        "loss threshold (Yeom et al.)": -loss[target],
    }


def evaluate(scores: torch.Tensor, members: torch.Tensor) -> dict[str, float]:
    row = {"AUROC": auroc(scores, members), "balanced accuracy": balanced_accuracy(scores, members)}
    for fpr in FPRS:
        row[f"TPR at {fpr:.1%} FPR"] = tpr_at_fpr(scores, members, fpr)
    return row


def table(results: dict, pooled: dict) -> str:
    """The markdown table: mean ± std over targets (percent), and the pooled TPR at 0.1%."""
    columns = list(next(iter(results.values()))[0])
    header = ["attack", *columns, f"TPR at 0.1% FPR, {len(next(iter(results.values())))} pooled"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, rows in results.items():
        cells = [name]
        for c in columns:
            values = np.array([r[c] for r in rows])
            cells.append(f"{100 * values.mean():.1f} ± {100 * values.std():.1f}")
        cells.append(f"{100 * pooled[name]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_roc(path: str, pooled_scores: dict, members: torch.Tensor, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from curvkern.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.2, 4.4), layout="constrained")
    for name, scores in pooled_scores.items():
        curve = roc_curve(scores, members)
        style = "-" if "curvature" in name else "--"
        ax.plot(curve.fpr.numpy(), curve.tpr.numpy(), style, lw=1.2, label=name)
    negatives = int((~members).sum())
    ax.plot([1e-5, 1], [1e-5, 1], ":", color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1 / negatives / 2, 1)
    ax.set_ylim(1e-3, 1)
    ax.set_xlabel(f"false positive rate ({negatives} non-members pooled)")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


SIGNALS = ("curvature", "confidence", "loss")


def train_and_score(
    x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Trains the shadow and target networks; returns keep (K, N) and their (K, N) signals."""
    m, t = args.shadow, args.targets
    start = time.perf_counter()
    keep = halves(len(x), m, t, args.seed)
    networks = train_networks(x, y, keep, args.hidden, args.epochs, args.lr, args.batch, args.seed)
    trained = time.perf_counter()
    with torch.no_grad():
        correct = torch.stack([net(x).argmax(1) == y for net in networks])
    print(
        f"trained in {trained - start:.0f} s; accuracy on their own halves "
        f"{correct[keep].float().mean():.1%}, on the other halves "
        f"{correct[~keep].float().mean():.1%}"
    )
    # Every network scores every image; the curvature probes depend on (seed, image id) only,
    # so all networks are measured along the same directions.
    ids = torch.arange(len(x))
    signals = {
        "curvature": privacy.shadow_signals(
            networks,
            x,
            y,
            privacy.curvature_signal,
            ids=ids,
            h=args.h,
            n_probes=args.probes,
            seed=args.seed,
        ),  # fmt: skip
        "confidence": privacy.shadow_signals(networks, x, y, privacy.confidence_signal),
        "loss": privacy.shadow_signals(networks, x, y, privacy.loss_signal),
    }
    inside = signals["curvature"][keep].exp().median() / args.h
    outside = signals["curvature"][~keep].exp().median() / args.h
    print(
        f"signals of {m + t} networks x {len(x)} images in {time.perf_counter() - trained:.0f} s "
        f"(zo curvature, {args.probes} probe pairs, h = {args.h:g}: median {inside:.3g} on "
        f"members, {outside:.3g} on non-members)"
    )
    return keep, signals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=tuple(DEFAULTS), default="digits")
    parser.add_argument("--shadow", type=int, help="shadow networks M (digits 32, fashion 16)")
    parser.add_argument("--targets", type=int, help="target networks T (digits 8, fashion 8)")
    parser.add_argument("--subset", type=int, help="images used (digits: all 1,797; "
                        "fashion-mnist: 1,000 of its 60,000 training images)")  # fmt: skip
    parser.add_argument("--epochs", type=int, help="training epochs (default 40)")
    parser.add_argument("--probes", type=int, default=10, help="zo probe pairs (the paper: 10)")
    parser.add_argument("--h", type=float, default=1e-3, help="zo step (the paper: 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/membership_inference")
    parser.add_argument(
        "--quick", action="store_true",
        help="seconds, for tests: 8 + 2 networks, 300 images, 15 epochs, 2 probe pairs",
    )  # fmt: skip
    args = parser.parse_args(argv)
    defaults = dict(DEFAULTS[args.dataset])
    if args.quick:
        defaults.update(QUICK)
        args.probes = QUICK["probes"]
    for name in ("subset", "shadow", "targets", "epochs"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    args.hidden, args.lr, args.batch = defaults["hidden"], defaults["lr"], defaults["batch"]
    if args.shadow < 4 or args.shadow % 2 or args.targets < 1 or args.probes < 1 or args.h <= 0:
        parser.error(
            "--shadow must be even and at least 4, --targets and --probes at least 1, --h > 0"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Runs the example; returns each attack's metrics, averaged over the targets."""
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    x, y = load(args.dataset, args.subset, args.seed)
    m, t = args.shadow, args.targets
    print(
        f"{args.dataset}: {len(x)} images; {m} shadow + {t} target MLPs "
        f"{x.shape[1]}-{args.hidden}-{args.hidden}-{int(y.max()) + 1}, each on half of them "
        f"({len(x) // 2}; shadow networks in complementary pairs), {args.epochs} epochs of Adam"
    )
    settings = {"format": CACHE_FORMAT} | {
        key: getattr(args, key)
        for key in ("dataset", "subset", "shadow", "targets", "epochs", "hidden", "lr", "batch",
                    "probes", "h", "seed")
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    cache = os.path.join(args.out, f"{args.dataset}_signals_{key}.npz")
    if os.path.exists(cache):
        with np.load(cache) as saved:
            keep = torch.from_numpy(saved["keep"])
            signals = {name: torch.from_numpy(saved[name]) for name in SIGNALS}
        print(f"signals of the {m + t} networks from the cache {cache}")
    else:
        keep, signals = train_and_score(x, y, args)
        os.makedirs(args.out, exist_ok=True)
        np.savez(cache, keep=keep.numpy(), **{k: v.numpy() for k, v in signals.items()})

    results, pooled_scores, pooled_members = {}, {}, []
    for target in range(t):
        members = keep[m + target]
        pooled_members.append(members)
        for name, scores in attacks(signals, keep, m, target).items():
            results.setdefault(name, []).append(evaluate(scores, members))
            pooled_scores.setdefault(name, []).append(scores)
    pooled_scores = {name: torch.cat(s) for name, s in pooled_scores.items()}
    pooled_members = torch.cat(pooled_members)
    pooled = {name: tpr_at_fpr(s, pooled_members, 0.001) for name, s in pooled_scores.items()}
    negatives = int((~keep[m]).sum())
    text = table(results, pooled)
    note = (
        f"Mean ± standard deviation over {t} target networks, in percent; each target has "
        f"{negatives} non-members, so 0.1% FPR allows {math.floor(0.001 * negatives)} false "
        f"positives and 1% allows {math.floor(0.01 * negatives)}. Pooled: the {t} targets' "
        f"scores together ({int((~pooled_members).sum())} non-members, "
        f"{math.floor(0.001 * int((~pooled_members).sum()))} false positives allowed at 0.1%)."
    )
    print(f"\n{text}\n\n{note}")

    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, args.dataset)
    plot_roc(
        f"{prefix}_roc.png", pooled_scores, pooled_members,
        f"{args.dataset}: membership inference on {t} target MLPs, {m} shadow MLPs",
    )  # fmt: skip
    with open(f"{prefix}_results.md", "w") as f:
        f.write(f"{text}\n\n{note}\n")
    print(f"\nwrote {prefix}_roc.png, {prefix}_results.md")
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return {
        name: {c: float(np.mean([r[c] for r in rows])) for c in rows[0]}
        for name, rows in results.items()
    }


if __name__ == "__main__":
    main()
