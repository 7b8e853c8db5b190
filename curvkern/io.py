"""Files: crash-safe writes, and the tracker's file format (NumPy .npz, never pickles).

A tracker saved at ``path`` is, in format 2:

- ``keep_history=True``: ``path`` is a small index (settings, the epochs, the name of each
  epoch's file) and every epoch has its own file in the folder ``<path>.epochs/``, holding one
  (N,) array per score field. Saving an epoch writes that epoch's file, then the index: O(N),
  however many epochs came before.
- ``keep_history=False``: ``path`` holds the running statistics (one or two (N,) arrays per
  field) and the last recorded epoch; its size does not grow with the epochs (only the list of
  epoch numbers does, by 8 bytes each).

Every file is written to a temporary name, flushed to disk and renamed over the old one (see
atomic_write), and the index is written last, so a crash at any moment leaves a loadable state:
the one before or the one after the save. Format 1 (one .npz holding (E, N) arrays, written by
curvkern 0.1) is still read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from .scores import SCORE_FIELDS

__all__ = [
    "atomic_write",
    "write_arrays",
    "read_arrays",
    "read_metadata",
    "epochs_folder",
    "FORMAT_VERSION",
    "SETTINGS",
    "TrackerFile",
    "read_tracker",
    "settings_in",
    "tracker_metadata",
    "write_history",
    "write_running",
]

FORMAT_VERSION = 2

# The scorer settings a tracker's epochs must share to be averaged (stored in its file).
SETTINGS = ("method", "h", "n_probes", "seed", "rtol", "max_probes", "precision")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write that replaces ``path`` only once it is complete.

    Writes go to a temporary file beside ``path`` (created with the permissions a plain open()
    would give); on leaving the block it is flushed to disk and renamed over ``path``, and the
    folder's entry is synced. If the block raises, the temporary file is removed and ``path`` is
    untouched, so a crash at any moment leaves either the old file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every platform can open a folder
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_arrays(path: str | os.PathLike, metadata: dict, arrays: Mapping[str, Tensor]) -> None:
    """Writes (N,) tensors and a JSON-able ``metadata`` dict to ``path`` (.npz), atomically.

    The metadata travels as a uint8 array of its JSON text, so the file loads without pickle.
    Tensors are written without a copy (``Tensor.numpy()`` shares their memory).
    """
    out = {name: t.detach().cpu().numpy() for name, t in arrays.items()}
    out["metadata"] = np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)
    with atomic_write(path) as f:
        np.savez(f, **out)


def read_arrays(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(metadata, {name: tensor}) of a file written by write_arrays (or format 1).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a tracker file (torn, foreign, no metadata, or a pickle inside).
    """
    return _read(path, arrays=True)


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a file written by write_arrays, without reading its arrays."""
    return _read(path, arrays=False)[0]


def _read(path, arrays: bool) -> tuple[dict, dict[str, Tensor]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "metadata" not in data.files:
                raise ValueError(f"{path} is not a curvkern tracker file (no metadata array)")
            metadata = json.loads(data["metadata"].tobytes().decode())
            names = [k for k in data.files if k != "metadata"] if arrays else []
            return metadata, {k: torch.from_numpy(data[k]) for k in names}
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:  # torn, foreign
        raise ValueError(f"{path} is not a readable curvkern tracker file: {e}") from e


def epochs_folder(path: str | os.PathLike) -> Path:
    """The folder of per-epoch files that belongs to the index at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".epochs")


def epoch_file_name(epoch: int) -> str:
    """The name of one epoch's file inside epochs_folder (sortable; negative epochs too)."""
    return f"epoch_{epoch:+09d}.npz"


# -- the tracker's files ------------------------------------------------------------------------


def tracker_metadata(num_samples: int, keep_history: bool, settings: dict, dtype) -> dict:
    """The metadata of a tracker's file (the index, with keep_history=True)."""
    return {
        "format": FORMAT_VERSION,
        "layout": "history" if keep_history else "running",
        "num_samples": num_samples,
        "settings": settings,
        "fields": list(SCORE_FIELDS),
        "dtype": str(dtype).removeprefix("torch."),
    }


def write_history(
    path: Path, metadata: dict, epochs: Sequence[int], new: Mapping[int, Mapping[str, Tensor]]
) -> None:
    """keep_history=True: the files of the ``new`` epochs ({epoch: {field: (N,)}}), then the
    index at ``path`` listing ``epochs`` (written last, so that a crash leaves a loadable state)."""
    folder = epochs_folder(path)
    for epoch in sorted(new):
        write_arrays(
            folder / epoch_file_name(epoch),
            {"format": FORMAT_VERSION, "epoch": epoch, "num_samples": metadata["num_samples"]},
            new[epoch],
        )
    write_arrays(path, metadata, {"epochs": torch.tensor(list(epochs), dtype=torch.int64)})


