"""Plain-autograd references: the published algorithm, and exact Hessians of small inputs.

``paper_curvature`` is the algorithm of Garg, Ravikumar & Roy, "Memorization Through the Lens of
Curvature of Loss Function Around Samples" (ICML 2024) as their code computes it, for tests and
benchmarks. The exact-Hessian helpers compute, by brute force, the quantities curvkern's
estimators estimate, for inputs small enough to enumerate.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "paper_curvature",
    "input_hessians",
    "hessian_trace",
    "hessian_frobenius_sq",
    "expected_hr_norm",
    "expected_abs_bilinear",
    "bilinear_moments",
    "hutchinson_variance",
    "hr_norm_sq_variance",
    "hr_norm_variance",
    "standard_error",
    "rademacher_sign_vectors",
]


def paper_curvature(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    h: float = 1e-3,
    n_probes: int = 10,
    probes: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The published curvature algorithm, computation for computation.

    Per probe v = h * (r + 1e-7), with r Rademacher, it runs the model at x + v and at x,
    differentiates the difference of the two batch-MEAN cross-entropy losses with respect to
    the input (two forward and two backward passes per probe), and accumulates the norm of that
    gradient difference and its dot product with v. The published code also takes
    diag(V G^T), a B x B product, for the dot products; so does this.

    Args:
        model: classifier; run in eval mode, its training flags restored after.
        x: (B, ...) input batch.
        y: (B,) class labels.
        h: step.
        n_probes: number of probes.
        probes: optional (n_probes, B, ...) tensor of +-1 to use instead of fresh random signs.
        generator: random generator for the signs when ``probes`` is None.
    Returns:
        (curv, eig), each (B,) in x's dtype: the means over probes of ||grad_diff|| and of
        v . grad_diff. curv is h / B times curvkern's ``curvature`` and eig h^2 / B times its
        ``trace``, up to the 1e-7 offset.
    """
    batch = x.shape[0]
    if probes is not None and probes.shape != (n_probes, *x.shape):
        raise ValueError(
            f"probes must have shape (n_probes, *x.shape) = {(n_probes, *x.shape)}, "
            f"got {tuple(probes.shape)}"
        )
    curv = torch.zeros(batch, dtype=x.dtype)
    eig = torch.zeros(batch, dtype=x.dtype)
    data = x.detach().clone().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        for k in range(n_probes):
            if probes is None:
                r = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype)
                r[r == 0] = -1
            else:
                r = probes[k].to(device=x.device, dtype=x.dtype)
            v = h * (r + 1e-7)
            loss_pos = F.cross_entropy(model(data + v), y)
            loss_orig = F.cross_entropy(model(data), y)
            (grad_diff,) = torch.autograd.grad(loss_pos - loss_orig, data)
            grad_diff = grad_diff.reshape(batch, -1)
            curv += grad_diff.norm(dim=1).detach().cpu()
            eig += torch.diag(v.reshape(batch, -1) @ grad_diff.T).detach().cpu()
    finally:
        model.train(was_training)
    return curv / n_probes, eig / n_probes


def input_hessians(model, x: Tensor, y: Tensor, loss_fn=None) -> Tensor:
    """Exact per-sample input Hessians of the loss, by autograd, for small inputs.

    Args:
        model: callable on (1, ...) batches.
        x: (B, ...) inputs, D = numel of one sample.
        y: (B, ...) targets.
        loss_fn: per-sample loss (default: cross entropy, reduction="none").
    Returns:
        (B, D, D) Hessians of L(x_b, y_b) with respect to x_b.
    """
    loss_fn = loss_fn or (lambda out, t: F.cross_entropy(out, t, reduction="none"))
    hessians = []
    for b in range(x.shape[0]):
        shape = x[b : b + 1].shape

        def loss_of(flat: Tensor, b: int = b, shape: torch.Size = shape) -> Tensor:
            return loss_fn(model(flat.reshape(shape)), y[b : b + 1]).sum()

        hess = torch.autograd.functional.hessian(loss_of, x[b].detach().reshape(-1))
        hessians.append(hess)
    return torch.stack(hessians)


