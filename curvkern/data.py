"""DATA as the command line and the report read it: an .npz file or an image folder.

An .npz holds ``x`` (N, ...) floats exactly as the model takes them, ``y`` (N,) integer labels
and optionally ``classes``, the class names; an image folder is laid out for torchvision's
ImageFolder (one sub-folder of images per class).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Data", "DataError", "fingerprint", "load_data"]


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
    arrays = _read_npz(path, str(source))
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
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise DataError(
            f"--data: x in {source} has non-finite values (NaN or inf) in "
            f"{int((~finite).sum())} samples, the first sample {first}; curvature is only "
            "defined at finite inputs: fix or drop those samples"
        )
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


_NPZ_ADVICE = "write it with numpy.savez(path, x=x, y=y)"


def _read_npz(path: Path, source: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, or a DataError saying what the file is instead."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"--data: {source} is empty (0 bytes); {_NPZ_ADVICE}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(6)
        kind = (
            "a single .npy array, not an .npz archive of x and y"
            if head == b"\x93NUMPY"
            else "a pickle, which curvkern does not load (it can run code)"
            if head[:1] == b"\x80"
            else "not a complete .npz archive (truncated or another format)"
        )
        raise DataError(f"--data: {source} ({size:,} bytes) is {kind}; {_NPZ_ADVICE}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as error:
        if "pickle" in str(error):  # an object array inside the archive
            raise DataError(
                f"--data: {source} holds an array of Python objects, which curvkern does not "
                "load (it can run code); save x and y as numeric arrays"
            ) from None
        raise DataError(f"--data: cannot read {source} as .npz ({one_line(error)})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(
            f"--data: {source} is a damaged .npz archive ({type(error).__name__}: "
            f"{one_line(error)}); {_NPZ_ADVICE}"
        ) from None
    return arrays


class _ImageLoader:
    """torchvision's image loader, with the file named when an image cannot be read (a class,
    not a closure, so that DataLoader workers can pickle it)."""

    def __call__(self, file: str):
        from torchvision.datasets.folder import default_loader

        try:
            return default_loader(file)
        except Exception as error:
            raise DataError(
                f"--data: cannot read the image {file} ({type(error).__name__}: "
                f"{one_line(error)}); remove or replace it"
            ) from None


def _image_folder(path: Path, transform: Callable | None) -> Data:
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise DataError(
            "--data: an image folder needs torchvision (pip install torchvision)"
        ) from None
    try:
        folder = datasets.ImageFolder(
            str(path), transform=transform or transforms.ToTensor(), loader=_ImageLoader()
        )
    except (FileNotFoundError, OSError) as error:
        raise DataError(f"--data: {path} is not an image folder ({one_line(error)})") from None
    files = [file for file, _ in folder.samples]
    labels = np.asarray(folder.targets, dtype=np.int64)
    return Data(folder, labels, list(folder.classes), str(path), files=files)


# How many samples of x the fingerprint hashes: evenly spaced ids, so the cost does not grow with
# N (a few kB of an .npz's x, a few image files of a folder).
FINGERPRINT_SAMPLES = 64


def fingerprint(data: Data) -> dict:
    """A cheap fingerprint of DATA, which a tracker file records so that scores of other data
    are refused: N, the sample shape and dtype (.npz) and SHA-256 hashes of all labels and of
    x at a fixed set of ids (FINGERPRINT_SAMPLES ids spread evenly over 0 .. N-1; for an image
    folder, the bytes and relative names of those files, not the decoded pictures, so that a
    random transform does not change it).

    Another data file of the same N with other labels, or other values at one of the hashed ids,
    is told apart; a change confined to ids that are not hashed is not.

    Returns:
        {"num_samples", "sample_shape", "dtype", "labels_sha256", "x_sha256"}, JSON-able
        (sample_shape and dtype None for an image folder).
    """
    n = len(data)
    ids = sorted(set(np.linspace(0, n - 1, FINGERPRINT_SAMPLES).round().astype(int).tolist()))
    ids = ids if n else []
    labels = hashlib.sha256(np.ascontiguousarray(data.labels, dtype="<i8").tobytes()).hexdigest()
    x = hashlib.sha256()
    if data.images is not None:
        shape, dtype = list(data.images.shape[1:]), str(data.images.dtype)
        x.update(np.ascontiguousarray(data.images[ids]).tobytes())
    else:
        shape = dtype = None
        root = Path(data.source)
        for i in ids:
            file = Path(data.files[i])
            name = file.relative_to(root) if file.is_relative_to(root) else file.name
            x.update(str(name).encode() + b"\0")
            x.update(file.read_bytes())
    return {
        "num_samples": n,
        "sample_shape": shape,
        "dtype": dtype,
        "labels_sha256": labels,
        "x_sha256": x.hexdigest(),
    }


def one_line(error: BaseException) -> str:
    """An exception's message on one line, at most 400 characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= 400 else text[:397] + "..."
