"""CurvatureScorer: per-sample input-curvature scores for any PyTorch model.

The scorer picks the backend and schedules the probes (groups of samples, adaptive rounds,
chunks of at most ``max_batch`` rows); its checks of settings, inputs, step and model live in
:mod:`curvkern.checks`, what each method computes (and warns about) in
:mod:`curvkern.estimators`, the model-state and precision contexts in
:mod:`curvkern._model_state`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from . import losses, torch_ops
from . import ops as kernel_ops
from ._extension import kernels_available, missing_kernels_message
from ._model_state import PRECISIONS, ieee_float32, reduced_precision_passes, scoring_mode
from ._pass_memory import pass_memory
from .checks import (
    ModelCheck,
    StepCheck,
    check_batch_options,
    check_inputs,
    check_placement,
    check_settings,
)
from .diagnostics import SampleWarning
from .estimators import ESTIMATORS, METHODS, Base, Batch, Objective
from .layer import LayerObjective, LayerTap, capture_activation
from .scores import CLASSIFICATION_FIELDS, CurvatureScores, qualified_name

__all__ = ["CurvatureScorer", "METHODS", "BACKENDS", "PRECISIONS", "ieee_float32"]

BACKENDS = ("auto", "kernels", "torch")

# Rows per forward/backward pass on the CPU when max_batch is None: CPU_PASS_ELEMENTS input
# elements' worth (a pass that fits in cache), and at least CPU_MIN_ROWS (so a large model's
# weights, re-read by every pass, serve several rows). Measured: see docs/method.md, "The CPU
# pass size".
CPU_PASS_ELEMENTS = 1 << 18
CPU_MIN_ROWS = 8
# And at most CPU_MAX_ROWS: the element budget's own figure for 64-element samples; it bounds
# only smaller ones. Thousands of rows are fastest for a small model once its passes' memory is
# kept from pass to pass (_pass_memory). Without that pool (no compiled library,
# CURVKERN_CPU_POOL=0, another CPU allocator installed) glibc faults large passes' activations
# back in every pass, and CPU_MAX_ROWS_UNPOOLED rows were fastest. Measured: see docs/method.md,
# "The CPU pass size".
CPU_MAX_ROWS = 4096
CPU_MAX_ROWS_UNPOOLED = 512

LossFn = Callable[[Any, Tensor], Tensor]


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
            2^18 input elements' worth of rows, at least 8 and at most 512 (fastest in
            measurements); on CUDA,
            all of a batch's probe rows at once, halved (and remembered) whenever the GPU runs
            out of memory.
        backend: "kernels" (the compiled ops; an error where they are missing), "torch" (the
            same computation in plain PyTorch, probes materialized) or "auto" (kernels where
            compiled for the input's device, else torch with one warning).
        rtol: if set, probes are drawn in rounds of ``n_probes`` until each sample's
            curvature_stderr <= rtol * curvature, or it has had ``max_probes``.
        max_probes: cap on probes per sample with ``rtol`` (default 10 * n_probes).
        at: None to score in the model's input space; a submodule of the model (or its
            qualified name, e.g. "layer3.1") to score the curvature with respect to that
            module's output a (the first floating tensor of a tuple or mapping output): the
            probes perturb a -> a + h m*r inside the forward pass, the rest of the model runs
            as it does, and x may be anything the model takes (token ids included). h, probe
            masks and ``per_position`` are then in a's units and over its (B, T, ...) dims.
        at_call: for a module called more than once in one forward (a shared embedding), the
            call (0-based) whose output is perturbed; None refuses such a module.
        precision: "fp32" (default: IEEE float32, no TF32), or for ``method="hvp"`` only
            "tf32" (CUDA float32 convolutions and matrix products on TF32 tensor cores; on the
            CPU the same as "fp32") or "bf16" (the probe passes under bfloat16 autocast; the
            pass at x, the losses and the reductions stay float32). hvp's H r differences
            nothing, so these cost about their relative rounding (5e-4, 4e-3); fd and zo
            refuse them. Accuracy: docs/results.md, "Fast mode accuracy".
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
        at: torch.nn.Module | str | None = None,
        at_call: int | None = None,
        precision: str = "fp32",
    ) -> None:
        max_probes = check_settings(
            model, loss_fn, input_key, h, n_probes, seed, method, max_batch, backend, BACKENDS,
            rtol, max_probes,
        )  # fmt: skip
        ESTIMATORS[method].check_scoring_precision(precision)
        if isinstance(model, DistributedDataParallel):
            # Score the wrapped module: a DDP forward is a collective (it broadcasts buffers and
            # arms the gradient reducer), and ranks run different numbers of scoring passes.
            model = model.module
        self.model = model
        self.loss_fn: LossFn = losses.cross_entropy if loss_fn is None else loss_fn
        self._loss_name = qualified_name(self.loss_fn)  # what tracker files record
        self.input_key = input_key
        self.h = float(h)
        self.n_probes = int(n_probes)
        self.seed = int(seed)
        self.method = method
        self.max_batch = None if max_batch is None else int(max_batch)
        self.backend = backend
        self.rtol = None if rtol is None else float(rtol)
        self.max_probes = self.n_probes if max_probes is None else int(max_probes)
        self.precision = precision
        self._estimator = ESTIMATORS[method]
        self._objective = Objective(self.model, self.loss_fn, input_key)
        # At a layer (curvkern.layer): the objective takes the activation of `at`.
        self.at, self.at_call = at, at_call
        self._layer: LayerTap | None = None
        if at is not None:
            self._layer = LayerTap(self.model, at, at_call)
            self._objective = LayerObjective(self.model, self.loss_fn, input_key, self._layer)
        elif at_call is not None:
            raise ValueError(f"at_call={at_call!r} names a call of the module at, and at is None")
        self._halving = _OutOfMemoryHalving()
        self._warned_fallback: set[str] = set()
        self._step_check = StepCheck(self.h)
        self._model_check = ModelCheck(
            self.model,
            self._objective,
            self._estimator,
            self.h,
            precision=self.precision,
        )

    def __repr__(self) -> str:
        adaptive = "" if self.rtol is None else f", rtol={self.rtol}, max_probes={self.max_probes}"
        key = "" if self.input_key is None else f", input_key={self.input_key!r}"
        if self._layer is not None:
            key += f", at={self._layer.name!r}" + (
                "" if self.at_call is None else f", at_call={self.at_call}"
            )
        precision = "" if self.precision == "fp32" else f", precision={self.precision!r}"
        return (
            f"CurvatureScorer(method={self.method!r}, h={self.h}, n_probes={self.n_probes}, "
            f"seed={self.seed}, max_batch={self.max_batch}, backend={self.backend!r}"
            f"{key}{adaptive}{precision})"
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
            x: (B, ...) floating input batch, as the model takes it (with ``at``: whatever
                (B, ...) input the model takes, integer token ids included).
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
        # On the CPU, the passes' memory is kept from one call's passes for the next's.
        with pass_memory(x.device if isinstance(x, Tensor) else None) as pooled:
            check_placement(self.model, x, y)
            if self._layer is not None:
                # at a layer: x is the activation, the model input rides along
                x, model_inputs = capture_activation(
                    self._layer,
                    self.model,
                    self.input_key,
                    self._estimator,
                    x,
                    model_inputs,
                    self.h,
                )
            x, y, ids = check_inputs(x, y, ids, self._estimator, self.h)
            batch = self._make_batch(x, y, ids, probe_mask, per_position, model_inputs)
            out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            if x.shape[0] == 0:
                empty = CurvatureScores.empty(
                    self.h, self.method, out_dtype, x.device, loss_fn=self._loss_name
                )
                if per_position:
                    empty.curvature_map = x.new_zeros((0, x.shape[1]), dtype=out_dtype)
                return empty
            ops = self._ops_for(x.device)
            with contextlib.ExitStack() as stack:
                if torch.is_inference_mode_enabled():
                    stack.enter_context(torch.inference_mode(False))
                stack.enter_context(self._estimator.context(x.device.type, self.precision))
                stack.enter_context(scoring_mode(self.model))
                batch = _outside_inference(batch)
                if self._estimator.takes_differences:
                    self._step_check.run(batch)

                result = self._halving.run(
                    functools.partial(self._passes, ops, batch, per_position),
                    x.device,
                    self._row_budget(x, pooled),
                    fixed=self.max_batch is not None,
                )
            scores = self._finalize(*result, batch, out_dtype)
            # The last pass's gradients and the batch freed here, not when score() returns:
            # inside pass_memory, their blocks go to its pool for the next call.
            del result, batch
        return scores

    # ------------------------------------------------------------------------------------------
    # The batch

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
        check_batch_options(x, model_inputs, self.input_key, per_position, self._estimator)
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

    def _row_budget(self, x: Tensor, pooled: bool) -> int:
        """Rows a pass: max_batch, a halved budget after CUDA ran out of memory, the CPU's
        rule (at most CPU_MAX_ROWS with the pass pool, CPU_MAX_ROWS_UNPOOLED without), or on
        other devices every probe row of the batch at once."""
        if self.max_batch is not None:
            return self.max_batch
        if x.device in self._halving.rows:
            return self._halving.rows[x.device]
        if x.device.type == "cpu":
            cap = CPU_MAX_ROWS if pooled else CPU_MAX_ROWS_UNPOOLED
            rows = min(cap, CPU_PASS_ELEMENTS // max(1, x[0].numel()))
            return max(CPU_MIN_ROWS, rows)
        return self._estimator.rows_per_probe * self.n_probes * x.shape[0]

    # ------------------------------------------------------------------------------------------
    # The probe schedule: groups of samples, adaptive rounds, chunks of probes

    def _passes(self, ops: types.ModuleType, batch: Batch, per_position: bool, rows: int):
        """The model check (once per input signature), then :meth:`_score_batch`."""
        self._model_check.run_once(batch, rows)
        return self._score_batch(ops, batch, rows, per_position)

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
        if self.rtol is None:  # one round of n_probes for every sample: nothing to select
            stats, maps = self._round_stats(
                ops, batch, base, 0, [self.n_probes], rows, per_position
            )
            count = torch.full((size,), self.n_probes, dtype=torch.int64, device=device)
            return stats[0], count, base, maps[0]
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
            stats, maps = self._round_stats(ops, sub, sub_base, offset, sizes, rows, per_position)
            # Rounds in order; a sample takes no rounds after the one where it converged.
            live = torch.ones(sub.size, dtype=torch.bool, device=device)
            for r, n in enumerate(sizes):
                rows_live = active[live]
                sums[rows_live] += stats[r][live]
                if maps[r] is not None:
                    cmap[rows_live] += maps[r][live]
                count[rows_live] += n
                offset += n
                live[live.clone()] = ~self._converged(sums[rows_live], offset)
            active = active[live]
        return sums, count, base, cmap if per_position else None

    def _round_stats(
        self,
        ops: types.ModuleType,
        batch: Batch,
        base: Base,
        offset: int,
        sizes: list[int],
        rows: int,
        per_position: bool,
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Per round of ``sizes`` probes (the first from probe ``offset``), in passes of at most
        ``rows`` rows: the (B, 4) float64 probe sums, and the (B, T) sums of the per-position
        curvature (None without per_position)."""
        est = self._estimator
        stats: list = [None] * len(sizes)
        maps: list = [None] * len(sizes)
        for k0, kk in self._probe_chunks(sum(sizes), batch.size, rows, est.rows_per_probe):
            with reduced_precision_passes(batch.x.device.type, self.precision):
                data = est.run(
                    ops, self._objective, batch, base, self.seed, self.h, offset + k0, kk
                )
            for r, a, b in self._rounds_in_chunk(sizes, k0, kk):
                part, part_map = est.reduce(
                    ops, data[a:b], batch, base, self.seed, self.h, offset + k0 + a, per_position
                )
                stats[r] = part if stats[r] is None else stats[r] + part
                if part_map is not None:
                    maps[r] = part_map if maps[r] is None else maps[r] + part_map
        return stats, maps

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
        # Without rtol every sample had n_probes probes: n is then a Python number, the same
        # values in fewer operations than a (B,) tensor of counts.
        n = float(self.n_probes) if self.rtol is None else count.double().unsqueeze(0)  # (1, B)
        # Every (B,) field is a row of one (F, B) table: the finiteness check, the NaNs and the
        # conversion to the output dtype are then one operation each, whatever F, and each
        # field comes out as a contiguous row without a transposing copy.
        probe_sums = sums.t()  # (4, B)
        mean, stderr = _mean_and_stderr(probe_sums[0::2], probe_sums[1::2], n)  # (2, B) each
        table = torch.cat(
            [
                # curvature, its stderr, trace, its stderr
                torch.stack([mean, stderr], dim=1).reshape(4, -1),
                probe_sums[1:2] / n,
                base.loss.unsqueeze(0),
                base.grad_norm.unsqueeze(0),
                base.stats.t(),
            ]
        )
        names = _TABLE_FIELDS
        curvature = table[0]
        if cmap is not None:
            cmap = cmap / (n if isinstance(n, float) else n.t())
        # NaN by design: grad_norm without a gradient, the classification fields of other outputs.
        checked = names.index("grad_norm") + int(self._estimator.needs_gradient)
        # A finite sum means every checked value is finite (one reduction); the per-sample test
        # runs only where it is not (a finite sum's overflow to inf included).
        bad, n_bad = None, 0
        if not math.isfinite(float(table[:checked].sum())):
            bad = ~torch.isfinite(table[:checked]).all(dim=0)
            n_bad = int(bad.sum())
        if n_bad:
            table[:, bad] = math.nan
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
            at = None if self._layer is None else self._layer.name
            self._estimator.warn_zero_differences(sums, bad, batch, base, self.h, at)
        self._estimator.warn_rounding(curvature, base, bad, batch, self.h)
        count = _unmeasured(table.t(), names, count, cmap, batch)
        columns = table.to(dtype)  # (F, B): each field a contiguous row
        return CurvatureScores(
            **dict(zip(names, columns.unbind(0), strict=True)),
            ids=batch.ids,
            n_probes=count,
            h=self.h,
            method=self.method,
            curvature_map=None if cmap is None else cmap.to(dtype),
            loss_fn=self._loss_name,
        )


