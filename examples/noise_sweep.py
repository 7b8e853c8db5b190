"""How the label-noise rate changes which score finds the flipped labels best.

Runs find_mislabeled.py's experiment on scikit-learn's digits at several flip rates (--rates,
default 5%, 10%, 20%, 30%, 40%) and seeds (--seeds, default 5): the same MLP and recipe, the
curvature tracked after every epoch, its training-dynamics baselines, and cleanlab (when
installed) on 5-fold out-of-sample probabilities. Reports the AUROC of the epoch-averaged
curvature, the epoch-averaged loss and cleanlab per rate (mean ± sd over seeds), and draws them.

Writes, under --out (default outputs/noise_sweep):
  digits_noise_sweep.png  AUROC against the flip rate, one line per score, bars: ± sd
  digits_noise_sweep.csv  every rate's and seed's AUROC of every score

    python3 examples/noise_sweep.py    # 25 runs of find_mislabeled.py's digits experiment
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import find_mislabeled
import numpy as np
import torch
from data import load_digits
from plots import markdown_table, mean_sd, pyplot, write_csv

from curvkern.metrics import auroc

SHOWN = {
    "loss_mean": "loss, mean over epochs",
    "curvature_mean": "curvature, mean over epochs",
    "cleanlab_label_quality": "cleanlab label quality (5-fold)",
}


def plot(path: str, rates: list[float], aurocs: dict[str, np.ndarray], seeds: int) -> None:
    """AUROC (mean, ± sd over seeds) against the flip rate, one line per score."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 3.8), layout="constrained")
    for key, values in aurocs.items():  # values (rates, seeds)
        ax.errorbar(
            [100 * r for r in rates], values.mean(1), yerr=values.std(1, ddof=1) if seeds > 1
            else None, marker="o", ms=4, lw=1.5, capsize=3, label=SHOWN[key],
        )  # fmt: skip
    ax.set_xlabel("labels flipped (%)")
    ax.set_ylabel("AUROC for the flipped labels")
    ax.set_title(f"digits: finding flipped labels (mean ± sd over {seeds} seeds)", fontsize=9)
    ax.set_xticks([100 * r for r in rates])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def one_run(task: tuple[float, int, list[str]]) -> tuple[float, int, dict[str, float]]:
    """find_mislabeled.py's digits experiment at flip rate ``rate`` with seed ``seed`` and its
    flags ``flags``, in one thread: (rate, seed, the AUROC of every score by CSV column name)."""
    rate, seed, flags = task
    torch.set_num_threads(1)
    _, args = find_mislabeled.parse_args(["--flip", str(rate), *flags])
    run = find_mislabeled.run(load_digits(), args, seed)
    return rate, seed, {key: auroc(v, run["flipped"]) for key, v in run["ranking"].items()}


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Runs the sweep; returns each shown score's mean AUROC per rate, by CSV column name."""
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4],
        help="fractions of labels flipped (default: 0.05 0.1 0.2 0.3 0.4)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=5, help="seeds per rate (default: 5)")
    parser.add_argument(
        "--track-every", type=int, default=1, metavar="K",
        help="score every K-th epoch (and the last), as find_mislabeled.py (default: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="runs at once, one thread each (default: 1; the numbers do not depend on it)",
    )  # fmt: skip
    parser.add_argument("--out", default="outputs/noise_sweep", help="(default: %(default)s)")
    parser.add_argument(
        "--quick", action="store_true",
        help="a seconds-long run for tests: find_mislabeled.py's --quick, 2 folds",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if (
        args.seeds < 1
        or args.jobs < 1
        or args.track_every < 1
        or not all(0 < r < 1 for r in args.rates)
    ):
        parser.error("--seeds, --jobs and --track-every must be positive, --rates in (0, 1)")
    start = time.perf_counter()
    flags = ["--track-every", str(args.track_every), *(["--quick"] if args.quick else [])]
    tasks = [(rate, seed, flags) for rate in args.rates for seed in range(args.seeds)]
    if args.jobs > 1:  # spawned workers: a forked torch may hang in its inherited thread pool
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(one_run, tasks, chunksize=1)
    else:
        results = list(map(one_run, tasks))
    aurocs = {key: np.zeros((len(args.rates), args.seeds)) for key in SHOWN}
    table = {"rate": [], "seed": [], "score": [], "auroc": []}
    for rate, seed, values in results:
        for key, value in values.items():
            table["rate"].append(rate), table["seed"].append(seed)
            table["score"].append(key), table["auroc"].append(value)
            if key in aurocs:
                aurocs[key][args.rates.index(rate), seed] = value
    if not aurocs["cleanlab_label_quality"].any():  # cleanlab is not installed
        del aurocs["cleanlab_label_quality"]

    spread = f"mean ± sd over {args.seeds} seeds" if args.seeds > 1 else "one seed"
    size = find_mislabeled.QUICK["subset"] if args.quick else len(load_digits())
    print(f"\nAUROC for the flipped labels among {size} digits ({spread}):\n")
    gap = aurocs["loss_mean"] - aurocs["curvature_mean"]
    rows = [
        (f"{rate:.0%}", *(mean_sd(aurocs[key][i]) for key in aurocs), mean_sd(gap[i]))
        for i, rate in enumerate(args.rates)
    ]
    header = ("flipped", *(SHOWN[key] for key in aurocs), "loss mean - curvature mean")
    print(markdown_table(header, rows))
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "digits_noise_sweep")
    plot(f"{prefix}.png", args.rates, aurocs, args.seeds)
    write_csv(f"{prefix}.csv", table)
    print(f"\nwrote {prefix}.png and {prefix}.csv\ntotal time: {time.perf_counter() - start:.0f} s")
    return {key: values.mean(1).tolist() for key, values in aurocs.items()}


if __name__ == "__main__":
    main()
