"""The scorer's checks, apart from its schedule: its settings, the inputs of each batch, the
step h against x's resolution, and the model and loss (dtype, device, determinism, rows
independent of their pass).

:func:`check_settings` and :func:`check_inputs` are plain functions; :class:`StepCheck` and
:class:`ModelCheck` are small objects a scorer holds, because each remembers what it has already
checked (a warning given once; an input signature checked once).
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import torch_ops
from ._model_state import ieee_float32
from .estimators import METHODS, Batch, Estimator, Objective

__all__ = [
    "check_settings",
    "check_inputs",
    "check_ids",
    "check_batch_options",
    "check_int",
    "StepCheck",
    "ModelCheck",
]

MAX_SEED = 1 << 63
MAX_ID = torch_ops.MAX_ID

# Samples the once-per-input-signature consistency check evaluates (in passes of at most 3 * 8
# + 1 rows): enough to see a batch statistic or a random op, cheap next to one scoring pass.
CHECK_SAMPLES = 8
# Two evaluations of the same row by a deterministic model and a per-row loss differ by
# reduction-order rounding (a few ulps of the loss, also between batch sizes); 1000 ulps
# separates that from dropout or a batch statistic, which change losses at order one.
CHECK_ULPS = 1000.0

# Torch's messages for a model called with an input of another dtype or device than its weights.
_MISMATCH_MESSAGES = ("same dtype", "same device", "should be the same")

# Mean relative rounding of the step x + h - x above which the scorer warns (StepCheck), and
# the elements of x it looks at: enough to estimate a fraction to about 1/sqrt(4096) = 1.6%.
STEP_WARN = 0.005
STEP_SAMPLE = 4096


def check_settings(
    model: Callable[..., Any],
    loss_fn: Callable | None,
    input_key: str | None,
    h: float,
    n_probes: int,
    seed: int,
    method: str,
    max_batch: int | None,
    backend: str,
    backends: Sequence[str],
    rtol: float | None,
    max_probes: int | None,
) -> int | None:
    """Refuses settings a :class:`curvkern.CurvatureScorer` cannot score with (``backends``
    the ones it knows); returns max_probes, 10 * n_probes where rtol is set and it is None."""
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    if input_key is not None and (not isinstance(input_key, str) or not input_key):
        raise TypeError(f"input_key must be a keyword name (str) or None, got {input_key!r}")
    if isinstance(h, bool) or not isinstance(h, numbers.Real) or not math.isfinite(h) or h <= 0:
        raise ValueError(f"h must be a positive finite number, got {h!r}")
    check_int("n_probes", n_probes, low=1)
    check_int("seed", seed, low=0, high=MAX_SEED)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if backend not in backends:
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
    if max_batch is not None:
        check_int("max_batch", max_batch, low=1)
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
        check_int("max_probes", max_probes, low=n_probes)
    elif max_probes is not None:
        raise ValueError(
            "max_probes caps the adaptive rounds and needs rtol; without rtol every sample "
            "gets exactly n_probes probes"
        )
    return max_probes


def check_inputs(
    x: Tensor, y: Tensor, ids: Tensor | Sequence[int] | None, estimator: Estimator, h: float
) -> tuple[Tensor, Tensor, Tensor]:
    """x, y and ids (as a (B,) int64 tensor on x's device), refused with an error that says
    what to do where they cannot be scored (``estimator`` refuses x's precision, with step h)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have shape (B, ...), got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(
            f"x must be a floating-point tensor (the model's input after normalization), "
            f"got dtype {x.dtype}. Curvature is measured in a continuous input space: for "
            f"token ids, score in embedding space, with curvkern.text.TokenScorer(model) "
            f"(Hugging Face-style models), CurvatureScorer(model, at=<its embedding "
            f"module>) on the ids themselves, or CurvatureScorer(model, "
            f"input_key='inputs_embeds') on x = model.get_input_embeddings()(input_ids); "
            f"for quantized signals (e.g. uint8 pixels), convert and normalize x as the "
            f"model expects."
        )
    estimator.check_precision(x, h)
    batch = x.shape[0]
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() < 1 or y.shape[0] != batch:
        raise ValueError(
            f"y must have one row per sample of x (B = {batch}), got shape {tuple(y.shape)}"
        )
    ids = check_ids(ids, batch, x.device)
    finite = torch.isfinite(x)
    finite = finite.flatten(1).all(dim=1) if x.dim() > 1 else finite
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"x has non-finite values (NaN or inf) in sample {first} (id {int(ids[first])}); "
            f"curvature is only defined at finite inputs"
        )
    return x, y, ids


