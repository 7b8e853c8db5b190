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

Every file also records what made its scores (``origin``: the loss function's qualified name,
the model factory of the command line, a fingerprint of the data), and a save takes a lock
beside the file (``<path>.lock``) so that several writers of one path do not lose each other's
epochs: with keep_history=True the index is merged with what is on disk, with
keep_history=False a writer that finds the file changed by another one refuses. Separate files
of the same settings are merged by merge_trackers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import socket
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from .diagnostics import _outside_caller_level
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
    "ORIGIN",
    "TrackerConflictError",
    "check_origin",
    "lock_path",
    "locked",
    "merge_trackers",
]

FORMAT_VERSION = 2

# The scorer settings a tracker's epochs must share to be averaged (stored in its file).
SETTINGS = ("method", "h", "n_probes", "seed", "rtol", "max_probes", "precision")

# What made a tracker's scores besides the settings (stored in its file under "origin"): the loss
# function's qualified name, the model factory (MODULE:FACTORY, from the command line) and a
# fingerprint of the data (curvkern.data.fingerprint). None where the writer did not know it.
ORIGIN = ("loss_fn", "model", "data")

# The data fingerprint's entries, as an error message names them.
_DATA_FIELDS = {
    "num_samples": "N",
    "sample_shape": "the sample shape",
    "dtype": "the dtype of x",
    "labels_sha256": "the labels",
    "x_sha256": "x (a fixed sample of its rows)",
}


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


