"""Accuracy of the fast mode on the CPU: hvp in bf16 (and tf32) against fp32 fd and fp32 hvp.

    python3 -m benchmarks.precision_accuracy [--quick] [--samples N] [--json FILE]
    python3 -m benchmarks.precision_accuracy --kinks [--quick]

Trains small classifiers (a CNN on scikit-learn's digits; a CNN on Fashion-MNIST where Debian's
dataset-fashion-mnist is installed; torchvision's ResNet-18 on the digits upsampled to 3x32x32),
then scores the same samples, with the same probes, with ``method="fd"`` in fp32,
``method="hvp"`` in fp32, tf32 and bf16. On the CPU "tf32" is IEEE float32, the same as "fp32"
(the scorer enables TF32 on CUDA only), so its row checks that and nothing more; bf16 runs
under CPU autocast, as it would under CUDA autocast (the rounding is the same format's; the
kernels and their summation order differ). Prints per model the Spearman rank correlations
of the curvature and the per-sample relative error of hvp bf16 against hvp fp32 (median and
90th percentile). Speed is not measured here (see benchmarks/gpu_check.sh).

``--kinks`` asks why fd and hvp rank the GELU network's samples alike only to Spearman 0.968:
the same digits CNN with GELU, once with max pooling (the table's) and once with average
pooling, Spearman of fp32 hvp against fd in fp32 and in float64 at h = 1e-2, 1e-3 and 1e-4. A
kink (a pooling window's maximum changing hands) makes fd's ||dg|| / h grow like 1 / h as h
shrinks, in any precision; rounding makes fp32 fd drift as h shrinks and float64 fd does not.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from curvkern import CurvatureScorer
from curvkern.metrics import spearman

# (name, method, precision) of the scorings compared.
SCORINGS = (
    ("fd fp32", "fd", "fp32"),
    ("hvp fp32", "hvp", "fp32"),
    ("hvp tf32", "hvp", "tf32"),
    ("hvp bf16", "hvp", "bf16"),
)
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32))
    x = ((x - x.mean()) / x.std()).unsqueeze(1)  # (1797, 1, 8, 8)
    return x, torch.from_numpy(d.target).long()


def _fashion(limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    import gzip
    import os

    for folder in FASHION_DIRS:
        images = os.path.join(folder, "train-images-idx3-ubyte.gz")
        labels = os.path.join(folder, "train-labels-idx1-ubyte.gz")
        if os.path.exists(images) and os.path.exists(labels):
            with gzip.open(images) as f:
                x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:limit]
            with gzip.open(labels) as f:
                y = np.frombuffer(f.read(), np.uint8, offset=8)[:limit]
            x = torch.from_numpy(x.astype(np.float32) / 255)
            return ((x - x.mean()) / x.std()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))
    return None


def _cnn(
    channels: int,
    side: int,
    act: type[nn.Module] = nn.ReLU,
    pool: type[nn.Module] = nn.MaxPool2d,
) -> nn.Module:
    """conv16-act-pool-conv32-act-flatten-fc10: (B, c, s, s) -> (B, 10)."""
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        act(),
        pool(2),
        nn.Conv2d(16, 32, 3, padding=1),
        act(),
        nn.Flatten(),
        nn.Linear(32 * (side // 2) ** 2, 10),
    )


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=10)  # as is: at 32x32 its stem leaves 8x8, its last stage 1x1


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    """Adam, batches of 64; returns the training accuracy after."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b).abs() / b.abs()).double()


def evaluate(name, model, x, y, train, samples, n_probes, epochs) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    accuracy = _train(model, x[:train], y[:train], epochs)
    trained = time.perf_counter() - start
    xs, ys = x[:samples], y[:samples]  # training samples: what memorization scores rank
    curv, seconds = {}, {}
    for label, method, precision in SCORINGS:
        scorer = CurvatureScorer(model, method=method, precision=precision, n_probes=n_probes)
        start = time.perf_counter()
        curv[label] = scorer.score(xs, ys).curvature
        seconds[label] = time.perf_counter() - start
    rel = _relative_error(curv["hvp bf16"], curv["hvp fp32"])
    return {
        "model": name,
        "train_samples": train,
        "train_accuracy": accuracy,
        "train_seconds": trained,
        "scored": samples,
        "n_probes": n_probes,
        "spearman_bf16_vs_fd_fp32": spearman(curv["hvp bf16"], curv["fd fp32"]),
        "spearman_bf16_vs_hvp_fp32": spearman(curv["hvp bf16"], curv["hvp fp32"]),
        "spearman_hvp_fp32_vs_fd_fp32": spearman(curv["hvp fp32"], curv["fd fp32"]),
        "tf32_equals_fp32_on_cpu": bool(torch.equal(curv["hvp tf32"], curv["hvp fp32"])),
        "rel_err_bf16_median": float(rel.median()),
        "rel_err_bf16_p90": float(rel.quantile(0.9)),
        "score_seconds": seconds,
    }


