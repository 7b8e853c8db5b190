"""Typed wrappers of the compiled ops ``torch.ops.curvkern.*``, and their fake (meta) kernels.

Every op regenerates its probes from (seed, stream, sample id, probe index, element index); see
``csrc/probes.h``. ``curvkern.torch_ops`` holds a pure-PyTorch twin of each, with the same
signature. ``ids=None`` means ids 0 .. B-1 (the position in the batch).

``mask`` (perturb, perturb_zo, probe_reduce): None or a (B, P) tensor of the data's dtype with
values 0/1, P dividing D (the elements of one sample): element j of sample b is weighted by
``mask[b, j // (D // P)]``; probes become m * r. :func:`curvkern.torch_ops.as_mask` makes it from a
user's (B, *p) mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._extension import has_kernels, missing_kernels_message
from .torch_ops import MAX_PROBE, MAX_STREAM, _mask_problem, as_ids

__all__ = ["perturb", "perturb_zo", "probe_reduce", "rademacher", "cuda_version"]


def _require_kernels() -> None:
    if not has_kernels():
        raise RuntimeError(missing_kernels_message("cpu"))


def perturb(
    x: Tensor,
    ids: Tensor | Sequence[int] | None,
    seed: int,
    n_probes: int,
    h: float,
    probe_offset: int = 0,
    mask: Tensor | None = None,
) -> Tensor:
    """All probe-perturbed copies of a batch, written in one pass.

    Args:
        x: (B, ...) float32 or float64 batch.
        ids: (B,) sample ids, or None for 0 .. B-1.
        seed: probe seed, 0 <= seed < 2^63.
        n_probes: number of probes n.
        h: step.
        probe_offset: index of the first probe.
        mask: None, or (B, P) 0/1 of x's dtype (see the module docstring); m = 1 without it.
    Returns:
        (n * B, ...) tensor: row k * B + b is x[b] + h * m[b] * r(seed, ids[b], probe_offset + k).
    """
    _require_kernels()
    ids = as_ids(ids, x.shape[0] if x.dim() else 0, x.device)
    return torch.ops.curvkern.perturb.default(
        x, ids, int(seed), int(n_probes), float(h), int(probe_offset), mask
    )


def perturb_zo(
    x: Tensor,
    ids: Tensor | Sequence[int] | None,
    seed: int,
    n_probes: int,
    h: float,
    probe_offset: int = 0,
    mask: Tensor | None = None,
) -> Tensor:
    """The four copies x +- h m r_k +- h m s_k of every probe pair, for the zeroth-order estimator.

    Args:
        x: (B, ...) float32 or float64 batch.
        ids: (B,) sample ids, or None for 0 .. B-1.
        seed, n_probes, h, probe_offset, mask: as in :func:`perturb`; r is probe stream 0, s
            stream 1.
    Returns:
        (4 * n * B, ...) tensor: row (c * n + k) * B + b holds sign pattern c of (r_k, s_k),
        in the order (+,+), (-,+), (+,-), (-,-).
    """
    _require_kernels()
    ids = as_ids(ids, x.shape[0] if x.dim() else 0, x.device)
    return torch.ops.curvkern.perturb_zo.default(
        x, ids, int(seed), int(n_probes), float(h), int(probe_offset), mask
    )


def probe_reduce(
    g0: Tensor,
    g: Tensor,
    ids: Tensor | Sequence[int] | None,
    seed: int,
    h: float,
    probe_offset: int = 0,
    mask: Tensor | None = None,
) -> Tensor:
    """Per-sample probe statistics in one pass over the probe gradients.

    With dg_k = m * (g[k] - g0) (the difference taken in g's dtype) and m * r_k the probes of
    :func:`perturb` (m = 1 without a mask):

    Args:
        g0: (B, D) input gradients at x.
        g: (n, B, D) input gradients at x + h m r_k.
        ids: (B,) sample ids, or None for 0 .. B-1.
        seed: probe seed.
        h: step, > 0.
        probe_offset: index of the first probe.
        mask: None, or (B, P) 0/1 of g's dtype (see the module docstring).
    Returns:
        (B, 4) float64 tensor, per sample the sums over k of ||dg_k|| / h, ||dg_k||^2 / h^2,
        (m r_k) . dg_k / h and ((m r_k) . dg_k / h)^2. Float64 whatever g's dtype: the
        standard error comes from the first two sums, which cancel.
    """
    _require_kernels()
    ids = as_ids(ids, g0.shape[0] if g0.dim() else 0, g0.device)
    return torch.ops.curvkern.probe_reduce.default(
        g0, g, ids, int(seed), float(h), int(probe_offset), mask
    )


def rademacher(
    seed: int,
    ids: Tensor | Sequence[int],
    n_probes: int,
    sample_shape: Sequence[int],
    probe_offset: int = 0,
    stream: int = 0,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Materialized probes k = probe_offset .. probe_offset + n_probes - 1 (tests, references).

    Args:
        seed: probe seed.
        ids: (B,) sample ids; the output is on their device.
        n_probes: number of probes n.
        sample_shape: shape of one sample.
        probe_offset: index of the first probe.
        stream: 0 for the probes r, 1 for the second probes s of the zeroth-order estimator.
        dtype: float32 (default) or float64.
    Returns:
        (n, B, *sample_shape) tensor of +-1.
    """
    _require_kernels()
    ids = as_ids(ids, len(ids), ids.device if isinstance(ids, Tensor) else torch.device("cpu"))
    return torch.ops.curvkern.rademacher.default(
        int(seed),
        ids,
        int(n_probes),
        [int(s) for s in sample_shape],
        int(probe_offset),
        int(stream),
        dtype,
    )


def cuda_version() -> int:
    """CUDA version the kernels were built with (e.g. 13000), or -1 for a CPU-only build."""
    _require_kernels()
    return int(torch.ops.curvkern.cuda_version())


# Fake kernels: shapes and dtypes for torch.compile / FakeTensor tracing, with the C++ checks.


def _check(cond: bool, op: str, message: str) -> None:
    torch._check(cond, lambda: f"curvkern::{op}: {message}")


def _check_ids(ids: Tensor, batch: int, like: Tensor, op: str, like_name: str) -> None:
    _check(ids.dtype == torch.int64, op, f"ids must be int64, got {ids.dtype}")
    _check(
        ids.dim() == 1 and ids.shape[0] == batch,
        op,
        f"ids must have shape (B,) with B = {batch} (the batch size of {like_name}), "
        f"got {tuple(ids.shape)}",
    )
    _check(ids.device == like.device, op, f"ids must be on {like.device} like {like_name}")


def _check_probes(seed: int, n_probes: int, probe_offset: int, op: str) -> None:
    _check(seed >= 0, op, f"seed must be >= 0, got {seed}")
    _check(n_probes >= 0, op, f"n_probes must be >= 0, got {n_probes}")
    _check(
        probe_offset >= 0 and probe_offset + n_probes <= MAX_PROBE,
        op,
        "probe indices probe_offset .. probe_offset + n_probes - 1 must lie in [0, 2^32)",
    )


def _check_mask(mask: Tensor | None, batch: int, dim: int, like: Tensor, op: str) -> None:
    if mask is not None:
        problem = _mask_problem(mask, batch, dim, like)
        _check(problem is None, op, str(problem))


def _check_sample_size(dim: int, op: str) -> None:
    _check(dim < 1 << 39, op, f"a sample may have at most 2^39 elements, got {dim}")


def _check_perturb(
    x: Tensor,
    ids: Tensor,
    seed: int,
    n_probes: int,
    h: float,
    probe_offset: int,
    mask: Tensor | None,
    op: str,
) -> None:
    _check(x.dim() >= 1, op, "x must have shape (B, ...), got a 0-d tensor")
    _check(
        x.dtype in (torch.float32, torch.float64),
        op,
        f"x must be float32 or float64, got {x.dtype}",
    )
    _check_ids(ids, x.shape[0], x, op, "x")
    _check_probes(seed, n_probes, probe_offset, op)
    _check(math.isfinite(h), op, f"h must be finite, got {h}")
    dim = math.prod(x.shape[1:])
    _check_sample_size(dim, op)
    _check_mask(mask, x.shape[0], dim, x, op)


if has_kernels():

    @torch.library.register_fake("curvkern::perturb")
    def _perturb_fake(x, ids, seed, n_probes, h, probe_offset=0, mask=None):
        _check_perturb(x, ids, seed, n_probes, h, probe_offset, mask, "perturb")
        return x.new_empty((n_probes * x.shape[0], *x.shape[1:]))

    @torch.library.register_fake("curvkern::perturb_zo")
    def _perturb_zo_fake(x, ids, seed, n_probes, h, probe_offset=0, mask=None):
        _check_perturb(x, ids, seed, n_probes, h, probe_offset, mask, "perturb_zo")
        return x.new_empty((4 * n_probes * x.shape[0], *x.shape[1:]))

    @torch.library.register_fake("curvkern::probe_reduce")
    def _probe_reduce_fake(g0, g, ids, seed, h, probe_offset=0, mask=None):
        op = "probe_reduce"
        _check(
            g.dtype in (torch.float32, torch.float64),
            op,
            f"g must be float32 or float64, got {g.dtype}",
        )
        _check(g.dim() == 3, op, f"g must have shape (n_probes, B, D), got {tuple(g.shape)}")
        _check(
            g0.dim() == 2 and g0.shape[0] == g.shape[1] and g0.shape[1] == g.shape[2],
            op,
            f"g0 must have shape (B, D) = ({g.shape[1]}, {g.shape[2]}) to match g, "
            f"got {tuple(g0.shape)}",
        )
        _check(g0.dtype == g.dtype, op, f"g0 must have the dtype of g ({g.dtype}), got {g0.dtype}")
        _check(g0.device == g.device, op, f"g0 must be on {g.device} like g, got {g0.device}")
        _check_ids(ids, g.shape[1], g, op, "g")
        _check_probes(seed, g.shape[0], probe_offset, op)
        _check(math.isfinite(h) and h > 0, op, f"h must be positive and finite, got {h}")
        _check_sample_size(g.shape[2], op)
        _check_mask(mask, g.shape[1], g.shape[2], g, op)
        return g.new_empty((g.shape[1], 4), dtype=torch.float64)

    @torch.library.register_fake("curvkern::rademacher")
    def _rademacher_fake(seed, ids, n_probes, sample_shape, probe_offset=0, stream=0, dtype=None):
        op = "rademacher"
        _check(ids.dim() == 1, op, f"ids must have shape (B,), got {tuple(ids.shape)}")
        _check(ids.dtype == torch.int64, op, f"ids must be int64, got {ids.dtype}")
        _check_probes(seed, n_probes, probe_offset, op)
        _check(0 <= stream < MAX_STREAM, op, f"stream must lie in [0, {MAX_STREAM}), got {stream}")
        _check(
            all(s >= 0 for s in sample_shape),
            op,
            f"sample_shape must be non-negative, got {list(sample_shape)}",
        )
        _check_sample_size(math.prod(sample_shape), op)
        dtype = torch.float32 if dtype is None else dtype
        _check(
            dtype in (torch.float32, torch.float64),
            op,
            f"dtype must be float32 or float64, got {dtype}",
        )
        return ids.new_empty((n_probes, ids.shape[0], *sample_shape), dtype=dtype)
