"""CurvatureScorer: per-sample input-curvature scores for any PyTorch model.

The scorer checks its inputs, picks the backend, and schedules the probes (adaptive rounds,
chunks of at most ``max_batch`` rows); what each method computes lives in
:mod:`curvkern.estimators`, the model-state and precision contexts in
:mod:`curvkern._model_state`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import os
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import losses, torch_ops
from . import ops as kernel_ops
from ._extension import kernels_available, missing_kernels_message
from ._model_state import ieee_float32, scoring_mode
from .estimators import ESTIMATORS, Base, Batch, Objective
from .scores import CLASSIFICATION_FIELDS, CurvatureScores

__all__ = ["CurvatureScorer", "METHODS", "BACKENDS", "ieee_float32"]

METHODS = ("fd", "hvp", "zo")
BACKENDS = ("auto", "kernels", "torch")
MAX_SEED = 1 << 63
MAX_ID = torch_ops.MAX_ID

# Rows per forward/backward pass on the CPU when max_batch is None: CPU_PASS_ELEMENTS input
# elements' worth, and at least CPU_MIN_ROWS. Measured (benchmarks/pass_size.py, n = 10, process
# CPU time of one thread against the floor of n + 1 passes of the batch, medians of 3 to 7
# interleaved cycles on a loaded 2-core machine): a small CNN on 3x32x32, B = 64, costs 1.02x
# the floor at 64 to 128 rows per pass, 1.36x at 8 and 1.9x with all 640 rows in one pass (its
# activations fall out of cache); torchvision's ResNet-18 on 3x224x224, B = 8, costs 1.25x at one
# row per pass (what the element budget alone gives), 1.11x at 2, 1.00x at 4 and 8, 1.09x at 16:
# every pass re-reads the 47 MB of weights, which one row does not amortize (a second run: 1.00x
# with this rule, 1.32x with one row; the published algorithm 1.84x). An MLP on 64 features
# costs 1.3 to 1.4x its floor from 256 rows up (fixed per-call costs, not the pass size), 2x at
# 64. The rule gives 85, 8 and 4,096 rows.
CPU_PASS_ELEMENTS = 1 << 18
CPU_MIN_ROWS = 8

# Samples the once-per-input-signature consistency check evaluates (in passes of at most 3 * 8
# + 1 rows): enough to see a batch statistic or a random op, cheap next to one scoring pass.
CHECK_SAMPLES = 8
# Two evaluations of the same row by a deterministic model and a per-row loss differ by
# reduction-order rounding (a few ulps of the loss, also between batch sizes); 1000 ulps
# separates that from dropout or a batch statistic, which change losses at order one.
CHECK_ULPS = 1000.0

# Torch's messages for a model called with an input of another dtype or device than its weights.
_MISMATCH_MESSAGES = ("same dtype", "same device", "should be the same")

# Mean relative rounding of the step x + h - x above which the scorer warns (_check_step), and
# the elements of x it looks at: enough to estimate a fraction to about 1/sqrt(4096) = 1.6%.
STEP_WARN = 0.005
STEP_SAMPLE = 4096

# method="zo": a sample whose curvature (mean |e| over its pairs) is below ZO_NOISE_WARN times
# the rounding floor eps * max(1, |L|) / (4 h^2) is reported (_warn_rounding). A pair's rounding
# error was up to 2 floors at the 90th percentile (measured: see ZerothOrder.rounding_floor), so
# below 20 floors the curvature can be more than 10% rounding.
ZO_NOISE_WARN = 20.0
# The largest h the zo warning suggests: on standardized digits (MLP and CNN, GELU) the O(h^2)
# error of float64 zo against the exact r^T H s was 4.6% (median) at h = 3e-2 and 66% at 1e-1.
ZO_MAX_H = 3e-2

LossFn = Callable[[Any, Tensor], Tensor]


class SampleWarning(UserWarning):
    """A warning about some of the samples one ``score()`` call scored: ``count`` of ``total``,
    the first of them ``first_id``. :func:`curvkern.score_dataset` (and so the tracker) merges
    those of one pass over a data set into one warning per ``kind``, counted over the pass.

    Args:
        kind: what the warning is about, with the settings its message depends on: warnings
            of one kind are merged.
        count, total, first_id: the samples it is about, of how many, the first one's id.
        render: ``render(count, total, first_id, values)`` -> the message.
        values: (count,) float64 per-sample quantities the message summarizes, or None.
    """

    def __init__(
        self,
        kind: str,
        count: int,
        total: int,
        first_id: int,
        render: Callable[[int, int, int, Tensor | None], str],
        values: Tensor | None = None,
    ) -> None:
        self.kind, self.count, self.total, self.first_id = kind, count, total, first_id
        self.render, self.values = render, values
        super().__init__(render(count, total, first_id, values))

    @classmethod
    def combined(cls, parts: Sequence[SampleWarning], total: int) -> SampleWarning:
        """``parts`` (of one kind, in the order of their samples) as one warning about
        ``total`` samples: their counts summed, the first one's first id, their values joined."""
        kinds = {w.kind for w in parts}
        if len(kinds) != 1:
            raise ValueError(f"combined() takes warnings of one kind, got {sorted(kinds)}")
        first = parts[0]
        values = None
        if all(w.values is not None for w in parts):
            values = torch.cat([w.values for w in parts])
        count = sum(w.count for w in parts)
        return cls(first.kind, count, total, first.first_id, first.render, values)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _outside_caller_level() -> int:
    """The ``stacklevel`` that makes a warning raised by this function's caller point at the
    first frame outside curvkern."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


class PassWarnings:
    """The warnings of one pass over a data set, raised when it ends (or fails): each kind of
    :class:`SampleWarning` once, counted over the pass ("12 of 50000 samples"), not once per
    batch; any other warning once per distinct message and place. Used as ``with
    PassWarnings() as caught:`` around the pass and ``with caught.batch(len(ids)):`` around
    each ``score()`` call; the merged warnings point at the first caller outside curvkern (the
    user's score_dataset or score_epoch line)."""

    def __init__(self) -> None:
        self.scored = 0
        self.samples: dict[str, list[SampleWarning]] = {}
        self.others: dict[tuple, warnings.WarningMessage] = {}

    @contextlib.contextmanager
    def batch(self, size: int):
        """Records the warnings raised inside (the filters still apply: an "error" filter
        raises there, as without this)."""
        with warnings.catch_warnings(record=True) as caught:
            try:
                yield
            finally:
                self.scored += size
                for w in caught:
                    if isinstance(w.message, SampleWarning):
                        self.samples.setdefault(w.message.kind, []).append(w.message)
                    else:
                        key = (w.category, str(w.message), w.filename, w.lineno)
                        self.others.setdefault(key, w)

    def __enter__(self) -> PassWarnings:
        return self

    def __exit__(self, *exc) -> None:
        for w in self.others.values():
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        for parts in self.samples.values():  # joined once, not once per batch
            merged = SampleWarning.combined(parts, self.scored)
            warnings.warn(merged, stacklevel=_outside_caller_level())


class _OutOfMemoryHalving:
    """Runs a scoring function with a row budget; on CUDA out-of-memory, halves the budget,
    retries, and remembers the halved budget per device for later batches."""

    def __init__(self) -> None:
        self.rows: dict[torch.device, int] = {}

    def run(self, fn: Callable[[int], Any], device: torch.device, rows: int, fixed: bool):
        """fn(rows), retried with rows // 2 after each OutOfMemoryError unless ``fixed``."""
        while True:
            try:
                return fn(rows)
            except torch.cuda.OutOfMemoryError:
                if fixed or rows <= 1:
                    raise
                rows = self.rows[device] = rows // 2


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
        model: any nn.Module or callable mapping a (B, ...) float batch (and keyword inputs) to
            an output that ``loss_fn`` understands. An nn.Module is scored in eval mode and
            left exactly as found; a plain callable is called as it is. A
            DistributedDataParallel model is scored through its ``module``.
        loss_fn: ``loss_fn(output, y)`` -> (B,) per-sample losses, each row's from that row
            alone. Default: :func:`curvkern.losses.cross_entropy` (reduction "none") on the
            logits :func:`curvkern.losses.logits_of` finds in the output (a tensor, a
            tuple/list's first element, a mapping's "logits", an object's ``.logits``).
        input_key: None to call ``model(x, **model_inputs)``; a keyword (e.g.
            "inputs_embeds", "pixel_values") to call ``model(**{input_key: x},
            **model_inputs)``.
        h: finite-difference step, in the model's input space (after normalization).
        n_probes: probes per sample (per round, with ``rtol``).
        seed: probe seed, 0 <= seed < 2^63.
        method: "fd" (default), "hvp" or "zo".
        max_batch: most rows (samples x probes) in one forward/backward pass. None: on the CPU,
            2^18 input elements' worth of rows, at least 8 (fastest in measurements); on CUDA,
            all of a batch's probe rows at once, halved (and remembered) whenever the GPU runs
            out of memory.
        backend: "kernels" (the compiled ops; an error where they are missing), "torch" (the
            same computation in plain PyTorch, probes materialized) or "auto" (kernels where
            compiled for the input's device, else torch with one warning).
        rtol: if set, probes are drawn in rounds of ``n_probes`` until each sample's
            curvature_stderr <= rtol * curvature, or it has had ``max_probes``.
        max_probes: cap on probes per sample with ``rtol`` (default 10 * n_probes).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        loss_fn: LossFn | None = None,
        *,
        input_key: str | None = None,
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
        if input_key is not None and (not isinstance(input_key, str) or not input_key):
            raise TypeError(f"input_key must be a keyword name (str) or None, got {input_key!r}")
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
        self.input_key = input_key
        self.h = float(h)
        self.n_probes = int(n_probes)
        self.seed = int(seed)
        self.method = method
        self.max_batch = None if max_batch is None else int(max_batch)
        self.backend = backend
        self.rtol = None if rtol is None else float(rtol)
        self.max_probes = self.n_probes if max_probes is None else int(max_probes)
        self._estimator = ESTIMATORS[method]
        self._objective = Objective(self.model, self.loss_fn, input_key)
        self._halving = _OutOfMemoryHalving()
        self._warned_fallback: set[str] = set()
        self._warned_step = False
        self._checked: set[tuple] = set()  # input signatures whose model and loss were checked

    def __repr__(self) -> str:
        adaptive = "" if self.rtol is None else f", rtol={self.rtol}, max_probes={self.max_probes}"
        key = "" if self.input_key is None else f", input_key={self.input_key!r}"
        return (
            f"CurvatureScorer(method={self.method!r}, h={self.h}, n_probes={self.n_probes}, "
            f"seed={self.seed}, max_batch={self.max_batch}, backend={self.backend!r}"
            f"{key}{adaptive})"
        )

    # ------------------------------------------------------------------------------------------
    # Public entry point

    def score(
        self,
        x: Tensor,
        y: Tensor,
        ids: Tensor | Sequence[int] | None = None,
        *,
        probe_mask: Tensor | None = None,
        per_position: bool = False,
        **model_inputs: Any,
    ) -> CurvatureScores:
        """Scores one batch.

        Args:
            x: (B, ...) floating input batch, as the model takes it.
            y: (B, ...) targets for ``loss_fn``.
            ids: (B,) integer sample ids in [0, 2^56), which fix each sample's probes; None
                means 0 .. B-1. Give dataset indices to make scores independent of batching.
            probe_mask: None, or a 0/1 (bool or float) tensor of shape (B, *p), p a prefix of
                x's sample shape (broadcast over the rest): the curvature is that of the loss
                restricted to the masked-in coordinates (probes m * r, differences m * dg).
            per_position: for x of shape (B, T, ...), also return ``curvature_map`` (B, T),
                mean_k ||dg_k[t]|| / h per position t (methods fd and hvp).
            **model_inputs: the model's other keyword inputs. A tensor whose first dimension
                is B is per-sample: its rows go with x's rows into every pass; anything else is
                passed unchanged.
        Returns:
            CurvatureScores with (B,) fields, on x's device.
        """
        x, y, ids = self._check_batch(x, y, ids)
        batch = self._make_batch(x, y, ids, probe_mask, per_position, model_inputs)
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if x.shape[0] == 0:
            empty = CurvatureScores.empty(self.h, self.method, out_dtype, x.device)
            if per_position:
                empty.curvature_map = x.new_zeros((0, x.shape[1]), dtype=out_dtype)
            return empty
        ops = self._ops_for(x.device)
        with contextlib.ExitStack() as stack:
            if torch.is_inference_mode_enabled():
                stack.enter_context(torch.inference_mode(False))
            stack.enter_context(self._estimator.context(x.device.type))
            stack.enter_context(scoring_mode(self.model))
            batch = _outside_inference(batch)
            if self._estimator.takes_differences:
                self._check_step(batch)

            def run(rows: int):
                self._check_once(batch, rows)
                return self._score_batch(ops, batch, rows, per_position)

            result = self._halving.run(
                run, x.device, self._row_budget(x), fixed=self.max_batch is not None
            )
        return self._finalize(*result, batch, out_dtype)

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
                f"got dtype {x.dtype}. Curvature is measured in a continuous input space: for "
                f"token ids, score in embedding space, with curvkern.text.TokenScorer(model) "
                f"(Hugging Face-style models) or CurvatureScorer(model, "
                f"input_key='inputs_embeds') on x = model.get_input_embeddings()(input_ids); "
                f"for quantized signals (e.g. uint8 pixels), convert and normalize x as the "
                f"model expects."
            )
        self._estimator.check_precision(x, self.h)
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

    def _make_batch(
        self,
        x: Tensor,
        y: Tensor,
        ids: Tensor,
        probe_mask: Tensor | None,
        per_position: bool,
        model_inputs: dict[str, Any],
    ) -> Batch:
        """The Batch: x, y, ids, the mask in the ops' (B, P) form, and the split model inputs."""
        if self.input_key is not None and self.input_key in model_inputs:
            raise ValueError(
                f"model_inputs has the key {self.input_key!r}, which is input_key: x is passed "
                f"under that keyword; pass the input being scored as x only"
            )
        if per_position:
            if not self._estimator.needs_gradient:
                raise ValueError(
                    "per_position=True needs gradient differences per position; method='zo' "
                    "has loss values only. Use method='fd' or 'hvp'."
                )
            if x.dim() < 2:
                raise ValueError(
                    f"per_position=True needs x of shape (B, T, ...) with positions T, got "
                    f"shape {tuple(x.shape)}"
                )
        batch = x.shape[0]
        inputs, shared = {}, {}
        for key, value in model_inputs.items():
            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                inputs[key] = value
            else:
                shared[key] = value
        mask = None if probe_mask is None else torch_ops.as_mask(probe_mask, x)
        return Batch(x, y, ids, mask, inputs, shared)

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

    def _check_step(self, batch: Batch) -> None:
        """Refuses (or warns about) a step h that x's floating-point resolution cannot carry.

        Per batch, on a strided sample of at most STEP_SAMPLE elements of x (so its cost does
        not grow with the batch): the step x + h - x as x's dtype rounds it, against h.
        Thresholds: an error when the step is lost (x + h == x) for most elements; a warning
        when it rounds by more than STEP_WARN on average. Measured on a small float32 MLP with
        x ~ N(0, 1): a mean step rounding of 0.6% (h = 3e-6) came with per-sample scores up to
        3% off the exact ones, 2% (h = 1e-6) with 12%, 18% (h = 1e-7) with 175%, as the
        gradients' own rounding, divided by h, grows alongside.
        """
        x = batch.x
        flat = x.reshape(-1)
        if flat.numel() > STEP_SAMPLE:
            flat = flat[:: flat.numel() // STEP_SAMPLE]
        step = (flat + self.h) - flat
        lost = float((step == 0).sum()) / max(1, step.numel())
        error = float((step - self.h).abs().sum()) / (self.h * max(1, step.numel()))
        if lost <= 0.5 and (error <= STEP_WARN or self._warned_step):
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
        self._warned_step = True
        warnings.warn(
            f"h = {self.h} is close to the floating-point resolution of x ({x.dtype}, |x| up to "
            f"{largest:.3g}): rounding changes the step x + h r - x by {error:.1%} on average, "
            f"and per-sample scores by several times that (the gradients' own rounding is "
            f"divided by h too). Use h of at least {suggest:.3g} (1000 ulps of the largest "
            f"|x|), or float64.",
            stacklevel=3,
        )

    def _check_once(self, batch: Batch, rows: int) -> None:
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
        if key in self._checked:
            return
        self._check_model_dtype_device(x)
        k = min(batch.size, CHECK_SAMPLES, max(1, (rows - 1) // 2))
        first = torch.arange(k, device=x.device)
        again = torch.cat([first, first, first[:1]])[:rows]
        a, b, eps = self._check_losses(batch, first, again)
        bad = _mismatch(a[again], b, eps)
        if bad is not None and not self._estimator.takes_differences:
            # hvp runs in the caller's float32 precision: TF32 rounding differs between pass
            # sizes by ~1e-3; compare again in IEEE float32 before blaming the model.
            with ieee_float32(x.device.type):
                a, b, eps = self._check_losses(batch, first, again)
            bad = _mismatch(a[again], b, eps)
        if bad is not None:
            a2, _, _ = self._check_losses(batch, first, first[:0])
            row = int(again[bad])
            i = _mismatch(a, a2, eps)
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
        self._checked.add(key)

    def _check_losses(
        self, batch: Batch, first: Tensor, again: Tensor
    ) -> tuple[Tensor, Tensor, float]:
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
                    loss, _ = self._objective.loss(part.x, part, 1)
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

    def _check_model_dtype_device(self, x: Tensor) -> None:
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

    def _row_budget(self, x: Tensor) -> int:
        if self.max_batch is not None:
            return self.max_batch
        if x.device in self._halving.rows:
            return self._halving.rows[x.device]
        if x.device.type == "cpu":
            return max(CPU_MIN_ROWS, CPU_PASS_ELEMENTS // max(1, x[0].numel()))
        return self._estimator.rows_per_probe * self.n_probes * x.shape[0]

    # ------------------------------------------------------------------------------------------
    # The probe schedule: groups of samples, adaptive rounds, chunks of probes

    def _score_batch(
        self, ops: types.ModuleType, batch: Batch, rows: int, per_position: bool
    ) -> tuple[Tensor, Tensor, Base, Tensor | None]:
        """Probe sums (B, 4), probe counts (B,), the unperturbed pass's Base, and the sums of
        the per-position curvature (B, T) (None without per_position)."""
        group = max(1, min(batch.size, rows // self._estimator.rows_per_probe))
        parts = [
            self._score_group(ops, batch.select(slice(s, s + group)), rows, per_position)
            for s in range(0, batch.size, group)
        ]
        if len(parts) == 1:
            return parts[0]
        sums, count, bases, maps = zip(*parts, strict=True)
        base = Base(
            torch.cat([b.loss for b in bases]),
            None,
            torch.cat([b.grad_norm for b in bases]),
            torch.cat([b.stats for b in bases]),
        )
        return (
            torch.cat(sums),
            torch.cat(count),
            base,
            None if not per_position else torch.cat(maps),
        )

    def _score_group(
        self, ops: types.ModuleType, batch: Batch, rows: int, per_position: bool
    ) -> tuple[Tensor, Tensor, Base, Tensor | None]:
        est = self._estimator
        size, device = batch.size, batch.x.device
        base = est.base(self._objective, batch)
        sums = torch.zeros(size, 4, dtype=torch.float64, device=device)
        count = torch.zeros(size, dtype=torch.int64, device=device)
        width = batch.x.shape[1] if per_position else 0
        cmap = torch.zeros(size, width, dtype=torch.float64, device=device)
        active = torch.arange(size, device=device)  # samples still drawing probes
        offset = 0  # probes drawn so far by every active sample
        while active.numel():
            sizes = self._round_sizes(offset, active.numel(), rows)
            everyone = active.numel() == size
            sub, sub_base = (
                (batch, base) if everyone else (batch.select(active), base.select(active))
            )
            stats = torch.zeros(len(sizes), sub.size, 4, dtype=torch.float64, device=device)
            maps = torch.zeros(len(sizes), sub.size, width, dtype=torch.float64, device=device)
            for k0, kk in self._probe_chunks(sum(sizes), sub.size, rows, est.rows_per_probe):
                data = est.run(
                    ops, self._objective, sub, sub_base, self.seed, self.h, offset + k0, kk
                )
                for r, a, b in self._rounds_in_chunk(sizes, k0, kk):
                    part, part_map = est.reduce(
                        ops,
                        data[a:b],
                        sub,
                        sub_base,
                        self.seed,
                        self.h,
                        offset + k0 + a,
                        per_position,
                    )
                    stats[r] += part
                    if part_map is not None:
                        maps[r] += part_map
            # Rounds in order; a sample takes no rounds after the one where it converged.
            live = torch.ones(sub.size, dtype=torch.bool, device=device)
            for r, n in enumerate(sizes):
                rows_live = active[live]
                sums[rows_live] += stats[r][live]
                cmap[rows_live] += maps[r][live]
                count[rows_live] += n
                offset += n
                if self.rtol is not None:
                    live[live.clone()] = ~self._converged(sums[rows_live], offset)
            active = active[live] if self.rtol is not None else active[:0]
        return sums, count, base, cmap if per_position else None

    def _round_sizes(self, offset: int, active: int, rows: int) -> list[int]:
        """Probes per round for the next pass over ``active`` samples.

        One round of n_probes without rtol. With rtol, as many rounds as fit in a pass of
        ``rows`` rows (at least one), up to max_probes: once few samples remain, one pass runs
        several rounds rather than many passes of a few rows each.
        """
        if self.rtol is None:
            return [self.n_probes]
        fit = max(1, rows // (self._estimator.rows_per_probe * self.n_probes * active))
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

    def _converged(self, sums: Tensor, n: int) -> Tensor:
        """Which samples (with sums (A, 4) over n probes each) need no further probes."""
        if n >= self.max_probes:
            return torch.ones(sums.shape[0], dtype=torch.bool, device=sums.device)
        mean, stderr = _mean_and_stderr(sums[:, 0], sums[:, 1], float(n))
        if n < 2:  # one probe gives no error estimate
            return ~torch.isfinite(mean)
        return (stderr <= self.rtol * mean) | ~torch.isfinite(mean) | ~torch.isfinite(stderr)

    # ------------------------------------------------------------------------------------------
    # Results

    def _finalize(
        self,
        sums: Tensor,
        count: Tensor,
        base: Base,
        cmap: Tensor | None,
        batch: Batch,
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
            "loss": base.loss,
            "grad_norm": base.grad_norm,
            **{name: base.stats[:, i] for i, name in enumerate(CLASSIFICATION_FIELDS)},
        }
        if cmap is not None:
            cmap = cmap / n.unsqueeze(1)
        # NaN by design: grad_norm without a gradient, the classification fields of other outputs.
        unchecked = set(CLASSIFICATION_FIELDS)
        if not self._estimator.needs_gradient:
            unchecked.add("grad_norm")
        checked = [v for k, v in fields.items() if k not in unchecked]
        bad = ~torch.stack([torch.isfinite(v) for v in checked]).all(dim=0)
        n_bad = int(bad.sum())
        if n_bad:
            for v in fields.values():
                v[bad] = math.nan
            if cmap is not None:
                cmap[bad] = math.nan
            warnings.warn(
                SampleWarning(
                    "non-finite",
                    n_bad,
                    bad.numel(),
                    int(batch.ids[int(bad.nonzero()[0, 0])]),
                    lambda count, total, first, _: (
                        f"{count} of {total} samples (first: id {first}) had a non-finite loss "
                        f"or gradient; their scores are NaN"
                    ),
                ),
                stacklevel=3,
            )
        if self._estimator.takes_differences:
            self._warn_zero_differences(sums, bad, batch, base)
        floor = self._estimator.rounding_floor(base, self.h, batch.x.dtype)
        if floor is not None:
            self._warn_rounding(curvature, floor, bad, batch)
        return CurvatureScores(
            **{k: v.to(dtype) for k, v in fields.items()},
            ids=batch.ids,
            n_probes=count,
            h=self.h,
            method=self.method,
            curvature_map=None if cmap is None else cmap.to(dtype),
        )

    def _warn_zero_differences(self, sums: Tensor, bad: Tensor, batch: Batch, base: Base) -> None:
        """Warns about samples whose differences were exactly zero for every probe: those whose
        loss is flat at x to the model's precision (loss exactly 0, or with fd its gradient),
        and the others (a step lost to rounding, or a loss linear in x)."""
        zero = (sums[:, 0] == 0) & ~bad
        if batch.mask is not None:
            zero &= batch.mask.sum(1) > 0  # a sample masked out entirely has curvature 0
        if not bool(zero.any()):
            return
        dtype = batch.x.dtype
        # A loss exactly 0 at x (a saturated softmax: its gradient is then 0 or a few bits of a
        # subnormal, which the step does not move) or, with fd, a gradient exactly 0.
        flat_at_x = base.loss == 0
        if self.method == "fd":
            what = "gradient differences"
            flat_at_x |= base.grad_norm == 0
            flat = (
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
        else:
            what = "four-point differences"
            flat = (
                "their loss at x is exactly 0 too, and so are the losses at the probe points: a "
                "cross-entropy rounds to 0 once a sample is fitted with a logit margin above "
                "about 17 in float32 (37 in float64). Their true curvature is below what loss "
                "values resolve, so they rank lowest, as they should; method='fd' resolves it "
                "(it differentiates: a fitted sample's gradient stays nonzero to a margin of "
                "about 100 in float32)."
            )
        other = (
            f"either h = {self.h} is lost to rounding at these inputs (x + h r == x), or the "
            f"loss is linear in x around them. Check h against the scale of x."
        )
        for cause, rows, text in (
            ("flat", zero & flat_at_x, flat),
            ("other", zero & ~flat_at_x, other),
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
            kind = f"zero differences, {cause}: {self.method}, {dtype}, h = {self.h}"
            warnings.warn(
                SampleWarning(kind, n_rows, rows.numel(), first, render),
                stacklevel=4,  # score() -> _finalize -> here: point at the caller
            )

    def _warn_rounding(self, curvature: Tensor, floor: Tensor, bad: Tensor, batch: Batch) -> None:
        """Warns once about samples whose zo curvature is within ZO_NOISE_WARN rounding floors.

        Their value is kept, not made NaN: it still says the curvature is at most about that
        size (a low-curvature sample stays low in a ranking), but its digits are rounding.

        Args:
            curvature: (B,) float64 mean |e| per sample.
            floor: (B,) float64 rounding floor per sample (ZerothOrder.rounding_floor).
            bad: (B,) bool, samples already NaN.
            batch: the scored samples.
        """
        # Exactly 0 is _warn_zero_differences' case (a loss linear in x, or a step lost to x).
        noisy = (curvature < ZO_NOISE_WARN * floor) & (curvature > 0) & ~bad
        if batch.mask is not None:
            noisy &= batch.mask.sum(1) > 0  # a sample masked out entirely has curvature 0
        n_noisy = int(noisy.sum())
        if not n_noisy:
            return
        first = int(batch.ids[int(noisy.nonzero()[0, 0])])
        dtype, h = batch.x.dtype, self.h
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


def _mismatch(expected: Tensor, got: Tensor, eps: float) -> int | None:
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


def _outside_inference(batch: Batch) -> Batch:
    """The batch with inference tensors cloned: autograd cannot record them."""

    def fix(t):
        return t.clone() if isinstance(t, Tensor) and t.is_inference() else t

    return Batch(
        fix(batch.x),
        fix(batch.y),
        batch.ids,
        fix(batch.mask),
        {k: fix(v) for k, v in batch.inputs.items()},
        {k: fix(v) for k, v in batch.shared.items()},
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
