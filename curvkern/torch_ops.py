"""Pure-PyTorch twins of the compiled ops, for every device and with no build.

Each function here has the signature and the result of its namesake in :mod:`curvkern.ops`:
``rademacher``, ``perturb`` and ``perturb_zo`` bit for bit (the probe generator is the same
Philox-4x32-10 of ``csrc/probes.h``, computed with int64 tensor arithmetic), ``probe_reduce`` up to
floating-point summation order. They materialize the probes, so they cost more memory and time
than the kernels; the scorer's ``backend="torch"`` uses them.

Probe masks: ``perturb``, ``perturb_zo`` and ``probe_reduce`` take ``mask``, None or a (B, P)
tensor of the data's dtype with values 0/1, where P divides D (the elements of one sample) and
element j of sample b is weighted by ``mask[b, j // (D // P)]``: a mask over a prefix of the
sample shape, broadcast over the rest (:func:`as_mask` makes it from a user's (B, *p) mask). The
probes become m * r (and m * s), and ``probe_reduce`` reduces m * (g - g0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "as_ids",
    "as_mask",
    "perturb",
    "perturb_zo",
    "probe_reduce",
    "rademacher",
    "philox4x32_10",
]

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PROBE_BLOCK = 128  # probe elements per generator call
# Limits of the probe counter (csrc/probes.h), checked by the ops' fake kernels and the scorer:
# ids in [0, MAX_ID), streams in [0, MAX_STREAM), probe indices in [0, MAX_PROBE).
MAX_ID = 1 << 56
MAX_STREAM = 256
MAX_PROBE = 1 << 32


def _mulhilo32(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of a * m, for a int64 tensor of values in [0, 2^32) and m < 2^32.

    The 64-bit product would overflow int64, so m is split into 16-bit halves: with
    P = a * m_hi and Q = a * m_lo (both < 2^48), a * m = P * 2^16 + Q.
    """
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p = a * m_hi
    q = a * m_lo
    hi = (p + (q >> 16)) >> 16
    lo = (((p & 0xFFFF) << 16) + q) & _MASK32
    return hi, lo