# The (B,) fields of CurvatureScores in the column order of _finalize's table: the ones
# checked for finiteness first, grad_norm (checked where the method has a gradient) last of them.
_TABLE_FIELDS = (
    "curvature",
    "curvature_stderr",
    "trace",
    "trace_stderr",
    "frobenius_sq",
    "loss",
    "grad_norm",
    *CLASSIFICATION_FIELDS,
)


# The fields a probe measures: NaN for a sample whose probe mask is all zero.
_PROBED = ("curvature", "curvature_stderr", "trace", "trace_stderr", "frobenius_sq", "grad_norm")


def _unmeasured(
    table: Tensor, names: Sequence[str], count: Tensor, cmap: Tensor | None, batch: Batch
) -> Tensor:
    """Makes the probed fields (columns ``names`` of the (B, F) ``table``) and the curvature
    map NaN for samples whose probe mask is all zero, with one SampleWarning; returns the
    probe counts, 0 for those samples.

    Such a sample has no coordinate to probe: its differences are 0 by construction, and a
    curvature of 0 would rank it lowest and halve its running mean in a tracker.
    """
    if batch.mask is None:
        return count
    empty = batch.mask.sum(1) == 0
    n_empty = int(empty.sum())
    if not n_empty:
        return count
    probed = torch.tensor([name in _PROBED for name in names], device=table.device)
    table[empty.unsqueeze(1) & probed] = math.nan
    if cmap is not None:
        cmap[empty] = math.nan
    count = count.clone()
    count[empty] = 0
    warnings.warn(
        SampleWarning(
            "all-zero probe mask",
            n_empty,
            empty.numel(),
            int(batch.ids[int(empty.nonzero()[0, 0])]),
            lambda count, total, first, _: (
                f"{count} of {total} samples (first: id {first}) have an all-zero probe_mask: "
                f"no coordinate to probe, so their scores are NaN with n_probes 0 (leave them "
                f"out, or give them at least one masked-in coordinate)"
            ),
        ),
        stacklevel=4,  # score() -> _finalize -> here: point at the caller
    )
    return count


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
    if isinstance(n, float):  # one count for all: the same arithmetic on a Python number
        var = ((total_sq - total * mean) / max(n - 1.0, 1.0)).clamp(min=0)
        return mean, torch.sqrt(var / n) if n > 1 else torch.zeros_like(var)
    n = torch.as_tensor(n, dtype=total.dtype, device=total.device)
    var = ((total_sq - total * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    stderr = torch.where(n > 1, torch.sqrt(var / n), torch.zeros_like(var))
    return mean, stderr
