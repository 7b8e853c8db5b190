"""End-to-end workloads: a model and a batch, the variants that score it, and their checks.

A variant is a zero-argument callable doing one batch's work:

- ``published``: :func:`curvkern.reference.paper_curvature`, the published algorithm (per probe,
  two forward and two backward passes of the batch-mean loss), on curvkern's probes;
- ``scorer-torch`` / ``scorer-kernels``: ``CurvatureScorer(...).score`` with that backend;
- ``floor``: the n + 1 forward and backward passes of the batch that the finite-difference
  method cannot avoid (one at x, one per probe), input gradients only, nothing else;
- ``floor-stacked`` (CUDA): the same rows in the passes the scorer makes on CUDA by default, the
  batch, then all n * B probe rows at once.

Before anything is timed, :class:`CheckedWorkload` checks that the variants compute the same
scores, twice: in float64, where every variant sees bit-identical inputs and the tolerance is
float64 rounding; and in float32, the timed precision, against the float64 result, within
FLOAT32_ERROR_FACTOR times the reference's own float32 error on the same samples.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvkern
from curvkern import CurvatureScorer, reference

from .models import CifarResNet18, SmallCNN, calibrate_batchnorm
from .peak_memory import RssPeakJob, cuda_peak_bytes

__all__ = [
    "WORKLOADS",
    "Workload",
    "CheckedWorkload",
    "build_workload",
    "make_variant",
    "variants_for",
]

H = 1e-3  # the published code's step and curvkern's default
SEED = 0  # probe seed
# Samples of the float64 checks (scores are per sample): all of the CPU batch; on CUDA, 64 of
# 256, as float64 convolutions are slow there.
CHECK_SAMPLES = 64


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    model: Callable[[], nn.Module]
    batch: int
    n_probes: int
    description: str


WORKLOADS = {
    "small_cnn": WorkloadSpec(
        SmallCNN, 64, 10, "small CNN (conv32-pool-conv64-pool-fc128-fc10) on 3x32x32"
    ),
    "resnet18": WorkloadSpec(CifarResNet18, 256, 10, "CIFAR ResNet-18 on 3x32x32"),
}


def variants_for(device: str) -> tuple[str, ...]:
    """The variants measured on a device type ("cpu" or "cuda")."""
    # On the CPU the scorer's default pass holds 2^18 input elements (85 rows of 3x32x32): one
    # probe of a 64-sample batch per pass, the same passes as ``floor``; no separate stacked row.
    common = ("published", "scorer-torch", "scorer-kernels", "floor")
    return (*common, "floor-stacked") if device == "cuda" else common


@dataclasses.dataclass
class Workload:
    """A model and one labelled batch on a device, with the probes curvkern draws for it."""

    name: str
    model: nn.Module  # eval mode
    x: Tensor  # (B, 3, 32, 32) inputs
    y: Tensor  # (B,) int64 labels
    ids: Tensor  # (B,) int64 sample ids
    probes: Tensor  # (n, B, 3, 32, 32) of +-1: r_k of sample b, as curvkern's kernels draw it
    h: float = H
    seed: int = SEED

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def n_probes(self) -> int:
        return self.probes.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def head(self, count: int) -> Workload:
        """The first ``count`` samples (and their probes), same model."""
        return dataclasses.replace(
            self,
            x=self.x[:count],
            y=self.y[:count],
            ids=self.ids[:count],
            probes=self.probes[:, :count],
        )

    def to(self, dtype: torch.dtype) -> Workload:
        """A copy in ``dtype``: the model deep-copied and converted, the same values."""
        return dataclasses.replace(
            self,
            model=copy.deepcopy(self.model).to(dtype),
            x=self.x.to(dtype),
            probes=self.probes.to(dtype),
        )


def build_workload(name: str, device: str | torch.device) -> Workload:
    """The workload ``name`` of WORKLOADS on ``device``, the same values on every call."""
    spec = WORKLOADS[name]
    device = torch.device(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(spec.batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (spec.batch,), generator=gen)
    with torch.random.fork_rng(devices=[]):  # the weights, without moving the caller's RNG
        torch.manual_seed(0)
        model = spec.model()
    model, x, y = model.to(device), x.to(device), y.to(device)
    calibrate_batchnorm(model, x)  # no-op without BatchNorm; leaves eval mode
    ids = torch.arange(spec.batch, device=device)
    probes = curvkern.ops.rademacher(SEED, ids, spec.n_probes, x.shape[1:], dtype=x.dtype)
    return Workload(name=name, model=model, x=x, y=y, ids=ids, probes=probes)


@contextlib.contextmanager
def _input_gradient_only(model: nn.Module) -> Iterator[None]:
    """Eval mode, parameters' requires_grad off (as the scorer does), both restored on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(training)


