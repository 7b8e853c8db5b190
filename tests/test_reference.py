"""The brute-force references that the estimator tests rely on."""

import math

import pytest
import torch
from torch import nn

from curvkern import CurvatureScorer, reference

from .conftest import labelled_batch, smooth_classifier


def _random_symmetric(batch, dim, seed=0):
    a = torch.randn(
        batch, dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return a + a.transpose(1, 2)


def _all_signs(dim):
    # every vector of {-1, +1}^dim, both halves of each pair {r, -r}
    half = reference.rademacher_sign_vectors(dim)
    return torch.cat([half, -half])


def test_sign_vectors():
    signs = reference.rademacher_sign_vectors(4)
    assert signs.shape == (8, 4) and (signs[:, 0] == 1).all()
    assert len({tuple(s.tolist()) for s in _all_signs(4)}) == 16
    with pytest.raises(ValueError, match="dim must be >= 1"):
        reference.rademacher_sign_vectors(0)


def test_moments_by_enumeration():
    hess = _random_symmetric(3, 5)
    signs = _all_signs(5)  # (32, 5): the exact Rademacher distribution
    hr = torch.einsum("bij,sj->bsi", hess, signs)
    quad = torch.einsum("si,bsi->bs", signs, hr)  # r^T H r
    norms = hr.norm(dim=-1)
    torch.testing.assert_close(reference.hessian_trace(hess), quad.mean(1))
    torch.testing.assert_close(reference.hessian_frobenius_sq(hess), (norms**2).mean(1))
    torch.testing.assert_close(reference.expected_hr_norm(hess), norms.mean(1))
    torch.testing.assert_close(reference.hutchinson_variance(hess), quad.var(1, correction=0))
    torch.testing.assert_close(reference.hr_norm_variance(hess), norms.var(1, correction=0))
    torch.testing.assert_close(reference.hr_norm_sq_variance(hess), (norms**2).var(1, correction=0))
    bil = torch.einsum("si,bij,tj->bst", signs, hess, signs)  # r^T H s over all pairs
    mean_abs, mean_sq, mean_4 = reference.bilinear_moments(hess)
    torch.testing.assert_close(reference.expected_abs_bilinear(hess), bil.abs().mean((1, 2)))
    torch.testing.assert_close(mean_abs, bil.abs().mean((1, 2)))
    torch.testing.assert_close(mean_sq, reference.hessian_frobenius_sq(hess))  # E (r^T H s)^2
    torch.testing.assert_close(mean_4, (bil**4).mean((1, 2)))


def test_closed_forms_on_special_matrices():
    diag = torch.diag_embed(torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64))
    assert reference.hutchinson_variance(diag).item() == 0  # r^T D r = tr D for every r
    assert math.isclose(reference.expected_hr_norm(diag).item(), math.sqrt(14))
    assert reference.hr_norm_variance(diag).item() == pytest.approx(0, abs=1e-12)
    one = torch.tensor([[[2.5]]], dtype=torch.float64)
    assert reference.expected_abs_bilinear(one).item() == 2.5
    with pytest.raises(ValueError, match="needs D <= 10"):
        reference.expected_abs_bilinear(torch.zeros(1, 11, 11))


def test_input_hessians_are_the_gradients_derivative():
    model = smooth_classifier(sample_shape=(2, 3))
    x, y = labelled_batch(3, sample_shape=(2, 3))
    hess = reference.input_hessians(model, x, y)
    assert hess.shape == (3, 6, 6)
    torch.testing.assert_close(hess, hess.transpose(1, 2))

    def grad(inp):
        inp = inp.clone().requires_grad_()
        loss = nn.functional.cross_entropy(model(inp), y, reduction="none").sum()
        return torch.autograd.grad(loss, inp)[0].reshape(3, 6)

    eps = 1e-6
    for j in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[j] = eps
        e = e.reshape(2, 3)
        column = (grad(x + e) - grad(x - e)) / (2 * eps)  # central difference, O(eps^2)
        torch.testing.assert_close(column, hess[:, :, j], rtol=1e-6, atol=1e-8)


def test_paper_curvature_with_random_probes():
    # With its own random signs, the published algorithm estimates h / B * E||H r|| (fd);
    # both estimates of 64 probes agree within their standard errors.
    model = smooth_classifier()
    x, y = labelled_batch(16)
    h, n = 1e-4, 64
    curv, eig = reference.paper_curvature(
        model, x, y, h=h, n_probes=n, generator=torch.Generator().manual_seed(0)
    )
    ours = CurvatureScorer(model, h=h, n_probes=n).score(x, y)
    hess = reference.input_hessians(model, x, y)
    se = reference.standard_error(reference.hr_norm_variance(hess), n) * h / 16
    z = (curv - ours.paper_score(16)) / (math.sqrt(2) * se)
    assert z.abs().max() < 4.5
    with pytest.raises(ValueError, match="probes must have shape"):
        reference.paper_curvature(model, x, y, n_probes=2, probes=torch.ones(3, 16, 6))
    assert model.training  # restored


def test_paper_curvature_restores_training_flag():
    model = smooth_classifier().eval()
    x, y = labelled_batch(2)
    reference.paper_curvature(model, x, y, n_probes=1)
    assert not model.training
