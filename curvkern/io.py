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
import os
import secrets
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "atomic_write",
    "write_arrays",
    "read_arrays",
    "epochs_folder",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 2


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
        ValueError: the file is not a tracker file (no metadata, or a pickle inside).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            if "metadata" not in data.files:
                raise ValueError(f"{path} is not a curvkern tracker file (no metadata array)")
            metadata = json.loads(data["metadata"].tobytes().decode())
            arrays = {k: torch.from_numpy(data[k]) for k in data.files if k != "metadata"}
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:  # torn, foreign
        raise ValueError(f"{path} is not a readable curvkern tracker file: {e}") from e
    return metadata, arrays


def epochs_folder(path: str | os.PathLike) -> Path:
    """The folder of per-epoch files that belongs to the index at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".epochs")


def epoch_file_name(epoch: int) -> str:
    """The name of one epoch's file inside epochs_folder (sortable; negative epochs too)."""
    return f"epoch_{epoch:+09d}.npz"