def input_gradients(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    """One forward and backward pass per (x, y) in ``batches``; the last pass's input gradient.

    Args:
        model: classifier.
        batches: (x (R, ...), y (R,)) pairs.
    Returns:
        (R, ...) gradient of the summed per-sample cross entropy with respect to the last x.
    """
    with _input_gradient_only(model), torch.enable_grad():
        for x, y in batches:
            xr = x.detach().requires_grad_(True)
            loss = F.cross_entropy(model(xr), y, reduction="none")
            (grad,) = torch.autograd.grad(loss.sum(), xr)
    return grad


def make_variant(w: Workload, variant: str, exact_probes: bool = False) -> Callable[[], Any]:
    """The zero-argument callable that does ``variant``'s work on the workload's batch.

    Args:
        w: the workload.
        variant: one of :func:`variants_for`.
        exact_probes: give the published algorithm r - 1e-7 instead of r, so that its probe
            h * (r + 1e-7) is exactly h * r (checked in float32 and float64: (+-1 - 1e-7) + 1e-7
            rounds to +-1), and it sees the same inputs as curvkern. For the float64 check only;
            timing uses r itself, as the published code would.
    """
    if variant == "published":
        probes = w.probes - 1e-7 if exact_probes else w.probes
        return lambda: reference.paper_curvature(w.model, w.x, w.y, w.h, w.n_probes, probes=probes)
    if variant in ("scorer-torch", "scorer-kernels"):
        backend = variant.split("-")[1]
        scorer = CurvatureScorer(w.model, h=w.h, n_probes=w.n_probes, seed=w.seed, backend=backend)
        return lambda: scorer.score(w.x, w.y, w.ids)
    if variant == "floor":
        passes = [(w.x, w.y)] * (w.n_probes + 1)
        return lambda: input_gradients(w.model, passes)
    if variant == "floor-stacked":
        n = w.n_probes
        stacked = (w.x.repeat(n, 1, 1, 1), w.y.repeat(n))  # (n * B, ...) as the scorer's pass
        return lambda: input_gradients(w.model, [(w.x, w.y), stacked])
    raise ValueError(f"unknown variant {variant!r}")


# Which variant's value of each output is the reference: the published algorithm defines the
# scores; a gradient norm is best computed by plain autograd (the floor).
REFERENCE = {"curvature": "published", "trace": "published", "grad_norm": "floor"}


def outputs_of(variant: str, out: Any, w: Workload) -> dict[str, Tensor]:
    """A variant's result as float64 CPU tensors in curvkern's units, by output name.

    The published score is h / B times curvkern's curvature and its second output h^2 / B times
    the trace (DESIGN.md section 1), so they are scaled back. The floors give the gradient norm,
    (B,), or (n, B) for the n copies of the stacked pass.
    """
    if variant == "published":
        curv, eig = out
        scale = w.batch / w.h
        return {"curvature": curv.double() * scale, "trace": eig.double() * scale / w.h}
    if variant.startswith("scorer"):
        return {
            name: getattr(out, name).detach().double().cpu()
            for name in ("curvature", "trace", "grad_norm")
        }
    norms = out.detach().flatten(1).double().norm(dim=1).cpu()
    return {"grad_norm": norms.reshape(-1, w.batch).squeeze(0)}


class CheckedWorkload:
    """A workload in float32 (timed) and its first CHECK_SAMPLES samples in float64 (checked).

    Each variant runs once per precision, lazily, and :meth:`verify` compares its outputs with
    the reference variant's (REFERENCE).
    """

    # float64: every variant sees bit-identical inputs (exact_probes), so results differ only by
    # float64 rounding, about 1e-16 relative in g, amplified by ||g|| / ||dg|| (10 to 100 here)
    # in the finite differences: measured 5e-16 on the CPU. 1e-9 leaves room for other
    # convolution algorithms and deeper nets, and is far below any change of algorithm: the
    # published code's own 1e-7 probe offset moves the trace by 5e-8 of its scale.
    RTOL_FLOAT64 = 1e-9
    # float32: rounding of the reductions over D = 3072 elements, relative sqrt(D) * 6e-8 ~ 3e-6
    # (the lowest tolerance a float32 comparison can have).
    RTOL_FLOAT32 = 1e-5
    # float32: allowed error against float64, in units of the reference variant's own worst
    # error on the same samples. A deep ReLU network's float32 gradient is not a smooth function
    # of rounding: a pre-activation within rounding of 0 flips a ReLU and moves g by ~1e-2 of
    # its norm, i.e. dg / h by ~10 at h = 1e-3. Measured on the CPU, ResNet-18, 48 samples:
    # the published algorithm's float32 curvature is off by up to 0.33% (trace: 0.7% of its
    # scale); the scorer with the same convolution algorithm (oneDNN) by 1.0x and 1.8x that; with
    # another (PyTorch's native convolutions, as cuDNN may pick another algorithm for the
    # scorer's larger passes) by 2.4x and 4.3x. 16 leaves a factor 4 on that, while a float32
    # path that is wrong (not rounding) is off by O(1) of the scale; the float64 check above is
    # the tight one.
    FLOAT32_ERROR_FACTOR = 16.0

    def __init__(self, name: str, device: str | torch.device, measure_memory: bool = True) -> None:
        self.name = name
        self.w32 = build_workload(name, device)
        self.w64 = self.w32.head(CHECK_SAMPLES).to(torch.float64)
        self.samples = self.w64.batch
        # On the CPU, the variants' peak memory, measured in a subprocess (peak_memory.py) that
        # starts now and runs beside the checks; peak_memory() waits for it.
        self._rss_job = (
            RssPeakJob(name, *variants_for("cpu"), "--device", "cpu")
            if self.device.type == "cpu" and measure_memory
            else None
        )
        self.measure_memory = measure_memory
        self._outputs: dict[tuple[str, torch.dtype], dict[str, Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self.w32.device

    def peak_memory(self, variant: str) -> dict[str, Any]:
        """{"peak_bytes", "method"}: the CPU subprocess's result (waited for), or measured now
        on CUDA. Called before timing, so nothing runs beside it."""
        if not self.measure_memory:
            return {"peak_bytes": None, "method": "not measured"}
        if self._rss_job is not None:
            return self._rss_job.result()[variant]
        fn = make_variant(self.w32, variant)
        return {
            "peak_bytes": cuda_peak_bytes(fn, self.device),
            "method": "torch.cuda.max_memory_allocated - memory_allocated before the call",
        }

    def settle(self) -> None:
        """Waits for the CPU peak-memory subprocess, so that it does not run beside timing."""
        if self._rss_job is not None:
            self._rss_job.result()

    def close(self) -> None:
        if self._rss_job is not None:
            self._rss_job.close()

    def outputs(self, variant: str, dtype: torch.dtype) -> dict[str, Tensor]:
        """The variant's outputs (outputs_of) in float32 (all B samples) or float64 (the first
        ``samples``), computed on first use."""
        key = (variant, dtype)
        if key not in self._outputs:
            w = self.w64 if dtype == torch.float64 else self.w32
            fn = make_variant(w, variant, exact_probes=dtype == torch.float64)
            self._outputs[key] = outputs_of(variant, fn(), w)
        return self._outputs[key]

    def verify(self, variant: str) -> dict[str, float]:
        """Checks the variant against the reference of each of its outputs, in both precisions.

        Returns:
            Per output, the largest error relative to the float64 reference's scale, in float64
            and float32 (for the record).
        Raises:
            AssertionError: naming the output, the precision and the worst sample.
        """
        report = {}
        got64 = self.outputs(variant, torch.float64)
        got32 = self.outputs(variant, torch.float32)
        for name in got64:
            ref = REFERENCE[name]
            want64 = self.outputs(ref, torch.float64)[name]  # (S,)
            scale = self._scale(name, want64)
            err64 = (got64[name] - want64).abs()
            _assert_within(err64, self.RTOL_FLOAT64 * scale, f"{variant} {name}, float64")
            # float32 on the first S samples (all B on the CPU workload)
            ref_err = (self.outputs(ref, torch.float32)[name][..., : self.samples] - want64).abs()
            bound = torch.maximum(
                self.FLOAT32_ERROR_FACTOR * ref_err.max(), self.RTOL_FLOAT32 * scale
            )
            err32 = (got32[name][..., : self.samples] - want64).abs()
            _assert_within(err32, bound, f"{variant} {name}, float32 (reference: {ref})")
            report[f"{name}_float64_rel_err"] = float((err64 / scale).max())
            report[f"{name}_float32_rel_err"] = float((err32 / scale).max())
        return report

    @staticmethod
    def _scale(name: str, want: Tensor) -> Tensor:
        # curvature and gradient norms are positive: per sample. r . dg / h can cancel to ~0
        # in one sample, so the trace is measured against the largest in the batch.
        return want.abs().max().expand_as(want) if name == "trace" else want.abs()


def _assert_within(err: Tensor, bound: Tensor, what: str) -> None:
    """err (..., S) <= bound (S,) elementwise, else an error naming the worst sample."""
    excess = err - bound
    if bool((excess > 0).any()):
        flat = int(excess.flatten().argmax())
        sample = flat % err.shape[-1]
        raise AssertionError(
            f"{what}: sample {sample} differs by {float(err.flatten()[flat]):.3e}, "
            f"tolerance {float(bound.expand_as(err).flatten()[flat]):.3e}"
        )