def tracker_metadata(
    num_samples: int, keep_history: bool, settings: dict, dtype, origin: dict | None = None
) -> dict:
    """The metadata of a tracker's file (the index, with keep_history=True)."""
    return {
        "format": FORMAT_VERSION,
        "layout": "history" if keep_history else "running",
        "num_samples": num_samples,
        "settings": settings,
        "origin": {k: (origin or {}).get(k) for k in ORIGIN},
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
        metadata: the file's metadata, as read.
    """

    format: int
    dtype: torch.dtype
    epochs: list[int]
    history: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    state: dict[str, Tensor] = field(default_factory=dict)
    last: dict[str, Tensor] | None = None
    metadata: dict = field(default_factory=dict)


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
    fmt = check_index(path, metadata, num_samples, keep_history, settings)
    dtype = torch.float64 if metadata.get("dtype") == "float64" else torch.float32
    epochs = arrays["epochs"].tolist()
    out = TrackerFile(fmt, dtype, epochs, metadata=metadata)
    if fmt == 1:  # (E, N) arrays in the one file; rewritten as format 2 at the next save
        for i, epoch in enumerate(epochs):
            out.history[epoch] = _complete({k: v[i] for k, v in arrays.items()}, path, num_samples)
            if out.history[epoch]["curvature"].dtype == torch.float64:
                out.dtype = torch.float64
    elif keep_history:
        for epoch in epochs:
            out.history[epoch] = read_epoch(path, epoch, num_samples)
    else:
        out.state = {
            k.removeprefix("state."): v for k, v in arrays.items() if k.startswith("state.")
        }
        last = {k.removeprefix("last."): v for k, v in arrays.items() if k.startswith("last.")}
        if epochs:
            out.last = _complete(last, path, num_samples)
    return out


def check_index(
    path: Path, metadata: dict, num_samples: int, keep_history: bool, settings: dict | None
) -> int:
    """Checks a tracker file's metadata against the tracker (see read_tracker); its format.

    Raises:
        ValueError: another format, layout, N or settings.
    """
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
    return fmt


def read_epoch(path: Path, epoch: int, num_samples: int) -> dict[str, Tensor]:
    """One epoch's {field: (N,)} of the format-2 history index at ``path``.

    Raises:
        ValueError: the epoch's file is missing or not as expected.
    """
    file = epochs_folder(path) / epoch_file_name(epoch)
    if not file.exists():
        raise ValueError(
            f"{path} lists epoch {epoch}, whose file {file} is missing; restore it, "
            "or start over with another path"
        )
    _, values = read_arrays(file)
    return _complete(values, path, num_samples)


def _check_settings(path: Path, stored: dict, ours: dict, whose: str = "scorer") -> None:
    differ = {
        k: (stored.get(k), ours.get(k))
        for k in SETTINGS
        if k in stored and k in ours and stored.get(k) != ours[k]
    }
    if differ:
        detail = ", ".join(f"{k}: file {a!r}, {whose} {b!r}" for k, (a, b) in differ.items())
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


# -- what made a file's scores ------------------------------------------------------------------


def check_origin(path: Path, metadata: dict, ours: Mapping, what: str = "this run") -> list[str]:
    """Checks what made a file's scores (its ``origin``) against ``ours`` ({ORIGIN key: value},
    None where not known), naming the first field that differs.

    An entry is compared only where both sides know it (a file written from Python without a
    model factory, say, is not refused for lacking one).

    Returns:
        The entries of ``ours`` that the file does not record (written by an older curvkern,
        or from Python without them), so that they cannot be checked: the caller warns.
    Raises:
        ValueError: an entry that differs (the message names it and both values).
    """
    stored = metadata.get("origin")
    unchecked = []
    for key in ORIGIN:
        mine = ours.get(key)
        if mine is None:
            continue
        if stored is None or key not in stored:
            unchecked.append(key)
            continue
        theirs = stored[key]
        if theirs is None:
            unchecked.append(key)
            continue
        if theirs == mine:
            continue
        if key == "loss_fn":
            raise ValueError(
                f"{path} holds scores of loss_fn {theirs}, {what} has loss_fn {mine}; scores "
                "of different losses do not average. Use another path, or the same loss."
            )
        if key == "model":
            raise ValueError(
                f"{path} holds scores of the model factory {theirs}, {what} has {mine}; scores "
                "of different models do not average. Use another path, or the same --model."
            )
        field_name = next(k for k in _DATA_FIELDS if theirs.get(k) != mine.get(k))
        raise ValueError(
            f"{path} holds scores of other data than {what}: {_DATA_FIELDS[field_name]} "
            f"differ (data.{field_name}: file {theirs.get(field_name)!r}, {what} "
            f"{mine.get(field_name)!r}); give the data the file was scored on, or another path"
        )
    return unchecked


def warn_unchecked(path: Path, unchecked: Sequence[str]) -> None:
    """The warning for a file that does not record the origin entries in ``unchecked``,
    pointing at the first caller outside curvkern."""
    if unchecked:
        warnings.warn(
            f"{path} does not record {', '.join(unchecked)} (written by an older curvkern, or "
            "from Python without them), so they cannot be checked against this run: make sure "
            "they are the ones the file was scored with",
            UserWarning,
            stacklevel=_outside_caller_level(),
        )


# -- several writers ----------------------------------------------------------------------------

# How long a save waits for another writer's save to finish. A save holds the lock for one
# file write; a holder that is killed releases it at once (the kernel drops its lock).
LOCK_TIMEOUT_S = 120.0


class TrackerConflictError(RuntimeError):
    """A keep_history=False tracker found its file changed by another writer."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file that guards the tracker file at ``path`` (kept after use: removing it
    would let a writer waiting on the old file and a new one both in)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def locked(path: str | os.PathLike, timeout: float | None = None) -> Iterator[None]:
    """Holds an exclusive lock on the tracker file at ``path`` for the block.

    The lock is ``flock`` on ``<path>.lock``, which names its holder (host and pid) for the error
    message. The kernel releases it when the holder's process ends in any way (SIGKILL
    included), so a killed writer never blocks the next one, and no two holders ever overlap on
    one machine. On NFS, Linux takes flock as a POSIX lock on the server: it excludes writers on
    other hosts when the mount has working locking (NFSv4, or v3 with lockd; not ``nolock``).

    Raises:
        TimeoutError: another writer held the lock for ``timeout`` seconds (default
            LOCK_TIMEOUT_S): the message names it.
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform: one writer per path is the user's care
        yield
        return
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    raise TimeoutError(
                        f"{path}: another writer ({holder}) has held its lock {lock} for "
                        f"{timeout:g} s; wait for it to finish, or score into another file and "
                        "merge the files with `curvkern merge`"
                    ) from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def save_id(path: Path, metadata: dict | None = None) -> str | None:
    """What identifies the version of the file at ``path`` that a writer last read or wrote:
    the random ``save_id`` in its metadata (None: no file). ``metadata``: the file's, where
    the caller has just read it."""
    if not path.exists():
        return None
    if metadata is None:
        metadata = read_metadata(path)
    if "save_id" in metadata:
        return metadata["save_id"]
    st = path.stat()  # a file of an older curvkern: its inode, time and size
    return f"stat:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def new_save_id() -> str:
    return secrets.token_hex(8)


def file_identity(path: Path) -> tuple[int, int, int]:
    """Which version of an epoch's file is on disk (every write is a new file, renamed over)."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


