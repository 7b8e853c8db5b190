"""The scorer's checks, apart from its schedule: its settings, the inputs of each batch, the
step h against x's resolution, and the model and loss (dtype, device, and what the model does
during a check pass: reduced precision inside forward, randomness, rows that depend on their
pass, state changed by forward; docs/method.md, "What the checks cover").

:func:`check_settings` and :func:`check_inputs` are plain functions; :class:`StepCheck` and
:class:`ModelCheck` are small objects a scorer holds, because each remembers what it has already
checked (a warning given once; an input signature checked once).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import numbers
import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import torch_ops
from ._model_state import ieee_float32
from .estimators import METHODS, Batch, Estimator, Objective
from .layer import MODEL_INPUT

__all__ = [
    "check_settings",
    "check_inputs",
    "check_ids",
    "check_batch_options",
    "check_int",
    "StepCheck",
    "ModelCheck",
    "check_placement",
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

# A discrepancy between two evaluations of the same row's gradient changes each probe's
# ||g(x + h r) - g(x)|| / h by up to its size over ||g(x + h r) - g(x)|| (triangle inequality);
# the check refuses it above FD_RESOLVE of that difference: the accuracy the scorer already asks
# of its step (StepCheck warns when rounding moves the step by more than STEP_WARN).
FD_RESOLVE = STEP_WARN


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
    # The sum is finite only where every element is (NaN and inf propagate; a finite sum's
    # overflow to inf falls through to the exact test): one reduction, a tenth of isfinite's
    # cost on a small batch. The sample is located only on failure.
    if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        finite = torch.isfinite(x)
        finite = finite.flatten(1).all(dim=1) if x.dim() > 1 else finite
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
    if batch and not (0 <= int(ids.min()) and int(ids.max()) < MAX_ID):
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
        # In place, and the lost steps counted by count_nonzero: fewer small operations, the
        # same values.
        step = (flat + self.h).sub_(flat)
        lost = (step.numel() - int(torch.count_nonzero(step))) / max(1, step.numel())
        error = float(step.sub_(self.h).abs_().sum()) / (self.h * max(1, step.numel()))
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


class _Watch(TorchFunctionMode):
    """Watches the torch functions called while active (a function mode costs about a
    microsecond a call, and sees the result of every op, autocast's casts included): the
    first floating result below ``floor`` precision (machine epsilon above ``floor``), and
    the first call of torch's random family that moved a global generator."""

    def __init__(self, floor: float) -> None:
        super().__init__()
        self.low = {d for d in _FLOATS if torch.finfo(d).eps > floor}
        self.random: str | None = None
        self.reduced: tuple[str, torch.dtype] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if self.random is None and name in _RANDOM:
            # dropout draws nothing in eval mode, attention nothing at dropout_p = 0: random
            # where a generator's state moved.
            before = _generator_states(kwargs)
            out = func(*args, **kwargs)
            if _generator_states(kwargs) != before:
                self.random = name
        else:
            out = func(*args, **kwargs)
        if self.reduced is None:
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, Tensor) and t.dtype in self.low:
                    self.reduced = (str(name), t.dtype)
                    break
        return out


_FLOATS = [
    getattr(torch, name)
    for name in (
        "float64", "float32", "bfloat16", "float16",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    )
    if hasattr(torch, name)
]  # fmt: skip

# torch's functions and tensor methods that may draw random numbers, to name the one that did.
_RANDOM = frozenset(
    """rand rand_like randn randn_like randint randint_like randperm bernoulli bernoulli_
    normal normal_ uniform_ exponential_ geometric_ cauchy_ log_normal_ random_ poisson
    multinomial dropout dropout_ alpha_dropout feature_alpha_dropout dropout1d dropout2d
    dropout3d rrelu rrelu_ scaled_dot_product_attention gumbel_softmax""".split()
)


def _generator_states(kwargs: dict[str, Any] | None = None) -> list[bytes]:
    """The states of the generators a random op may draw from: one passed to it, the CPU
    default, and every CUDA device's where CUDA is initialized."""
    states = [g.get_state() for g in (kwargs or {}).values() if isinstance(g, torch.Generator)]
    states.append(torch.random.get_rng_state())
    if torch.cuda.is_initialized():
        states.extend(torch.cuda.get_rng_state_all())
    return [t.numpy().tobytes() for t in states]


