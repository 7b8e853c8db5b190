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
