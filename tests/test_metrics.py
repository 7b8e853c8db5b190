"""curvkern.metrics against known values and against scikit-learn / SciPy."""

import math

import numpy as np
import pytest
import torch

from curvkern import metrics


def test_auroc_known_values():
    assert metrics.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert metrics.auroc([1.0, 2.0, 3.0], [False, False, True]) == 1.0
    assert metrics.auroc([3.0, 2.0, 1.0], [True, False, False]) == 1.0
    assert metrics.auroc([1.0, 2.0, 3.0], [True, False, False]) == 0.0
    assert metrics.auroc([5.0, 5.0, 5.0, 5.0], [0, 1, 0, 1]) == 0.5  # ties count one half


def test_auroc_and_roc_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics", reason="compared against scikit-learn")
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.2
    scores = np.round(rng.normal(size=500) + labels, 1)  # rounded: many ties
    assert metrics.auroc(torch.tensor(scores), labels) == pytest.approx(
        skm.roc_auc_score(labels, scores), abs=1e-12
    )
    fpr, tpr, thr = metrics.roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr.numpy(), sk_fpr)
    np.testing.assert_allclose(tpr.numpy(), sk_tpr)
    np.testing.assert_allclose(thr.numpy()[1:], sk_thr[1:])
    assert torch.trapezoid(tpr, fpr).item() == pytest.approx(metrics.auroc(scores, labels))


def test_auroc_leaves_out_nan_scores():
    scores = [0.1, math.nan, 0.35, 0.8, math.nan, 0.4]
    labels = [0, 1, 1, 1, 0, 0]
    assert metrics.auroc(scores, labels) == metrics.auroc([0.1, 0.35, 0.8, 0.4], [0, 1, 1, 0])


def test_auroc_errors():
    with pytest.raises(ValueError, match="both positives and negatives"):
        metrics.auroc([1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="positives must have the shape of scores"):
        metrics.auroc([1.0, 2.0], [1, 0, 1])
    with pytest.raises(ValueError, match="boolean or 0/1"):
        metrics.auroc([1.0, 2.0], [2, 0])
    with pytest.raises(ValueError, match="one-dimensional"):
        metrics.auroc(torch.ones(2, 2), torch.ones(2, 2))


def test_rank_correlation_and_cosine():
    stats = pytest.importorskip("scipy.stats", reason="compared against SciPy")
    rng = np.random.default_rng(1)
    a = np.round(rng.normal(size=200), 1)
    b = a + rng.normal(size=200)
    np.testing.assert_allclose(metrics.rankdata(a).numpy(), stats.rankdata(a))
    assert metrics.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert metrics.spearman(a, -a) == pytest.approx(-1.0)
    assert metrics.cosine_similarity([1.0, 0.0], [0.0, 2.0]) == 0.0
    assert metrics.cosine_similarity([1.0, 2.0], [2.0, 4.0]) == pytest.approx(1.0)
    assert metrics.cosine_similarity([1.0, math.nan, 1.0], [1.0, 5.0, -1.0]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="zero vector"):
        metrics.cosine_similarity([0.0, 0.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="same shape"):
        metrics.spearman([1.0, 2.0], [1.0])


def test_topk():
    values, indices = metrics.topk([0.5, math.nan, 2.0, -1.0, 1.0], 3)
    assert indices.tolist() == [2, 4, 0] and values.tolist() == [2.0, 1.0, 0.5]
    assert metrics.topk([1.0, math.nan], 0).indices.numel() == 0
    with pytest.raises(ValueError, match=r"k must lie in \[0, 1\]"):
        metrics.topk([1.0, math.nan], 2)


def test_tpr_at_fpr_step_convention_on_a_hand_made_case():
    # sorted by score: + - + + - - + - - -  (4 positives, 6 negatives)
    scores = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    labels = [1, 0, 1, 1, 0, 0, 1, 0, 0, 0]
    # thresholds: t=10 -> (FPR 0, TPR 1/4); t=9 -> (1/6, 1/4); t=7 -> (1/6, 3/4);
    # t=6 -> (2/6, 3/4); t=4 -> (3/6, 4/4)
    assert metrics.tpr_at_fpr(scores, labels, 0.0) == 0.25
    assert metrics.tpr_at_fpr(scores, labels, 0.1) == 0.25  # below 1/6: no false positive allowed
    assert metrics.tpr_at_fpr(scores, labels, 1 / 6) == 0.75  # FPR <= fpr, equality included
    assert metrics.tpr_at_fpr(scores, labels, 0.49) == 0.75  # a step, not interpolated
    assert metrics.tpr_at_fpr(scores, labels, 0.5) == 1.0
    assert metrics.tpr_at_fpr(scores, labels, 1.0) == 1.0
    # ties are flagged together: the tied negative comes with the top positive
    assert metrics.tpr_at_fpr([5, 5, 1, 0], [1, 0, 1, 0], 0.0) == 0.0
    assert metrics.tpr_at_fpr([5, 5, 1, 0], [1, 0, 1, 0], 0.49) == 0.0
    assert metrics.tpr_at_fpr([5, 5, 1, 0], [1, 0, 1, 0], 0.5) == 1.0
    # NaN scores are left out with their labels
    assert metrics.tpr_at_fpr([10, math.nan, 9, 1], [1, 0, 0, 1], 0.0) == 0.5
    for bad in (-0.1, 1.5, math.nan, True, "0.1", np.float32(1.5)):
        with pytest.raises(ValueError, match=r"fpr must be a number in \[0, 1\]"):
            metrics.tpr_at_fpr(scores, labels, bad)
    # numpy's numbers are numbers (a value read from an array)
    for fpr in (np.float32(1 / 6), np.float64(0.49), np.int64(1)):
        assert metrics.tpr_at_fpr(scores, labels, fpr) == metrics.tpr_at_fpr(
            scores, labels, float(fpr)
        )


def test_balanced_accuracy_on_a_hand_made_case():
    scores = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    labels = [1, 0, 1, 1, 0, 0, 1, 0, 0, 0]
    # the ROC points above: (TPR + 1 - FPR) / 2 is best at t=7: (3/4 + 5/6) / 2 = 19/24
    assert metrics.balanced_accuracy(scores, labels) == pytest.approx(19 / 24, abs=1e-15)
    assert metrics.balanced_accuracy([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0  # separable
    assert metrics.balanced_accuracy([4, 3, 2, 1], [0, 0, 1, 1]) == 0.5  # reversed: flag none
    with pytest.raises(ValueError, match="both positives and negatives"):
        metrics.balanced_accuracy([1.0, 2.0], [0, 0])


def test_tpr_at_fpr_and_balanced_accuracy_match_liras_conventions():
    """LiRA's plot.py: acc = max(1 - (fpr + (1 - tpr)) / 2), TPR at the last FPR < 0.001."""
    skm = pytest.importorskip("sklearn.metrics", reason="LiRA's code uses scikit-learn's ROC")
    rng = np.random.default_rng(2)
    labels = rng.random(5000) < 0.5
    scores = rng.normal(size=5000) + 1.5 * labels  # continuous: no FPR equals 0.001 exactly
    fpr, tpr, _ = skm.roc_curve(labels, scores)
    assert metrics.balanced_accuracy(scores, labels) == pytest.approx(
        np.max(1 - (fpr + (1 - tpr)) / 2), abs=1e-12
    )
    for target in (0.001, 0.01, 0.1):
        lira = tpr[np.where(fpr < target)[0][-1]]
        assert metrics.tpr_at_fpr(scores, labels, target) == pytest.approx(lira, abs=1e-12)
