"""method="zo" in float32: the warning about curvatures within rounding of the loss values."""

import copy
import warnings

import pytest
import torch
from torch import nn

from curvkern import CurvatureScorer
from curvkern.scorer import ZO_NOISE_WARN

from .conftest import smooth_classifier

BATCH = 64
N_PROBES = 8
EPS32 = torch.finfo(torch.float32).eps
# The floor is an order of magnitude, not a bound: measured (ZerothOrder.rounding_floor), one
# pair's rounding |e32 - e64| was about 1 floor at the median, 1 to 2 at the 90th percentile and
# 23 at most; a sample's curvature (a mean over pairs) was off by up to 5.8 floors on the fitted
# model below. A floor off by FLOORS = 10 times would make the threshold of 20 floors meaningless.
FLOORS = 10.0


def _problem(confidence: float):
    """A float64 GELU classifier whose labels are its own predictions, with logits scaled by
    ``confidence`` (8 fits the samples as training does: median loss ~2e-3), its float32 copy,
    and inputs (BATCH, 8)."""
    model = smooth_classifier(sample_shape=(8,), hidden=32, activation=nn.GELU, seed=1)
    with torch.no_grad():
        model[-1].weight.mul_(confidence)
        model[-1].bias.mul_(confidence)
    x = torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = model(x).argmax(1)
    return model, copy.deepcopy(model).float(), x, y


def _score(model, x, y, h):
    """Scores and the zo rounding warnings raised by one score() call."""
    scorer = CurvatureScorer(model, method="zo", h=h, n_probes=N_PROBES, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = scorer.score(x, y)
    return scores, [str(w.message) for w in caught if "method='zo'" in str(w.message)]


def _floor(scores, h, eps=EPS32):
    return eps * scores.loss.double().abs().clamp(min=1.0) / (4 * h * h)


def test_float32_fitted_model_warns_once_with_the_count():
    m64, m32, x, y = _problem(confidence=8.0)
    h = 1e-3
    s32, messages = _score(m32, x.float(), y, h)
    s64, _ = _score(m64, x, y, h)
    floor = _floor(s32, h)
    c32 = s32.curvature.double()
    flagged = c32 < ZO_NOISE_WARN * floor
    # Curvature exactly 0 (every pair's four losses rounded equal) has a warning of its own.
    assert len(messages) == 1
    assert int((c32 == 0).sum()) > 0
    assert f"{int((flagged & (c32 > 0)).sum())} of {BATCH} samples" in messages[0]
    assert "float64" in messages[0]
    assert int(flagged.sum()) > BATCH // 4
    # Every sample's float32 curvature is within FLOORS floors of the float64 one, typically
    # within one; flagged samples are off by 10% and more (curvature below 20 floors, rounding
    # ~2), the others within 2 / 20 = 10%.
    err = (s32.curvature.double() - s64.curvature).abs()
    assert (err <= FLOORS * floor).all(), f"max {float((err / floor).max()):.1f} floors"
    assert float((err / floor).median()) <= 1.0
    rel = err / s64.curvature
    assert float(rel[flagged].median()) > 2.0 / ZO_NOISE_WARN
    assert float(rel[~flagged].max()) <= 2.0 / ZO_NOISE_WARN


def test_float64_does_not_warn():
    m64, _, x, y = _problem(confidence=8.0)
    s64, messages = _score(m64, x, y, 1e-3)
    assert messages == []
    floor = _floor(s64, 1e-3, torch.finfo(torch.float64).eps)
    # The same fitted samples clear the float64 floor (2^29 times lower) by 150 floors and more,
    # where the float32 floor swallows 37 of them (8 at exactly 0).
    assert (s64.curvature >= ZO_NOISE_WARN * floor).all()


@pytest.mark.parametrize("h", [1e-2, 3e-2])
def test_float32_larger_h_is_accurate_and_silent(h):
    m64, m32, x, y = _problem(confidence=1.0)
    s32, messages = _score(m32, x.float(), y, h)
    s64, _ = _score(m64, x, y, h)
    assert messages == []
    rel = (s32.curvature.double() - s64.curvature).abs() / s64.curvature
    # Unflagged: curvature above 20 floors, rounding ~2 floors at most: within 10%.
    assert float(rel.max()) <= 2.0 / ZO_NOISE_WARN


def test_other_methods_have_no_zo_check():
    _, m32, x, y = _problem(confidence=8.0)
    scorer = CurvatureScorer(m32, method="fd", h=1e-2, n_probes=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer.score(x.float(), y)
    assert not [w for w in caught if "method='zo'" in str(w.message)]
