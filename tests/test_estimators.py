"""The scorer's estimates against exact Hessians of small smooth models.

Every bound below is derived from the estimator's distribution: for n independent probes the
estimate of E[f(r)] is a mean with standard error sqrt(Var f(r) / n), and the variances are known
in closed form (Hutchinson: Var r^T A r = 2 (||A||_F^2 - sum_i A_ii^2)) or by enumerating all sign
vectors. Probes are a deterministic function of (seed, id), so each test is reproducible; across
samples the probes are independent, so the standardized errors z_b are (close to) independent
standard normals, and the tests check their maximum (Bonferroni) and their spread.
"""

import math

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
