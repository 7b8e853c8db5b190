"""The estimators: their estimates against exact Hessians of small smooth models, and the
wording of each method's warning about differences that were all exactly zero.

Every bound below is derived from the estimator's distribution: for n independent probes the
estimate of E[f(r)] is a mean with standard error sqrt(Var f(r) / n), and the variances are known
in closed form (Hutchinson: Var r^T A r = 2 (||A||_F^2 - sum_i A_ii^2)) or by enumerating all sign
vectors. Probes are a deterministic function of (seed, id), so each test is reproducible; across
samples the probes are independent, so the standardized errors z_b are (close to) independent
standard normals, and the tests check their maximum (Bonferroni) and their spread.
"""

import math
import warnings

import pytest
import torch
from torch import nn

from curvkern import CurvatureScorer, reference

from .conftest import labelled_batch, smooth_classifier

BATCH = 48
N_PROBES = 64
# P(max_b |z_b| > 4.5) <= 48 * 6.8e-6 for independent standard normals.
Z_MAX = 4.5


@pytest.fixture(scope="module", params=[nn.Tanh, nn.Softplus, nn.GELU], ids=lambda a: a.__name__)
def problem(request):
    model = smooth_classifier(sample_shape=(2, 4), activation=request.param)
    x, y = labelled_batch(BATCH, sample_shape=(2, 4))
    hess = reference.input_hessians(model, x, y)  # (B, 8, 8)
    return model, x, y, hess


def _assert_standard_normal(z: torch.Tensor, what: str):
    assert z.abs().max() < Z_MAX, f"{what}: max |z| = {z.abs().max():.2f}"
    # mean of 48 standard normals: standard error 1/sqrt(48); 4 standard errors
    assert abs(z.mean()) < 4 / math.sqrt(z.numel()), f"{what}: mean z = {z.mean():.3f}"
    # sample standard deviation: standard error about 1/sqrt(2 * 48); 4 standard errors
    assert abs(z.std() - 1) < 4 / math.sqrt(2 * z.numel()), f"{what}: std z = {z.std():.3f}"


@pytest.mark.parametrize("method,h", [("hvp", 1e-3), ("fd", 1e-5)])
def test_unbiased_against_exact_hessians(problem, method, h):
    model, x, y, hess = problem
    scores = CurvatureScorer(model, method=method, h=h, n_probes=N_PROBES, seed=3).score(x, y)
    # fd: bias O(h ||d^3 L||) ~ 1e-5 relative, far inside the standard errors (~1e-1 relative).

    se_trace = reference.standard_error(reference.hutchinson_variance(hess), N_PROBES)
    z = (scores.trace - reference.hessian_trace(hess)) / se_trace
    _assert_standard_normal(z, "trace")

    se_frob = reference.standard_error(reference.hr_norm_sq_variance(hess), N_PROBES)
    z = (scores.frobenius_sq - reference.hessian_frobenius_sq(hess)) / se_frob
    _assert_standard_normal(z, "frobenius_sq")

    se_curv = reference.standard_error(reference.hr_norm_variance(hess), N_PROBES)
    z = (scores.curvature - reference.expected_hr_norm(hess)) / se_curv
    _assert_standard_normal(z, "curvature")

    # The reported standard error estimates the true one: sample standard deviations of 64
    # probes have relative standard error about sqrt((kurtosis - 1) / (4 n)) < 0.2 here.
    ratio = scores.curvature_stderr / se_curv
    assert 0.8 < ratio.median() < 1.25, ratio
    ratio = scores.trace_stderr / se_trace
    assert 0.8 < ratio.median() < 1.25, ratio


