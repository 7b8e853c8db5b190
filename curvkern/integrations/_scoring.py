"""What the training-framework callbacks share: a tracker fed by a sequential, indexed loader."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data import items_fingerprint
from ..dataset import IndexedDataset
from ..tracker import CurvatureTracker


class EpochScoring:
    """Scores ``dataset`` at the end of every ``every_n_epochs``-th epoch into ``tracker``.

    The loader is the callback's own: sequential, over ``IndexedDataset(dataset)``, so ids are
    the data set's indices whatever order, sharding or column filtering the training loop
    uses. Under torch.distributed each rank scores a DistributedSampler's shard (not shuffled)
    and every rank's tracker gets the full result (see :func:`curvkern.score_dataset`).

    Args:
        dataset: a map-style data set; its items go through ``collate_fn``.
        batch_size: samples per scoring batch (each costs n_probes + 1 passes of that size).
        path: the tracker's file (saved every scored epoch; resumed from when it exists).
        every_n_epochs: score after epochs every_n_epochs - 1, 2 * every_n_epochs - 1, ...
        keep_history: the tracker's keep_history.
        collate_fn: turns a list of IndexedDataset items into a scoring batch; None: torch's.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        path: str | os.PathLike | None,
        every_n_epochs: int,
        keep_history: bool,
        collate_fn: Callable | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, int)
            or every_n_epochs < 1
        ):
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        try:
            len(dataset)
        except TypeError:
            raise TypeError(
                "dataset must be a map-style data set with a length (ids are its indices), got "
                f"{type(dataset).__name__}"
            ) from None
        self.dataset = IndexedDataset(dataset)
        self.batch_size = batch_size
        self.path = path
        self.every_n_epochs = every_n_epochs
        self.keep_history = keep_history
        self.collate_fn = collate_fn
        self.tracker: CurvatureTracker | None = None

    def due(self, epoch: int) -> bool:
        """Whether the epoch with 0-based index ``epoch``, just finished, is to be scored."""
        return (epoch + 1) % self.every_n_epochs == 0

    def score(self, make_scorer: Callable[[], object], epoch: int) -> None:
        """Scores the data set as ``epoch``, making the tracker (and its scorer) the first time."""
        if self.tracker is None:
            self.tracker = CurvatureTracker(
                make_scorer(),
                self.dataset.num_samples,
                self.path,
                keep_history=self.keep_history,
                # A file resumed with other data is refused (its fingerprint is recorded).
                data_fingerprint=items_fingerprint(self.dataset.dataset),
            )
        sampler = (
            DistributedSampler(self.dataset, shuffle=False)
            if dist.is_available() and dist.is_initialized()
            else None
        )
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            collate_fn=self.collate_fn,
        )
        self.tracker.score_epoch(loader, epoch, progress=False)


class ScoringCallback:
    """What both frameworks' callbacks share: their constructor and ``tracker``. A subclass
    (listed before the framework's callback class) sets ``_collate_fn`` (a staticmethod) and
    may override ``_items`` to adapt the data set's items."""

    _collate_fn: Callable | None = None

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int = 64,
        path: str | os.PathLike | None = None,
        every_n_epochs: int = 1,
        keep_history: bool = True,
        **scorer_kwargs,
    ) -> None:
        super().__init__()
        self._dataset = dataset
        self._scoring = EpochScoring(
            self._items(dataset),
            batch_size=batch_size,
            path=path,
            every_n_epochs=every_n_epochs,
            keep_history=keep_history,
            collate_fn=self._collate_fn,
        )
        self.scorer_kwargs = scorer_kwargs

    @staticmethod
    def _items(dataset: Dataset) -> Dataset:
        return dataset

    @property
    def dataset(self) -> Dataset:
        """The data set to score, as given (its items before ``_items`` adapts them)."""
        return self._dataset

    @property
    def tracker(self) -> CurvatureTracker | None:
        return self._scoring.tracker
