"""Pure-PyTorch twins of the compiled ops, for every device and with no build.

Each function here has the signature and the result of its namesake in :mod:`curvkern.ops`:
``rademacher``, ``perturb`` and ``perturb_zo`` bit for bit (the probe generator is the same
Philox-4x32-10 of ``csrc/probes.h``, computed with int64 tensor arithmetic), ``probe_reduce`` up to
floating-point summation order. They materialize the probes, so they cost more memory and time
than the kernels; the scorer's ``backend="torch"`` uses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["perturb", "perturb_zo", "probe_reduce", "rademacher", "philox4x32_10"]

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PROBE_BLOCK = 128  # probe elements per generator call
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


def perturb(
    x: Tensor,
    ids: Tensor | Sequence[int] | None,
    seed: int,
    n_probes: int,
    h: float,
    probe_offset: int = 0,
) -> Tensor:
    """x (B, ...) -> (n_probes * B, ...); row k * B + b is x[b] + h r(seed, ids[b], offset + k)."""
    ids = as_ids(ids, x.shape[0], x.device)
    r = rademacher(seed, ids, n_probes, x.shape[1:], probe_offset, 0, x.dtype)
    return (x.unsqueeze(0) + h * r).reshape(-1, *x.shape[1:])


def perturb_zo(
    x: Tensor,
    ids: Tensor | Sequence[int] | None,
    seed: int,
    n_probes: int,
    h: float,
    probe_offset: int = 0,
) -> Tensor:
    """x (B, ...) -> (4 * n_probes * B, ...): the four copies x +- h r +- h s of each probe pair.

    Row (c * n + k) * B + b holds sign pattern c of (r, s): (+,+), (-,+), (+,-), (-,-).
    """
    ids = as_ids(ids, x.shape[0], x.device)
    hr = h * rademacher(seed, ids, n_probes, x.shape[1:], probe_offset, 0, x.dtype)
    hs = h * rademacher(seed, ids, n_probes, x.shape[1:], probe_offset, 1, x.dtype)
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
) -> Tensor:
    """Per-sample sums over probes k of ||dg_k|| / h, ||dg_k||^2 / h^2, r_k.dg_k / h, its square.

    Args:
        g0: (B, D) gradients at x.
        g: (n, B, D) gradients at x + h r_k.
        ids: (B,) sample ids (None: 0 .. B-1).
    Returns:
        (B, 4) tensor of the dtype of g.
    """
    ids = as_ids(ids, g0.shape[0], g0.device)
    r = rademacher(seed, ids, g.shape[0], g.shape[2:], probe_offset, 0, g.dtype)
    dg = g - g0
    c = torch.linalg.vector_norm(dg, dim=-1) / h  # (n, B)
    t = (r * dg).sum(-1) / h  # (n, B)
    return torch.stack([c.sum(0), (c * c).sum(0), t.sum(0), (t * t).sum(0)], dim=-1)
