"""CurvatureTracker: epoch averaging and the training-dynamics baselines' running statistics.

Its files are written and read by curvkern.io; the baselines are defined in curvkern.baselines.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from . import io
from .baselines import BASELINES
from .dataset import score_dataset, scorer_setting
from .diagnostics import _outside_caller_level
from .distributed import is_main_process
from .metrics import TopK, topk
from .scores import SCORE_FIELDS, CurvatureScores, qualified_name

__all__ = ["CurvatureTracker"]


class _Running:
    """Per-sample running statistics of epochs folded in epoch order: O(N) per field.

    For every tracked field: the sum (float64) and the count of its finite values per sample,
    so that the mean skips epochs where a sample was not scored. For ``p_label`` also the sum of
    squares (variability); for ``correct`` the last finite value (-1 before any), the number of
    correct -> incorrect transitions, and whether it was ever correct (forgetting).
    """

    def __init__(self, fields: Sequence[str], num_samples: int) -> None:
        n = num_samples
        self.fields = tuple(fields)
        self.sum = {f: torch.zeros(n, dtype=torch.float64) for f in self.fields}
        self.count = {f: torch.zeros(n, dtype=torch.int32) for f in self.fields}
        self.extra: dict[str, Tensor] = {}
        if "p_label" in self.fields:
            self.extra["p_label_sq"] = torch.zeros(n, dtype=torch.float64)
        if "correct" in self.fields:
            self.extra["last_correct"] = torch.full((n,), -1, dtype=torch.int8)
            self.extra["forgotten"] = torch.zeros(n, dtype=torch.int32)
            self.extra["ever_correct"] = torch.zeros(n, dtype=torch.bool)

    def fold(self, values: Mapping[str, Tensor]) -> None:
        """Adds one epoch ({field: (N,) tensor}, NaN where not scored), after those folded."""
        for f in self.fields:
            v = values[f]
            finite = torch.isfinite(v)
            # A copy (also of float64 input, which may be a kept epoch), 0 where not finite.
            v = v.to(torch.float64, copy=True).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            self.sum[f] += v
            self.count[f] += finite
            if f == "p_label":
                self.extra["p_label_sq"].addcmul_(v, v)
            if f == "correct":
                last = self.extra["last_correct"]
                now = torch.where(finite, (v == 1).to(torch.int8), -1).to(torch.int8)
                self.extra["forgotten"] += (last == 1) & (now == 0)
                self.extra["ever_correct"] |= now == 1
                self.extra["last_correct"] = torch.where(now >= 0, now, last)

    # The extra statistics that belong to each field.
    _EXTRA = {
        "p_label_sq": "p_label",
        "last_correct": "correct",
        "forgotten": "correct",
        "ever_correct": "correct",
    }

    def copy(self, fields: Sequence[str]) -> _Running:
        """A copy of the statistics of ``fields`` only (a subset of self.fields)."""
        out = _Running.__new__(_Running)
        out.fields = tuple(fields)
        out.sum = {f: self.sum[f].clone() for f in out.fields}
        out.count = {f: self.count[f].clone() for f in out.fields}
        out.extra = {k: t.clone() for k, t in self.extra.items() if self._EXTRA[k] in out.fields}
        return out

    def mean(self, field: str) -> Tensor:
        """(N,) float64 mean over the epochs where the field was finite, NaN where never."""
        count = self.count[field]
        return torch.where(count > 0, self.sum[field] / count.clamp(min=1), math.nan)

    def arrays(self) -> dict[str, Tensor]:
        """The state as named (N,) tensors, for the file."""
        out = {f"sum.{f}": t for f, t in self.sum.items()}
        out.update({f"count.{f}": t for f, t in self.count.items()})
        out.update(self.extra)
        return out

    @classmethod
    def from_arrays(cls, fields: Sequence[str], num_samples: int, arrays) -> _Running:
        """The state saved by :meth:`arrays`; fields missing from it start empty."""
        out = cls(fields, num_samples)
        for f in out.fields:
            if f"sum.{f}" in arrays:
                out.sum[f] = arrays[f"sum.{f}"].clone()
                out.count[f] = arrays[f"count.{f}"].clone()
        for k in out.extra:
            if k in arrays:
                out.extra[k] = arrays[k].clone()
        return out


class CurvatureTracker:
    """Per-sample scores over training epochs, their means and the training-dynamics baselines.

    Call ``score_epoch(loader, epoch)`` at the epochs to average (the paper scores every epoch
    or a regular subset), or ``record(epoch, scores)`` with scores computed elsewhere.

    With ``keep_history=True`` every epoch's scores are kept (``history``, ``field_history``),
    in memory and, with ``path``, one file per epoch: memory grows as (E, N) per field, saving
    an epoch costs O(N). With ``keep_history=False`` only running statistics are kept: memory
    and the file stay O(N) per field however many epochs are scored, and saving costs O(N).
    Epochs must then be recorded in increasing order; the last recorded epoch may be recorded
    again (it replaces the last one exactly, e.g. after a training run resumed from the
    checkpoint before it), an earlier one may not (its contribution is folded into sums).

    With ``path`` set the state is saved after every epoch, crash-safe (each file written to a
    temporary name, synced, then renamed; NumPy .npz, never pickles; see curvkern.io), and a
    tracker constructed on an existing file resumes from it exactly. The file must have been
    written by a scorer with the same settings and the same ``keep_history``. The file also
    records what made its scores: the loss function's qualified name, and where given the model
    factory and a fingerprint of the data; a tracker with other ones refuses it, naming the
    field (a file of an older curvkern, which did not record them, loads with a warning).

    Several processes may write one path (see "Several writers" in docs/guide.md): each save
    holds a lock on ``<path>.lock``; with keep_history=True it merges its epochs with those
    other writers saved (the file ends with the union; an epoch both recorded keeps the later
    save's), with keep_history=False a save that finds the file changed by another writer
    raises TrackerConflictError and saves nothing (running sums cannot take another writer's
    epochs): score into separate files and merge them (curvkern.merge_trackers).

    Args:
        scorer: the CurvatureScorer (or any scorer with its ``score`` signature) to apply.
        num_samples: N, the number of samples (ids 0 .. N-1).
        path: optional file to save to and resume from (e.g. "curvature.npz").
        keep_history: keep every epoch's scores (True) or only running statistics (False).
        model_factory: what made the model (the command line gives MODULE:FACTORY), recorded
            in the file and checked when resuming; None: not recorded or checked.
        data_fingerprint: curvkern.data.fingerprint of the data, recorded in the file and
            checked when resuming; None: not recorded or checked.

    Attributes:
        epochs: the recorded epochs, ascending.
        history: (E, N) curvature per recorded epoch (keep_history=True only).
        mean: (N,) curvature averaged over the recorded epochs (NaN where never scored; rank
            with ``top(k)``, which puts never-scored ids last).
    """

    def __init__(
        self,
        scorer,
        num_samples: int,
        path: str | os.PathLike | None = None,
        *,
        keep_history: bool = True,
        model_factory: str | None = None,
        data_fingerprint: dict | None = None,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
        if not isinstance(keep_history, bool):
            raise TypeError(f"keep_history must be a bool, got {keep_history!r}")
        self.scorer = scorer
        settings = {k: scorer_setting(scorer, k) for k in io.SETTINGS}
        self._origin = self._origin_of(scorer, model_factory, data_fingerprint)
        self._setup(num_samples, path, keep_history, settings, read_only=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CurvatureTracker:
        """A read-only tracker from a saved file, without a scorer (e.g. for reports).

        Its means, baselines and (with a kept history) history are those of the file;
        ``record`` and ``score_epoch`` raise.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: not a tracker file, or one of an unknown format.
        """
        if not Path(path).exists():
            raise FileNotFoundError(f"no tracker file at {path}")
        metadata = io.read_metadata(path)
        tracker = cls.__new__(cls)
        tracker.scorer = None
        keep_history = metadata.get("layout", "history") == "history"
        settings = io.settings_in(metadata)
        tracker._origin = {k: (metadata.get("origin") or {}).get(k) for k in io.ORIGIN}
        tracker._setup(int(metadata["num_samples"]), path, keep_history, settings, read_only=True)
        return tracker

    def _setup(self, num_samples, path, keep_history, settings, read_only) -> None:
        self.num_samples = num_samples
        self.path = None if path is None else Path(path)
        self.keep_history = keep_history
        self._settings = settings
        self._read_only = read_only
        self._dtype = torch.float32  # float64 once any recorded epoch is
        # keep_history=True: every epoch's {field: (N,)}, and those not yet in files.
        self._epochs: dict[int, dict[str, Tensor]] = {}
        self._unsaved: set[int] = set()
        # keep_history=False: the epochs before the last one, folded; the last one as recorded.
        self._folded = None if keep_history else _Running(SCORE_FIELDS, num_samples)
        self._folded_epochs: list[int] = []
        self._last: tuple[int, dict[str, Tensor]] | None = None
        self._unscored_counts_warned: set[int] = set()
        # Which version of the file this tracker last read or wrote, so that a save sees what
        # other writers did since: keep_history=False its save_id, keep_history=True the
        # identity of each epoch's file.
        self._disk_id: str | None = None
        self._file_ids: dict[int, tuple[int, int, int]] = {}
        if self.path is not None and self.path.exists():
            if read_only:  # no lock file: a read-only folder must stay readable
                self._load(self.path)
            else:
                with io.locked(self.path):
                    self._load(self.path)

    # -- recording --------------------------------------------------------------------------

    def score_epoch(
        self, loader: Iterable, epoch: int, progress: bool = True, device=None
    ) -> CurvatureScores:
        """Scores every sample the loader yields as epoch ``epoch``, records it and saves.

        Args:
            loader: (x, y, ids) or (x, y, ids, model_inputs) batches, as for score_dataset.
            epoch: the training epoch (an int).
            progress: show a progress bar on a terminal.
            device: where to score (default: the scorer's model's device).
        Returns:
            This epoch's CurvatureScores (N rows, on the CPU).
        """
        self._check_writable()
        _check_epoch(epoch)
        self._check_order(epoch)  # before the expensive pass
        scores = score_dataset(self.scorer, loader, self.num_samples, progress, device)
        self.record(epoch, scores)
        return scores

    def record(self, epoch: int, scores: CurvatureScores) -> None:
        """Stores already computed scores of ids 0 .. N-1 as epoch ``epoch``, and saves.

        Args:
            epoch: the training epoch. With keep_history=True an epoch already recorded is
                replaced; with keep_history=False it must be above every recorded epoch, or
                equal to the last one (which it then replaces).
            scores: N rows, one per id 0 .. N-1 (in any order), e.g. from score_dataset, made
                with this tracker's scorer settings.
        Raises:
            ValueError: other row counts or ids, scores of another h, method or n_probes, or
                (keep_history=False) an epoch before the last recorded one.
        """
        self._check_writable()
        _check_epoch(epoch)
        values = self._checked_values(scores)
        self._check_order(epoch)
        self._warn_unscored(epoch, values["curvature"])
        if any(v.dtype == torch.float64 for v in values.values()):
            self._dtype = torch.float64
        if self.keep_history:
            self._epochs[epoch] = values
            self._unsaved.add(epoch)
        else:
            if self._last is not None and epoch > self._last[0]:
                self._folded.fold(self._last[1])
                self._folded_epochs.append(self._last[0])
            self._last = (epoch, values)
        if self.path is not None and is_main_process():
            self.save()

    def _warn_unscored(self, epoch: int, curvature: Tensor) -> None:
        """Warns when an epoch leaves ids without a curvature, once per distinct count: a
        loader over part of the data (a Subset, a random_split part, drop_last) does so at every
        epoch, and one warning says it; a change in the count is news and warns again."""
        missing = int((~torch.isfinite(curvature)).sum())
        if missing == 0 or missing in self._unscored_counts_warned:
            return
        self._unscored_counts_warned.add(missing)
        first = int((~torch.isfinite(curvature)).nonzero()[0])
        warnings.warn(
            f"epoch {epoch} left {missing} of {self.num_samples} ids without a curvature (NaN; "
            f"the first is id {first}): the loader did not yield them (a Subset, a random_split "
            "part, drop_last=True) or their scores were refused with a SampleWarning. Means "
            "skip them and tracker.top(k) ranks them last; torch's mean.topk(k) would rank "
            "NaN first. Score every id to average all of them (this warning repeats only when "
            "the count changes).",
            UserWarning,
            stacklevel=_outside_caller_level(),
        )

    def _check_writable(self) -> None:
        if self._read_only:
            raise RuntimeError(
                f"this tracker was opened read-only by CurvatureTracker.load({str(self.path)!r}) "
                "and has no scorer; to add epochs, construct "
                "CurvatureTracker(scorer, num_samples, path) with the same scorer settings"
            )

    def _check_order(self, epoch: int) -> None:
        if not self.keep_history and self._last is not None and epoch < self._last[0]:
            raise ValueError(
                f"epoch {epoch} comes before the last recorded epoch {self._last[0]}: with "
                "keep_history=False epochs are folded into running statistics in order, and "
                f"only the last one ({self._last[0]}) can be recorded again. Use "
                "keep_history=True to record epochs in any order or replace any of them."
            )

    def _checked_values(self, scores: CurvatureScores) -> dict[str, Tensor]:
        """{field: (N,) tensor on the CPU, row i = id i} after checking rows and settings."""
        n = self.num_samples
        if len(scores) != n:
            raise ValueError(f"scores must have num_samples = {n} rows, got {len(scores)}")
        ids = scores.ids.detach().cpu()
        order = None
        if not torch.equal(ids, torch.arange(n)):
            order = torch.argsort(ids)
            if not torch.equal(ids[order], torch.arange(n)):
                raise ValueError(
                    f"scores.ids must hold every id 0 .. {n - 1} once (as score_dataset returns); "
                    "scores of part of the data set go through score_dataset(..., num_samples=N)"
                )
        want = self._settings
        for name, have in (("h", scores.h), ("method", scores.method)):
            if want[name] is not None and have != want[name]:
                raise ValueError(
                    f"scores were made with {name} = {have!r}, this tracker's scorer has "
                    f"{name} = {want[name]!r}; scores of different settings do not average"
                )
        if want["n_probes"] is not None:
            probes = scores.n_probes.detach().cpu()
            probes = probes[probes > 0]  # 0: a sample that was not scored
            low = want["n_probes"]
            high = low if want["rtol"] is None else want["max_probes"] or low
            outside = probes[(probes < low) | (probes > high)]
            if outside.numel():
                expected = f"{low}" if low == high else f"{low} to {high} (rtol)"
                raise ValueError(
                    f"scores were made with n_probes = {int(outside[0])}, this tracker's scorer "
                    f"gives {expected}; scores of different settings do not average"
                )
        self._check_loss_of(scores)
        values = {}
        for name in SCORE_FIELDS:
            v = getattr(scores, name).detach().cpu()
            values[name] = (v if order is None else v[order]).clone()
        return values

    # -- results ----------------------------------------------------------------------------

    @property
    def epochs(self) -> list[int]:
        if self.keep_history:
            return sorted(self._epochs)
        return self._folded_epochs + ([self._last[0]] if self._last is not None else [])

    def _check_field(self, name: str) -> None:
        if name not in SCORE_FIELDS:
            raise ValueError(f"name must be one of {SCORE_FIELDS}, got {name!r}")

    def field_history(self, name: str = "curvature") -> Tensor:
        """(E, N) history of one score field (one of SCORE_FIELDS), rows in epoch order.

        Raises:
            RuntimeError: with keep_history=False (only running statistics are kept).
        """
        self._check_field(name)
        if not self.keep_history:
            raise RuntimeError(
                "this tracker has keep_history=False: it keeps running statistics (means, "
                "baselines()), not the per-epoch history; construct it with keep_history=True "
                "to get history and field_history"
            )
        if not self._epochs:
            return torch.empty(0, self.num_samples, dtype=self._dtype)
        return torch.stack([self._epochs[e][name].to(self._dtype) for e in self.epochs])

    def _statistics(self, fields: Sequence[str]) -> _Running:
        """Running statistics of ``fields`` over every recorded epoch, in epoch order."""
        if self.keep_history:
            stats = _Running(fields, self.num_samples)
            for e in self.epochs:
                stats.fold(self._epochs[e])
            return stats
        stats = self._folded.copy(fields)
        if self._last is not None:
            stats.fold(self._last[1])
        return stats

    def field_mean(self, name: str = "curvature") -> Tensor:
        """(N,) mean of one score field over the recorded epochs (NaN where never scored)."""
        self._check_field(name)
        return self._statistics((name,)).mean(name).to(self._dtype)

    @property
    def history(self) -> Tensor:
        return self.field_history("curvature")

    @property
    def mean(self) -> Tensor:
        return self.field_mean("curvature")

    def top(self, k: int, field: str = "curvature") -> TopK:
        """The k ids of highest mean ``field`` (one of SCORE_FIELDS), highest first.

        Ids never scored (NaN mean: outside the loader's Subset, random_split part or
        drop_last remainder) rank after every scored id and are never returned, unlike
        ``tracker.mean.topk(k)``, where torch ranks NaN first.

        Returns:
            ``(values, indices)``: (k,) means and the ids they belong to.
        Raises:
            ValueError: k outside [0, the number of scored ids].
        """
        return topk(self.field_mean(field), k)

    def baselines(self) -> dict[str, Tensor]:
        """The training-dynamics scores of every sample, from the recorded epochs (each one
        defined in curvkern.baselines.BASELINES).

        They are measured at x in eval mode at the recorded epochs (the scoring pass), while
        the papers record them on the training minibatches in train mode (augmentation,
        dropout, BatchNorm batch statistics) at every step or epoch; values differ accordingly.

        Returns:
            A dict of (N,) tensors (NaN where a sample has no finite value of the field):
            ``loss_mean`` mean loss (cumulative training loss); ``grad_norm_mean`` mean input
            gradient norm; ``aum`` mean margin logit_y - max_{j != y} logit_j (area under the
            margin, Pleiss et al. 2020); ``confidence`` mean p_label and ``variability`` its
            standard deviation over epochs, ddof 0 (dataset cartography, Swayamdipta et al.
            2020); ``forgetting`` the number of correct -> incorrect transitions between
            consecutive epochs where the sample was scored, +inf when never correct (Toneva et
            al. 2019); ``el2n`` mean ||softmax - onehot(y)|| (Paul et al. 2021).
        """
        fields = tuple(dict.fromkeys(b.field for b in BASELINES.values()))
        stats = self._statistics(fields)
        return {name: b.statistic(stats, b.field).to(self._dtype) for name, b in BASELINES.items()}

    def to_pandas(self):
        """One row per sample id: the mean of every score field over the recorded epochs, every
        baseline (see :meth:`baselines`) and ``epochs_scored``, the number of epochs in which
        the sample's curvature is finite.

        Returns:
            A pandas DataFrame of N rows: column ``id`` (0 .. N-1), the fields of SCORE_FIELDS
            (float means, NaN where never scored), the baselines (``el2n``, a field and a
            baseline, the field's mean, is one column), ``epochs_scored`` (int).
        Raises:
            ImportError: without pandas (pip install 'curvkern[data]').
        """
        try:
            import pandas
        except ImportError:
            raise ImportError(
                "CurvatureTracker.to_pandas needs pandas: pip install 'curvkern[data]'"
            ) from None
        stats = self._statistics(SCORE_FIELDS)
        columns = {"id": torch.arange(self.num_samples).numpy()}
        for name in SCORE_FIELDS:
            columns[name] = stats.mean(name).to(self._dtype).numpy()
        for name, value in self.baselines().items():
            columns[name] = value.numpy()
        columns["epochs_scored"] = stats.count["curvature"].to(torch.int64).numpy()
        return pandas.DataFrame(columns)

    # -- persistence ------------------------------------------------------------------------

    def save(self) -> None:
        """Writes what is not yet on disk to ``path``, crash-safe (see curvkern.io).

        keep_history=True: the files of the epochs recorded since the last save, then the
        index. keep_history=False: the running statistics and the last epoch, in one file.
        """
        if self.path is None:
            raise ValueError("this tracker has no path to save to; construct it with path=...")
        with io.locked(self.path):
            if self.keep_history:
                self._save_history()
            else:
                self._save_running()

    def _load(self, path: Path) -> None:
        stored = io.read_tracker(
            path, self.num_samples, self.keep_history, None if self._read_only else self._settings
        )
        self._dtype = stored.dtype
        if not self._read_only:
            unchecked = io.check_origin(path, stored.metadata, self._origin, what="this tracker")
            io.warn_unchecked(path, unchecked)
            self._disk_id = io.save_id(path, stored.metadata)
        if self.keep_history:
            self._epochs.update(stored.history)
            if stored.format == 1:  # rewritten as the current format at the next save
                self._unsaved = set(stored.epochs)
            else:
                folder = io.epochs_folder(path)
                for e in stored.epochs:
                    self._file_ids[e] = io.file_identity(folder / io.epoch_file_name(e))
        else:
            self._folded = _Running.from_arrays(SCORE_FIELDS, self.num_samples, stored.state)
            if stored.epochs:
                self._folded_epochs = stored.epochs[:-1]
                self._last = (stored.epochs[-1], stored.last)

    # -- what made the scores, and other writers -------------------------------------------

    @staticmethod
    def _origin_of(scorer, model_factory, data_fingerprint) -> dict:
        """The file's ``origin`` record of this tracker (see curvkern.io.ORIGIN)."""
        if model_factory is not None and not isinstance(model_factory, str):
            raise TypeError(f"model_factory must be a str or None, got {model_factory!r}")
        if data_fingerprint is not None and not isinstance(data_fingerprint, dict):
            raise TypeError(
                "data_fingerprint must be a dict from curvkern.data.fingerprint or None, got "
                f"{type(data_fingerprint).__name__}"
            )
        loss_fn = scorer_setting(scorer, "loss_fn")
        return {
            "loss_fn": None if loss_fn is None else qualified_name(loss_fn),
            "model": model_factory,
            "data": data_fingerprint,
        }

    def _check_loss_of(self, scores: CurvatureScores) -> None:
        """Scores made with another loss function are refused (scores built by hand, without
        a loss_fn name, cannot be checked)."""
        want, have = self._origin.get("loss_fn"), getattr(scores, "loss_fn", None)
        if want is not None and have is not None and have != want:
            raise ValueError(
                f"scores were made with loss_fn {have}, this tracker's scorer has loss_fn "
                f"{want}; scores of different losses do not average"
            )

    def _save_history(self) -> None:
        """Under the lock: takes in the epochs other writers saved since this tracker last
        looked, then writes this tracker's new epochs and the index of the union."""
        self._take_other_writers_epochs()
        metadata = io.tracker_metadata(
            self.num_samples, True, self._settings, self._dtype, self._origin
        )
        new = {e: self._epochs[e] for e in self._unsaved}
        io.write_history(self.path, metadata, self.epochs, new)
        folder = io.epochs_folder(self.path)
        for e in new:
            self._file_ids[e] = io.file_identity(folder / io.epoch_file_name(e))
        self._unsaved.clear()

    def _take_other_writers_epochs(self) -> None:
        if not self.path.exists():
            return
        metadata, arrays = io.read_arrays(self.path)
        fmt = io.check_index(self.path, metadata, self.num_samples, True, self._settings)
        io.check_origin(self.path, metadata, self._origin, what="this tracker")
        if fmt == 1:  # not yet rewritten: every epoch of it was read when this tracker opened it
            return
        folder = io.epochs_folder(self.path)
        for e in arrays["epochs"].tolist():
            if e in self._unsaved:  # recorded again here: this save's replaces it
                continue
            identity = io.file_identity(folder / io.epoch_file_name(e))
            if e in self._epochs and self._file_ids.get(e) == identity:
                continue
            values = io.read_epoch(self.path, e, self.num_samples)
            self._epochs[e] = values
            self._file_ids[e] = identity
            if any(v.dtype == torch.float64 for v in values.values()):
                self._dtype = torch.float64

    def _save_running(self) -> None:
        """Under the lock: refuses if another writer saved since this tracker last read or
        wrote the file, then writes it with a new save_id."""
        if io.save_id(self.path) != self._disk_id:
            epoch = "" if self._last is None else f" (epoch {self._last[0]} was not saved)"
            raise io.TrackerConflictError(
                f"another writer has saved {self.path} since this tracker read it{epoch}: with "
                "keep_history=False running statistics cannot take another writer's epochs; "
                "score each job into its own file with keep_history=True and merge them with "
                "curvkern.merge_trackers (or `curvkern merge`)"
            )
        metadata = io.tracker_metadata(
            self.num_samples, False, self._settings, self._dtype, self._origin
        )
        metadata["save_id"] = io.new_save_id()
        last = None if self._last is None else self._last[1]
        io.write_running(self.path, metadata, self.epochs, self._folded.arrays(), last)
        self._disk_id = metadata["save_id"]


def _check_epoch(epoch) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(f"epoch must be an int, got {epoch!r}")
