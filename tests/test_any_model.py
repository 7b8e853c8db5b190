"""Any model: output forms, side and keyword inputs, probe masks, maps, and refused cases."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from curvkern import CurvatureScorer, CurvatureScores, losses

from .conftest import labelled_batch, smooth_classifier

EXACT = dict(rtol=1e-8, atol=1e-12)


# --- output selection and the default loss ---------------------------------------------------


def test_logits_of_every_output_form():
    logits = torch.randn(3, 4)
    for output in (
        logits,
        (logits, torch.zeros(1)),
        [logits],
        {"logits": logits, "hidden": None},
        SimpleNamespace(logits=logits, loss=None),
    ):
        assert losses.logits_of(output) is logits
    with pytest.raises(TypeError, match="mapping without a 'logits' tensor.*keys: \\['out'\\]"):
        losses.logits_of({"out": logits})
    with pytest.raises(TypeError, match="first element is NoneType"):
        losses.logits_of((None, logits))
    with pytest.raises(TypeError, match="type int: expected a tensor"):
        losses.logits_of(3)


def test_default_loss_is_per_sample_cross_entropy():
    logits, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    expected = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(losses.cross_entropy({"logits": logits}, y), expected, **EXACT)
    # (B, C, T) logits with (B, T) labels: the mean over positions, one loss per sample
    seq, labels = torch.randn(2, 3, 4, dtype=torch.float64), torch.randint(0, 3, (2, 4))
    per_token = F.cross_entropy(seq, labels, reduction="none")
    torch.testing.assert_close(losses.cross_entropy(seq, labels), per_token.mean(1), **EXACT)


def test_classification_stats_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    stats = losses.classification_stats(logits, y)
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(stats[:, 0], torch.tensor([1.5, -2.0], dtype=torch.float64))
    torch.testing.assert_close(stats[:, 1], p[[0, 1], [0, 1]])
    torch.testing.assert_close(stats[:, 2], torch.tensor([1.0, 0.0], dtype=torch.float64))
    onehot = torch.eye(3, dtype=torch.float64)[y]
    torch.testing.assert_close(stats[:, 3], torch.linalg.vector_norm(p - onehot, dim=1))
    # an ignored label gives NaN in its row only; regression outputs give NaN everywhere
    ignored = losses.classification_stats(logits, torch.tensor([-100, 1]))
    assert torch.isnan(ignored[0]).all() and torch.equal(ignored[1], stats[1])
    assert torch.isnan(losses.classification_stats(logits[:, :1], torch.zeros(2))).all()
    assert torch.isnan(losses.classification_stats(logits, torch.zeros(2))).all()


@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
def test_scores_carry_classification_fields_of_the_unperturbed_output(method):
    model = smooth_classifier()
    x, y = labelled_batch(6)
    s = CurvatureScorer(model, n_probes=2, method=method, h=1e-2).score(x, y)
    expected = losses.classification_stats(model(x), y)
    for i, name in enumerate(("margin", "p_label", "correct", "el2n")):
        torch.testing.assert_close(getattr(s, name), expected[:, i], **EXACT)


def test_regression_output_has_nan_classification_fields():
    model = smooth_classifier(classes=2)
    x, _ = labelled_batch(4)
    target = torch.randn(4, 2, dtype=torch.float64)

    def mse(output, t):
        return ((output - t) ** 2).sum(1)

    s = CurvatureScorer(model, mse, n_probes=2).score(x, target)
    assert torch.isfinite(s.curvature).all()
    for name in ("margin", "p_label", "correct", "el2n"):
        assert torch.isnan(getattr(s, name)).all(), name


def test_curvature_map_follows_rows():
    a = CurvatureScores.empty(1e-3, "fd", size=2)
    b = CurvatureScores.empty(1e-3, "fd", size=1)
    a.curvature_map = torch.arange(6.0).reshape(2, 3)
    b.curvature_map = torch.ones(1, 2)
    both = CurvatureScores.cat([a, b])
    assert both.curvature_map.shape == (3, 3)
    assert torch.equal(both.curvature_map[:2], a.curvature_map)
    assert both.curvature_map[2, :2].tolist() == [1.0, 1.0] and math.isnan(both.curvature_map[2, 2])
    assert torch.equal(both[1:2].curvature_map, a.curvature_map[1:2])
    assert "curvature_map" not in both.to_dict()
    with pytest.raises(ValueError, match="with and without curvature_map"):
        CurvatureScores.cat([a, CurvatureScores.empty(1e-3, "fd", size=1)])
