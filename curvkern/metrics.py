"""Metrics for judging scores: AUROC, ROC curves, TPR at a low FPR, balanced accuracy, cosine
similarity, Spearman correlation, top-k.

Inputs may be tensors, NumPy arrays or sequences; NaN scores (samples never scored, or whose loss
was not finite) are left out, together with their labels.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "auroc",
    "roc_curve",
    "tpr_at_fpr",
    "balanced_accuracy",
    "cosine_similarity",
    "spearman",
    "rankdata",
    "topk",
]


def _cpu_tensor(values) -> Tensor:
    """A tensor, NumPy array or sequence as a CPU tensor (of its own dtype)."""
    t = values if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))
    return t.detach().cpu()


def _vector(values, name: str) -> Tensor:
    t = _cpu_tensor(values).double()
    if t.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    return t


def _scores_and_labels(scores, positives) -> tuple[Tensor, Tensor]:
    s = _vector(scores, "scores")
    p = _cpu_tensor(positives)
    if p.shape != s.shape:
        raise ValueError(
            f"positives must have the shape of scores {tuple(s.shape)}, got {tuple(p.shape)}"
        )
    if p.dtype != torch.bool:
        if not bool(((p == 0) | (p == 1)).all()):
            raise ValueError("positives must be boolean or 0/1")
        p = p.bool()
    keep = ~torch.isnan(s)
    s, p = s[keep], p[keep]
    n_pos = int(p.sum())
    if n_pos == 0 or n_pos == p.numel():
        raise ValueError(
            f"ROC metrics need both positives and negatives among the scored samples, got {n_pos} "
            f"positives of {p.numel()}"
        )
    return s, p


def rankdata(values) -> Tensor:
    """Ranks 1..n of ``values``, ties given their average rank (as scipy.stats.rankdata)."""
    v = _vector(values, "values")
    order = torch.argsort(v, stable=True)
    sorted_v = v[order]
    n = v.numel()
    # start of each run of equal values, and the average rank of the run
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = sorted_v[1:] != sorted_v[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    starts = torch.nonzero(new_run).flatten()
    ends = torch.cat([starts[1:], torch.tensor([n])])
    average = (starts + ends + 1).double() / 2  # mean of ranks start+1 .. end
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = average[run_id]
    return ranks


def auroc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for finding ``positives`` (higher = positive).

    Computed exactly as the Mann-Whitney statistic, ties counted one half.

    Args:
        scores: (N,) scores.
        positives: (N,) bool or 0/1 labels.
    Returns:
        P(score of a random positive > score of a random negative), in [0, 1].
    """
    s, p = _scores_and_labels(scores, positives)
    ranks = rankdata(s)
    n_pos = int(p.sum())
    n_neg = p.numel() - n_pos
    u = ranks[p].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


class RocCurve(NamedTuple):
    fpr: Tensor
    tpr: Tensor
    thresholds: Tensor


def roc_curve(scores, positives) -> RocCurve:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    s, p = _scores_and_labels(scores, positives)
    order = torch.argsort(s, descending=True, stable=True)
    s, p = s[order], p[order].double()
    distinct = torch.nonzero(s[1:] != s[:-1]).flatten()
    cut = torch.cat([distinct, torch.tensor([s.numel() - 1])])
    tps = torch.cumsum(p, 0)[cut]
    fps = (cut + 1).double() - tps
    zero = torch.zeros(1, dtype=torch.float64)
    return RocCurve(
        fpr=torch.cat([zero, fps / fps[-1]]),
        tpr=torch.cat([zero, tps / tps[-1]]),
        thresholds=torch.cat([torch.tensor([np.inf]), s[cut]]),
    )


