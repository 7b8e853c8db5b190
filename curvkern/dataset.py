"""Data-set scale: score_dataset, IndexedDataset, CurvatureTracker, score_checkpoints."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import secrets
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from .scorer import CurvatureScorer
from .scores import SCORE_FIELDS, CurvatureScores

__all__ = [
    "IndexedDataset",
    "score_dataset",
    "CurvatureTracker",
    "score_checkpoints",
    "atomic_write",
]


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


class IndexedDataset(Dataset):
    """A map-style dataset whose items are (x, y, index): what score_dataset's loader yields.

    Args:
        dataset: any map-style dataset of (x, y) items (e.g. a torchvision dataset).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(
                f"IndexedDataset expects (x, y) items, got {type(item).__name__}"
                + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            )
        return item[0], item[1], index


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_main_process() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _model_device(model) -> torch.device | None:
    if isinstance(model, nn.Module):
        tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
        if tensor is not None:
            return tensor.device
    return None


def _collective_device() -> torch.device:
    """Where the process group's tensors must be: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_rows(ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's rows, on every rank: ids (R,) int64 and values (R, F) float64, on the CPU.

    Ranks may hold different numbers of rows: counts are gathered first and rows padded to the
    largest. NCCL gathers CUDA tensors (on the current device), gloo CPU tensors.
    """
    if not _distributed():
        return ids, values
    device = _collective_device()
    world = dist.get_world_size()
    count = torch.tensor([ids.numel()], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    rows = max(counts)
    padded_ids = torch.full((rows,), -1, dtype=torch.int64, device=device)
    padded_ids[: ids.numel()] = ids.to(device)
    padded_values = torch.zeros((rows, values.shape[1]), dtype=torch.float64, device=device)
    padded_values[: ids.numel()] = values.to(device)
    all_ids = [torch.empty_like(padded_ids) for _ in range(world)]
    all_values = [torch.empty_like(padded_values) for _ in range(world)]
    dist.all_gather(all_ids, padded_ids)
    dist.all_gather(all_values, padded_values)
    return (
        torch.cat([t[:c] for t, c in zip(all_ids, counts, strict=True)]).cpu(),
        torch.cat([t[:c] for t, c in zip(all_values, counts, strict=True)]).cpu(),
    )


def _progress_bar(total: int | None, enabled: bool, description: str):
    from tqdm.auto import tqdm

    show = enabled and _is_main_process() and sys.stderr.isatty()
    return tqdm(total=total, unit="sample", unit_scale=True, desc=description, disable=not show)


def score_dataset(
    scorer: CurvatureScorer,
    loader: Iterable,
    num_samples: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> CurvatureScores:
    """Scores every sample a loader yields, into one row per id 0 .. N-1.

    Under torch.distributed (gloo or NCCL), each rank scores what its loader gives it (e.g.
    through a DistributedSampler) and every rank returns the full result. A sample's scores
    depend only on its id, so the padding duplicates of a DistributedSampler are harmless.

    Args:
        scorer: the CurvatureScorer to apply.
        loader: iterable of (x, y, ids) batches, e.g. a DataLoader over IndexedDataset(dataset).
        num_samples: N; default: len(loader.dataset) when the loader has one, else the largest
            id seen + 1 (across ranks).
        progress: show a progress bar (samples/s) when stderr is a terminal.
        device: where to score; default: the device of the scorer's model (its first parameter
            or buffer), else where the batches are.
    Returns:
        CurvatureScores of N rows on the CPU, ids 0 .. N-1; NaN scores and n_probes 0 for ids
        never seen.
    """
    if num_samples is None and hasattr(loader, "dataset"):
        try:
            num_samples = len(loader.dataset)
        except TypeError:  # an iterable-style dataset without a length
            num_samples = None
    if num_samples is not None and (isinstance(num_samples, bool) or num_samples < 0):
        raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
    device = torch.device(device) if device is not None else _model_device(scorer.model)
    sampler = getattr(loader, "sampler", None)
    total = len(sampler) if sampler is not None and hasattr(sampler, "__len__") else num_samples

    parts: list[CurvatureScores] = []
    with _progress_bar(total, progress, "curvature") as bar:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                raise TypeError(
                    "score_dataset's loader must yield (x, y, ids) batches; wrap a dataset of "
                    "(x, y) items in curvkern.IndexedDataset"
                )
            x, y, ids = batch
            ids = torch.as_tensor(ids)
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            parts.append(scorer.score(x, y, ids).to("cpu"))
            bar.update(len(ids))

    fields = (*SCORE_FIELDS, "n_probes")
    if parts:
        local = CurvatureScores.cat(parts)
        ids = local.ids
        values = torch.stack([getattr(local, f).double() for f in fields], dim=1)
        dtype = local.curvature.dtype
    else:
        ids = torch.empty(0, dtype=torch.int64)
        values = torch.empty(0, len(fields), dtype=torch.float64)
        dtype = torch.float32
    ids, values = _all_gather_rows(ids, values)
    if _distributed():  # ranks agree on the dtype: the widest of theirs
        wide = torch.tensor([int(dtype == torch.float64)], device=_collective_device())
        dist.all_reduce(wide, op=dist.ReduceOp.MAX)
        dtype = torch.float64 if int(wide) else torch.float32

    if num_samples is None:
        num_samples = int(ids.max()) + 1 if ids.numel() else 0
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_samples):
        bad = ids[(ids < 0) | (ids >= num_samples)][0]
        raise ValueError(f"ids must lie in [0, num_samples = {num_samples}), got id {int(bad)}")
    result = CurvatureScores.empty(scorer.h, scorer.method, dtype=dtype, size=num_samples)
    for i, field in enumerate(SCORE_FIELDS):
        getattr(result, field)[ids] = values[:, i].to(dtype)
    result.n_probes[ids] = values[:, -1].long()
    return result


class CurvatureTracker:
    """Per-sample curvature averaged over training epochs, for any training loop.

    Call ``score_epoch(loader, epoch)`` at the epochs to average (the paper scores every epoch
    or a regular subset). With ``path`` set, the history is saved after every epoch, atomically
    (written to a temporary file, then renamed over the old one), as NumPy .npz without
    pickles; a tracker constructed on an existing file resumes from it.

    Args:
        scorer: the CurvatureScorer to apply each epoch.
        num_samples: N, the number of samples (ids 0 .. N-1).
        path: optional .npz file to save to and resume from.

    Attributes:
        epochs: the scored epochs, ascending.
        history: (E, N) curvature per scored epoch.
        mean: (N,) curvature averaged over the scored epochs (NaN where never scored).
    """

    FORMAT_VERSION = 1

    def __init__(
        self, scorer: CurvatureScorer, num_samples: int, path: str | os.PathLike | None = None
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
        self.scorer = scorer
        self.num_samples = num_samples
        self.path = None if path is None else Path(path)
        self._epochs: dict[int, dict[str, Tensor]] = {}
        if self.path is not None and self.path.exists():
            self._load(self.path)

    # -- scoring ----------------------------------------------------------------------------

    def score_epoch(
        self, loader: Iterable, epoch: int, progress: bool = True, device=None
    ) -> CurvatureScores:
        """Scores every sample the loader yields as epoch ``epoch`` (replacing an earlier one).

        Returns:
            This epoch's CurvatureScores (N rows, on the CPU).
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch must be an int, got {epoch!r}")
        scores = score_dataset(self.scorer, loader, self.num_samples, progress, device)
        self.record(epoch, scores)
        return scores

    def record(self, epoch: int, scores: CurvatureScores) -> None:
        """Stores already computed scores (N rows) as epoch ``epoch``, and saves."""
        if len(scores) != self.num_samples:
            raise ValueError(
                f"scores must have num_samples = {self.num_samples} rows, got {len(scores)}"
            )
        # Kept in the scores' own precision (float32 unless the model runs in float64).
        self._epochs[int(epoch)] = {
            name: getattr(scores, name).detach().cpu() for name in SCORE_FIELDS
        }
        if self.path is not None and _is_main_process():
            self.save(self.path)

    # -- results ----------------------------------------------------------------------------

    @property
    def epochs(self) -> list[int]:
        return sorted(self._epochs)

    def field_history(self, name: str = "curvature") -> Tensor:
        """(E, N) history of one score field (one of SCORE_FIELDS), rows in epoch order."""
        if name not in SCORE_FIELDS:
            raise ValueError(f"name must be one of {SCORE_FIELDS}, got {name!r}")
        if not self._epochs:
            return torch.empty(0, self.num_samples)
        rows = [self._epochs[e][name] for e in self.epochs]
        dtype = torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32
        return torch.stack([r.to(dtype) for r in rows])

    def field_mean(self, name: str = "curvature") -> Tensor:
        """(N,) mean of one score field over the scored epochs (NaN where never scored)."""
        history = self.field_history(name)
        if history.shape[0] == 0:
            return torch.full((self.num_samples,), math.nan)
        return torch.nanmean(history, dim=0)

    @property
    def history(self) -> Tensor:
        return self.field_history("curvature")

    @property
    def mean(self) -> Tensor:
        return self.field_mean("curvature")

    # -- persistence ------------------------------------------------------------------------

    def _metadata(self) -> dict:
        s = self.scorer
        return {
            "format": self.FORMAT_VERSION,
            "num_samples": self.num_samples,
            "method": s.method,
            "h": s.h,
            "n_probes": s.n_probes,
            "seed": s.seed,
            "rtol": s.rtol,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the history to ``path`` (.npz) atomically: a crash leaves the old file."""
        arrays = {"epochs": np.asarray(self.epochs, dtype=np.int64)}
        for name in SCORE_FIELDS:
            arrays[name] = self.field_history(name).numpy()
        arrays["metadata"] = np.frombuffer(json.dumps(self._metadata()).encode(), dtype=np.uint8)
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    def _load(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["metadata"].tobytes().decode())
            if meta.get("format") != self.FORMAT_VERSION:
                raise ValueError(f"{path}: unknown tracker file format {meta.get('format')!r}")
            ours = self._metadata()
            if meta["num_samples"] != self.num_samples:
                raise ValueError(
                    f"{path} holds {meta['num_samples']} samples, this tracker has "
                    f"num_samples = {self.num_samples}"
                )
            differ = {
                k: (meta.get(k), ours[k])
                for k in ("method", "h", "n_probes", "seed", "rtol")
                if meta.get(k) != ours[k]
            }
            if differ:
                detail = ", ".join(f"{k}: file {a!r}, scorer {b!r}" for k, (a, b) in differ.items())
                raise ValueError(
                    f"{path} was written by a scorer with other settings ({detail}); scores of "
                    f"different settings do not average. Use another path, or the same settings."
                )
            for i, epoch in enumerate(data["epochs"].tolist()):
                self._epochs[int(epoch)] = {
                    name: torch.from_numpy(data[name][i].copy()) for name in SCORE_FIELDS
                }


def _checkpoint_epochs(checkpoints) -> list[tuple[int, str | os.PathLike]]:
    """(epoch, path) pairs from a mapping {epoch: path} or a sequence of paths.

    For a sequence, the epoch is the last number in each file name when every name has one and
    they are distinct (ckpt_012.pt -> 12), else the position in the sequence.
    """
    if isinstance(checkpoints, Mapping):
        return sorted((int(e), p) for e, p in checkpoints.items())
    paths = list(checkpoints)
    numbers = [re.findall(r"\d+", Path(p).stem) for p in paths]
    if all(numbers) and len({int(n[-1]) for n in numbers}) == len(paths):
        return sorted((int(n[-1]), p) for n, p in zip(numbers, paths, strict=True))
    return list(enumerate(paths))


def _state_dict_of(obj, path) -> Mapping[str, Tensor]:
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
    keys = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(
        f"{path}: expected a state_dict, or a dict with one under 'state_dict', "
        f"'model_state_dict' or 'model'; found {keys}"
    )


def score_checkpoints(
    model: nn.Module,
    checkpoints: Mapping[int, str | os.PathLike] | Sequence[str | os.PathLike],
    loader: Iterable,
    *,
    num_samples: int | None = None,
    path: str | os.PathLike | None = None,
    progress: bool = True,
    device=None,
    **scorer_kwargs,
) -> CurvatureTracker:
    """Scores a series of saved checkpoints, as the paper does, into a CurvatureTracker.

    Each checkpoint is loaded with ``torch.load(..., weights_only=True)`` (no pickled code is
    run) into ``model``, whose own state is restored at the end. Epochs already in the
    tracker's file (``path``) are not scored again, so an interrupted run resumes.

    Args:
        model: the architecture the checkpoints belong to.
        checkpoints: {epoch: file}, or a sequence of files (epochs from the numbers in their
            names, e.g. ckpt_012.pt -> 12, else their positions).
        loader: (x, y, ids) batches, as for score_dataset.
        num_samples: N (default: len(loader.dataset)).
        path: optional .npz file for the tracker (saved after every checkpoint).
        progress: progress bars.
        device: where to score (default: the model's device).
        **scorer_kwargs: CurvatureScorer arguments (loss_fn, h, n_probes, seed, method, ...).
    Returns:
        The CurvatureTracker holding one epoch per checkpoint.
    """
    if num_samples is None:
        num_samples = len(loader.dataset)
    tracker = CurvatureTracker(CurvatureScorer(model, **scorer_kwargs), num_samples, path)
    pending = [(e, p) for e, p in _checkpoint_epochs(checkpoints) if e not in tracker._epochs]
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    map_location = device if device is not None else _model_device(model) or "cpu"
    try:
        for epoch, file in pending:
            state = torch.load(file, map_location=map_location, weights_only=True)
            model.load_state_dict(_state_dict_of(state, file))
            tracker.score_epoch(loader, epoch, progress=progress, device=device)
    finally:
        model.load_state_dict(original)
    return tracker
