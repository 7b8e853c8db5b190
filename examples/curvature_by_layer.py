"""Where memorization shows, layer by layer: curvature at the input and after each layer.

``CurvatureScorer(model, at=layer)`` scores the curvature of each sample's loss with respect to
a layer's output (curvkern perturbs that activation inside the forward pass). This example
trains networks that memorize, scores every sample at every layer during training (one
CurvatureTracker per layer), and reports, layer by layer, how well the curvature averaged over
the scored epochs tells the memorized samples from the others (AUROC), next to the loss averaged
over the same epochs:

  - flipped labels (--flip, default 10%) in scikit-learn's digits and in a Fashion-MNIST subset,
    each with an MLP (the input, after each of its two hidden layers, the logits) and a small CNN
    (the input, after each convolution block, after its hidden layer, the logits): AUROC for
    flagging the flipped samples (high curvature first; the loss: high first);
  - canaries "the secret code is " + 10 random characters in a character-level GPT-2 (4 blocks,
    random initial weights) trained on Debian's fortunes, some inserted once, 4 or 16 times, as
    many held out: AUROC of the inserted canaries against the held-out ones (members: high
    curvature first; the loss: low first), at the token embeddings, after each transformer block
    (a tuple output: its hidden states are perturbed) and at the logits.

AUROC compares samples within one layer; the curvature's scale differs from layer to layer and
is never compared across layers. The default method is hvp (exact Hessian-vector products): the
networks here are ReLU networks at the image layers, where a finite difference that crosses a
kink measures the kink rather than the curvature (docs/guide.md, "Choosing h at a layer").

Writes, under --out (default outputs/curvature_by_layer):
  curvature_by_layer.png  AUROC against depth, one panel per setting (mean ± sd over seeds)
  seeds.csv               every seed's AUROC by setting, layer and score

    python3 examples/curvature_by_layer.py --seeds 5   # docs/results.md: the tables
    python3 examples/curvature_by_layer.py --quick     # seconds: one seed, tiny sizes
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from data import DataUnavailable, batches, flip_labels, load_digits, load_fashion_mnist
from fortunes import DataUnavailable as FortunesUnavailable
from models import Recipe, adam, cnn, mlp, train_epoch
from plots import markdown_table, mean_sd, pyplot, write_csv

from curvkern import CurvatureScorer, CurvatureTracker
from curvkern.metrics import auroc

FLIP_SETTINGS = ("digits-mlp", "digits-cnn", "fashion-mlp", "fashion-cnn")
SETTINGS = (*FLIP_SETTINGS, "canaries")


@dataclass(frozen=True)
class Sizes:
    """One setting's training and scoring sizes."""

    subset: int | None  # images (None: all); for canaries, ordinary training fortunes
    epochs: int
    every: int  # score after every this many epochs (and after the last)
    lr: float
    batch_size: int
    probes: int  # curvature probes per sample and scored epoch
    hidden: int = 256  # the MLP's width
    blocks: int = 0  # canaries: GPT-2's transformer blocks
    canaries: int = 0  # canaries: per repetition count (and 3x as many held out)


# The full run's sizes, chosen so that five seeds of all five settings take about half an hour
# on a busy 2-core CPU (smaller Fashion-MNIST subsets and fewer epochs than find_mislabeled's).
# A probe pass at a layer runs the whole model (the layers before it without gradients), so the
# CNNs, the costliest to score, are scored less often and with fewer probes.
SIZES = {
    "digits-mlp": Sizes(subset=None, epochs=30, every=2, lr=3e-3, batch_size=64, probes=4),
    "digits-cnn": Sizes(subset=None, epochs=60, every=3, lr=3e-3, batch_size=64, probes=4),
    "fashion-mlp": Sizes(subset=2000, epochs=30, every=3, lr=1e-3, batch_size=64, probes=4),
    "fashion-cnn": Sizes(subset=1000, epochs=50, every=5, lr=2e-3, batch_size=64, probes=2),
    "canaries": Sizes(subset=500, epochs=12, every=2, lr=3e-3, batch_size=32, probes=4,
                      blocks=4, canaries=8),
}  # fmt: skip
QUICK = {
    "digits-mlp": Sizes(subset=500, epochs=15, every=3, lr=3e-3, batch_size=64, probes=4),
    "digits-cnn": Sizes(subset=300, epochs=6, every=3, lr=3e-3, batch_size=64, probes=2),
    "fashion-mlp": Sizes(subset=300, epochs=6, every=3, lr=1e-3, batch_size=64, probes=2),
    "fashion-cnn": Sizes(subset=300, epochs=6, every=3, lr=1e-3, batch_size=64, probes=2),
    "canaries": Sizes(subset=100, epochs=4, every=2, lr=3e-3, batch_size=32, probes=2,
                      blocks=2, canaries=3),
}  # fmt: skip


