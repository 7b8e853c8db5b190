"""How close probe_reduce's kernels must come to its float64 twin (shared by the kernel tests)."""

import torch

FLOAT32_EPS = 2.0**-24  # unit roundoff


def stats_tolerance(dtype: torch.dtype, dim: int) -> float:
    """Largest error of the kernels' (B, 4) sums against the twin on the same inputs, relative to
    each column's largest magnitude (r . dg can cancel to ~0, so not per element).

    Kernels and twin take the same differences g - g0 in the input dtype. float64 inputs: all sums
    in float64 in other orders, off by about D * 2^-53 of the sum of magnitudes (1.7e-11 at
    D = 150,528): 1e-10. float32 inputs: the CPU kernel sums each 128-element probe block in
    float32 (then in float64), each addition off by at most u = 2^-24 relative, and these errors
    add up like a random walk over the D terms: about sqrt(D) u of the column's scale; 4 times
    that for the tails (1.3e-5 at D = 3072). The CUDA kernel sums in float64 and is far inside it.
    """
    if dtype == torch.float64:
        return 1e-10
    return 4 * FLOAT32_EPS * max(dim, 1) ** 0.5


def assert_stats_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, dim: int):
    """got, want: (B, 4) float64 sums of probe_reduce (kernel) and torch_ops.probe_reduce."""
    assert got.dtype == torch.float64 and got.shape == want.shape
    scale = want.abs().amax(dim=0, keepdim=True)
    error = (got - want).abs()
    assert (error <= stats_tolerance(dtype, dim) * scale).all(), (got, want)
