"""The three curvature estimators, fd, hvp and zo: each one small object holding its facts.

An estimator knows how many model rows one probe costs, whether it needs input gradients,
whether it takes finite differences (and so refuses half precision and autocast and runs in IEEE
float32), and two functions: :meth:`Estimator.run`, one model pass over a chunk of probes, and
:meth:`Estimator.reduce`, the per-sample probe sums of (part of) that chunk; and its warnings'
facts (what its differences are called, when a sample is flat at x, zo's rounding floor). The loop
over chunks and adaptive rounds is written once, in :class:`curvkern.CurvatureScorer`.

A :class:`Batch` holds the samples (x, y, ids, probe mask and the model's other inputs) and
repeats their per-sample inputs exactly as the probe rows repeat x; an :class:`Objective` calls
the model and the loss on such rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ._model_state import PRECISIONS, double_backward_attention, float32_precision
from .diagnostics import SampleWarning
from .losses import classification_stats

__all__ = ["Batch", "Base", "Objective", "Estimator", "ESTIMATORS", "METHODS"]

_NO_INPUT_GRADIENT = (
    "loss_fn(model(x), y) does not depend on x through autograd, so it has no input gradient; "
    "methods 'fd' and 'hvp' need a model that can be backpropagated to its input (a detach(), "
    "numpy round trip or torch.no_grad inside the model cuts that path). method='zo' needs "
    "loss values only."
)


# Autograd's messages for an op whose backward cannot be differentiated again ("the derivative
# for <op> is not implemented", "... double backward ...", "trying to differentiate twice ...").
_NO_DOUBLE_BACKWARD = ("derivative for", "double backward", "differentiate twice")

# method="zo": a sample whose curvature (mean |e| over its pairs) is below ZO_NOISE_WARN times
# the rounding floor eps * max(1, |L|) / (4 h^2) is reported (ZerothOrder.warn_rounding): a
# pair's rounding error is up to about 2 floors, so below 20 floors the curvature can be more
# than 10% rounding. Measured: see docs/method.md, "Measurements behind the constants".
ZO_NOISE_WARN = 20.0
# The largest h the zo warning suggests: above it, zo's O(h^2) error takes over on unit-scale
# inputs. Measured: see docs/method.md, "Measurements behind the constants".
ZO_MAX_H = 3e-2


# torch.compile's backward frees ("donates") its saved buffers, so it cannot be differentiated
# again: the error autograd gives names donated buffers.
_COMPILED_NO_DOUBLE_BACKWARD = (
    "method='hvp' differentiates the model's backward pass again, and this model was compiled "
    "with torch.compile, whose backward frees ('donates') its buffers and cannot be "
    "differentiated. Score the uncompiled module (model._orig_mod for a compiled nn.Module), "
    "set torch._functorch.config.donated_buffer = False before compiling, or use method='fd'."
)

# The relative rounding of one operation in each reduced precision (2^-11 and 2^-8: TF32 and
# bfloat16 keep 10 and 7 stored mantissa bits).
_ROUNDING = {"tf32": "4.9e-4", "bf16": "3.9e-3"}


def no_double_backward(error: BaseException) -> bool:
    """Whether ``error`` says an op of the model has no second derivative."""
    return any(s in str(error) for s in _NO_DOUBLE_BACKWARD)


def _no_double_backward(cause: str) -> str:
    return (
        f"method='hvp' differentiates the model's backward pass again, and an op of this model "
        f"has no such derivative ({cause}). Use method='fd' (first-order autograd only), or "
        f"replace that op by one built from differentiable torch ops. (Fused scaled-dot-product "
        f"attention is already switched to its math kernel for hvp.)"
    )


def _has_error_node(t: Tensor) -> bool:
    """Whether t's autograd graph holds an error node (what a once-differentiable backward
    leaves where its own derivative would be)."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Error" in type(node).__name__:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def repeat_rows(t: Tensor, copies: int) -> Tensor:
    """(B, ...) -> (copies * B, ...), row c * B + b = t[b]."""
    if copies == 1:
        return t
    return torch.cat([t] * copies)  # a tenth of t.repeat's dispatch cost on small tensors