def image_layers(arch: str) -> list[tuple[str, str | None]]:
    """(name, at) of the scored layers of models.mlp / models.cnn, input first."""
    if arch == "mlp":  # Flatten, Linear, ReLU, Linear, ReLU, Linear
        return [("input", None), ("hidden 1", "2"), ("hidden 2", "4"), ("logits", "5")]
    # Conv, ReLU, Pool, Conv, ReLU, Pool, Flatten, Linear, ReLU, Linear
    return [("input", None), ("conv 1", "2"), ("conv 2", "5"), ("hidden", "8"), ("logits", "9")]


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--settings", nargs="+", choices=SETTINGS, metavar="SETTING",
        help=f"which of {', '.join(SETTINGS)} (default: all; a setting whose data is missing is "
        f"then skipped with a note, while one named here stops the run)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default: 0)")
    parser.add_argument(
        "--seeds", type=int, default=1, metavar="S",
        help="runs with seeds --seed .. --seed+S-1 (subset, flipped labels or canaries, initial "
        "weights, batch order, probes); tables give mean ± sd over them (default: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--flip", type=float, default=0.1, help="fraction of labels flipped (default: 0.1)"
    )
    parser.add_argument(
        "--method", choices=("hvp", "fd"), default="hvp",
        help="curvature estimator at every layer (default: hvp, exact for ReLU networks)",
    )  # fmt: skip
    parser.add_argument(
        "--h", type=float, default=1e-3,
        help="fd's step, in each layer's own units (used by fd only; default: 1e-3)",
    )  # fmt: skip
    parser.add_argument(
        "--probes", type=int,
        help="curvature probes per sample and scored epoch (default: per setting)",
    )  # fmt: skip
    parser.add_argument(
        "--fashion-subset", type=int, metavar="N",
        help=f"Fashion-MNIST images per seed (default: {SIZES['fashion-mlp'].subset}, "
        f"{QUICK['fashion-mlp'].subset} with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--epochs", type=int, help="training epochs of every setting (default: per setting)"
    )
    parser.add_argument(
        "--data-root", metavar="DIR",
        help="a folder with Fashion-MNIST's four gzipped IDX files (default: Debian's "
        "dataset-fashion-mnist, see examples/data.py)",
    )  # fmt: skip
    parser.add_argument(
        "--download", action="store_true",
        help="download Fashion-MNIST with torchvision if it is not found (needs internet)",
    )  # fmt: skip
    parser.add_argument(
        "--fortunes", metavar="DIR", default=None,
        help="the folder of Debian's fortune files (default: where `apt-get install fortunes` "
        "puts them)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--out", default="outputs/curvature_by_layer")
    parser.add_argument(
        "--from-csv", nargs="+", metavar="CSV",
        help="run nothing: the tables and the picture of earlier runs' seeds.csv files (e.g. "
        "settings run in parallel processes), written under --out",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="a seconds-long run for the tests: tiny subsets, few epochs, small networks",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("seeds", "probes", "fashion_subset", "epochs", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0 < args.flip < 1:
        parser.error(f"--flip must lie in (0, 1), got {args.flip}")
    if args.h <= 0:
        parser.error(f"--h must be positive, got {args.h}")
    sizes = dict(QUICK if args.quick else SIZES)
    for name in sizes:
        if args.epochs is not None:
            sizes[name] = replace(sizes[name], epochs=args.epochs)
        if args.probes is not None:
            sizes[name] = replace(sizes[name], probes=args.probes)
        if args.fashion_subset is not None and name.startswith("fashion"):
            sizes[name] = replace(sizes[name], subset=args.fashion_subset)
    args.sizes = sizes
    return parser, args


def flipped_labels_run(data, arch: str, sizes: Sizes, args, seed: int) -> dict[str, float]:
    """One seed of one flipped-label setting: AUROC by layer, and of the mean loss."""
    data = data.subset(sizes.subset, seed)
    noisy, flipped = flip_labels(data.y, args.flip, data.num_classes, seed=seed)
    torch.manual_seed(seed)
    if arch == "mlp":
        model = mlp(data.x[0].numel(), data.num_classes, sizes.hidden)
    else:
        model = cnn(data.num_classes, data.x.shape[-1])
    optimizer, schedule = adam(model, _recipe(sizes), len(data))
    order = torch.Generator().manual_seed(seed)

    # curvkern: one tracker per layer, each scoring the curvature with respect to its output
    trackers = {
        name: CurvatureTracker(
            CurvatureScorer(
                model, at=at, method=args.method, h=args.h, n_probes=sizes.probes, seed=seed
            ),
            len(data),
        )
        for name, at in image_layers(arch)
    }
    for epoch in range(1, sizes.epochs + 1):
        train_epoch(model, optimizer, schedule, data.x, noisy, sizes.batch_size, order)
        if epoch % sizes.every == 0 or epoch == sizes.epochs:
            for tracker in trackers.values():
                tracker.score_epoch(batches(data.x, noisy), epoch, progress=False)

    aurocs = {name: auroc(tracker.mean, flipped) for name, tracker in trackers.items()}
    aurocs["loss, mean"] = auroc(trackers["input"].baselines()["loss_mean"], flipped)
    fitted = trackers["input"].field_history("correct")[-1].bool()
    print(
        f"  seed {seed}: train accuracy on the noisy labels {fitted.float().mean():.1%} "
        f"(flipped ones memorized: {fitted[flipped].float().mean():.1%})",
        file=sys.stderr,
    )
    return aurocs


def _recipe(sizes: Sizes) -> Recipe:
    """models.Recipe's schedule (Adam, then a linear decay over the last 20% of the steps)."""
    return Recipe(hidden=sizes.hidden, epochs=sizes.epochs, lr=sizes.lr,
                  batch_size=sizes.batch_size, decay=0.2, subset=sizes.subset)  # fmt: skip


def gpt2(vocab_size: int, blocks: int):
    """canary_exposure's character-level GPT-2 with ``blocks`` transformer blocks."""
    import transformers
    from canary_exposure import BOS, EOS, PAD

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=96, n_embd=48, n_layer=blocks, n_head=4,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def canary_run(texts: list[str], sizes: Sizes, args, seed: int) -> dict[tuple[int, str], float]:
    """One seed of the canary setting: AUROC of inserted against held-out canaries, by
    repetition count and layer, and of the mean loss."""
    import canary_exposure as ce

    from curvkern.losses import sequence_cross_entropy

    corpus = argparse.Namespace(texts=sizes.subset, canaries=sizes.canaries, scored_texts=0)
    train, scored, role, vocab_size = ce.build_corpus(texts, corpus, seed)
    torch.manual_seed(seed)
    model = gpt2(vocab_size, sizes.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sizes.lr, weight_decay=0.0)
    layers = [("embeddings", "transformer.wte")]
    layers += [(f"block {i}", f"transformer.h.{i}") for i in range(sizes.blocks)]
    layers.append(("logits", "lm_head"))

    # curvkern: the model takes the token ids; each tracker perturbs one layer's output
    trackers = {
        name: CurvatureTracker(
            CurvatureScorer(
                model,
                sequence_cross_entropy,
                input_key="input_ids",
                at=at,
                method=args.method,
                h=args.h,
                n_probes=sizes.probes,
                seed=seed,
            ),
            len(scored),
        )
        for name, at in layers
    }
    loader = [
        (input_ids, input_ids.masked_fill(mask == 0, -100), ids, {"attention_mask": mask})
        for ids, input_ids, mask in ce.batches(scored, 64)
    ]
    shuffle = random.Random(seed)
    for epoch in range(1, sizes.epochs + 1):
        model.train()
        for _, input_ids, mask in ce.batches(train, sizes.batch_size, shuffle):
            labels = input_ids.masked_fill(mask == 0, -100)
            loss = model(input_ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % sizes.every == 0 or epoch == sizes.epochs:
            for tracker in trackers.values():
                tracker.score_epoch(loader, epoch, progress=False)

    held = role == 0
    scores = {name: tracker.mean for name, tracker in trackers.items()}
    scores["loss, mean"] = -trackers["embeddings"].field_mean("loss")  # low loss: member
    print(f"  seed {seed}: {len(train)} training sequences, last batch loss {loss.item():.3f}",
          file=sys.stderr)  # fmt: skip
    return {
        (r, name): auroc(s[(role == r) | held].double(), (role == r)[(role == r) | held])
        for r in ce.REPEATS
        for name, s in scores.items()
    }


def load_setting_data(parser, args, settings: list[str], explicit: bool):
    """The images of digits and Fashion-MNIST and the fortunes the settings need; a setting
    whose data is missing stops the run (exit 2 with the install command) when named
    explicitly, else is dropped with a note."""
    data = {}
    kept = []
    for setting in settings:
        try:
            if setting.startswith("digits") and "digits" not in data:
                data["digits"] = load_digits()
            elif setting.startswith("fashion") and "fashion" not in data:
                data["fashion"] = load_fashion_mnist(args.data_root, args.download)
            elif setting == "canaries":
                import transformers  # noqa: F401
                from canary_exposure import CATEGORIES
                from fortunes import FORTUNE_DIR, load_fortunes

                groups = load_fortunes(CATEGORIES, args.fortunes or FORTUNE_DIR, 80)
                data["fortunes"] = [t for ts in groups.values() for t in ts]
        except (DataUnavailable, FortunesUnavailable, ImportError) as error:
            if explicit:
                parser.exit(2, f"{parser.prog}: {setting}: {error}\n")
            print(f"skipping {setting}: {error}")
            continue
        kept.append(setting)
    return data, kept


def plot(path: str, results: dict, title: str) -> None:
    """AUROC against depth, one panel per setting: curvature by layer (mean ± sd over seeds),
    the mean loss as a dashed line of the same color, chance as a gray line."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(3.3 * len(results), 3.6), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (setting, (layers, lines)) in zip(axes[0], results.items(), strict=True):
        depth = np.arange(len(layers))
        for i, (label, (curv, loss)) in enumerate(lines.items()):
            curv = np.asarray(curv)  # (seeds, layers)
            mean, sd = curv.mean(0), curv.std(0, ddof=1) if len(curv) > 1 else 0 * curv[0]
            ax.errorbar(depth, mean, yerr=sd, color=colors[i], marker="o", ms=4, capsize=3,
                        label=f"curvature{label}")  # fmt: skip
            ax.axhline(np.mean(loss), color=colors[i], ls="--", lw=1, label=f"loss, mean{label}")
        ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        ax.set_xticks(depth, layers, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.02)
        task = "inserted vs held-out canaries" if setting == "canaries" else "flipped labels"
        ax.set_title(f"{setting}: {task}", fontsize=9)
        ax.set_ylabel("AUROC", fontsize=8)
        ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_setting(setting: str, data: dict, args) -> list[tuple]:
    """Every seed of one setting: (setting, seed, repeats or None, layer, AUROC) rows."""
    sizes = args.sizes[setting]
    start = time.perf_counter()
    print(f"{setting}: {sizes}", file=sys.stderr)
    rows = []
    for seed in range(args.seed, args.seed + args.seeds):
        if setting == "canaries":
            aurocs = canary_run(data["fortunes"], sizes, args, seed)
        else:
            source, arch = setting.split("-")
            aurocs = {
                (None, layer): value
                for layer, value in flipped_labels_run(
                    data[source], arch, sizes, args, seed
                ).items()
            }
        rows += [(setting, seed, rep, layer, value) for (rep, layer), value in aurocs.items()]
    print(f"  {setting}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows


def read_seeds(parser, paths: list[str]) -> list[tuple]:
    """The rows of earlier runs' seeds.csv files (e.g. settings run in parallel processes)."""
    rows = []
    for path in paths:
        try:
            with open(path, newline="") as f:
                for r in csv.DictReader(f):
                    rep = int(r["inserted"]) if r["inserted"] else None
                    rows.append((r["setting"], int(r["seed"]), rep, r["layer"], float(r["auroc"])))
        except (OSError, KeyError, ValueError) as error:
            parser.exit(2, f"{parser.prog}: --from-csv {path}: not a seeds.csv of this example "
                        f"({error!r})\n")  # fmt: skip
        unknown = {r[0] for r in rows} - set(SETTINGS)
        if unknown:
            parser.exit(2, f"{parser.prog}: --from-csv {path}: unknown settings {unknown}\n")
    keys = [r[:4] for r in rows]
    if len(set(keys)) < len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        parser.exit(
            2,
            f"{parser.prog}: --from-csv: the files hold a setting, seed and layer more than "
            f"once, e.g. {twice[:2]} {twice[3]!r}: pass each run once\n",
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Runs the example; returns {setting: {(repeats or None, layer or "loss, mean"): AUROCs
    per seed}}."""
    parser, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.from_csv:
        rows_csv = read_seeds(parser, args.from_csv)
    else:
        rows_csv = []  # (setting, seed, repeats or None, layer, AUROC)
        data, settings = load_setting_data(
            parser, args, list(args.settings or SETTINGS), args.settings is not None
        )
        for setting in settings:
            rows_csv += run_setting(setting, data, args)
    per_seed = {}  # setting -> {(repeats, layer): [AUROC per seed]}, settings in SETTINGS order
    for setting, _, rep, layer, value in sorted(rows_csv, key=lambda r: SETTINGS.index(r[0])):
        per_seed.setdefault(setting, {}).setdefault((rep, layer), []).append(value)
    seeds = sorted({r[1] for r in rows_csv})
    spread = f"mean ± sd over seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else (
        f"seed {seeds[0]}" if seeds else "no seeds")  # fmt: skip

    curve, tables = {}, []
    for setting, aurocs in per_seed.items():
        layers = [layer for rep, layer in aurocs if layer != "loss, mean"]
        layers = list(dict.fromkeys(layers))
        reps = list(dict.fromkeys(rep for rep, _ in aurocs))
        lines = {}
        for rep in reps:
            label = "" if rep is None else f", {rep}x"
            curv = np.array([aurocs[(rep, layer)] for layer in layers]).T  # (seeds, layers)
            lines[label] = (curv, aurocs[(rep, "loss, mean")])
        curve[setting] = (layers, lines)
        header = ([] if reps[0] is None else ["inserted"]) + [*layers, "loss, mean"]
        rows = [
            ([f"{rep}x"] if rep is not None else [])
            + [mean_sd(aurocs[(rep, layer)]) for layer in [*layers, "loss, mean"]]
            for rep in reps
        ]
        tables.append((setting, args.sizes[setting], markdown_table(header, rows)))

    os.makedirs(args.out, exist_ok=True)
    for setting, sizes, table in tables:
        what = "canaries inserted against held out" if setting == "canaries" else (
            f"{args.flip:.0%} flipped labels")  # fmt: skip
        print(f"\n{setting} ({what}; AUROC, {spread}; {_describe(setting, sizes)}):\n")
        print(table)
    picture = os.path.join(args.out, "curvature_by_layer.png")
    if curve:
        plot(picture, curve, f"AUROC of curvature by layer ({args.method}, mean over the "
             f"scored epochs; {spread}); dashed: the mean loss")  # fmt: skip
    write_csv(
        os.path.join(args.out, "seeds.csv"),
        {"setting": [r[0] for r in rows_csv], "seed": [r[1] for r in rows_csv],
         "inserted": ["" if r[2] is None else r[2] for r in rows_csv],
         "layer": [r[3] for r in rows_csv], "auroc": [r[4] for r in rows_csv]},
    )  # fmt: skip
    print(f"\nwrote {picture} and seeds.csv; total time {time.perf_counter() - start:.0f} s")
    return per_seed


def _describe(setting: str, sizes: Sizes) -> str:
    if setting == "canaries":
        return (
            f"{sizes.subset} fortunes + {sizes.canaries} canaries per repetition count, "
            f"{3 * sizes.canaries} held out; GPT-2 with {sizes.blocks} blocks, {sizes.epochs} "
            f"epochs, scored every {sizes.every} with {sizes.probes} probes"
        )
    images = "all" if sizes.subset is None else sizes.subset
    network = "MLP" if setting.endswith("mlp") else "CNN"
    return (
        f"{images} images, {network}, {sizes.epochs} epochs, scored every {sizes.every} with "
        f"{sizes.probes} probes"
    )


if __name__ == "__main__":
    main()