def check_ids(ids: Tensor | Sequence[int] | None, batch: int, device: torch.device) -> Tensor:
    """ids as a (batch,) int64 tensor on ``device`` (None: 0 .. batch - 1), each in [0, 2^56)."""
    ids = torch_ops.as_ids(ids, batch, device)
    if ids.shape != (batch,):
        raise ValueError(f"ids must have shape (B,) = ({batch},), got {tuple(ids.shape)}")
    if batch and not bool(((ids >= 0) & (ids < MAX_ID)).all()):
        bad = int(((ids < 0) | (ids >= MAX_ID)).nonzero()[0, 0])
        raise ValueError(f"ids must lie in [0, 2^56), got ids[{bad}] = {int(ids[bad])}")
    return ids


def check_batch_options(
    x: Tensor,
    model_inputs: dict[str, Any],
    input_key: str | None,
    per_position: bool,
    estimator: Estimator,
) -> None:
    """Refuses a score() call's other inputs where they contradict the settings: a model input
    under ``input_key`` (x's keyword), or ``per_position`` with a method without gradients or
    an x without positions."""
    if input_key is not None and input_key in model_inputs:
        raise ValueError(
            f"model_inputs has the key {input_key!r}, which is input_key: x is passed "
            f"under that keyword; pass the input being scored as x only"
        )
    if per_position:
        if not estimator.needs_gradient:
            raise ValueError(
                "per_position=True needs gradient differences per position; method='zo' "
                "has loss values only. Use method='fd' or 'hvp'."
            )
        if x.dim() < 2:
            raise ValueError(
                f"per_position=True needs x of shape (B, T, ...) with positions T, got "
                f"shape {tuple(x.shape)}"
            )


