"""CurvatureScorer: per-sample input-curvature scores for any PyTorch model."""

from __future__ import annotations

import contextlib
import math
import numbers
import types
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import losses, torch_ops
from . import ops as kernel_ops
from ._extension import kernels_available, missing_kernels_message
from .scores import CLASSIFICATION_FIELDS, CurvatureScores

__all__ = ["CurvatureScorer", "METHODS", "BACKENDS"]

METHODS = ("fd", "hvp", "zo")
BACKENDS = ("auto", "kernels", "torch")
MAX_SEED = 1 << 63
MAX_ID = torch_ops.MAX_ID

# Input elements per forward/backward pass on the CPU when max_batch is None: rows per pass =
# CPU_PASS_ELEMENTS // (elements per sample). Measured on two cores (n = 10): a small CNN on
# 3x32x32 ran fastest at 32 to 128 rows per pass and 1.4 to 1.7 times slower with all n * B rows
# stacked (activations fall out of cache); an MLP on 64 features ran fastest at 1,000 rows and
# more, 3 times slower at 64. 2^18 elements give 85 and 4,096 rows.
CPU_PASS_ELEMENTS = 1 << 18

LossFn = Callable[[Tensor, Tensor], Tensor]

_NO_INPUT_GRADIENT = (
    "loss_fn(model(x), y) does not depend on x through autograd, so it has no input gradient; "
    "methods 'fd' and 'hvp' need a model that can be backpropagated to its input (a detach(), "
    "numpy round trip or torch.no_grad inside the model cuts that path). method='zo' needs "
    "loss values only."
)


def _repeat_rows(t: Tensor, copies: int) -> Tensor:
    """(B, ...) -> (copies * B, ...), row c * B + b = t[b]."""
    return t.repeat(copies, *([1] * (t.dim() - 1)))


# Per device type, the torch.backends objects whose fp32_precision lets float32 convolutions and
# matrix products run in a reduced precision (TF32 on CUDA, by default for cuDNN convolutions;
# bf16/TF32 in oneDNN on some CPUs when asked for).
_FP32_PRECISION_KNOBS = {
    "cuda": ("cudnn.conv", "cuda.matmul"),
    "cpu": ("mkldnn.conv", "mkldnn.matmul"),
}


@contextlib.contextmanager
def ieee_float32(device_type: str) -> Iterator[None]:
    """Float32 convolutions and matrix products in full IEEE precision, restored on exit.

    TF32 rounds to about 5e-4 relative, while a finite difference g(x + h r) - g(x) is about
    h = 1e-3 times smaller than g: in TF32 it would be mostly rounding. The fd and zo methods
    therefore score inside this context. It uses torch's fp32_precision settings (torch >= 2.9)
    and puts back each one's previous value, so the caller's TF32 choices are unchanged after.

    Args:
        device_type: "cuda" or "cpu" (other devices: nothing to set).
    """
    knobs = []
    for path in _FP32_PRECISION_KNOBS.get(device_type, ()):
        obj = torch.backends
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            knobs.append((obj, obj.fp32_precision))
    try:
        for obj, _ in knobs:
            obj.fp32_precision = "ieee"
        yield
    finally:
        for obj, value in knobs:
            obj.fp32_precision = value


