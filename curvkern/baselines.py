"""The training-dynamics baselines, each defined once: ``BASELINES``.

Every baseline is a per-sample statistic over the scored epochs of one score field, computed by
``CurvatureTracker.baselines()`` from the tracker's running statistics. The tracker, the HTML
report (axis labels and scales) and the examples (table names, which end ranks first) all read
this table; adding a baseline means adding one entry here (and a test).

They are measured at x in eval mode at the scored epochs (the scoring pass), while the papers
record them on the training minibatches in train mode (augmentation, dropout, BatchNorm batch
statistics) at every step or epoch; values differ accordingly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Baseline", "BASELINES"]


def _mean(stats, field: str) -> Tensor:
    """Mean over the epochs where the field was finite."""
    return stats.mean(field)


def _std(stats, field: str) -> Tensor:
    """Standard deviation over the epochs where the field was finite (ddof 0)."""
    mean = stats.mean(field)
    count = stats.count[field]
    square = torch.where(count > 0, stats.extra[f"{field}_sq"] / count.clamp(min=1), math.nan)
    # E[p^2] - E[p]^2 in float64: rounding leaves |error| ~ 1e-16, clamped at 0.
    return (square - mean * mean).clamp(min=0).sqrt()


def _forgetting(stats, field: str) -> Tensor:
    """Correct -> incorrect transitions between consecutive scored epochs; +inf when never
    correct, NaN when never scored."""
    forgetting = torch.where(
        stats.extra["ever_correct"], stats.extra["forgotten"].double(), math.inf
    )
    return torch.where(stats.count[field] > 0, forgetting, math.nan)


@dataclass(frozen=True)
class Baseline:
    """One training-dynamics baseline.

    Attributes:
        field: the score field (one of curvkern.scores.SCORE_FIELDS) it is computed from.
        statistic: (running statistics, field) -> (N,) float64 tensor: the statistic over the
            epochs (a mean, a standard deviation, a count of forgetting events).
        label: what a plot's axis calls it (the report).
        title: what a table calls it (the examples), saying which end comes first.
        direction: +1 where a high value flags a sample (more memorized or harder), -1 where a
            low one does.
        log: drawn on a log axis.
    """

    field: str
    statistic: Callable[[object, str], Tensor]
    label: str
    title: str
    direction: int
    log: bool


# In the order tracker.baselines() returns them (the report's columns, the examples' tables).
BASELINES: dict[str, Baseline] = {
    # Cumulative training loss.
    "loss_mean": Baseline(
        "loss", _mean, "mean loss", "loss, mean over epochs", direction=1, log=True
    ),
    "grad_norm_mean": Baseline(
        "grad_norm",
        _mean,
        "mean input-gradient norm",
        "input-gradient norm, mean over epochs",
        direction=1,
        log=True,
    ),
    # Area under the margin (Pleiss et al. 2020): mean of logit_y - max_{j != y} logit_j.
    "aum": Baseline(
        "margin",
        _mean,
        "area under the margin",
        "AUM: margin, mean over epochs (low first)",
        direction=-1,
        log=False,
    ),
    # Dataset cartography (Swayamdipta et al. 2020): mean p_label and its std over epochs.
    "confidence": Baseline(
        "p_label",
        _mean,
        "confidence (mean p of the label)",
        "confidence: p(label), mean (low first)",
        direction=-1,
        log=False,
    ),
    "variability": Baseline(
        "p_label",
        _std,
        "variability (std of p over epochs)",
        "variability: p(label), std over epochs",
        direction=1,
        log=False,
    ),
    # Forgetting events (Toneva et al. 2019).
    "forgetting": Baseline(
        "correct", _forgetting, "forgetting events", "forgetting events", direction=1, log=False
    ),
    # EL2N (Paul et al. 2021): mean ||softmax - onehot(y)||.
    "el2n": Baseline(
        "el2n", _mean, "EL2N (mean)", "EL2N, mean over epochs", direction=1, log=False
    ),
}