def write_running(
    path: Path,
    metadata: dict,
    epochs: Sequence[int],
    state: Mapping[str, Tensor],
    last: Mapping[str, Tensor] | None,
) -> None:
    """keep_history=False: the running statistics ``state``, the epochs and the last epoch's
    fields, in one file."""
    arrays = {f"state.{k}": v for k, v in state.items()}
    arrays["epochs"] = torch.tensor(list(epochs), dtype=torch.int64)
    if last is not None:
        arrays.update({f"last.{k}": v for k, v in last.items()})
    write_arrays(path, metadata, arrays)


def settings_in(metadata: dict) -> dict:
    """The scorer settings stored in a file's metadata (format 1 kept them at the top)."""
    stored = metadata.get("settings", metadata)
    return {k: stored[k] for k in SETTINGS if k in stored}


@dataclass
class TrackerFile:
    """What a tracker file holds, checked against the tracker that reads it.

    Attributes:
        format: the file's format (1 or FORMAT_VERSION).
        dtype: the scores' dtype (float64 once any stored epoch is).
        epochs: the recorded epochs, in the file's order.
        history: keep_history=True: {epoch: {field: (N,)}} with every current field.
        state: keep_history=False: the running statistics' arrays (as Running.arrays() names).
        last: keep_history=False: the last epoch's {field: (N,)}, if any epoch.
    """

    format: int
    dtype: torch.dtype
    epochs: list[int]
    history: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    state: dict[str, Tensor] = field(default_factory=dict)
    last: dict[str, Tensor] | None = None


def read_tracker(
    path: Path, num_samples: int, keep_history: bool, settings: dict | None
) -> TrackerFile:
    """Reads a tracker's file after checking it against the tracker: the format, the layout
    (keep_history), the number of samples and (unless ``settings`` is None, for a read-only
    tracker) the scorer settings.

    Raises:
        ValueError: a file of another format, layout, N or settings, a missing epoch file, or a
            field of the wrong shape (the message says which).
    """
    metadata, arrays = read_arrays(path)
    fmt = metadata.get("format")
    if fmt not in (1, FORMAT_VERSION):
        raise ValueError(
            f"{path}: tracker file format {fmt!r}, this curvkern reads formats 1 and "
            f"{FORMAT_VERSION}; it was written by another version of curvkern"
        )
    layout = metadata.get("layout", "history")  # format 1 kept the history
    if (layout == "history") != keep_history:
        raise ValueError(
            f"{path} was written with keep_history={layout == 'history'}, this tracker has "
            f"keep_history={keep_history}; use the same setting or another path"
        )
    if metadata["num_samples"] != num_samples:
        raise ValueError(
            f"{path} holds {metadata['num_samples']} samples, this tracker has "
            f"num_samples = {num_samples}"
        )
    if settings is not None:
        _check_settings(path, settings_in(metadata), settings)
    dtype = torch.float64 if metadata.get("dtype") == "float64" else torch.float32
    epochs = arrays["epochs"].tolist()
    out = TrackerFile(fmt, dtype, epochs)
    if fmt == 1:  # (E, N) arrays in the one file; rewritten as format 2 at the next save
        for i, epoch in enumerate(epochs):
            out.history[epoch] = _complete({k: v[i] for k, v in arrays.items()}, path, num_samples)
            if out.history[epoch]["curvature"].dtype == torch.float64:
                out.dtype = torch.float64
    elif keep_history:
        folder = epochs_folder(path)
        for epoch in epochs:
            file = folder / epoch_file_name(epoch)
            if not file.exists():
                raise ValueError(
                    f"{path} lists epoch {epoch}, whose file {file} is missing; restore it, "
                    "or start over with another path"
                )
            _, values = read_arrays(file)
            out.history[epoch] = _complete(values, path, num_samples)
    else:
        out.state = {
            k.removeprefix("state."): v for k, v in arrays.items() if k.startswith("state.")
        }
        last = {k.removeprefix("last."): v for k, v in arrays.items() if k.startswith("last.")}
        if epochs:
            out.last = _complete(last, path, num_samples)
    return out


def _check_settings(path: Path, stored: dict, ours: dict) -> None:
    differ = {
        k: (stored.get(k), ours[k]) for k in SETTINGS if k in stored and stored.get(k) != ours[k]
    }
    if differ:
        detail = ", ".join(f"{k}: file {a!r}, scorer {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"{path} was written by a scorer with other settings ({detail}); scores of "
            f"different settings do not average. Use another path, or the same settings."
        )


def _complete(values: Mapping[str, Tensor], path: Path, num_samples: int) -> dict[str, Tensor]:
    """{field: (N,)} with every current field: NaN for fields an older file did not have."""
    present = [values[name] for name in SCORE_FIELDS if name in values]
    dtype = present[0].dtype if present else torch.float32
    out = {}
    for name in SCORE_FIELDS:
        v = values.get(name)
        if v is None:
            v = torch.full((num_samples,), math.nan, dtype=dtype)
        elif v.shape != (num_samples,):
            raise ValueError(
                f"{path}: field {name} has shape {tuple(v.shape)}, expected ({num_samples},)"
            )
        out[name] = v
    return out