@contextlib.contextmanager
def _scoring_mode(model: Callable) -> Iterator[None]:
    """Eval mode and frozen parameters; on exit, the model exactly as it was found.

    Restores every submodule's training flag, every parameter's requires_grad and .grad, and the
    values of all buffers (BatchNorm running statistics included), also when scoring raises.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modules = list(model.modules())
    training = [m.training for m in modules]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone(), b._version) for b in model.buffers()]
    try:
        model.eval()
        for p in params:
            # Gradients with respect to the input only: parameters need no graph of their own.
            p.requires_grad_(False)
        yield
    finally:
        for m, flag in zip(modules, training, strict=True):
            m.training = flag
        for p, flag, grad in zip(params, requires_grad, grads, strict=True):
            p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad
        with torch.no_grad():
            for b, saved, version in buffers:
                if b._version != version:
                    b.copy_(saved)


class CurvatureScorer:
    """Scores samples by the curvature of their loss with respect to the input.

    For a sample x with label y, g(x) = grad_x L(x, y), H its Hessian in x, and Rademacher probes
    r_k (a pure function of (seed, sample id, k)), ``method="fd"`` measures
    dg_k = g(x + h r_k) - g(x) = h H r_k + O(h^2), and reports per sample the mean of
    ||dg_k|| / h (``curvature``, the memorization score of Garg, Ravikumar & Roy, ICML 2024), of
    r_k . dg_k / h (``trace``, Hutchinson's estimate of tr H) and of ||dg_k||^2 / h^2
    (``frobenius_sq``, of ||H||_F^2). ``method="hvp"`` computes H r_k exactly by double
    backward; ``method="zo"`` uses loss values only, four per probe pair (r_k, s_k).

    Args:
        model: any nn.Module or callable mapping a (B, ...) float batch to an output that
            ``loss_fn`` understands. Scored in eval mode; left exactly as found. A
            DistributedDataParallel model is scored through its ``module``.
        loss_fn: ``loss_fn(output, y)`` -> (B,) per-sample losses. Default: cross entropy with
            reduction="none".
        h: finite-difference step, in the model's input space (after normalization).
        n_probes: probes per sample (per round, with ``rtol``).
        seed: probe seed, 0 <= seed < 2^63.
        method: "fd" (default), "hvp" or "zo".
        max_batch: most rows (samples x probes) in one forward/backward pass. None: on the CPU,
            2^18 input elements' worth of rows (fastest in measurements); on CUDA, all of a
            batch's probe rows at once, halved (and remembered) whenever the GPU runs out of
            memory.
        backend: "kernels" (the compiled ops; an error where they are missing), "torch" (the
            same computation in plain PyTorch, probes materialized) or "auto" (kernels where
            compiled for the input's device, else torch with one warning).
        rtol: if set, probes are drawn in rounds of ``n_probes`` until each sample's
            curvature_stderr <= rtol * curvature, or it has had ``max_probes``.
        max_probes: cap on probes per sample with ``rtol`` (default 10 * n_probes).
    """

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        loss_fn: LossFn | None = None,
        *,
        h: float = 1e-3,
        n_probes: int = 10,
        seed: int = 0,
        method: str = "fd",
        max_batch: int | None = None,
        backend: str = "auto",
        rtol: float | None = None,
        max_probes: int | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
        if isinstance(h, bool) or not isinstance(h, numbers.Real) or not math.isfinite(h) or h <= 0:
            raise ValueError(f"h must be a positive finite number, got {h!r}")
        _check_int("n_probes", n_probes, low=1)
        _check_int("seed", seed, low=0, high=MAX_SEED)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if max_batch is not None:
            _check_int("max_batch", max_batch, low=1)
        if rtol is not None:
            if (
                isinstance(rtol, bool)
                or not isinstance(rtol, numbers.Real)
                or not math.isfinite(rtol)
                or rtol <= 0
            ):
                raise ValueError(f"rtol must be a positive finite number or None, got {rtol!r}")
            if max_probes is None:
                max_probes = 10 * n_probes
            _check_int("max_probes", max_probes, low=n_probes)
        elif max_probes is not None:
            raise ValueError(
                "max_probes caps the adaptive rounds and needs rtol; without rtol every sample "
                "gets exactly n_probes probes"
            )

        if isinstance(model, DistributedDataParallel):
            # Score the wrapped module: a DDP forward is a collective (it broadcasts buffers and
            # arms the gradient reducer), and ranks run different numbers of scoring passes.
            model = model.module
        self.model = model
        self.loss_fn: LossFn = losses.cross_entropy if loss_fn is None else loss_fn
        self.h = float(h)
        self.n_probes = int(n_probes)
        self.seed = int(seed)
        self.method = method
        self.max_batch = None if max_batch is None else int(max_batch)
        self.backend = backend
        self.rtol = None if rtol is None else float(rtol)
        self.max_probes = self.n_probes if max_probes is None else int(max_probes)
        self._auto_rows: dict[torch.device, int] = {}
        self._warned_fallback: set[str] = set()

    def __repr__(self) -> str:
        adaptive = "" if self.rtol is None else f", rtol={self.rtol}, max_probes={self.max_probes}"
        return (
            f"CurvatureScorer(method={self.method!r}, h={self.h}, n_probes={self.n_probes}, "
            f"seed={self.seed}, max_batch={self.max_batch}, backend={self.backend!r}{adaptive})"
        )

    # ------------------------------------------------------------------------------------------
    # Public entry point

    def score(
        self, x: Tensor, y: Tensor, ids: Tensor | Sequence[int] | None = None
    ) -> CurvatureScores:
        """Scores one batch.

        Args:
            x: (B, ...) floating input batch, as the model takes it.
            y: (B, ...) targets for ``loss_fn``.
            ids: (B,) integer sample ids in [0, 2^56), which fix each sample's probes; None
                means 0 .. B-1. Give dataset indices to make scores independent of batching.
        Returns:
            CurvatureScores with (B,) fields, on x's device.
        """
        x, y, ids = self._check_batch(x, y, ids)
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if x.shape[0] == 0:
            return CurvatureScores.empty(self.h, self.method, out_dtype, x.device)
        ops = self._ops_for(x.device)
        with contextlib.ExitStack() as stack:
            if torch.is_inference_mode_enabled():
                stack.enter_context(torch.inference_mode(False))
            if self.method in ("fd", "zo"):
                stack.enter_context(ieee_float32(x.device.type))
            stack.enter_context(_scoring_mode(self.model))
            if x.is_inference():
                x = x.clone()
            if isinstance(y, Tensor) and y.is_inference():
                y = y.clone()
            while True:
                rows = self._row_budget(x)
                try:
                    sums, count, loss, grad_norm, cls = self._score_batch(ops, x, y, ids, rows)
                    break
                except torch.cuda.OutOfMemoryError:
                    if self.max_batch is not None or rows <= 1:
                        raise
                    self._auto_rows[x.device] = rows // 2
        return self._finalize(sums, count, loss, grad_norm, cls, ids, out_dtype)

    # ------------------------------------------------------------------------------------------
    # Checks

    def _check_batch(
        self, x: Tensor, y: Tensor, ids: Tensor | Sequence[int] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError("x must have shape (B, ...), got a 0-d tensor")
        if not x.is_floating_point():
            raise TypeError(
                f"x must be a floating-point tensor (the model's input after normalization), "
                f"got dtype {x.dtype}; convert it with x.float()"
            )
        if x.dtype not in (torch.float32, torch.float64):
            if self.method in ("fd", "zo"):
                raise TypeError(
                    f"method={self.method!r} needs float32 or float64 input, got {x.dtype}: its "
                    f"differences (g(x + h r) - g(x) is about h = {self.h} times smaller than "
                    f"g; loss differences about h^2 times smaller than the loss) are lost to "
                    f"{x.dtype} rounding. Score with x.float() and a float32 model, a larger "
                    f"h, or method='hvp'."
                )
        if self.method in ("fd", "zo") and torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(
                f"method={self.method!r} cannot run under autocast: in reduced precision the "
                f"finite differences are rounding noise. Call score() outside the autocast "
                f"region (or inside torch.autocast({x.device.type!r}, enabled=False)) with a "
                f"float32 model, or use method='hvp'."
            )
        batch = x.shape[0]
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if y.dim() < 1 or y.shape[0] != batch:
            raise ValueError(
                f"y must have one row per sample of x (B = {batch}), got shape {tuple(y.shape)}"
            )
        ids = self._check_ids(ids, batch, x.device)
        finite = torch.isfinite(x)
        finite = finite.flatten(1).all(dim=1) if x.dim() > 1 else finite
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0, 0])
            raise ValueError(
                f"x has non-finite values (NaN or inf) in sample {first} (id {int(ids[first])}); "
                f"curvature is only defined at finite inputs"
            )
        return x, y, ids

    @staticmethod
    def _check_ids(ids: Tensor | Sequence[int] | None, batch: int, device: torch.device) -> Tensor:
        ids = torch_ops.as_ids(ids, batch, device)
        if ids.shape != (batch,):
            raise ValueError(f"ids must have shape (B,) = ({batch},), got {tuple(ids.shape)}")
        if batch and not bool(((ids >= 0) & (ids < MAX_ID)).all()):
            bad = int(((ids < 0) | (ids >= MAX_ID)).nonzero()[0, 0])
            raise ValueError(f"ids must lie in [0, 2^56), got ids[{bad}] = {int(ids[bad])}")
        return ids

    def _ops_for(self, device: torch.device) -> types.ModuleType:
        if self.backend == "torch":
            return torch_ops
        if kernels_available(device):
            return kernel_ops
        if self.backend == "kernels":
            raise RuntimeError(f"backend='kernels': {missing_kernels_message(device)}")
        if device.type not in self._warned_fallback:
            self._warned_fallback.add(device.type)
            warnings.warn(
                f"{missing_kernels_message(device)}. Falling back to backend='torch' (same "
                f"scores, slower, probes materialized).",
                stacklevel=3,
            )
        return torch_ops

    @property
    def _rows_per_probe(self) -> int:
        """Model rows one probe of one sample costs: fd and hvp one, zo its four copies."""
        return 4 if self.method == "zo" else 1

    def _row_budget(self, x: Tensor) -> int:
        if self.max_batch is not None:
            return self.max_batch
        if x.device in self._auto_rows:
            return self._auto_rows[x.device]
        if x.device.type == "cpu":
            return max(1, CPU_PASS_ELEMENTS // max(1, x[0].numel()))
        return self._rows_per_probe * self.n_probes * x.shape[0]

    # ------------------------------------------------------------------------------------------
    # Model evaluation

    def _losses(self, output: Tensor, y: Tensor, rows: int) -> Tensor:
        loss = self.loss_fn(output, y)
        if not isinstance(loss, Tensor) or loss.shape != (rows,):
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return one loss per sample, shape ({rows},), got {shape}; "
                f"use a per-sample loss, e.g. nn.CrossEntropyLoss(reduction='none')"
            )
        return loss

    def _loss_and_grad(self, x: Tensor, y: Tensor, stats: bool = False):
        """Per-row losses (R,) and input gradients (R, ...) at x (R, ...); with ``stats``, also
        the (R, 4) classification statistics of the output."""
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            output = self.model(xr)
            loss = self._losses(output, y, xr.shape[0])
            grad = None
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss.sum(), xr, allow_unused=True)
        if grad is None:
            raise RuntimeError(_NO_INPUT_GRADIENT)
        if stats:
            return loss.detach(), grad.detach(), losses.classification_stats(output, y)
        return loss.detach(), grad.detach()

    def _hessian_vector(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """H v per row, by double backward: x, v (R, ...) -> (R, ...)."""
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._losses(self.model(xr), y, xr.shape[0])
            grad = None
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss.sum(), xr, create_graph=True, allow_unused=True)
            if grad is None:
                raise RuntimeError(_NO_INPUT_GRADIENT)
            if not grad.requires_grad:
                return torch.zeros_like(xr)  # the loss is at most linear in x here
            (hv,) = torch.autograd.grad(grad, xr, grad_outputs=v, allow_unused=True)
        return torch.zeros_like(xr) if hv is None else hv.detach()

    # ------------------------------------------------------------------------------------------
    # Estimation

    def _score_batch(
        self, ops: types.ModuleType, x: Tensor, y: Tensor, ids: Tensor, rows: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Probe sums (B, 4), probe counts (B,), losses (B,), gradient norms (B,) and
        classification statistics (B, 4)."""
        group = max(1, min(x.shape[0], rows // self._rows_per_probe))
        parts = [
            self._score_group(ops, x[s : s + group], y[s : s + group], ids[s : s + group], rows)
            for s in range(0, x.shape[0], group)
        ]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def _score_group(
        self, ops: types.ModuleType, x: Tensor, y: Tensor, ids: Tensor, rows: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        batch = x.shape[0]
        if self.method == "zo":
            with torch.no_grad():
                output = self.model(x)
                loss = self._losses(output, y, batch).detach()
                cls_stats = losses.classification_stats(output, y)
            grad = None
            grad_norm = torch.full((batch,), math.nan, dtype=torch.float64, device=x.device)
        else:
            loss, grad, cls_stats = self._loss_and_grad(x, y, stats=True)
            grad = grad.reshape(batch, -1)
            grad_norm = torch.linalg.vector_norm(grad.double(), dim=1)
        sums = torch.zeros(batch, 4, dtype=torch.float64, device=x.device)
        count = torch.zeros(batch, dtype=torch.int64, device=x.device)
        active = torch.arange(batch, device=x.device)  # samples still drawing probes
        offset = 0  # probes drawn so far by every active sample
        while active.numel():
            sizes = self._round_sizes(offset, active.numel(), rows)
            everyone = active.numel() == batch
            xa, ya, ia = (x, y, ids) if everyone else (x[active], y[active], ids[active])
            if self.method == "fd":
                ga = grad if everyone else grad[active]
                stats = self._fd_rounds(ops, xa, ya, ia, ga, offset, sizes, rows)
            elif self.method == "hvp":
                stats = self._hvp_rounds(ops, xa, ya, ia, offset, sizes, rows)
            else:
                la = loss if everyone else loss[active]
                stats = self._zo_rounds(ops, xa, ya, ia, la, offset, sizes, rows)
            # Rounds in order; a sample takes no rounds after the one where it converged.
            live = torch.ones(active.numel(), dtype=torch.bool, device=x.device)
            for r, size in enumerate(sizes):
                rows_live = active[live]
                sums[rows_live] += stats[r][live]
                count[rows_live] += size
                offset += size
                if self.rtol is not None:
                    live[live.clone()] = ~self._converged(sums[rows_live], offset)
            active = active[live] if self.rtol is not None else active[:0]
        return sums, count, loss.to(torch.float64), grad_norm, cls_stats

    def _round_sizes(self, offset: int, active: int, rows: int) -> list[int]:
        """Probes per round for the next pass over ``active`` samples.

        One round of n_probes without rtol. With rtol, as many rounds as fit in a pass of
        ``rows`` rows (at least one), up to max_probes: once few samples remain, one pass runs
        several rounds rather than many passes of a few rows each.
        """
        if self.rtol is None:
            return [self.n_probes]
        fit = max(1, rows // (self._rows_per_probe * self.n_probes * active))
        sizes, remaining = [], self.max_probes - offset
        while remaining > 0 and len(sizes) < fit:
            sizes.append(min(self.n_probes, remaining))
            remaining -= sizes[-1]
        return sizes

    @staticmethod
    def _probe_chunks(n: int, batch: int, rows: int, copies: int = 1):
        """(first probe, probes) chunks of at most ``rows`` rows of ``copies`` x probes x batch."""
        per_chunk = max(1, rows // (copies * batch))
        for k0 in range(0, n, per_chunk):
            yield k0, min(per_chunk, n - k0)

    @staticmethod
    def _rounds_in_chunk(sizes: list[int], k0: int, kk: int):
        """(round, start, stop): the part [start, stop) of chunk [k0, k0 + kk) in each round."""
        first = 0
        for r, size in enumerate(sizes):
            start, stop = max(first, k0), min(first + size, k0 + kk)
            if start < stop:
                yield r, start - k0, stop - k0
            first += size

    def _fd_rounds(self, ops, x, y, ids, grad, offset, sizes, rows) -> Tensor:
        """(rounds, B, 4) probe sums; grad (B, D) is g(x)."""
        batch = x.shape[0]
        stats = torch.zeros(len(sizes), batch, 4, dtype=torch.float64, device=x.device)
        for k0, kk in self._probe_chunks(sum(sizes), batch, rows):
            xp = ops.perturb(x, ids, self.seed, kk, self.h, offset + k0)  # (kk * B, ...)
            _, gp = self._loss_and_grad(xp, _repeat_rows(y, kk))
            gp = gp.reshape(kk, batch, -1)  # (kk, B, D)
            for r, a, b in self._rounds_in_chunk(sizes, k0, kk):
                part = ops.probe_reduce(grad, gp[a:b], ids, self.seed, self.h, offset + k0 + a)
                stats[r] += part.double()
        return stats

    def _hvp_rounds(self, ops, x, y, ids, offset, sizes, rows) -> Tensor:
        """(rounds, B, 4) probe sums of H r_k, by double backward."""
        batch = x.shape[0]
        stats = torch.zeros(len(sizes), batch, 4, dtype=torch.float64, device=x.device)
        # The reduction runs in float32 at least (the ops take float32 and float64).
        reduce_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        zero = x.new_zeros(batch, x[0].numel(), dtype=reduce_dtype)
        for k0, kk in self._probe_chunks(sum(sizes), batch, rows):
            r = ops.rademacher(self.seed, ids, kk, x.shape[1:], offset + k0, 0, reduce_dtype)
            v = r.reshape(kk * batch, *x.shape[1:]).to(x.dtype)
            hv = self._hessian_vector(_repeat_rows(x, kk), _repeat_rows(y, kk), v)
            # (kk, B, D): H r_k, so h = 1 in probe_reduce
            hv = hv.reshape(kk, batch, -1).to(reduce_dtype)
            for rnd, a, b in self._rounds_in_chunk(sizes, k0, kk):
                part = ops.probe_reduce(zero, hv[a:b], ids, self.seed, 1.0, offset + k0 + a)
                stats[rnd] += part.double()
        return stats

    def _zo_rounds(self, ops, x, y, ids, loss, offset, sizes, rows) -> Tensor:
        """(rounds, B, 4) sums of |e|, e^2, t, t^2 with e ~ r^T H s, t ~ (r^T H r + s^T H s) / 2."""
        batch = x.shape[0]
        stats = torch.zeros(len(sizes), batch, 4, dtype=torch.float64, device=x.device)
        scale = 4.0 * self.h * self.h
        with torch.no_grad():
            for k0, kk in self._probe_chunks(sum(sizes), batch, rows, self._rows_per_probe):
                xp = ops.perturb_zo(x, ids, self.seed, kk, self.h, offset + k0)  # (4 kk B, ...)
                lp = self._losses(self.model(xp), _repeat_rows(y, 4 * kk), xp.shape[0])
                lp = lp.detach().double().reshape(4, kk, batch)
                # Four-point differences, exact for quadratics (errors O(h^2)):
                # L(x+hr+hs) - L(x-hr+hs) - L(x+hr-hs) + L(x-hr-hs) = 4 h^2 r^T H s, and
                # their sum - 4 L(x) = 2 h^2 (r^T H r + s^T H s).
                bilinear = (lp[0] - lp[1] - lp[2] + lp[3]) / scale  # (kk, B)
                trace = (lp.sum(0) - 4.0 * loss.double()) / scale  # (kk, B)
                per_probe = torch.stack([bilinear.abs(), bilinear**2, trace, trace**2], dim=-1)
                for r, a, b in self._rounds_in_chunk(sizes, k0, kk):
                    stats[r] += per_probe[a:b].sum(0)
        return stats

    def _converged(self, sums: Tensor, n: int) -> Tensor:
        """Which samples (with sums (A, 4) over n probes each) need no further probes."""
        if n >= self.max_probes:
            return torch.ones(sums.shape[0], dtype=torch.bool, device=sums.device)
        mean, stderr = _mean_and_stderr(sums[:, 0], sums[:, 1], float(n))
        if n < 2:  # one probe gives no error estimate
            return ~torch.isfinite(mean)
        return (stderr <= self.rtol * mean) | ~torch.isfinite(mean) | ~torch.isfinite(stderr)

    def _finalize(
        self,
        sums: Tensor,
        count: Tensor,
        loss: Tensor,
        grad_norm: Tensor,
        cls: Tensor,
        ids: Tensor,
        dtype: torch.dtype,
    ) -> CurvatureScores:
        n = count.double()
        curvature, curvature_stderr = _mean_and_stderr(sums[:, 0], sums[:, 1], n)
        trace, trace_stderr = _mean_and_stderr(sums[:, 2], sums[:, 3], n)
        fields = {
            "curvature": curvature,
            "curvature_stderr": curvature_stderr,
            "trace": trace,
            "trace_stderr": trace_stderr,
            "frobenius_sq": sums[:, 1] / n,
            "loss": loss,
            "grad_norm": grad_norm,
            **{name: cls[:, i] for i, name in enumerate(CLASSIFICATION_FIELDS)},
        }
        # NaN by design: grad_norm of zo, the classification fields of other outputs.
        unchecked = {*CLASSIFICATION_FIELDS, *(("grad_norm",) if self.method == "zo" else ())}
        checked = [v for k, v in fields.items() if k not in unchecked]
        bad = ~torch.stack([torch.isfinite(v) for v in checked]).all(dim=0)
        n_bad = int(bad.sum())
        if n_bad:
            for v in fields.values():
                v[bad] = math.nan
            warnings.warn(
                f"{n_bad} of {bad.numel()} samples had a non-finite loss or gradient; their "
                f"scores are NaN",
                stacklevel=3,
            )
        return CurvatureScores(
            **{k: v.to(dtype) for k, v in fields.items()},
            ids=ids,
            n_probes=count,
            h=self.h,
            method=self.method,
        )


def _mean_and_stderr(total: Tensor, total_sq: Tensor, n: Tensor | float) -> tuple[Tensor, Tensor]:
    """Mean and its standard error from the sum and the sum of squares of n values (0 if n == 1)."""
    mean = total / n
    n = torch.as_tensor(n, dtype=total.dtype, device=total.device)
    var = ((total_sq - total * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    stderr = torch.where(n > 1, torch.sqrt(var / n), torch.zeros_like(var))
    return mean, stderr


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
