"""Saved checkpoints: their epochs, loading one into a model, and scoring a series of them."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .dataset import _model_device, _num_samples_of
from .scorer import CurvatureScorer
from .tracker import CurvatureTracker

__all__ = [
    "epoch_in_name",
    "checkpoint_epochs",
    "load_checkpoint",
    "load_error_line",
    "restored_state",
    "score_checkpoints",
]


def epoch_in_name(path: str | os.PathLike) -> int | None:
    """The epoch a checkpoint's file name gives: the last number in it (ckpt_012.pt -> 12), or
    None when it has none."""
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else None


def checkpoint_epochs(checkpoints) -> list[tuple[int, str | os.PathLike]]:
    """(epoch, path) pairs from a mapping {epoch: path} or a sequence of paths.

    For a sequence, the epoch is the last number in each file name when every name has one and
    they are distinct (ckpt_012.pt -> 12), else the position in the sequence.
    """
    if isinstance(checkpoints, Mapping):
        return sorted((int(e), p) for e, p in checkpoints.items())
    paths = list(checkpoints)
    epochs = [epoch_in_name(p) for p in paths]
    if all(e is not None for e in epochs) and len(set(epochs)) == len(paths):
        return sorted(zip(epochs, paths, strict=True))
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


def load_checkpoint(model: nn.Module, path: str | os.PathLike, map_location=None) -> None:
    """Loads the checkpoint at ``path`` into ``model``.

    The file is read with ``torch.load(..., weights_only=True)`` (no pickled code is run); it
    holds a state_dict, or a dict with one under 'state_dict', 'model_state_dict' or 'model'.

    Args:
        model: the architecture the checkpoint belongs to.
        path: the checkpoint file.
        map_location: where to load the tensors (default: the model's device, else the CPU).
    Raises:
        ValueError: the file holds no state_dict.
        RuntimeError: the state_dict does not fit the model (load_state_dict's report; see
            load_error_line), or the file holds more than weights.
    """
    if map_location is None:
        map_location = _model_device(model) or "cpu"
    state = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(_state_dict_of(state, path))


def load_error_line(error: BaseException) -> str:
    """load_state_dict's multi-line report (missing, unexpected, size mismatch) as one line."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    text = "; ".join(lines) if lines else type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."


@contextlib.contextmanager
def restored_state(model: nn.Module) -> Iterator[None]:
    """Gives ``model`` its state_dict back on leaving the block, also when it raises."""
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(original)


def score_checkpoints(
    model: nn.Module,
    checkpoints: Mapping[int, str | os.PathLike] | Sequence[str | os.PathLike],
    loader: Iterable,
    *,
    num_samples: int | None = None,
    path: str | os.PathLike | None = None,
    keep_history: bool = True,
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
        num_samples: N (default: as score_dataset finds it from loader.dataset).
        path: optional file for the tracker (saved after every checkpoint).
        keep_history: as for CurvatureTracker.
        progress: progress bars.
        device: where to score (default: the model's device).
        **scorer_kwargs: CurvatureScorer arguments (loss_fn, h, n_probes, seed, method, ...).
    Returns:
        The CurvatureTracker holding one epoch per checkpoint.
    """
    if num_samples is None:
        num_samples = _num_samples_of(loader.dataset)
    scorer = CurvatureScorer(model, **scorer_kwargs)
    tracker = CurvatureTracker(scorer, num_samples, path, keep_history=keep_history)
    done = set(tracker.epochs)
    pending = [(e, p) for e, p in checkpoint_epochs(checkpoints) if e not in done]
    with restored_state(model):
        for epoch, file in pending:
            load_checkpoint(model, file, device)  # None: the model's device (see there)
            tracker.score_epoch(loader, epoch, progress=progress, device=device)
    return tracker