def test_loss_and_grad_norm(problem):
    model, x, y, _ = problem
    scores = CurvatureScorer(model, n_probes=2).score(x, y)
    xr = x.clone().requires_grad_()
    loss = nn.functional.cross_entropy(model(xr), y, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), xr)
    torch.testing.assert_close(scores.loss, loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(scores.grad_norm, grad.reshape(BATCH, -1).norm(dim=1))


def test_fd_converges_to_hvp_at_first_order(problem):
    # Per probe, dg / h - H r = (h / 2) D^3L[r, r] + O(h^2): with the same probes, halving h
    # halves the difference between the fd and hvp estimates.
    model, x, y, _ = problem
    exact = CurvatureScorer(model, method="hvp", n_probes=8).score(x, y)

    def error(h):
        fd = CurvatureScorer(model, method="fd", h=h, n_probes=8).score(x, y)
        return {
            f: (getattr(fd, f) - getattr(exact, f)).abs().sum().item()
            for f in ("curvature", "trace", "frobenius_sq")
        }

    coarse, fine = error(1e-2), error(5e-3)
    for field in coarse:
        ratio = coarse[field] / fine[field]
        assert 1.8 < ratio < 2.2, (field, coarse[field], fine[field])
    # and at the default step the difference is small against the scores themselves
    err = error(1e-3)
    assert err["curvature"] < 1e-2 * exact.curvature.abs().sum().item()


# --- the zero-differences warning's wording, each method's own -------------------------------


def _fitted_with_margins(scale, low, high):
    """A float32 classifier with its logits scaled by ``scale``, and 4 inputs labelled with
    its predictions whose logit margins lie in (low, high)."""
    model = smooth_classifier(dtype=torch.float32)
    with torch.no_grad():
        model[-1].weight.mul_(scale)
        model[-1].bias.mul_(scale)
        x, _ = labelled_batch(64, dtype=torch.float32)
        top = model(x).topk(2, dim=1).values
        margin = top[:, 0] - top[:, 1]
        x = x[(margin > low) & (margin < high)][:4]
        assert len(x) == 4
        return model, x, model(x).argmax(1)


def _zero_difference_warning(model, x, y, method):
    with pytest.warns(UserWarning, match="4 of 4 samples .* exactly zero for every probe") as rec:
        s = CurvatureScorer(model, method=method, n_probes=2).score(x, y)
    assert torch.equal(s.curvature, torch.zeros(4))
    (message,) = [str(w.message) for w in rec if "exactly zero" in str(w.message)]
    assert "lost to rounding" not in message
    return message


def test_saturated_softmax_is_named_as_the_cause_fd():
    # Logit margins of 120 to 300: every other class's probability is below float32's smallest
    # subnormal (exp(-103.3)), so the loss and its gradient are exactly 0 at x and at every probe
    # point; in float64 (down to exp(-745)) they are not.
    model, x, y = _fitted_with_margins(1e3, 120, 300)
    message = _zero_difference_warning(model, x, y, "fd")
    assert "their loss or its gradient at x is exactly 0 too" in message
    assert "model.double(), x.double()" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s64 = CurvatureScorer(model.double(), n_probes=2).score(x.double(), y)
    assert (s64.curvature > 0).all()


def test_a_zero_loss_with_a_gradient_is_flat_too():
    # A softmax saturated to a subnormal probability leaves the loss exactly 0 and a gradient of
    # a few bits that the step does not move (measured: a ReLU MLP at a logit margin of 103 in
    # float32, gradient norm 6e-43). Its stand-in: a loss of value exactly 0 whose gradient is
    # constant in x. It is named as flat, not as a step lost to rounding.
    model = nn.Linear(6, 4, dtype=torch.float32)
    x, y = labelled_batch(4, dtype=torch.float32)

    def zero_valued(output, target):
        s = output.sum(1)
        return s - s.detach()  # 0, with gradient model.weight.sum(0)

    with pytest.warns(UserWarning, match="4 of 4 samples .* exactly zero") as rec:
        s = CurvatureScorer(model, zero_valued, n_probes=2).score(x, y)
    assert (s.loss == 0).all() and (s.grad_norm > 0).all()
    (message,) = [str(w.message) for w in rec if "exactly zero" in str(w.message)]
    assert "their loss or its gradient at x is exactly 0 too" in message


def test_saturated_softmax_is_named_as_the_cause_zo():
    # Logit margins of 20 to 35: the float32 cross-entropy log(1 + exp(-margin)) rounds to 0
    # (above a margin of 16.6), and zo sees only loss values; the gradient is far from 0.
    model, x, y = _fitted_with_margins(1e2, 20, 35)
    message = _zero_difference_warning(model, x, y, "zo")
    assert "their loss at x is exactly 0 too" in message and "method='fd'" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd = CurvatureScorer(model, n_probes=2).score(x, y)
    assert (fd.curvature > 0).all()