@dataclasses.dataclass
class Batch:
    """The samples being scored and everything a model pass over their rows needs.

    Attributes:
        x: (B, ...) inputs.
        y: (B, ...) targets.
        ids: (B,) int64 sample ids.
        mask: (B, P) probe mask in x's dtype (the ops' form), or None.
        inputs: per-sample keyword inputs of the model, each (B, ...).
        shared: the model's other keyword inputs, passed unchanged.
    """

    x: Tensor
    y: Tensor
    ids: Tensor
    mask: Tensor | None = None
    inputs: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def select(self, index: Tensor | slice) -> Batch:
        """The samples ``index`` (an index tensor or a slice), with their inputs and mask."""
        return Batch(
            self.x[index],
            self.y[index],
            self.ids[index],
            None if self.mask is None else self.mask[index],
            {k: v[index] for k, v in self.inputs.items()},
            self.shared,
        )

    def targets(self, copies: int) -> Tensor:
        """y for ``copies`` stacked copies of the batch: (copies * B, ...)."""
        return repeat_rows(self.y, copies)

    def keywords(self, copies: int) -> dict[str, Any]:
        """The model's keyword inputs for ``copies`` stacked copies of the batch."""
        if not self.inputs:
            return self.shared
        return {**self.shared, **{k: repeat_rows(v, copies) for k, v in self.inputs.items()}}

    def element_mask(self, dtype: torch.dtype | None = None) -> Tensor | None:
        """The probe mask per input element, (B, D), or None without a mask."""
        if self.mask is None:
            return None
        per_part = self.x[0].numel() // max(1, self.mask.shape[1])
        m = self.mask.repeat_interleave(per_part, dim=1) if per_part > 1 else self.mask
        return m if dtype is None else m.to(dtype)


@dataclasses.dataclass
class Base:
    """What an estimator takes from the unperturbed pass at x, per sample.

    Attributes:
        loss: (B,) float64 losses L(x, y).
        grad: (B, D) input gradients g(x) in x's dtype (None for zo).
        grad_norm: (B,) float64 ||m * g(x)|| (m the probe mask, 1 without one; NaN for zo).
        stats: (B, 4) float64 classification statistics (margin, p_label, correct, el2n).
    """

    loss: Tensor
    grad: Tensor | None
    grad_norm: Tensor
    stats: Tensor

    def select(self, index: Tensor | slice) -> Base:
        return Base(
            self.loss[index],
            None if self.grad is None else self.grad[index],
            self.grad_norm[index],
            self.stats[index],
        )