# -- merging files ------------------------------------------------------------------------------


def merge_trackers(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> list[int]:
    """Merges tracker files of one data set, written with keep_history=True and the same
    settings (e.g. one per job of a job array), into one tracker file at ``out``.

    An epoch in several files must have the same scores in each (to the last few bits: the
    same epoch scored twice with the same settings); ``out`` may be one of ``paths`` (then the
    others are added to it) but may not be another existing file. The merge holds ``out``'s lock.

    Args:
        paths: the tracker files (format 1 or 2, keep_history=True).
        out: the merged tracker file (keep_history=True, format 2).
    Returns:
        The merged file's epochs, ascending.
    Raises:
        ValueError: no paths, a file of keep_history=False, another N, other settings, other
            origin (loss_fn, model factory, data), or an epoch whose scores disagree (the
            message names the files and the field).
    """
    paths = [Path(p) for p in paths]
    out = Path(out)
    if not paths:
        raise ValueError("paths must name at least one tracker file to merge, got none")
    resolved = {p.resolve() for p in paths}
    if out.exists() and out.resolve() not in resolved:
        raise ValueError(
            f"out: {out} exists and is not one of the files to merge; give another path, or "
            "name it among the inputs to merge into it"
        )
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"no tracker file at {p}")
    with locked(out):
        first = paths[0]
        meta0 = read_metadata(first)
        num_samples = int(meta0["num_samples"])
        settings = settings_in(meta0)
        origin: dict = {}
        older = []  # files that predate the origin record: they cannot be checked
        merged: dict[int, dict[str, Tensor]] = {}
        source: dict[int, Path] = {}
        dtype = torch.float32
        for p in paths:
            metadata = read_metadata(p) if p is not first else meta0
            if metadata.get("layout", "history") != "history":
                raise ValueError(
                    f"{p} was written with keep_history=False: its running statistics cannot "
                    "be merged; score each part with keep_history=True (the command line "
                    "does) and merge those files"
                )
            if int(metadata["num_samples"]) != num_samples:
                raise ValueError(
                    f"{p} holds {metadata['num_samples']} samples, {first} holds {num_samples}; "
                    "only files of one data set merge"
                )
            _check_settings(p, settings_in(metadata), settings, f"{first}'s")
            if "origin" not in metadata:
                older.append(str(p))
            else:
                check_origin(p, metadata, origin, what="the files before it")
                for key, value in metadata["origin"].items():
                    if key in ORIGIN and origin.get(key) is None:
                        origin[key] = value
            stored = read_tracker(p, num_samples, True, None)
            if stored.dtype == torch.float64:
                dtype = torch.float64
            for epoch, values in stored.history.items():
                if epoch in merged:
                    _check_same_epoch(epoch, merged[epoch], values, source[epoch], p)
                else:
                    merged[epoch], source[epoch] = values, p
        if older and len(paths) > 1:
            warnings.warn(
                f"{', '.join(older)} predate the record of the loss function, model factory "
                "and data: merged without checking that they match the other files",
                UserWarning,
                stacklevel=2,
            )
        metadata = tracker_metadata(num_samples, True, settings, dtype, origin)
        epochs = sorted(merged)
        write_history(out, metadata, epochs, merged)
    return epochs


def _check_same_epoch(epoch: int, a: Mapping[str, Tensor], b: Mapping[str, Tensor], pa, pb):
    """The scores of one epoch in two files agree to 1,000 units in the last place of their
    dtype (the same epoch scored twice: bit-identical on the CPU, reductions in another order on
    a GPU), NaN where either is NaN."""
    for name in SCORE_FIELDS:
        x, y = a[name].double(), b[name].double()
        eps = torch.finfo(torch.promote_types(a[name].dtype, b[name].dtype)).eps
        scale = torch.nan_to_num(torch.cat([x, y]).abs(), nan=0.0, posinf=0.0).amax()
        same = (x == y) | (x.isnan() & y.isnan()) | ((x - y).abs() <= 1e3 * eps * (x.abs() + scale))
        if not bool(same.all()):
            i = int((~same).nonzero()[0])
            raise ValueError(
                f"epoch {epoch} is in {pa} and {pb} with different scores ({name} of id {i}: "
                f"{float(x[i]):.6g} and {float(y[i]):.6g}, {int((~same).sum())} ids in all); "
                "they were scored from different checkpoints or settings. Merge only one of them."
            )
