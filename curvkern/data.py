"""DATA as the command line and the report read it: an .npz file, an image folder, a Hugging
Face ``datasets`` folder or Parquet files.

An .npz holds ``x`` (N, ...) floats exactly as the model takes them, ``y`` (N,) integer labels
and optionally ``classes``, the class names; an image folder is laid out for torchvision's
ImageFolder (one sub-folder of images per class). A ``datasets`` folder (``save_to_disk``) or
Parquet files are tables: one input column (an image column decoded as ImageFolder decodes
files, or an array column) and one integer label column; ids are row numbers.
"""

from __future__ import annotations

import glob
import hashlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Data",
    "DataError",
    "TableDataset",
    "fingerprint",
    "load_data",
    "X_COLUMNS",
    "Y_COLUMNS",
]

# The columns a `datasets` folder or Parquet data is scored on, unless named: the first present.
X_COLUMNS = ("x", "image", "pixel_values")
Y_COLUMNS = ("label", "labels", "y")


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


def load_data(
    source: str | os.PathLike,
    transform: Callable | None = None,
    *,
    x_column: str | None = None,
    y_column: str | None = None,
) -> Data:
    """Reads DATA: an .npz with ``x`` and ``y`` (optionally ``classes``), an image folder, a
    Hugging Face ``datasets`` folder (written by ``save_to_disk``) or Parquet files (one file,
    a folder of them or a glob).

    Args:
        source: the .npz file, the folder (one sub-folder of images per class, or a saved
            ``datasets`` data set, or .parquet files), a .parquet file, or a glob of them.
        transform: for images, PIL image -> tensor (default: torchvision's ToTensor, floats in
            [0, 1] of shape (C, H, W)); for an array column of a table, tensor -> tensor.
        x_column, y_column: for a table (``datasets`` or Parquet), the input and label columns
            (default: the first present of X_COLUMNS and of Y_COLUMNS).
    Returns:
        Data.
    Raises:
        DataError: the file or folder is missing or not as expected (the message names
            --data, as the command line reports it).
    """
    path = Path(source)
    table = _table_source(path)
    if table is not None:
        return _table_data(table, str(source), transform, x_column, y_column)
    if x_column is not None or y_column is not None:
        raise DataError(
            "--x-column/--y-column: only for a `datasets` folder or Parquet data, but "
            f"{source} is {'an image folder' if path.is_dir() else 'not one'}"
        )
    if not path.exists():
        raise DataError(
            f"--data: {source} does not exist (expected an .npz file, an image folder, a "
            "`datasets` folder or Parquet files)"
        )
    if path.is_dir():
        return _image_folder(path, transform)
    if path.suffix != ".npz":
        raise DataError(
            "--data: expected an .npz file, an image folder, a `datasets` folder or Parquet "
            f"files, got {source}"
        )
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
    names = arrays["classes"].tolist() if "classes" in arrays else None
    classes = _classes(labels, names, "--data", source)
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


def _fingerprint_ids(n: int) -> list[int]:
    """The ids a fingerprint hashes: FINGERPRINT_SAMPLES spread evenly over 0 .. n-1."""
    if not n:
        return []
    return sorted(set(np.linspace(0, n - 1, FINGERPRINT_SAMPLES).round().astype(int).tolist()))


def items_fingerprint(dataset) -> dict:
    """A cheap fingerprint of a map-style data set's items, for the trackers of the training
    callbacks, which see items rather than a data file: N and a SHA-256 of the items at
    FINGERPRINT_SAMPLES ids spread evenly over 0 .. N-1 (their tensors' and arrays' dtypes,
    shapes and bytes, numbers and strings, mapping keys in order).

    The items are read twice: a data set that gives other values the second time (random
    augmentation in ``__getitem__``) is fingerprinted by N alone, rather than refused on every
    resume.

    Returns:
        the keys of :func:`fingerprint` ("sample_shape", "dtype" and "labels_sha256" None;
        "x_sha256" None for a random data set).
    """
    n = len(dataset)
    ids = _fingerprint_ids(n)
    digests = []
    for _ in range(2):
        h = hashlib.sha256()
        for i in ids:
            _hash_value(dataset[i], h)
        digests.append(h.hexdigest())
    return {
        "num_samples": n,
        "sample_shape": None,
        "dtype": None,
        "labels_sha256": None,
        "x_sha256": digests[0] if digests[0] == digests[1] else None,
    }


