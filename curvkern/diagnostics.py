"""Warnings about scored samples: :class:`SampleWarning` (some samples of one ``score()``
call) and :class:`PassWarnings` (those of one pass over a data set, merged per kind)."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["SampleWarning", "PassWarnings"]


class SampleWarning(UserWarning):
    """A warning about some of the samples one ``score()`` call scored: ``count`` of ``total``,
    the first of them ``first_id``. :func:`curvkern.score_dataset` (and so the tracker) merges
    those of one pass over a data set into one warning per ``kind``, counted over the pass.

    Args:
        kind: what the warning is about, with the settings its message depends on: warnings
            of one kind are merged.
        count, total, first_id: the samples it is about, of how many, the first one's id.
        render: ``render(count, total, first_id, values)`` -> the message.
        values: (count,) float64 per-sample quantities the message summarizes, or None.
    """

    def __init__(
        self,
        kind: str,
        count: int,
        total: int,
        first_id: int,
        render: Callable[[int, int, int, Tensor | None], str],
        values: Tensor | None = None,
    ) -> None:
        self.kind, self.count, self.total, self.first_id = kind, count, total, first_id
        self.render, self.values = render, values
        super().__init__(render(count, total, first_id, values))

    @classmethod
    def combined(cls, parts: Sequence[SampleWarning], total: int) -> SampleWarning:
        """``parts`` (of one kind, in the order of their samples) as one warning about
        ``total`` samples: their counts summed, the first one's first id, their values joined."""
        kinds = {w.kind for w in parts}
        if len(kinds) != 1:
            raise ValueError(f"combined() takes warnings of one kind, got {sorted(kinds)}")
        first = parts[0]
        values = None
        if all(w.values is not None for w in parts):
            values = torch.cat([w.values for w in parts])
        count = sum(w.count for w in parts)
        return cls(first.kind, count, total, first.first_id, first.render, values)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _outside_caller_level() -> int:
    """The ``stacklevel`` that makes a warning raised by this function's caller point at the
    first frame outside curvkern."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


class PassWarnings:
    """The warnings of one pass over a data set, raised when it ends (or fails): each kind of
    :class:`SampleWarning` once, counted over the pass ("12 of 50000 samples"), not once per
    batch; any other warning once per distinct message and place. Used as ``with
    PassWarnings() as caught:`` around the pass and ``with caught.batch(len(ids)):`` around
    each ``score()`` call; the merged warnings point at the first caller outside curvkern (the
    user's score_dataset or score_epoch line)."""

    def __init__(self) -> None:
        self.scored = 0
        self.samples: dict[str, list[SampleWarning]] = {}
        self.others: dict[tuple, warnings.WarningMessage] = {}

    @contextlib.contextmanager
    def batch(self, size: int):
        """Records the warnings raised inside (the filters still apply: an "error" filter
        raises there, as without this)."""
        with warnings.catch_warnings(record=True) as caught:
            try:
                yield
            finally:
                self.scored += size
                for w in caught:
                    if isinstance(w.message, SampleWarning):
                        self.samples.setdefault(w.message.kind, []).append(w.message)
                    else:
                        key = (w.category, str(w.message), w.filename, w.lineno)
                        self.others.setdefault(key, w)

    def __enter__(self) -> PassWarnings:
        return self

    def __exit__(self, *exc) -> None:
        for w in self.others.values():
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        for parts in self.samples.values():  # joined once, not once per batch
            merged = SampleWarning.combined(parts, self.scored)
            warnings.warn(merged, stacklevel=_outside_caller_level())