class _Evaluation:
    """Losses (R,) float64 and input gradients (R, D) float64 (None without) of one pass."""

    def __init__(self, loss: Tensor, grad: Tensor | None) -> None:
        self.loss = loss
        self.grad = grad


class ModelCheck:
    """The model and loss checks run once per input signature (see :meth:`run_once`).

    Args:
        model: the scored model (an nn.Module's parameters tell its dtype and device).
        objective: the model and loss on rows of a batch.
        estimator: the method (hvp compares again in IEEE float32 before refusing).
        h: the scorer's step (the check's own perturbed rows use it).
        precision: the scorer's compute precision for method 'hvp': "bf16" admits
            bfloat16/float16 ops inside the forward.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        objective: Objective,
        estimator: Estimator,
        h: float = 1e-3,
        precision: str = "fp32",
    ):
        self.model = model
        self.objective = objective
        self.estimator = estimator
        self.h = h
        self.precision = precision
        self.checked: set[tuple] = set()  # input signatures whose model and loss were checked

    def run_once(self, batch: Batch, rows: int) -> None:
        """Once per input signature: the model's dtype and device, and what the model does
        during a short check pass.

        The check pass evaluates k <= CHECK_SAMPLES samples in a pass of k rows, then the rows
        (x, x + h r[, x - h r], x_0) of those samples (r a Rademacher probe; x - h r for zo) in
        a pass of 2k + 1 rows (3k + 1 for zo), twice; with input gradients for fd and hvp. It
        refuses, with the cause: a forward that computes below x's precision (an autocast
        region or a cast to bfloat16/float16 inside it; for fd and zo, and hvp unless its
        precision is "bf16"); a forward that changes a buffer or parameter; a forward that
        draws random numbers (an op of torch's random family, or Python's or numpy's global
        generator), or whose two evaluations of the same rows differ by more than the
        tolerance of :func:`fd_mismatch`; and a loss of a row that depends on the other rows of
        its pass (a pass size, a row's position) by more than that tolerance.

        Costs 5k + 2 rows of forward and backward passes (7k + 2 rows of forward passes for
        zo), fewer samples when ``rows`` is smaller, the first time a signature (shapes and
        dtypes of x, y and the per-sample inputs, and the other inputs' names) is scored.
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
        per = 3 if not self.estimator.needs_gradient else 2  # rows per sample in the long pass
        k = min(batch.size, CHECK_SAMPLES, max(1, (rows - 1) // per))
        part = batch.select(torch.arange(k, device=x.device))
        # One fixed Rademacher direction per sample, from a generator of its own (the global
        # generators are watched).
        signs = torch.randint(0, 2, part.x.shape, generator=torch.Generator().manual_seed(0))
        hr = (self.h * (2 * signs - 1)).to(x.dtype).to(x.device)
        shifted = [part.x, part.x + hr] + ([part.x - hr] if per == 3 else [])
        index = torch.arange(k, device=x.device).repeat(per)
        long = part.select(torch.cat([index, index[:1]]))
        long.x = torch.cat([*shifted, part.x[:1]])

        state = _State(self.model)
        rng = _python_rng_state(), _generator_states()
        # A floating result below x's precision, or below float32 (a float32 op inside a float64
        # model is as precise as a float32 scoring, which the scorer accepts).
        floor = max(torch.finfo(x.dtype).eps, torch.finfo(torch.float32).eps)
        watch = _Watch(floor)
        inputs = _InputVersions(part, long)
        with watch:
            passes = self.measure(part, long, rows, state)
        inputs.check()
        state.check()
        self.check_precision(watch.reduced, x)
        if watch.random is not None or (_python_rng_state(), _generator_states()) != rng:
            if watch.random is not None:
                drew = f"torch.{watch.random} drew random numbers"
            elif _generator_states() != rng[1]:
                drew = "torch's global random generator was drawn from"
            else:
                drew = "Python's or numpy's global random generator was drawn from"
            raise RuntimeError(_random_message(f"during the check pass {drew}"))
        eps = passes[3]
        if watch.reduced is not None:
            eps = max(eps, torch.finfo(watch.reduced[1]).eps)
        found = self.compare(passes, k, per, eps, part, rows)
        if found is not None and not self.estimator.takes_differences:
            # hvp runs in the caller's float32 precision: TF32 rounding differs between pass
            # sizes by ~1e-3; compare again in IEEE float32 before blaming the model.
            with ieee_float32(x.device.type):
                passes = self.measure(part, long, rows)
            found = self.compare(passes, k, per, eps, part, rows)
        if found is not None:
            attribute = state.changed_attribute()
            if attribute is not None:
                raise RuntimeError(
                    f"the model's forward changed its tensor attribute {attribute!r} (a plain "
                    f"attribute, not a registered buffer) during the check pass, and two "
                    f"evaluations of the same rows differed: every scoring pass would see "
                    f"another model (e.g. a call counter or a running statistic kept in "
                    f"forward). Make forward leave it unchanged when scoring (e.g. update it "
                    f"only in train mode), or score a copy whose update is switched off."
                )
            raise RuntimeError(found + _per_sample_note(batch))
        self.checked.add(key)

    def measure(
        self, part: Batch, long: Batch, rows: int, state: _State | None = None
    ) -> tuple[_Evaluation, _Evaluation, _Evaluation, float]:
        """The check's three passes (``part``, ``long`` twice) in passes of at most ``rows``
        rows, and the machine epsilon of the loss's dtype (at least float64's); ``state``
        marked after the first."""
        eps = [torch.finfo(torch.float64).eps]
        short = self.evaluate(part, rows, eps)
        if state is not None:
            state.mark()
        first, second = (self.evaluate(long, rows, eps) for _ in range(2))
        return short, first, second, eps[0]

    def evaluate(self, batch: Batch, rows: int, eps: list[float]) -> _Evaluation:
        """Losses and (for fd and hvp) input gradients of every row of ``batch``, in passes of
        at most ``rows`` rows; eps[0] raised to the loss dtype's machine epsilon."""
        losses, grads = [], []
        for s in range(0, batch.size, max(1, rows)):
            b = batch.select(slice(s, s + max(1, rows)))
            xr = b.x.detach().requires_grad_(self.estimator.needs_gradient)
            with torch.set_grad_enabled(self.estimator.needs_gradient):
                try:
                    output = self.objective.output(xr, b, 1)
                except Exception as e:  # noqa: BLE001 - re-raised, with its cause where known
                    explained = self.explain(e, batch)
                    if explained is None:
                        raise
                    raise explained from e
                try:
                    loss = self.objective.losses(output, b.targets(1), b.size)
                except ValueError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise _rewrap(
                        e,
                        f"loss_fn(output, y) failed on the model's output ({_describe(output)}) "
                        f"and y ({_describe(b.y)}): {e}",
                    ) from e
                grad = None
                if loss.requires_grad:
                    (grad,) = torch.autograd.grad(loss.sum(), xr, allow_unused=True)
                tap = getattr(self.objective, "tap", None)
                if grad is None and self.estimator.needs_gradient and tap is not None:
                    raise RuntimeError(
                        f"the loss does not depend, through autograd, on the activation scored "
                        f"at {tap.where()}: the probes perturb the first floating tensor of the "
                        f"module's output ({tap.perturbed}), and the "
                        f"forward does not use it or cuts it (detach(), torch.no_grad). Pass as "
                        f"at the module that computes the tensor the rest of the model uses."
                    )
            if loss.is_floating_point():
                eps[0] = max(eps[0], torch.finfo(loss.dtype).eps)
            losses.append(loss.detach().double())
            grads.append(None if grad is None else grad.detach().reshape(b.size, -1).double())
        grad = None if any(g is None for g in grads) else torch.cat(grads)
        return _Evaluation(torch.cat(losses), grad)

    def compare(self, passes, k: int, per: int, eps: float, part: Batch, rows: int) -> str | None:
        """The refusal for the check passes (None if they agree): two evaluations of the same
        rows in one pass that differ (randomness), or a sample's values that differ between
        passes or positions (a loss or model that depends on the other rows; unless the pass
        of ``part``, evaluated once more, differs from its first evaluation: randomness)."""
        short, first, second, _ = passes
        # What the method divides by its step, per sample: gradient differences g(x + h r) -
        # g(x) for fd and hvp, second loss differences L(x + h r) + L(x - h r) - 2 L(x) for zo.
        if first.grad is not None:
            diff = torch.linalg.vector_norm(first.grad[k : 2 * k] - first.grad[:k], dim=1)
        else:
            loss = first.loss
            diff = (loss[k : 2 * k] + loss[2 * k : 3 * k] - 2 * loss[:k]).abs()
        sample = torch.cat([torch.arange(k, device=diff.device).repeat(per), diff.new_zeros(1)])
        sample = sample.long()
        scale = diff[sample]
        row = fd_mismatch(first, second, scale, eps)
        if row is not None:
            return _random_message(
                f"two evaluations of the same {first.loss.numel()} rows, in passes of the same "
                f"size, differed (row {row}, sample {int(sample[row])}: "
                f"{row_values(first, second, row)})"
            )
        # the same samples at x in a pass of k rows, and sample 0 again at the end of the long pass
        at_x = _Evaluation(
            first.loss[:k],
            None if first.grad is None else first.grad[:k],
        )
        i = fd_mismatch(short, at_x, scale[:k], eps)
        j = fd_mismatch(
            _select(first, slice(0, 1)), _select(first, slice(-1, None)), scale[:1], eps
        )
        if i is None and j is None:
            return None
        again = self.evaluate(part, rows, [eps])
        r = fd_mismatch(short, again, scale[:k], eps)
        if r is not None:
            return _random_message(
                f"two evaluations of the same {k} rows, in passes of the same size, differed "
                f"(sample {r}: {row_values(short, again, r)})"
            )
        if i is not None:
            where = (
                f"sample {i} has {row_values(short, at_x, i)} in a pass of {k} rows and of "
                f"{first.loss.numel()} rows"
            )
        else:
            ends = row_values(_select(first, slice(0, 1)), _select(first, slice(-1, None)), 0)
            where = f"sample 0 has {ends} as the first and the last row of one pass"
        return (
            f"the loss of a sample depends on the other rows of its pass, their number or its "
            f"position: {where}. The scorer stacks many perturbed copies in one pass, so "
            f"loss_fn(output, y) must return each row's loss from that row alone (no mean over "
            f"rows, no division by output.shape[0]), and the model must not use batch "
            f"statistics (e.g. BatchNorm in train mode inside a plain callable; pass the "
            f"nn.Module itself so that it is scored in eval mode)."
        )

    def check_precision(self, reduced: tuple[str, torch.dtype] | None, x: Tensor) -> None:
        """Refuses a forward that computed below x's precision (``reduced``: the op and its
        result dtype), for the methods and precisions that cannot score it."""
        if reduced is None:
            return
        op, dtype = reduced
        cause = (
            f"the model computes in {dtype} inside its forward (the op {op} returned {dtype} "
            f"for x of dtype {x.dtype}): an autocast region or a cast inside forward (what "
            f"accelerate does to model.forward with mixed precision, e.g. the Hugging Face "
            f"Trainer with bf16=True)"
        )
        if self.estimator.takes_differences:
            raise RuntimeError(
                f"method={self.estimator.name!r} cannot score this model: {cause}. Its "
                f"differences (about h = {self.h} times smaller than the gradient, h^2 times "
                f"smaller than the loss for zo) are lost to {dtype} rounding. Score a float32 "
                f"model and forward (remove the autocast from forward; for a model prepared by "
                f"accelerate, accelerator.unwrap_model(model, keep_fp32_wrapper=False)), or "
                f"use method='hvp' with precision='bf16'."
            )
        if self.precision != "bf16":
            raise RuntimeError(
                f"method='hvp' with precision={self.precision!r}: {cause}. Pass "
                f"precision='bf16' to score it in reduced precision, or score a float32 "
                f"forward (remove the autocast from forward)."
            )

    def explain(self, error: Exception, batch: Batch) -> Exception | None:
        """A clear error for a model that failed on its check pass, where the cause is one the
        scorer can tell (else None: the model's own error stands)."""
        text = str(error)
        model = self.model
        if isinstance(error, RuntimeError) and any(s in text for s in _MISMATCH_MESSAGES):
            return TypeError(
                f"the model could not take x (dtype {batch.x.dtype}, device "
                f"{batch.x.device}): {text}. Give x the dtype and device of the model's "
                f"parameters, e.g. x.to(next(model.parameters()))."
            )
        names = _forward_parameters(model)
        if self.objective.input_key is None and "inputs_embeds" in names and batch.x.dim() >= 3:
            return ValueError(
                f"the model failed on x passed as its first argument ({type(error).__name__}: "
                f"{text}). Its forward takes 'inputs_embeds': for x of embeddings (shape "
                f"{tuple(batch.x.shape)}), pass input_key='inputs_embeds' (or score token "
                f"models with curvkern.text.TokenScorer)."
            )
        if isinstance(error, TypeError) and "'y'" in text and "argument" in text:
            return TypeError(
                f"the model failed with {text!r}: score()'s y is the target of loss_fn(output, "
                f"y), never passed to the model, and a model input named 'y' cannot be given "
                f"as a keyword of score(). Bind it to the model instead, e.g. "
                f"functools.partial(model, y=...) or a small module that passes it."
            )
        if _per_sample_note(batch):
            return _rewrap(
                error,
                f"the model failed on its check pass ({type(error).__name__}: {text})."
                + _per_sample_note(batch),
            )
        return None

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


def check_placement(model: Callable[..., Any], x: Any, y: Any) -> None:
    """Refuses, in one sentence each, a model or x on the meta device (no values) and a y on
    another device than x."""
    # Unnamed tensors first (every call; named_parameters builds each name), named on failure.
    if isinstance(model, nn.Module) and any(
        t.is_meta for t in itertools.chain(model.parameters(), model.buffers())
    ):
        meta = next(
            n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t.is_meta
        )  # fmt: skip
        raise ValueError(
            f"the model's parameter {meta!r} is on the meta device: it has a shape but no "
            f"values (a model built under torch.device('meta') or init_empty_weights). "
            f"Load its weights first (model.to_empty(device=...) then load_state_dict, or "
            f"from_pretrained without a meta device)."
        )
    if isinstance(x, Tensor) and x.is_meta:
        raise ValueError(
            "x is on the meta device: it has a shape but no values to score; give x on the "
            "model's device (cpu or cuda)"
        )
    if isinstance(x, Tensor) and isinstance(y, Tensor) and y.device != x.device:
        raise ValueError(
            f"y is on {y.device}, x on {x.device}: give y on x's device (y.to(x.device))"
        )


class _State:
    """A module's buffers (values) and parameters (identity and version): as found, to put
    them back, and after the check's first pass (:meth:`mark`), to name any that a later
    forward changed. A buffer filled once by the first forward (a lazily built cache) is
    not a change; one that every forward updates (a call counter, an EMA) is."""

    def __init__(self, model: Callable[..., Any]) -> None:
        module = _module_of(model)
        self.module = module
        if module is None:
            return
        self.found = {n: t.detach().clone() for n, t in module.named_buffers()}
        self.found_attributes = _tensor_attributes(module)

    def mark(self) -> None:
        """Remembers the state that :meth:`check` compares against."""
        module = self.module
        if module is None:
            return
        self.buffers = {n: t.detach().clone() for n, t in module.named_buffers()}
        self.params = {n: (id(p), p._version) for n, p in module.named_parameters()}
        self.attributes = _tensor_attributes(module)

    def changed_attribute(self) -> str | None:
        """The qualified name of a plain tensor attribute (not a registered buffer) whose values
        changed since :meth:`mark`, after putting them back as found; None if none did.

        Asked only once the check has refused: a forward may legitimately keep tensors it does
        not read back (an activation saved for inspection), so a change alone is no refusal."""
        if self.module is None:
            return None
        now = _tensor_attributes(self.module, copy=False)
        changed = None
        for n, before in self.attributes.items():
            t = now.get(n)
            if t is not None and t.shape == before.shape and not torch.equal(t.detach(), before):
                changed = n
                break
        if changed is not None:
            owners = dict(self.module.named_modules())
            for n, found in self.found_attributes.items():
                owner, _, attribute = n.rpartition(".")
                setattr(owners[owner], attribute, found.clone())
        return changed

    def check(self) -> None:
        """Refuses a buffer or parameter changed since :meth:`mark`, naming it, after putting
        the buffers back as found."""
        module = self.module
        if module is None:
            return
        changed = None
        buffers = dict(module.named_buffers())
        for n, before in self.buffers.items():
            now = buffers.get(n)
            if now is None or now.shape != before.shape or not torch.equal(now, before):
                changed = ("buffer", n, before, now)
                break
        if changed is None:
            params = dict(module.named_parameters())
            for n, (ident, version) in self.params.items():
                p = params.get(n)
                if p is None or id(p) != ident or p._version != version:
                    changed = ("parameter", n, None, p)
                    break
        if changed is None:
            return
        kind, name, before, now = changed
        values = ""
        if before is not None and now is not None and before.numel() == 1:
            values = f" (from {before.item():.6g} to {now.item():.6g})"
        with torch.no_grad():  # put the buffers back as found
            for n, t in self.found.items():
                if n in buffers and buffers[n].shape == t.shape:
                    buffers[n].copy_(t)
        raise RuntimeError(
            f"the model's forward changed its {kind} {name!r}{values} during the check pass: "
            f"every scoring pass would see another model (e.g. a call counter, a running "
            f"average or an EMA normalizer updated in forward), so the scores would mix "
            f"models. Make forward leave it unchanged when scoring (e.g. update it only in "
            f"train mode), or score a copy whose update is switched off."
        )


class _InputVersions:
    """The model's keyword inputs in the check's batches (the rows the model sees; shared
    inputs are the caller's own tensors), as found: a forward that writes other values into
    one in place is named, rather than blamed as randomness when the next pass sees other
    values. (x itself is copied before every call and may be written.)"""

    def __init__(self, *batches: Batch) -> None:
        self.watched: list[tuple[str, Tensor, int, Tensor, bool]] = []
        seen: set[int] = set()
        for batch in batches:
            for name, value in itertools.chain(batch.inputs.items(), batch.shared.items()):
                if name != MODEL_INPUT and isinstance(value, Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    found = value.detach().clone()
                    self.watched.append((name, value, value._version, found, name in batch.shared))

    def check(self) -> None:
        for name, value, version, found, _ in self.watched:
            if value._version != version and not torch.equal(value.detach(), found):
                with torch.no_grad():  # the caller's tensors put back as found
                    for _, tensor, _, before, shared in self.watched:
                        if shared:
                            tensor.copy_(before)
                raise RuntimeError(
                    f"the model's forward writes into its input {name!r} in place (e.g. "
                    f"{name}.mul_(...)): the scorer copies x before every call, but not the "
                    f"model's other inputs, so each pass would see the values the last one left "
                    f"(the caller's tensors are put back as found). Make forward write into a "
                    f"copy ({name} = {name} * ... rather than {name}.mul_(...))."
                )


def _tensor_attributes(module: nn.Module, copy: bool = True) -> dict[str, Tensor]:
    """The plain tensor attributes (in ``__dict__``, not parameters or buffers) of module and
    its submodules, by qualified name (copies, unless ``copy`` is False)."""
    found = {}
    for prefix, m in module.named_modules():
        for name, value in vars(m).items():
            if isinstance(value, Tensor):
                key = f"{prefix}.{name}" if prefix else name
                found[key] = value.detach().clone() if copy else value
    return found


def _module_of(model: Callable[..., Any]) -> nn.Module | None:
    """The nn.Module behind ``model`` (itself, or a functools.partial's function), or None."""
    while isinstance(model, functools.partial):
        model = model.func
    return model if isinstance(model, nn.Module) else None


def _forward_parameters(model: Callable[..., Any]) -> set[str]:
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _python_rng_state() -> tuple:
    """The state of Python's and numpy's global random generators (a draw changes it)."""
    state = np.random.get_state()  # noqa: NPY002 - the legacy global generator is what is watched
    return (random.getstate(), state[1].tobytes(), state[2])


def _random_message(what: str) -> str:
    return (
        f"the model is random at scoring time (not deterministic): {what}. Finite differences "
        f"divide the change of the gradient by h, so randomness becomes curvature. The usual "
        f"causes: a random transform or noise layer that eval mode does not switch off (e.g. "
        f"torchvision.transforms.v2 modules inside the model: score the deterministic part, "
        f"e.g. model[1:] for nn.Sequential(transform, body), and apply transforms in the data "
        f"pipeline), or a plain callable around a module in train mode (e.g. lambda x: "
        f"model(x)[0] with dropout): the scorer puts only an nn.Module it is given in eval "
        f"mode, so pass the module itself (with a loss_fn that picks its output), or call "
        f"model.eval()."
    )


def _per_sample_note(batch: Batch) -> str:
    """For a refusal where the model has per-sample keyword inputs: which were taken as
    per-sample (their first dimension is B) and how to pass one that is shared."""
    inputs = {k: v for k, v in batch.inputs.items() if k != MODEL_INPUT}  # the user's only
    if not inputs:
        return ""
    names = ", ".join(f"{k!r} (shape {tuple(v.shape)})" for k, v in inputs.items())
    return (
        f" Note: the keyword input(s) {names} were taken as per-sample, because their first "
        f"dimension equals the batch size B = {batch.size}: their rows were selected and "
        f"repeated with x's rows. If one is shared by all samples (e.g. class prototypes), "
        f"bind it to the model instead, e.g. functools.partial(model, name=value)."
    )


def _rewrap(error: Exception, text: str) -> Exception:
    """An exception of ``error``'s type with ``text`` (a RuntimeError where that type cannot
    be built from a message)."""
    try:
        return type(error)(text)
    except Exception:  # noqa: BLE001 - a type with another constructor
        return RuntimeError(text)


def _select(e: _Evaluation, index: slice) -> _Evaluation:
    return _Evaluation(e.loss[index], None if e.grad is None else e.grad[index])


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)}: " + ", ".join(
            _describe(v) if isinstance(v, Tensor) else type(v).__name__ for v in value[:4]
        )
    if isinstance(value, dict):
        return f"a {type(value).__name__} with keys {list(value)[:8]}"
    return type(value).__name__


def row_values(a: _Evaluation, b: _Evaluation, i: int) -> str:
    """The two evaluations' values of row i, for a message."""
    text = f"loss {float(a.loss[i]):.9g} and {float(b.loss[i]):.9g}"
    if a.grad is not None and b.grad is not None:
        change = float(torch.linalg.vector_norm(a.grad[i] - b.grad[i]))
        norm = float(torch.linalg.vector_norm(a.grad[i]))
        text += f", input gradients of norm {norm:.6g} apart by {change:.3g}"
    return text


def fd_mismatch(a: _Evaluation, b: _Evaluation, diff: Tensor, eps: float) -> int | None:
    """The first row where two evaluations of the same rows disagree by more than the method
    resolves, or None.

    With gradients (fd, hvp), rows disagree where ||g_a - g_b|| is both above rounding
    (CHECK_ULPS ulps, machine epsilon ``eps``, of the largest ||g||) and above FD_RESOLVE times
    ``diff``, the row's ||g(x + h r) - g(x)||: the discrepancy, divided by h as fd divides,
    would be more than FD_RESOLVE of the curvature. Without gradients (zo), the same for the
    losses, with ``diff`` the row's second loss difference L(x + h r) + L(x - h r) - 2 L(x).
    A value finite in one evaluation and not in the other always disagrees.

    Args:
        a, b: the two evaluations of R rows.
        diff: (R,) float64, what the method divides by its step, per row.
        eps: machine epsilon of the model's loss dtype.
    """
    if a.loss.numel() == 0:
        return None
    if a.grad is not None and b.grad is not None:
        va, vb = a.grad, b.grad
        change = torch.linalg.vector_norm(va - vb, dim=1)
        size = torch.linalg.vector_norm(va, dim=1)
        finite_a, finite_b = torch.isfinite(va).all(1), torch.isfinite(vb).all(1)
    else:
        va, vb = a.loss, b.loss
        change, size = (va - vb).abs(), va.abs()
        finite_a, finite_b = torch.isfinite(va), torch.isfinite(vb)
    finite = finite_a & finite_b & torch.isfinite(diff)
    scale = float(size[finite].max()) if bool(finite.any()) else 0.0
    floor = CHECK_ULPS * eps * max(scale, torch.finfo(torch.float32).tiny)
    bad = finite & (change > floor) & (change > FD_RESOLVE * diff)
    bad |= finite_a != finite_b
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