KINK_STEPS = (1e-2, 1e-3, 1e-4)


def kinks(quick: bool) -> list[dict]:
    """fd against hvp with and without max pooling's kinks (see the module doc): one row per
    pooling, Spearman of hvp fp32 with fd fp32 and fd float64 at each of KINK_STEPS."""
    x, y = _digits()
    train, samples, epochs = (256, 64, 2) if quick else (1797, 512, 30)
    rows = []
    for pooling, pool in (("max", nn.MaxPool2d), ("average", nn.AvgPool2d)):
        torch.manual_seed(0)
        model = _cnn(1, 8, nn.GELU, pool)
        accuracy = _train(model, x[:train], y[:train], epochs)
        xs, ys = x[:samples], y[:samples]
        hvp = CurvatureScorer(model, method="hvp", n_probes=10).score(xs, ys).curvature
        row = {"pooling": pooling, "train_accuracy": accuracy, "scored": samples}
        for h in KINK_STEPS:
            fd32 = CurvatureScorer(model, method="fd", n_probes=10, h=h).score(xs, ys).curvature
            model.double()
            fd64 = CurvatureScorer(model, method="fd", n_probes=10, h=h).score(xs.double(), ys)
            model.float()
            row[f"fp32 h={h:g}"] = spearman(hvp, fd32)
            row[f"float64 h={h:g}"] = spearman(hvp, fd64.curvature.float())
        rows.append(row)
        print(
            f"digits CNN GELU, {pooling} pooling (accuracy {accuracy:.3f}, {samples} scored): "
            "Spearman of hvp fp32 with fd "
            + ", ".join(
                f"h = {h:g}: fp32 {row[f'fp32 h={h:g}']:.4f} / "
                f"float64 {row[f'float64 h={h:g}']:.4f}"
                for h in KINK_STEPS
            ),
            flush=True,
        )
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--samples", type=int, default=None, help="samples scored per model")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument(
        "--only",
        default=None,
        metavar="TEXT",
        help="run only the models whose name contains TEXT (e.g. Fashion, ResNet)",
    )
    parser.add_argument(
        "--kinks", action="store_true", help="fd against hvp with max and average pooling"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if args.kinks:
        rows = kinks(quick)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return rows
    samples = args.samples or (32 if quick else 512)
    n_probes = 4 if quick else 10
    x, y = _digits()
    # (name, model, x, y, training samples, epochs)
    # ReLU networks: fd also sees the kinks its step crosses, which the exact Hessian (hvp) does
    # not (docs/method.md, Estimators), so fd and hvp differ there by design whatever the
    # precision. The GELU network has them too, in its max pooling (--kinks measures that).
    digits_epochs = 2 if quick else 30
    setups = [
        ("digits CNN 1x8x8, ReLU", _cnn(1, 8), x, y, 256 if quick else 1797, digits_epochs),
        (
            "digits CNN 1x8x8, GELU",
            _cnn(1, 8, nn.GELU),
            x,
            y,
            256 if quick else 1797,
            digits_epochs,
        ),
    ]
    fashion = _fashion(1000 if quick else 10000)
    if fashion is None:
        print("Fashion-MNIST: not installed (apt-get install dataset-fashion-mnist); skipped")
    else:
        fx, fy = fashion
        epochs = 1 if quick else 5
        setups.append(("Fashion-MNIST CNN 1x28x28, ReLU", _cnn(1, 28), fx, fy, len(fx), epochs))
    try:
        big = F.interpolate(x, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        resnet = _resnet18()
        setups.append(
            ("ResNet-18 3x32x32 (digits)", resnet, big.contiguous(), y, 128 if quick else 1024,
             1 if quick else 8)
        )  # fmt: skip
    except ImportError:
        print("ResNet-18: torchvision is not installed; skipped")
    if args.only is not None:
        setups = [setup for setup in setups if args.only in setup[0]]
    rows = []
    for name, model, xx, yy, train, epochs in setups:
        count = min(samples, len(xx)) if "ResNet" not in name or quick else min(samples, 256)
        rows.append(evaluate(name, model, xx, yy, train, count, n_probes, epochs))
        r = rows[-1]
        print(
            f"{name}: trained on {train} (accuracy {r['train_accuracy']:.3f}), {count} scored, "
            f"n = {n_probes}: Spearman bf16 vs fd fp32 {r['spearman_bf16_vs_fd_fp32']:.4f}, "
            f"vs hvp fp32 {r['spearman_bf16_vs_hvp_fp32']:.4f} (hvp fp32 vs fd fp32 "
            f"{r['spearman_hvp_fp32_vs_fd_fp32']:.4f}); bf16 relative error median "
            f"{r['rel_err_bf16_median']:.2e}, 90th pct {r['rel_err_bf16_p90']:.2e}; tf32 == "
            f"fp32 on the CPU: {r['tf32_equals_fp32_on_cpu']}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