class StepCheck:
    """Refuses a step h lost to x's resolution, per batch; warns (once) where it rounds."""

    def __init__(self, h: float) -> None:
        self.h = h
        self.warned = False

    def run(self, batch: Batch) -> None:
        """Refuses (or warns about) a step h that x's floating-point resolution cannot carry.

        Per batch, on a strided sample of at most STEP_SAMPLE elements of x (so its cost does
        not grow with the batch): the step x + h - x as x's dtype rounds it, against h.
        Thresholds: an error when the step is lost (x + h == x) for most elements; a warning
        when it rounds by more than STEP_WARN on average: per-sample scores are then off by
        several times that, as the gradients' own rounding, divided by h, grows alongside
        (measured: see docs/method.md, "Measurements behind the constants").
        """
        x = batch.x
        flat = x.reshape(-1)
        if flat.numel() > STEP_SAMPLE:
            flat = flat[:: flat.numel() // STEP_SAMPLE]
        step = (flat + self.h) - flat
        lost = float((step == 0).sum()) / max(1, step.numel())
        error = float((step - self.h).abs().sum()) / (self.h * max(1, step.numel()))
        if lost <= 0.5 and (error <= STEP_WARN or self.warned):
            return
        largest = float(x.abs().max())
        suggest = 1e3 * torch.finfo(x.dtype).eps * largest
        if lost > 0.5:
            raise ValueError(
                f"h = {self.h} is below the floating-point resolution of x ({x.dtype}, |x| up "
                f"to {largest:.3g}): x + h == x for {lost:.0%} of its elements, so the scores "
                f"would be rounding. Use h of at least {suggest:.3g} (1000 ulps of the largest "
                f"|x|), or float64 inputs and model."
            )
        self.warned = True
        warnings.warn(
            f"h = {self.h} is close to the floating-point resolution of x ({x.dtype}, |x| up to "
            f"{largest:.3g}): rounding changes the step x + h r - x by {error:.1%} on average, "
            f"and per-sample scores by several times that (the gradients' own rounding is "
            f"divided by h too). Use h of at least {suggest:.3g} (1000 ulps of the largest "
            f"|x|), or float64.",
            stacklevel=3,
        )


class ModelCheck:
    """The model and loss checks run once per input signature (see :meth:`run_once`).

    Args:
        model: the scored model (an nn.Module's parameters tell its dtype and device).
        objective: the model and loss on rows of a batch.
        estimator: the method (hvp compares again in IEEE float32 before refusing).
    """

    def __init__(self, model: Callable[..., Any], objective: Objective, estimator: Estimator):
        self.model = model
        self.objective = objective
        self.estimator = estimator
        self.checked: set[tuple] = set()  # input signatures whose model and loss were checked

    def run_once(self, batch: Batch, rows: int) -> None:
        """Once per input signature: the model's dtype and device, and that the loss of a
        row is deterministic and independent of the other rows in its pass.

        Costs one pass over k <= 8 samples and one over those samples twice plus one
        (2k + 1 rows, fewer when ``rows`` is smaller), without gradients, the first time a
        signature (shapes and dtypes of x, y and the per-sample inputs, and the other inputs'
        names) is scored.
        """
        x = batch.x
        key = (
            tuple(x.shape[1:]),
            x.dtype,
            x.device,
            tuple(batch.y.shape[1:]),
            batch.y.dtype,
            tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in batch.inputs.items()),
            tuple(sorted(batch.shared)),
        )
        if key in self.checked:
            return
        self.check_dtype_device(x)
        k = min(batch.size, CHECK_SAMPLES, max(1, (rows - 1) // 2))
        first = torch.arange(k, device=x.device)
        again = torch.cat([first, first, first[:1]])[:rows]
        a, b, eps = self.losses(batch, first, again)
        bad = mismatch(a[again], b, eps)
        if bad is not None and not self.estimator.takes_differences:
            # hvp runs in the caller's float32 precision: TF32 rounding differs between pass
            # sizes by ~1e-3; compare again in IEEE float32 before blaming the model.
            with ieee_float32(x.device.type):
                a, b, eps = self.losses(batch, first, again)
            bad = mismatch(a[again], b, eps)
        if bad is not None:
            a2, _, _ = self.losses(batch, first, first[:0])
            row = int(again[bad])
            i = mismatch(a, a2, eps)
            if i is not None:
                raise RuntimeError(
                    f"the loss at x is not deterministic: two evaluations of sample {i} gave "
                    f"{float(a[i]):.9g} and {float(a2[i]):.9g}. The finite differences would "
                    f"be that noise divided by h. A plain callable around a module in train "
                    f"mode (e.g. lambda x: model(x)[0] with dropout) keeps it random: the "
                    f"scorer puts only an nn.Module it is given in eval mode. Pass the module "
                    f"itself (with a loss_fn that picks its output), or call model.eval()."
                )
            raise RuntimeError(
                f"the loss of a sample depends on the other rows of its pass or on their "
                f"number: sample {row} has loss {float(a[row]):.9g} in a pass of {k} rows and "
                f"{float(b[bad]):.9g} in a pass of {again.numel()} rows. The scorer stacks "
                f"many perturbed copies in one pass, so loss_fn(output, y) must return each "
                f"row's loss from that row alone (no mean over rows, no division by "
                f"output.shape[0]), and the model must not use batch statistics (e.g. "
                f"BatchNorm in train mode inside a plain callable; pass the nn.Module itself "
                f"so that it is scored in eval mode)."
            )
        self.checked.add(key)

    def losses(self, batch: Batch, first: Tensor, again: Tensor) -> tuple[Tensor, Tensor, float]:
        """Float64 losses of samples ``first`` in one pass and of rows ``again`` in another,
        and the machine epsilon of the loss's own dtype."""
        out, eps = [], torch.finfo(torch.float64).eps
        with torch.no_grad():
            for index in (first, again):
                if index.numel() == 0:
                    out.append(index.double())
                    continue
                part = batch.select(index)
                try:
                    loss, _ = self.objective.loss(part.x, part, 1)
                except RuntimeError as e:
                    text = str(e)
                    if any(s in text for s in _MISMATCH_MESSAGES):
                        raise TypeError(
                            f"the model could not take x (dtype {batch.x.dtype}, device "
                            f"{batch.x.device}): {text}. Give x "
                            f"the dtype and device of the model's parameters, e.g. "
                            f"x.to(next(model.parameters()))."
                        ) from e
                    raise
                if loss.is_floating_point():
                    eps = max(eps, torch.finfo(loss.dtype).eps)
                out.append(loss.detach().double())
        return out[0], out[1], eps

    def check_dtype_device(self, x: Tensor) -> None:
        """A clear error where x's dtype or device is unlike every floating parameter's."""
        if not isinstance(self.model, nn.Module):
            return
        tensors = [
            t
            for t in itertools.chain(self.model.parameters(), self.model.buffers())
            if t.is_floating_point()
        ]
        if not tensors:
            return
        if not any(t.device == x.device for t in tensors):
            raise ValueError(
                f"x is on {x.device}, the model's parameters on {tensors[0].device}: move one "
                f"to the other (x.to({str(tensors[0].device)!r}) or model.to(x.device))"
            )
        if not any(t.dtype == x.dtype for t in tensors):
            raise TypeError(
                f"x has dtype {x.dtype}, the model's parameters {tensors[0].dtype}: convert x "
                f"(x.to({tensors[0].dtype})) or the model (model.to({x.dtype})); float32 or "
                f"float64 for methods 'fd' and 'zo'"
            )


def mismatch(expected: Tensor, got: Tensor, eps: float) -> int | None:
    """Index of the first row where ``got`` differs from ``expected`` by more than CHECK_ULPS
    ulps (machine epsilon ``eps``) of the largest |loss| (both non-finite counts as equal), or
    None."""
    if got.numel() == 0:
        return None
    finite = torch.isfinite(expected) & torch.isfinite(got)
    scale = float(expected[finite].abs().max()) if bool(finite.any()) else 0.0
    tol = CHECK_ULPS * eps * max(scale, torch.finfo(torch.float32).tiny)
    differ = ((expected - got).abs() > tol) & finite
    differ |= torch.isfinite(expected) != torch.isfinite(got)
    return int(differ.nonzero()[0, 0]) if bool(differ.any()) else None


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
