"""method="zo" in float32: the warning about curvatures within rounding of the loss values."""

import copy
import warnings

import pytest
import torch
from torch import nn

from curvkern import CurvatureScorer
from curvkern.estimators import ZO_NOISE_WARN
from curvkern.losses import cross_entropy

from .conftest import smooth_classifier

BATCH = 64
N_PROBES = 8
EPS32 = torch.finfo(torch.float32).eps
# The floor is an order of magnitude, not a bound (ZerothOrder.rounding_floor): one pair's
# rounding |e32 - e64| was measured at about 1 floor at the median, 1 to 2 at the 90th percentile
# and 23 at most. The bound the tests check is derived from the loss values themselves instead:
# with d_j the float32 minus float64 loss at the j-th of a pair's four points,
# |e32 - e64| = |d_0 - d_1 - d_2 + d_3| / (4 h^2), so a sample's curvature (a mean of |e| over
# pairs) moves by at most the mean over pairs of (|d_0| + |d_1| + |d_2| + |d_3|) / (4 h^2).


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


def _score(model, x, y, h, record=None):
    """Scores and the zo rounding warnings raised by one score() call; ``record`` (a list)
    receives the per-sample losses of every loss_fn call, as computed (the model's dtype)."""

    def loss_fn(output, target):
        loss = cross_entropy(output, target)
        if record is not None:
            record.append(loss.detach().clone())
        return loss

    scorer = CurvatureScorer(model, loss_fn, method="zo", h=h, n_probes=N_PROBES, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = scorer.score(x, y)
    return scores, [str(w.message) for w in caught if "method='zo'" in str(w.message)]


def _perturbed_losses(record):
    """The (4, N_PROBES, BATCH) float64 losses at the four points of every pair: the calls
    after the unperturbed pass (the last call of BATCH rows; the model checks of the first
    score() call come before it) hold them, one call per chunk of probes, each call's rows
    ordered (point, probe, sample)."""
    base = max(i for i, loss in enumerate(record) if loss.shape == (BATCH,))
    chunks = [loss.double().reshape(4, -1, BATCH) for loss in record[base + 1 :]]
    return torch.cat(chunks, dim=1)  # (4, N_PROBES, BATCH)


def _floor(scores, h, eps=EPS32):
    return eps * scores.loss.double().abs().clamp(min=1.0) / (4 * h * h)


def test_float32_fitted_model_warns_once_with_the_count():
    m64, m32, x, y = _problem(confidence=8.0)
    h = 1e-3
    r32, r64 = [], []
    s32, messages = _score(m32, x.float(), y, h, r32)
    s64, _ = _score(m64, x, y, h, r64)
    floor = _floor(s32, h)
    c32 = s32.curvature.double()
    flagged = c32 < ZO_NOISE_WARN * floor
    # Curvature exactly 0 (every pair's four losses rounded equal) has a warning of its own.
    assert len(messages) == 1
    assert int((c32 == 0).sum()) > 0
    assert f"{int((flagged & (c32 > 0)).sum())} of {BATCH} samples" in messages[0]
    assert "float64" in messages[0]
    assert int(flagged.sum()) > BATCH // 4
    # Every sample's float32 curvature is within the bound the rounding of its loss values
    # gives (above; plus float64's own rounding of the four-point sums, relative 4 eps64),
    # typically within one floor; flagged samples are off by 10% and more (curvature below 20
    # floors, rounding ~2), the others within 2 / 20 = 10%.
    lp32, lp64 = _perturbed_losses(r32), _perturbed_losses(r64)
    scale = 4 * h * h
    # The reported curvature is the four-point formula on exactly these losses (stored in
    # float32: relative rounding eps32 / 2).
    recomputed = ((lp32[0] - lp32[1] - lp32[2] + lp32[3]).abs() / scale).mean(0)
    torch.testing.assert_close(c32, recomputed, rtol=EPS32 / 2, atol=0.0)
    bound = (lp32 - lp64).abs().sum(0).mean(0) / scale
    bound += 4 * torch.finfo(torch.float64).eps * (lp32.abs() + lp64.abs()).sum(0).mean(0) / scale
    err = (s32.curvature.double() - s64.curvature).abs()
    assert (err <= bound).all(), f"max {float((err / bound).max()):.2f} x the bound"
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