def _hash_value(value, h) -> None:
    """Feeds an item's content into the hash ``h``: tensors and arrays by dtype, shape and
    bytes; mappings in key order; sequences in order; pictures by mode, size and bytes; numbers,
    strings and bytes by value; anything else by its type's name only (its repr may hold an
    address that changes from run to run)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        h.update(f"tensor{tuple(value.shape)}{value.dtype}".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        h.update(f"array{value.shape}{value.dtype}".encode())
        if value.dtype != object:
            h.update(np.ascontiguousarray(value).tobytes())
        else:
            for v in value.ravel():
                _hash_value(v, h)
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            h.update(f"key:{key}".encode())
            _hash_value(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for v in value:
            _hash_value(v, h)
    elif isinstance(value, (bool, int, float, complex, str, bytes, type(None), np.generic)):
        h.update(f"{type(value).__name__}:{value!r}".encode())
    elif hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):
        h.update(f"picture{value.mode}{value.size}".encode())  # a PIL image
        h.update(value.tobytes())
    else:
        h.update(f"object:{type(value).__qualname__}".encode())


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
    ids = _fingerprint_ids(n)
    labels = hashlib.sha256(np.ascontiguousarray(data.labels, dtype="<i8").tobytes()).hexdigest()
    x = hashlib.sha256()
    if data.images is not None:
        shape, dtype = list(data.images.shape[1:]), str(data.images.dtype)
        x.update(np.ascontiguousarray(data.images[ids]).tobytes())
    elif isinstance(data.dataset, TableDataset):
        shape, dtype = data.dataset.hash_stored(ids, x)
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


# -- tables: a Hugging Face `datasets` folder, Parquet files -----------------------------------


def _table_source(path: Path) -> tuple[str, object] | None:
    """("datasets", folder) or ("parquet", [files]) when DATA is one of those, else None."""
    text = str(path)
    if any(c in text for c in "*?["):
        files = sorted(glob.glob(text, recursive=True))
        parquet = [f for f in files if f.endswith(".parquet") and os.path.isfile(f)]
        if not parquet:
            raise DataError(f"--data: {text!r} matches no .parquet file")
        return "parquet", parquet
    if path.is_file() and path.suffix == ".parquet":
        return "parquet", [str(path)]
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            raise DataError(
                f"--data: {path} holds a DatasetDict of splits {splits}; give one split's "
                f"folder, e.g. {path / (splits[0] if splits else 'train')}"
            )
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return "datasets", path
        parquet = sorted(str(p) for p in path.glob("*.parquet") if p.is_file())
        if parquet and not any(p.is_dir() for p in path.iterdir()):
            return "parquet", parquet
    return None


def _load_table(kind: str, where, source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--data: reading {source} needs the `datasets` package: pip install 'curvkern[data]'"
        ) from None
    from .distributed import check_ranks, is_main_process

    try:
        if kind == "datasets":
            table = datasets.load_from_disk(str(where))
        else:
            # Converted once into Arrow files in the datasets cache, then memory-mapped: rows
            # are read on demand, not all held in memory. Under torch.distributed rank 0
            # converts first and the others then open its cache: two ranks writing one cache
            # entry at once fail.
            if not is_main_process():
                check_ranks()
            table = datasets.Dataset.from_parquet(list(where))
            if is_main_process():
                check_ranks()
    except Exception as error:
        what = "a `datasets` folder" if kind == "datasets" else "Parquet"
        raise DataError(
            f"--data: cannot read {source} as {what} ({type(error).__name__}: {one_line(error)})"
        ) from None
    if not isinstance(table, datasets.Dataset):
        raise DataError(f"--data: {source} is a {type(table).__name__}; give one split's folder")
    return table


def _pick_column(table, name: str | None, defaults: tuple[str, ...], option: str, source: str):
    columns = list(table.column_names)
    if name is not None:
        if name not in columns:
            raise DataError(f"{option}: {source} has no column {name!r} (columns: {columns})")
        return name
    for candidate in defaults:
        if candidate in columns:
            return candidate
    raise DataError(
        f"{option}: {source} has none of the columns {', '.join(defaults)} (columns: "
        f"{columns}); name one with {option}"
    )


def _is_image_column(feature) -> bool:
    """An Image feature, or a struct of encoded bytes as datasets writes images to Parquet."""
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    return isinstance(feature, dict) and "bytes" in feature


class TableDataset(torch.utils.data.Dataset):
    """(x, y) items of one input and one label column of a ``datasets.Dataset``.

    Image columns are decoded as torchvision's ImageFolder decodes files (PIL, converted to
    RGB) and go through ``transform`` (default ToTensor); array columns become tensors (then
    ``transform``, when given). Labels come from the (N,) int64 array read up front.
    """

    def __init__(self, table, x_column: str, labels: np.ndarray, transform, image: bool) -> None:
        self.table = table.select_columns([x_column])
        self.x_column = x_column
        self.labels = torch.from_numpy(labels)
        self.transform = transform
        self.image = image
        # Floating inputs are cast to this dtype (the model's) when set: Parquet written from
        # NumPy or pandas holds float64.
        self.dtype: torch.dtype | None = None
        if image:
            import datasets

            if isinstance(self.table.features[x_column], datasets.Image):
                # Decode ourselves from the stored bytes or path, as ImageFolder does.
                self.table = self.table.cast_column(x_column, datasets.Image(decode=False))
        else:
            # dtype=None: the stored dtype (datasets' numpy format makes floats float32 else)
            self.table = self.table.with_format("numpy", dtype=None)

    def __len__(self) -> int:
        return len(self.labels)

    def hash_stored(self, ids: list[int], digest) -> tuple[list[int] | None, str | None]:
        """Feeds the stored x of ``ids`` to ``digest`` (an image's encoded bytes, not the
        decoded picture); returns the sample shape and dtype of an array column, else Nones."""
        shape = dtype = None
        for i in ids:
            value = self.table[int(i)][self.x_column]
            if self.image:
                data = value.get("bytes") if isinstance(value, dict) else None
                if data is None and isinstance(value, dict) and value.get("path"):
                    data = Path(value["path"]).read_bytes()
                digest.update(data or b"")
            else:
                array = np.ascontiguousarray(value)
                shape, dtype = list(array.shape), str(array.dtype)
                digest.update(array.tobytes())
        return shape, dtype

    def picture(self, index: int):
        """The stored image of ``index`` as a PIL image (RGB), for pictures of an image column."""
        return _decode_image(self.table[int(index)][self.x_column])

    def stored(self, ids: list[int]) -> np.ndarray:
        """The stored arrays of ``ids`` of an array column, stacked: (len(ids), ...)."""
        return np.stack([np.asarray(self.table[int(i)][self.x_column]) for i in ids])

    def __getitem__(self, index: int):
        value = self.table[int(index)][self.x_column]
        if self.image:
            x = _decode_image(value)
            if self.transform is None:
                from torchvision.transforms.functional import to_tensor

                return to_tensor(x), self.labels[index]
            return self.transform(x), self.labels[index]
        x = torch.from_numpy(np.ascontiguousarray(value))
        x = x if self.transform is None else self.transform(x)
        if self.dtype is not None and x.is_floating_point():
            x = x.to(self.dtype)
        return x, self.labels[index]


def _decode_image(value):
    import io

    from PIL import Image

    if isinstance(value, dict):
        if value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        else:
            image = Image.open(value["path"])
    else:
        image = value
    return image.convert("RGB")


def _classes(labels: np.ndarray, names: list | None, option: str, source: str) -> list[str]:
    """The class names (``names``, else 0 .. the largest label), once every label is checked to
    index them; ``option`` names the command-line option an error points at."""
    if names is None:
        names = range(int(labels.max()) + 1 if len(labels) else 0)
    classes = [str(c) for c in names]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(
            f"{option}: labels in {source} must lie in [0, {len(classes)}), got "
            f"{labels.min()} .. {labels.max()}"
        )
    return classes


def _table_data(
    table_source: tuple[str, object], source: str, transform, x_column, y_column
) -> Data:
    kind, where = table_source
    table = _load_table(kind, where, source)
    x_column = _pick_column(table, x_column, X_COLUMNS, "--x-column", source)
    y_column = _pick_column(table, y_column, Y_COLUMNS, "--y-column", source)
    labels = np.asarray(table.with_format("numpy", dtype=None)[y_column])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"--y-column: {y_column!r} in {source} must hold integer class labels, one per row; "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    labels = labels.astype(np.int64)
    names = getattr(table.features[y_column], "names", None) or None
    classes = _classes(labels, names, "--y-column", source)
    image = _is_image_column(table.features[x_column])
    dataset = TableDataset(table, x_column, labels, transform, image)
    if not image and len(dataset):
        first = dataset[0][0]
        if transform is None and not first.is_floating_point():
            raise DataError(
                f"--x-column: {x_column!r} in {source} holds {first.dtype} arrays; store them "
                "as floats exactly as the model takes them, or give --transform to convert them"
            )
    return Data(dataset, labels, classes, source)