class Objective:
    """The model and the per-sample loss, evaluated on rows of a :class:`Batch`.

    Args:
        model: callable; called ``model(x, **keywords)``, or ``model(**{input_key: x},
            **keywords)`` when ``input_key`` is set.
        loss_fn: ``loss_fn(output, y)`` -> (R,) per-row losses.
        input_key: the keyword that takes x, or None to pass x first.
    """

    def __init__(self, model: Callable, loss_fn: Callable, input_key: str | None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.input_key = input_key
        # Set once a model wrote into rows the scorer owns (see loss_and_grad): copied since.
        self.copy_owned = False

    def output(self, xp: Tensor, batch: Batch, copies: int):
        """The model's output on xp, (copies * B, ...) rows of ``batch``."""
        # A copy: a model that writes into its input (x.mul_(0.5)) must not change the
        # caller's x or the unperturbed rows later passes are built from, and autograd refuses
        # in-place writes into a leaf that requires grad. One copy of the rows, small next to
        # the activations of the pass.
        return self._call(xp.clone(), batch, copies)

    def _call(self, xp: Tensor, batch: Batch, copies: int):
        keywords = batch.keywords(copies)
        if self.input_key is None:
            return self.model(xp, **keywords)
        return self.model(**{self.input_key: xp}, **keywords)

    def losses(self, output, y: Tensor, rows: int) -> Tensor:
        """loss_fn(output, y), checked to hold one loss per row: (rows,)."""
        loss = self.loss_fn(output, y)
        if not isinstance(loss, Tensor) or loss.shape != (rows,):
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return one loss per sample, shape ({rows},), got {shape}; "
                f"use a per-sample loss, e.g. nn.CrossEntropyLoss(reduction='none')"
            )
        return loss

    def loss(
        self, xp: Tensor, batch: Batch, copies: int, owned: bool = False
    ) -> tuple[Tensor, Any]:
        """Per-row losses (R,) at xp (R = copies * B rows), and the model's output.

        ``owned``: xp is a leaf that requires grad, made for this pass and used by nothing
        else, so the model may take it without the copy :meth:`output` makes (a subclass that
        overrides :meth:`output` is always called through it)."""
        if owned and type(self).output is Objective.output:
            output = self._call(xp, batch, copies)
        else:
            output = self.output(xp, batch, copies)
        return self.losses(output, batch.targets(copies), xp.shape[0]), output

    def loss_and_grad(
        self,
        xp: Tensor,
        batch: Batch,
        copies: int,
        create_graph: bool = False,
        owned: bool = False,
    ) -> tuple[Tensor, Tensor, Any]:
        """Per-row losses (R,), input gradients (R, ...) at xp, and the model's output.

        With ``create_graph`` the gradient keeps its graph, for a second backward with respect
        to xp: xp must then be a leaf that requires grad. With ``owned`` (xp made for this
        pass, e.g. perturb's rows) the rows reach the model without a copy: on a small model
        the copy and its backward are a visible part of a pass. A model that writes into them
        is then refused by autograd before anything is written (they are a leaf that requires
        grad), and the pass runs again on a copy, as every later owned pass does.
        """
        xr = xp if create_graph else xp.detach().requires_grad_(True)
        with torch.enable_grad():
            owned = owned and not self.copy_owned
            try:
                loss, output = self.loss(xr, batch, copies, owned=owned)
            except RuntimeError as e:
                if not owned or _LEAF_IN_PLACE not in str(e):
                    raise
                self.copy_owned = True
                loss, output = self.loss(xr, batch, copies)
            grad = None
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(
                    loss.sum(), xr, create_graph=create_graph, allow_unused=True
                )
        if grad is None:
            raise RuntimeError(_NO_INPUT_GRADIENT)
        return loss, grad, output


# Autograd's refusal of an in-place write into a leaf (or a view of one) that requires grad.
_LEAF_IN_PLACE = "leaf Variable that requires grad is being used in an in-place operation"


# cross_entropy's default ignore_index: a sample whose labels are all of it has loss 0 at any x.
IGNORE_INDEX = -100

_IGNORED_REASON = (
    f"their labels are all {IGNORE_INDEX} (cross-entropy's ignore_index), so their loss is 0 "
    f"at every x: there is no curvature to measure. Leave them out of the scored data (or "
    f"give them labels)."
)
_CONSTANT_REASON = (
    "their input gradient at x is exactly 0 while their loss is not: the model's output does "
    "not change with x there (e.g. a zero-initialized last layer, as torchvision's ViT has "
    "before training, weights that were never loaded, or every path from x cut, e.g. by "
    "inactive ReLUs). More precision would not change that: check that the model is the "
    "trained one."
)


def _all_ignored(y: Tensor) -> Tensor:
    """Which samples' integer labels are all IGNORE_INDEX, (B,) bool."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        return torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    return (y == IGNORE_INDEX).reshape(y.shape[0], -1).all(1)


def _masked_norm(g: Tensor, m: Tensor | None) -> Tensor:
    """||m * g|| per row of g (B, D), in float64."""
    g = g.double()
    return torch.linalg.vector_norm(g if m is None else g * m.double(), dim=1)


def _position_norms(d: Tensor, batch: Batch, m: Tensor | None, h: float) -> Tensor:
    """sum_k ||m * d_k[t]|| / h per sample and position t: d (k, B, D) -> (B, T) float64."""
    if m is not None:
        d = d * m.to(d.dtype)
    k, b = d.shape[0], d.shape[1]
    d = d.reshape(k, b, batch.x.shape[1], -1).double()
    return torch.linalg.vector_norm(d, dim=-1).sum(0) / h


def _cast(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The (B, P) probe mask in the dtype of the data an op takes it with (None stays None)."""
    return None if mask is None else mask.to(dtype)