def tpr_at_fpr(scores, positives, fpr: float) -> float:
    """The true positive rate at a false positive rate of at most ``fpr`` (higher = positive).

    Step convention: a threshold t flags the samples with score >= t, thresholds run over the
    observed scores (tied scores are flagged together), and the result is the largest TPR among
    the thresholds whose FPR <= ``fpr`` (0 when only flagging nothing qualifies). No
    interpolation between thresholds: every value is reached by an actual threshold.

    Conventions of the membership-inference literature differ here. LiRA's reference code
    (Carlini et al. 2022, research/mi_lira_2021/plot.py in tensorflow/privacy) takes the last
    point of scikit-learn's ROC with FPR < ``fpr`` (strictly): the same number unless some
    threshold has FPR exactly ``fpr``. The Curvature Clues notebooks (Ravikumar et al. 2024)
    interpolate the ROC linearly (``np.interp``). Between two thresholds without ties the ROC
    runs flat (one more negative flagged, no positive), so interpolating there gives the same
    TPR as the step convention; it gives a larger TPR only on a diagonal segment, which tied
    scores make (a positive and a negative with one score are flagged together), and by at
    most the TPR that tied group adds.

    Resolution: with n negatives the attainable FPRs are 0, 1/n, 2/n, ...; for ``fpr`` < 1/n
    (e.g. 0.1% with fewer than 1,000 negatives) only thresholds with no false positive at all
    qualify, so the result is the TPR at FPR = 0.

    Args:
        scores: (N,) scores; NaN scores are left out with their labels.
        positives: (N,) bool or 0/1 labels, with at least one of each.
        fpr: the false positive rate, in [0, 1].
    Returns:
        The TPR, in [0, 1].
    """
    # numbers.Real: Python and numpy numbers alike (np.float32(0.01) is one).
    if isinstance(fpr, bool | np.bool_) or not isinstance(fpr, numbers.Real):
        raise ValueError(f"fpr must be a number in [0, 1], got {type(fpr).__name__} {fpr!r}")
    fpr = float(fpr)
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must be a number in [0, 1], got {fpr!r}")
    curve = roc_curve(scores, positives)
    return float(curve.tpr[curve.fpr <= fpr].max())


def balanced_accuracy(scores, positives) -> float:
    """The best balanced accuracy of a threshold on ``scores``: max_t (TPR(t) + TNR(t)) / 2.

    Thresholds run over the observed scores (plus flagging nothing, which gives 0.5), as in
    LiRA's reference code (``np.max(1 - (fpr + (1 - tpr)) / 2)``). The Curvature Clues notebooks
    instead take the threshold where TPR + FPR is closest to 1, which can give less.

    Args:
        scores: (N,) scores, higher = positive; NaN scores are left out with their labels.
        positives: (N,) bool or 0/1 labels, with at least one of each.
    Returns:
        The balanced accuracy, in [0.5, 1].
    """
    curve = roc_curve(scores, positives)
    return float(((curve.tpr + 1 - curve.fpr) / 2).max())


def _paired(a, b) -> tuple[Tensor, Tensor]:
    x, y = _vector(a, "a"), _vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    keep = ~(torch.isnan(x) | torch.isnan(y))
    return x[keep], y[keep]


def cosine_similarity(a, b) -> float:
    """Cosine of the angle between two score vectors (pairs with a NaN left out)."""
    x, y = _paired(a, b)
    denom = x.norm() * y.norm()
    if denom == 0:
        raise ValueError("cosine similarity is undefined for a zero vector")
    return float(x @ y / denom)


def spearman(a, b) -> float:
    """Spearman rank correlation (pairs with a NaN left out; ties get average ranks)."""
    x, y = _paired(a, b)
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = rx.norm() * ry.norm()
    if denom == 0:
        raise ValueError("Spearman correlation is undefined for a constant vector")
    return float(rx @ ry / denom)


class TopK(NamedTuple):
    values: Tensor
    indices: Tensor


def topk(scores, k: int) -> TopK:
    """The k highest scores and their indices, highest first; NaN scores are never selected."""
    s = _vector(scores, "scores")
    finite = torch.nonzero(~torch.isnan(s)).flatten()
    if not 0 <= k <= finite.numel():
        raise ValueError(f"k must lie in [0, {finite.numel()}] (the non-NaN scores), got {k}")
    values, idx = torch.topk(s[finite], k)
    return TopK(values=values, indices=finite[idx])