def philox4x32_10(
    counter: Sequence[Tensor | int], key: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-10 (Random123) on int64 tensors holding uint32 values.

    Args:
        counter: four int64 tensors (broadcastable) or ints in [0, 2^32).
        key: two ints in [0, 2^32).
    Returns:
        The four output words, int64 tensors of values in [0, 2^32).
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = int(key[0]), int(key[1])
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def rademacher(
    seed: int,
    ids: Tensor,
    n_probes: int,
    sample_shape: Sequence[int],
    probe_offset: int = 0,
    stream: int = 0,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Probes k = probe_offset .. probe_offset + n_probes - 1 of the samples ``ids``.

    Args:
        seed: generator seed, 0 <= seed < 2^63.
        ids: (B,) int64 sample ids, each in [0, 2^56); the output is on their device.
        n_probes: number of probes n.
        sample_shape: shape of one sample; D = its product.
        probe_offset: index of the first probe.
        stream: 0 for the probes r, 1 for the second probes s of the zeroth-order estimator.
        dtype: float32 (default) or float64.
    Returns:
        (n, B, *sample_shape) tensor of +-1.
    """
    dtype = torch.float32 if dtype is None else dtype
    sample_shape = tuple(int(s) for s in sample_shape)
    numel = 1
    for s in sample_shape:
        numel *= s
    n, batch = int(n_probes), ids.shape[0]
    nblk = -(-numel // PROBE_BLOCK)
    ids = ids.to(torch.int64)
    block = torch.arange(nblk, device=ids.device).view(1, 1, nblk)
    probe = (probe_offset + torch.arange(n, device=ids.device)).view(n, 1, 1)
    id_lo = (ids & _MASK32).view(1, batch, 1)
    id_hi = ((ids >> 32) | (int(stream) << 24)).view(1, batch, 1)
    words = philox4x32_10((block, probe, id_lo, id_hi), (seed & _MASK32, seed >> 32))
    words = torch.stack([w.expand(n, batch, nblk) for w in words], dim=-1)  # (n, B, nblk, 4)
    shifts = torch.arange(32, device=ids.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # (n, B, nblk, 4, 32)
    bits = bits.reshape(n, batch, nblk * PROBE_BLOCK)[..., :numel]
    return (1 - 2 * bits).to(dtype).reshape(n, batch, *sample_shape)


def as_ids(ids: Tensor | Sequence[int] | None, batch: int, device: torch.device) -> Tensor:
    """(B,) int64 ids on ``device``; None means 0 .. B-1 (the position in the batch).

    What every op (compiled or twin) and the scorer make of their ``ids`` argument.
    """
    if ids is None:
        return torch.arange(batch, device=device)
    ids = torch.as_tensor(ids, device=device)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    return ids.to(torch.int64)


def as_mask(probe_mask: Tensor | None, x: Tensor) -> Tensor | None:
    """A user's probe mask in the (B, P) form the ops take; None passes through.

    Args:
        probe_mask: None, or a bool or floating tensor of shape (B, *p) with values 0/1, where p
            is a prefix of the sample shape ``x.shape[1:]`` (e.g. (B, T) for x of shape
            (B, T, E): one value per position, shared by its E features). Moved to x's device.
        x: (B, ...) the batch the mask belongs to.
    Returns:
        None, or a (B, P) tensor of x's dtype and device, P = prod(p), contiguous:
        element j of sample b is weighted by ``mask[b, j // (D // P)]`` (D = x[0].numel()).
    Raises:
        TypeError: probe_mask is not a tensor, or not bool or floating.
        ValueError: its shape is not (B, *p), or a value is neither 0 nor 1.
    """
    if probe_mask is None:
        return None
    if not isinstance(probe_mask, Tensor):
        raise TypeError(
            f"probe_mask must be a tensor (bool or floating, shape (B, *p)), "
            f"got {type(probe_mask).__name__}"
        )
    if probe_mask.dtype != torch.bool and not probe_mask.is_floating_point():
        raise TypeError(
            f"probe_mask must be bool or floating (0/1 values), got {probe_mask.dtype}; "
            "convert an integer mask with .bool()"
        )
    sample_shape = tuple(x.shape[1:])
    shape = tuple(probe_mask.shape)
    prefix = shape[1:]
    if len(shape) == 0 or shape[0] != x.shape[0] or prefix != sample_shape[: len(prefix)]:
        raise ValueError(
            f"probe_mask must have shape (B, *p) with B = {x.shape[0]} and p a prefix of the "
            f"sample shape {sample_shape} (e.g. {(x.shape[0], *sample_shape[:1])}), got {shape}"
        )
    mask = probe_mask.to(device=x.device)
    if mask.is_floating_point():
        bad = ~((mask == 0) | (mask == 1))
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"probe_mask must hold only 0 and 1, got {mask[first].item()} at index {first}"
            )
    return mask.to(x.dtype).reshape(x.shape[0], -1).contiguous()


def _mask_problem(mask: Tensor, batch: int, dim: int, like: Tensor) -> str | None:
    """What is wrong with the (B, P) ``mask`` argument of an op, or None.

    The checks of the compiled ops (csrc/common.h, check_mask), shared by the twins and the ops'
    fake kernels.
    """
    if mask.dim() != 2 or mask.shape[0] != batch:
        return f"mask must have shape (B, P) with B = {batch}, got {tuple(mask.shape)}"
    parts = mask.shape[1]
    if (parts == 0 and dim != 0) or (parts > 0 and dim % parts != 0):
        return (
            f"mask must have shape (B, P) with P dividing the {dim} elements of a sample, "
            f"got {tuple(mask.shape)}"
        )
    if mask.dtype != like.dtype:
        return f"mask must have dtype {like.dtype}, got {mask.dtype}"
    if mask.device != like.device:
        return f"mask must be on {like.device}, got {mask.device}"
    return None


def _expand_mask(mask: Tensor | None, x: Tensor, op: str) -> Tensor | None:
    """(B, P) mask -> (B, *sample_shape): each value repeated over its D // P elements."""
    if mask is None:
        return None
    batch, dim = x.shape[0], _numel(x.shape[1:])
    problem = _mask_problem(mask, batch, dim, x)
    if problem is not None:
        raise RuntimeError(f"curvkern::{op}: {problem}")
    parts = mask.shape[1]
    return mask.repeat_interleave(dim // parts if parts else 0, dim=1).reshape(x.shape)


def _numel(shape: Sequence[int]) -> int:
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel


def perturb(
    x: Tensor,
    ids: Tensor | Sequence[int] | None,
    seed: int,
    n_probes: int,
    h: float,
    probe_offset: int = 0,
    mask: Tensor | None = None,
) -> Tensor:
    """x (B, ...) -> (n_probes * B, ...); row k * B + b is x[b] + h m[b] r_k(seed, ids[b]).

    r_k is probe probe_offset + k; ``mask``: None or (B, P) (see the module docstring), m = 1
    without it.
    """
    ids = as_ids(ids, x.shape[0], x.device)
    r = rademacher(seed, ids, n_probes, x.shape[1:], probe_offset, 0, x.dtype)
    m = _expand_mask(mask, x, "perturb")
    step = h * r if m is None else h * m * r  # h m r is exact: m is 0/1 and r is +-1
    return (x.unsqueeze(0) + step).reshape(-1, *x.shape[1:])


def perturb_zo(
    x: Tensor,
    ids: Tensor | Sequence[int] | None,
    seed: int,
    n_probes: int,
    h: float,
    probe_offset: int = 0,
    mask: Tensor | None = None,
) -> Tensor:
    """x (B, ...) -> (4 * n_probes * B, ...): the copies x +- h m r +- h m s of each probe pair.

    Row (c * n + k) * B + b holds sign pattern c of (r, s): (+,+), (-,+), (+,-), (-,-).
    ``mask``: None or (B, P) (see the module docstring); m = 1 without it.
    """
    ids = as_ids(ids, x.shape[0], x.device)
    hr = h * rademacher(seed, ids, n_probes, x.shape[1:], probe_offset, 0, x.dtype)
    hs = h * rademacher(seed, ids, n_probes, x.shape[1:], probe_offset, 1, x.dtype)
    m = _expand_mask(mask, x, "perturb_zo")
    if m is not None:
        hr, hs = hr * m, hs * m
    plus, minus = x.unsqueeze(0) + hr, x.unsqueeze(0) - hr
    copies = torch.stack([plus + hs, minus + hs, plus - hs, minus - hs])  # (4, n, B, ...)
    return copies.reshape(-1, *x.shape[1:])


def probe_reduce(
    g0: Tensor,
    g: Tensor,
    ids: Tensor | Sequence[int] | None,
    seed: int,
    h: float,
    probe_offset: int = 0,
    mask: Tensor | None = None,
) -> Tensor:
    """Per-sample sums over probes k of ||dg_k|| / h, ||dg_k||^2 / h^2, r_k.dg_k / h, its square.

    dg_k = m * (g[k] - g0) and r_k -> m * r_k with a mask; where m is 0, dg_k is 0 even if g or
    g0 is not finite there. The difference g - g0 is taken in the
    input dtype (as the kernels do); norms, dot products and sums are in float64, because the
    standard error is computed from the sums of c and c^2, which cancel: in float32 they lose a
    spread of 1e-4 between probes entirely.

    Args:
        g0: (B, D) gradients at x.
        g: (n, B, D) gradients at x + h m r_k.
        ids: (B,) sample ids (None: 0 .. B-1).
        seed, h, probe_offset: as in :func:`perturb`.
        mask: None or (B, P) (see the module docstring).
    Returns:
        (B, 4) float64 tensor.
    """
    ids = as_ids(ids, g0.shape[0], g0.device)
    r = rademacher(seed, ids, g.shape[0], g.shape[2:], probe_offset, 0, torch.float64)
    dg = g - g0  # (n, B, D) in the input dtype
    m = _expand_mask(mask, g0, "probe_reduce")
    if m is not None:
        # A masked-out element never contributes, a NaN there included: select, not multiply
        # (NaN * 0 is NaN), as the kernels do (csrc/mask.h).
        dg = torch.where(m != 0, dg * m, torch.zeros((), dtype=dg.dtype, device=dg.device))
        r = r * m.double()
    dg = dg.double()
    c = torch.linalg.vector_norm(dg, dim=-1) / h  # (n, B)
    t = (r * dg).sum(-1) / h  # (n, B)
    return torch.stack([c.sum(0), (c * c).sum(0), t.sum(0), (t * t).sum(0)], dim=-1)