class Estimator:
    """One curvature estimator: its facts, its pass over a chunk of probes, and its reduction.

    Attributes:
        name: the ``method`` string.
        rows_per_probe: model rows one probe of one sample costs.
        needs_gradient: whether it backpropagates to the input (and so reports grad_norm).
        takes_differences: whether it differences nearby values (fd, zo): it then refuses
            half precision and autocast, and runs in IEEE float32.
        differences: what its differences are called, in the warning about samples whose
            differences were all exactly zero (fd, zo).
        needs_double_backward: whether it differentiates the model's backward pass (hvp):
            an op without a second derivative then stops it (see :func:`no_double_backward`).
        precisions: the scorer ``precision`` settings it takes: "fp32" only where it takes
            differences (TF32's or bfloat16's rounding, 5e-4 to 4e-3 relative, is as large as
            a difference h = 1e-3 times smaller than what it differences).
    """

    name = ""
    rows_per_probe = 1
    needs_gradient = True
    takes_differences = True
    differences = ""
    needs_double_backward = False
    precisions: tuple[str, ...] = ("fp32",)

    def check_scoring_precision(self, precision: str) -> None:
        """Refuses a scorer ``precision`` setting this method cannot score in."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision not in self.precisions:
            raise ValueError(
                f"precision={precision!r} is for method='hvp' only: method={self.name!r} "
                f"takes differences of nearly equal values (about h times smaller than what "
                f"is differenced), which {precision}'s rounding ({_ROUNDING[precision]} "
                f"relative) would swamp, while hvp's H r involves no such difference, so "
                f"reduced precision costs it only about its relative rounding. Use "
                f"method='hvp' with precision={precision!r}, or precision='fp32'."
            )

    def check_precision(self, x: Tensor, h: float) -> None:
        """Refuses inputs whose precision would turn the estimate into rounding noise."""
        if not self.takes_differences:
            return
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"method={self.name!r} needs float32 or float64 input, got {x.dtype}: its "
                f"differences (g(x + h r) - g(x) is about h = {h} times smaller than "
                f"g; loss differences about h^2 times smaller than the loss) are lost to "
                f"{x.dtype} rounding. Score with x.float() and a float32 model, a larger "
                f"h, or method='hvp'."
            )
        if torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(
                f"method={self.name!r} cannot run under autocast: in reduced precision the "
                f"finite differences are rounding noise. Call score() outside the autocast "
                f"region (or inside torch.autocast({x.device.type!r}, enabled=False)) with a "
                f"float32 model, or use method='hvp'."
            )

    @contextlib.contextmanager
    def context(self, device_type: str, precision: str = "fp32") -> Iterator[None]:
        """The numerical context every pass of this estimator runs in: float32 arithmetic as
        ``precision`` sets it (IEEE float32 for "fp32" and "bf16", whose bfloat16 passes are
        autocast's, see :func:`curvkern._model_state.reduced_precision_passes`)."""
        with float32_precision(device_type, precision):
            yield

    def base(self, objective: Objective, batch: Batch) -> Base:
        """Loss, gradient and classification statistics at the unperturbed x."""
        loss, grad, output = objective.loss_and_grad(batch.x, batch, 1)
        grad = grad.detach().reshape(batch.size, -1)
        return Base(
            loss.detach().double(),
            grad,
            _masked_norm(grad, batch.element_mask()),
            classification_stats(output, batch.y),
        )

    def run(
        self,
        ops: types.ModuleType,
        objective: Objective,
        batch: Batch,
        base: Base,
        seed: int,
        h: float,
        offset: int,
        n: int,
    ) -> Tensor:
        """One model pass over probes offset .. offset + n - 1 of every sample: (n, B, ...)."""
        raise NotImplementedError

    def flat_at_x(self, base: Base) -> Tensor:
        """Which samples' loss is flat at x to the model's precision, (B,) bool: where their
        differences are all exactly zero, :meth:`flat_reason` says why."""
        # A loss exactly 0 at x (a saturated softmax: its gradient is then 0 or a few bits of a
        # subnormal, which the step does not move).
        return base.loss == 0

    def constant_at_x(self, base: Base) -> Tensor:
        """Which samples' output does not change with x at all, (B,) bool: a gradient exactly 0
        where the loss is not (nothing for a method without gradients)."""
        return torch.zeros_like(base.loss, dtype=torch.bool)

    def flat_reason(self, dtype: torch.dtype) -> str:
        """The zero-differences warning's text for samples flat at x (:meth:`flat_at_x`), for
        a model computing in ``dtype``: why their differences are zero and what resolves them."""
        raise NotImplementedError

    def warn_zero_differences(
        self,
        sums: Tensor,
        bad: Tensor | None,
        batch: Batch,
        base: Base,
        h: float,
        at: str | None = None,
    ) -> None:
        """Warns about samples whose differences were exactly zero for every probe: those whose
        loss is flat at x to the model's precision (:meth:`flat_at_x`), and the others (a step
        lost to rounding, or a loss linear in x). For the estimators that take differences.

        Args:
            sums: (B, 4) float64 probe sums (the curvature's first).
            bad: (B,) bool, samples already NaN (None: none is).
            batch: the scored samples.
            base: the unperturbed pass.
            h: the step.
            at: the name of the module whose output x is (scoring at a layer), or None.
        """
        zero = sums[:, 0] == 0
        if bad is not None:
            zero &= ~bad
        if batch.mask is not None:
            zero &= batch.mask.sum(1) > 0  # a sample masked out entirely has curvature 0
        if not bool(zero.any()):
            return
        dtype = batch.x.dtype
        what, flat = self.differences, self.flat_reason(dtype)
        ignored = zero & _all_ignored(batch.y)
        constant = zero & ~ignored & self.constant_at_x(base)
        flat_at_x = zero & ~ignored & ~constant & self.flat_at_x(base)
        other = (
            f"either h = {h} is lost to rounding at these inputs (x + h r == x), or the "
            f"loss does not change with x around them, or only linearly (a constant output, "
            f"e.g. from a zero-initialized last layer as torchvision's ViT has before "
            f"training, or weights that were never loaded, also gives this). Check h against "
            f"the scale of x, and that the model's weights are the trained ones."
        )
        if at is not None:
            other += (
                f" Here x is the output of the module at={at!r}: a loss that does not use "
                f"the entry of its output that is perturbed (the first floating tensor) gives "
                f"this too."
            )
        for cause, rows, text in (
            ("ignored labels", ignored, _IGNORED_REASON),
            ("constant output", constant, _CONSTANT_REASON),
            ("flat", flat_at_x, flat),
            ("other", zero & ~ignored & ~constant & ~flat_at_x, other),
        ):
            n_rows = int(rows.sum())
            if not n_rows:
                continue

            def render(count, total, first, _, text=text):
                return (
                    f"{count} of {total} samples (first: id {first}) had {what} exactly zero "
                    f"for every probe, so their curvature is 0: {text}"
                )

            first = int(batch.ids[int(rows.nonzero()[0, 0])])
            kind = f"zero differences, {cause}: {self.name}, {dtype}, h = {h}"
            warnings.warn(
                SampleWarning(kind, n_rows, rows.numel(), first, render),
                stacklevel=4,  # score() -> _finalize -> here: point at the caller
            )

    def warn_rounding(
        self, curvature: Tensor, base: Base, bad: Tensor | None, batch: Batch, h: float
    ):
        """Warns about samples whose curvature (B,) float64 is mostly rounding (``bad``: those
        already NaN, None if none is). Nothing by default: only zo has such a floor (see
        ZerothOrder)."""

    def reduce(
        self,
        ops: types.ModuleType,
        data: Tensor,
        batch: Batch,
        base: Base,
        seed: int,
        h: float,
        offset: int,
        per_position: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Per-sample sums over the probes of ``data`` (the first k of :meth:`run`'s output,
        probes offset .. offset + k - 1): (B, 4) float64 sums of (curvature, its square,
        trace, its square), and with ``per_position`` the (B, T) float64 sums of the
        per-position curvature (else None)."""
        raise NotImplementedError


class FiniteDifference(Estimator):
    """dg_k = g(x + h m r_k) - g(x): one gradient pass per probe."""

    name = "fd"
    differences = "gradient differences"

    def flat_at_x(self, base):
        # Or a gradient exactly 0 at x: the step does not move it either.
        return super().flat_at_x(base) | (base.grad_norm == 0)

    def constant_at_x(self, base):
        # A cross-entropy's gradient (softmax - one-hot) stays nonzero while its loss does: a
        # gradient exactly 0 at a nonzero loss is an output that x does not move.
        return (base.grad_norm == 0) & (base.loss != 0)

    def flat_reason(self, dtype):
        return (
            f"their loss or its gradient at x is exactly 0 too: the loss is flat there to "
            f"{dtype}'s precision (e.g. a cross-entropy whose softmax saturated: the other "
            f"classes' probabilities rounded to 0 or to a subnormal the step does not move). "
            f"Their true curvature is below what {dtype} resolves, so they rank lowest, as "
            f"they should"
            + (
                "; to resolve it, score with a float64 model and input (model.double(), "
                "x.double())."
                if dtype != torch.float64
                else "."
            )
        )

    def run(self, ops, objective, batch, base, seed, h, offset, n):
        mask = _cast(batch.mask, batch.x.dtype)
        xp = ops.perturb(batch.x, batch.ids, seed, n, h, offset, mask)  # (n B, ...)
        _, grad, _ = objective.loss_and_grad(xp, batch, n, owned=True)
        return grad.detach().reshape(n, batch.size, -1)  # (n, B, D)

    def reduce(self, ops, data, batch, base, seed, h, offset, per_position):
        mask = _cast(batch.mask, data.dtype)
        stats = ops.probe_reduce(base.grad, data, batch.ids, seed, h, offset, mask).double()
        cmap = None
        if per_position:
            cmap = _position_norms(data - base.grad, batch, batch.element_mask(), h)
        return stats, cmap


class HessianVector(Estimator):
    """H (m r_k) exactly, by a double backward (no step h, no O(h) error)."""

    name = "hvp"
    takes_differences = False
    needs_double_backward = True
    precisions = PRECISIONS  # no differences: reduced precision costs only its rounding

    @contextlib.contextmanager
    def context(self, device_type, precision="fp32"):
        # Attention must take a kernel whose backward can be differentiated again.
        with float32_precision(device_type, precision), double_backward_attention():
            yield

    def run(self, ops, objective, batch, base, seed, h, offset, n):
        x = batch.x
        # The reduction runs in float32 at least (the ops take float32 and float64).
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        r = ops.rademacher(seed, batch.ids, n, x.shape[1:], offset, 0, dtype)  # (n, B, ...)
        m = batch.element_mask(dtype)
        if m is not None:
            r = r * m.reshape(1, *x.shape)
        v = r.reshape(n * batch.size, *x.shape[1:]).to(x.dtype)
        xr = repeat_rows(x, n).detach().requires_grad_(True)
        with torch.enable_grad():
            try:
                _, grad, _ = objective.loss_and_grad(xr, batch, n, create_graph=True)
            except RuntimeError as e:
                if "donated buffer" not in str(e):
                    raise
                raise RuntimeError(_COMPILED_NO_DOUBLE_BACKWARD) from e
            if not grad.requires_grad:  # the loss is at most linear in x here
                return torch.zeros(n, batch.size, x[0].numel(), dtype=dtype, device=x.device)
            if _has_error_node(grad):
                # A once-differentiable backward leaves an error node that is not connected to
                # x: autograd would silently drop its share of H r (all of it, in a model made
                # of such ops). A walk over the graph's nodes, cheap next to the pass.
                raise RuntimeError(
                    _no_double_backward("a backward marked once_differentiable is in the graph")
                )
            try:
                (hv,) = torch.autograd.grad(grad, xr, grad_outputs=v, allow_unused=True)
            except RuntimeError as e:
                if not no_double_backward(e):
                    raise
                raise RuntimeError(_no_double_backward(str(e))) from e
        if hv is None:  # the gradient does not depend on x: H = 0
            return torch.zeros(n, batch.size, x[0].numel(), dtype=dtype, device=x.device)
        return hv.detach().reshape(n, batch.size, -1).to(dtype)  # (n, B, D): H m r_k

    def reduce(self, ops, data, batch, base, seed, h, offset, per_position):
        zero = data.new_zeros(data.shape[1:])
        mask = _cast(batch.mask, data.dtype)
        # data holds H r_k itself, so the step is 1
        stats = ops.probe_reduce(zero, data, batch.ids, seed, 1.0, offset, mask).double()
        cmap = None
        if per_position:
            cmap = _position_norms(data, batch, batch.element_mask(), 1.0)
        return stats, cmap


class ZerothOrder(Estimator):
    """Four loss values per probe pair (r_k, s_k): |r^T H s| without any backward."""

    name = "zo"
    rows_per_probe = 4
    needs_gradient = False
    differences = "four-point differences"

    def flat_reason(self, dtype):
        return (
            "their loss at x is exactly 0 too, and so are the losses at the probe points: a "
            "cross-entropy rounds to 0 once a sample is fitted with a logit margin above "
            "about 17 in float32 (37 in float64). Their true curvature is below what loss "
            "values resolve, so they rank lowest, as they should; method='fd' resolves it "
            "(it differentiates: a fitted sample's gradient stays nonzero to a margin of "
            "about 100 in float32)."
        )

    def base(self, objective, batch):
        with torch.no_grad():
            loss, output = objective.loss(batch.x, batch, 1)
        nan = torch.full((batch.size,), math.nan, dtype=torch.float64, device=batch.x.device)
        return Base(loss.double(), None, nan, classification_stats(output, batch.y))

    def run(self, ops, objective, batch, base, seed, h, offset, n):
        mask = _cast(batch.mask, batch.x.dtype)
        with torch.no_grad():
            xp = ops.perturb_zo(batch.x, batch.ids, seed, n, h, offset, mask)  # (4 n B, ...)
            lp, _ = objective.loss(xp, batch, 4 * n)
        lp = lp.double().reshape(4, n, batch.size)
        # Four-point differences, exact for quadratics (errors O(h^2)):
        # L(x+hr+hs) - L(x-hr+hs) - L(x+hr-hs) + L(x-hr-hs) = 4 h^2 r^T H s, and
        # their sum - 4 L(x) = 2 h^2 (r^T H r + s^T H s).
        scale = 4.0 * h * h
        bilinear = (lp[0] - lp[1] - lp[2] + lp[3]) / scale  # (n, B)
        trace = (lp.sum(0) - 4.0 * base.loss) / scale  # (n, B)
        return torch.stack([bilinear.abs(), bilinear**2, trace, trace**2], dim=-1)  # (n, B, 4)

    def reduce(self, ops, data, batch, base, seed, h, offset, per_position):
        return data.sum(0), None

    def warn_rounding(self, curvature, base, bad, batch, h):
        """Warns once about samples whose zo curvature is within ZO_NOISE_WARN rounding floors.

        Their value is kept, not made NaN: it still says the curvature is at most about that
        size (a low-curvature sample stays low in a ranking), but its digits are rounding.

        Args:
            curvature: (B,) float64 mean |e| per sample.
            base: the unperturbed pass (its losses set the rounding floor, see rounding_floor).
            bad: (B,) bool, samples already NaN (None: none is).
            batch: the scored samples.
            h: the step.
        """
        floor = self.rounding_floor(base, h, batch.x.dtype)
        # Exactly 0 is the zero-differences warning's case (a loss linear in x, or a step lost).
        noisy = (curvature < ZO_NOISE_WARN * floor) & (curvature > 0)
        if bad is not None:
            noisy &= ~bad
        if batch.mask is not None:
            noisy &= batch.mask.sum(1) > 0  # a sample masked out entirely has curvature 0
        n_noisy = int(noisy.sum())
        if not n_noisy:
            return
        first = int(batch.ids[int(noisy.nonzero()[0, 0])])
        dtype = batch.x.dtype
        advice = (
            "score with a float64 model and input (model.double(), x.double())"
            if dtype != torch.float64
            else "use a larger h"
        )

        def render(count, total, first, ratios):
            # The h at which the median such sample would stand ZO_NOISE_WARN floors clear (the
            # floor falls as 1 / h^2). Above ZO_MAX_H the O(h^2) error takes over on unit-scale
            # inputs, so none is suggested.
            suggest = h * math.sqrt(float(ratios.median()))
            larger = ""
            if suggest <= ZO_MAX_H:
                larger = f", or h = {suggest:.2g} (half of them clear the floor there)"
            floors = float((ZO_NOISE_WARN / ratios).median())
            return (
                f"method='zo': {count} of {total} samples (first: id {first}) have a curvature "
                f"below {ZO_NOISE_WARN:g} times the rounding floor of their four-point loss "
                f"differences in {dtype} (eps * max(1, |loss|) / 4h^2 with h = {h}; the median "
                f"such sample at {floors:.2g} times). One pair's rounding error is 1 to 2 "
                f"floors, so their values are off by about 10% (at {ZO_NOISE_WARN:g} floors) up "
                f"to their whole size (near 1 floor): they bound the curvature more than they "
                f"measure it. To fix: {advice}{larger}."
            )

        ratios = (ZO_NOISE_WARN * floor[noisy] / curvature[noisy]).double().cpu()
        warnings.warn(
            SampleWarning(
                f"zo rounding: {dtype}, h = {h}", n_noisy, noisy.numel(), first, render, ratios
            ),
            stacklevel=4,  # score() -> _finalize -> here: point at the caller
        )

    def rounding_floor(self, base: Base, h: float, dtype: torch.dtype) -> Tensor:
        """The size of one pair's |e| that rounding alone gives, per sample: (B,) float64.

        Each loss value carries an absolute rounding error of about eps * max(1, |L|) (eps of
        the model's dtype): a cross-entropy is computed as log(sum exp(z - max z)), whose
        log(1 + small) is rounded to eps of 1 however small the loss, so a float32 loss below
        eps comes out exactly 0. The four-point combination divides that by 4 h^2. A pair's
        rounding error |e32 - e64| is of the order of this floor (measured: see docs/method.md,
        "Measurements behind the constants"). The perturbed losses differ from L(x) by
        O(h |g|), far below 1 where the floor matters, so L(x) stands in for the four.

        Args:
            base: the unperturbed pass (its float64 losses (B,)).
            h: the step.
            dtype: the dtype the model computed its losses in.
        Returns:
            (B,) float64 eps * max(1, |L(x)|) / (4 h^2).
        """
        eps = torch.finfo(dtype).eps
        return eps * base.loss.abs().clamp(min=1.0) / (4.0 * h * h)


ESTIMATORS: dict[str, Estimator] = {
    e.name: e for e in (FiniteDifference(), HessianVector(), ZerothOrder())
}
# The methods' names, the one list the scorer and the command line take their choices from.
METHODS: tuple[str, ...] = tuple(ESTIMATORS)
