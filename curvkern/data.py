"""DATA as the command line and the report read it: an .npz file or an image folder.

An .npz holds ``x`` (N, ...) floats exactly as the model takes them, ``y`` (N,) integer labels
and optionally ``classes``, the class names; an image folder is laid out for torchvision's
ImageFolder (one sub-folder of images per class).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Data", "DataError", "load_data"]


class DataError(ValueError):
    """DATA that cannot be read as expected (the message says what was expected and found)."""


# -- data ---------------------------------------------------------------------------------------


@dataclass
class Data:
    """A data set as the command line reads it.

    Attributes:
        dataset: map-style dataset of (x, y) items, x a float tensor (what the model takes).
        labels: (N,) int64 labels.
        classes: class names, indexed by label.
        source: the DATA argument.
        images: for an .npz, the (N, ...) array x (pictures for the report); None for a folder.
        files: for an image folder, the N image files; None for an .npz.
    """

    dataset: torch.utils.data.Dataset
    labels: np.ndarray
    classes: list[str]
    source: str
    images: np.ndarray | None = None
    files: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def load_data(source: str | os.PathLike, transform: Callable | None = None) -> Data:
    """Reads DATA: an .npz with ``x`` and ``y`` (optionally ``classes``), or an image folder.

    Args:
        source: the .npz file or the folder (one sub-folder of images per class).
        transform: for a folder, PIL image -> tensor (default: torchvision's ToTensor, floats in
            [0, 1] of shape (C, H, W)).
    Returns:
        Data.
    Raises:
        DataError: the file or folder is missing or not as expected (the message names
            --data, as the command line reports it).
    """
    path = Path(source)
    if not path.exists():
        raise DataError(f"--data: {source} does not exist (expected an .npz file or image folder)")
    if path.is_dir():
        return _image_folder(path, transform)
    if path.suffix != ".npz":
        raise DataError(f"--data: expected an .npz file or an image folder, got {source}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as error:
        raise DataError(f"--data: cannot read {source} as .npz ({one_line(error)})") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"--data: {source} must hold arrays 'x' (N, ...) and 'y' (N,); missing "
            f"{', '.join(repr(k) for k in missing)} (found {sorted(arrays)})"
        )
    x, y = arrays["x"], arrays["y"]
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(
            f"--data: x in {source} has dtype {x.dtype}; save it as floats exactly as the model "
            "takes them (e.g. scaled and normalized as in training)"
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x):
        raise DataError(
            f"--data: y in {source} must be integer class labels of shape ({len(x)},), "
            f"got {y.dtype} of shape {y.shape}"
        )
    if x.ndim < 2:
        raise DataError(f"--data: x in {source} must have shape (N, ...), got {x.shape}")
    labels = y.astype(np.int64)
    if "classes" in arrays:
        classes = [str(c) for c in arrays["classes"].tolist()]
    else:
        classes = [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(
            f"--data: labels in {source} must lie in [0, {len(classes)}), got "
            f"{labels.min()} .. {labels.max()}"
        )
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(labels))
    return Data(dataset, labels, classes, str(source), images=x)


def _image_folder(path: Path, transform: Callable | None) -> Data:
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise DataError(
            "--data: an image folder needs torchvision (pip install torchvision)"
        ) from None
    try:
        folder = datasets.ImageFolder(str(path), transform=transform or transforms.ToTensor())
    except (FileNotFoundError, OSError) as error:
        raise DataError(f"--data: {path} is not an image folder ({one_line(error)})") from None
    files = [file for file, _ in folder.samples]
    labels = np.asarray(folder.targets, dtype=np.int64)
    return Data(folder, labels, list(folder.classes), str(path), files=files)


def one_line(error: BaseException) -> str:
    """An exception's message on one line, at most 400 characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= 400 else text[:397] + "..."