def hessian_trace(hessians: Tensor) -> Tensor:
    """tr(H) per sample: (B, D, D) -> (B,)."""
    return torch.diagonal(hessians, dim1=-2, dim2=-1).sum(-1)


def hessian_frobenius_sq(hessians: Tensor) -> Tensor:
    """||H||_F^2 = tr(H^T H) per sample: (B, D, D) -> (B,)."""
    return (hessians * hessians).sum((-2, -1))


def rademacher_sign_vectors(dim: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """All 2^(dim-1) sign vectors in {-1, +1}^dim with first entry +1: (2^(dim-1), dim).

    Functions even in r (||H r||, |r^T H s|) need only these, one of each pair {r, -r}.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    rest = list(itertools.product((1.0, -1.0), repeat=dim - 1))
    signs = torch.tensor(rest, dtype=dtype).reshape(len(rest), dim - 1)
    return torch.cat([torch.ones(len(rest), 1, dtype=dtype), signs], dim=1)


def _check_enumerable(hessians: Tensor, max_dim: int) -> int:
    dim = hessians.shape[-1]
    if dim > max_dim:
        raise ValueError(f"brute force over 2^D sign vectors needs D <= {max_dim}, got D = {dim}")
    return dim


def expected_hr_norm(hessians: Tensor, max_dim: int = 20) -> Tensor:
    """E ||H r|| over Rademacher r, exactly, by enumerating sign vectors: (B, D, D) -> (B,)."""
    dim = _check_enumerable(hessians, max_dim)
    signs = rademacher_sign_vectors(dim, hessians.dtype).to(hessians.device)  # (S, D)
    norms = torch.linalg.vector_norm(torch.einsum("bij,sj->bsi", hessians, signs), dim=-1)
    return norms.mean(dim=1)


def _bilinear_values(hessians: Tensor, max_dim: int) -> Tensor:
    """r^T H s for every pair of sign vectors r, s (first entries +1): (B, D, D) -> (B, S, S).

    |r^T H s| and its even powers are the same for (+-r, +-s), so these pairs give their
    expectations over independent Rademacher r, s exactly.
    """
    dim = _check_enumerable(hessians, max_dim)
    signs = rademacher_sign_vectors(dim, hessians.dtype).to(hessians.device)  # (S, D)
    return torch.einsum("si,bij,tj->bst", signs, hessians, signs)


def expected_abs_bilinear(hessians: Tensor, max_dim: int = 10) -> Tensor:
    """E |r^T H s| over independent Rademacher r, s, exactly: (B, D, D) -> (B,)."""
    return _bilinear_values(hessians, max_dim).abs().mean(dim=(1, 2))


def hutchinson_variance(hessians: Tensor) -> Tensor:
    """Var(r^T H r) for Rademacher r and symmetric H: 2 (||H||_F^2 - sum_i H_ii^2). (B,)"""
    diag = torch.diagonal(hessians, dim1=-2, dim2=-1)
    return 2.0 * (hessian_frobenius_sq(hessians) - (diag * diag).sum(-1))


def hr_norm_sq_variance(hessians: Tensor) -> Tensor:
    """Var(||H r||^2) for Rademacher r: Var(r^T A r) with A = H^2. (B,)"""
    return hutchinson_variance(hessians @ hessians)


def hr_norm_variance(hessians: Tensor, max_dim: int = 20) -> Tensor:
    """Var(||H r||) = ||H||_F^2 - (E ||H r||)^2 for Rademacher r. (B,)"""
    mean = expected_hr_norm(hessians, max_dim)
    return (hessian_frobenius_sq(hessians) - mean * mean).clamp(min=0)


def bilinear_moments(hessians: Tensor, max_dim: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """E|r^T H s|, E (r^T H s)^2 and E (r^T H s)^4 over independent Rademacher r, s. (B,) each."""
    values = _bilinear_values(hessians, max_dim)
    return (
        values.abs().mean(dim=(1, 2)),
        (values**2).mean(dim=(1, 2)),
        (values**4).mean(dim=(1, 2)),
    )


def standard_error(variance: Tensor, n: int) -> Tensor:
    """Standard error of the mean of n independent draws of a given variance."""
    return torch.sqrt(variance / n) if n > 0 else torch.full_like(variance, math.inf)
