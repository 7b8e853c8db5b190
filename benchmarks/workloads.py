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

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvkern
from curvkern import CurvatureScorer, reference

from .models import CifarResNet18, SmallCNN, calibrate_batchnorm, imagenet_resnet18
from .peak_memory import rss_peak_bytes

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


@dataclasses.dataclass(frozen=True)
class Size:
    """Batch, probes, sample shape, and how many samples the float64 check scores."""

    batch: int
    n_probes: int
    sample_shape: tuple[int, ...]
    check_samples: int


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    model: Callable[[], nn.Module]
    classes: int
    full: Size
    quick: Size  # under --quick: the same, or smaller where the full size takes seconds a call
    description: str

    def size(self, quick: bool) -> Size:
        return self.quick if quick else self.full


def mlp_64_256_10() -> nn.Module:
    """Linear(64, 256) - ReLU - Linear(256, 10): (B, 64) -> (B, 10). A model so small that the
    scorer's fixed cost per call shows against its passes."""
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


_CIFAR = (3, 32, 32)
_IMAGENET = (3, 224, 224)
# check_samples: the float64 check scores that many samples; all of the small CNN's batch, fewer
# where float64 convolutions take seconds (CUDA; 224x224 on the CPU).
WORKLOADS = {
    "small_cnn": WorkloadSpec(
        SmallCNN,
        10,
        Size(64, 10, _CIFAR, 64),
        Size(64, 10, _CIFAR, 64),
        "small CNN (conv32-pool-conv64-pool-fc128-fc10)",
    ),
    "resnet18": WorkloadSpec(
        CifarResNet18,
        10,
        Size(256, 10, _CIFAR, 64),
        Size(256, 10, _CIFAR, 64),
        "CIFAR ResNet-18",
    ),
    "mlp": WorkloadSpec(
        mlp_64_256_10,
        10,
        Size(256, 10, (64,), 256),
        Size(256, 10, (64,), 256),
        "MLP 64-256-10 (ReLU)",
    ),
    # An ImageNet-size input on the CPU: one sample is 150,528 elements, 49 times a CIFAR image,
    # where the CPU's default pass size matters (curvkern.scorer's CPU_MIN_ROWS). --quick, for
    # CI's smoke run: 3x112x112 (37,632 elements, still under the minimum row count's rule), 2
    # samples, 4 probes; about 40 times less work than the full size.
    "resnet18_imagenet": WorkloadSpec(
        imagenet_resnet18,
        1000,
        Size(8, 10, _IMAGENET, 2),
        Size(2, 4, (3, 112, 112), 2),
        "torchvision ResNet-18 (random weights, 1000 classes)",
    ),
}


def variants_for(device: str) -> tuple[str, ...]:
    """The variants measured on a device type ("cpu" or "cuda")."""
    # On the CPU the scorer's default passes hold at least one probe of every sample of the batch,
    # the same passes as ``floor``; no separate stacked row.
    common = ("published", "scorer-torch", "scorer-kernels", "floor")
    return (*common, "floor-stacked") if device == "cuda" else common


@dataclasses.dataclass
class Workload:
    """A model and one labelled batch on a device, with the probes curvkern draws for it."""

    name: str
    model: nn.Module  # eval mode
    x: Tensor  # (B, *sample_shape) inputs
    y: Tensor  # (B,) int64 labels
    ids: Tensor  # (B,) int64 sample ids
    probes: Tensor  # (n, B, *sample_shape) of +-1: r_k of sample b, as curvkern's kernels draw it
    check_samples: int  # samples of the float64 check
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


def build_workload(name: str, device: str | torch.device, quick: bool = False) -> Workload:
    """The workload ``name`` of WORKLOADS on ``device``, the same values on every call."""
    spec = WORKLOADS[name]
    size = spec.size(quick)
    device = torch.device(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(size.batch, *size.sample_shape, generator=gen)
    y = torch.randint(0, spec.classes, (size.batch,), generator=gen)
    with torch.random.fork_rng(devices=[]):  # the weights, without moving the caller's RNG
        torch.manual_seed(0)
        model = spec.model()
    model, x, y = model.to(device), x.to(device), y.to(device)
    calibrate_batchnorm(model, x)  # no-op without BatchNorm; leaves eval mode
    ids = torch.arange(size.batch, device=device)
    probes = curvkern.ops.rademacher(SEED, ids, size.n_probes, x.shape[1:], dtype=x.dtype)
    return Workload(name, model, x, y, ids, probes, min(size.check_samples, size.batch))


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
        stacked = (torch.cat([w.x] * n), w.y.repeat(n))  # (n * B, ...) as the scorer's pass
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
    """A workload in float32 (timed) and its first check_samples samples in float64 (checked).

    Each variant runs once per precision, lazily, and :meth:`verify` compares its outputs with
    the reference variant's (REFERENCE).
    """

    # float64: every variant sees bit-identical inputs (exact_probes), so results differ only by
    # float64 rounding, about 1e-16 relative in g, amplified by ||g|| / ||dg|| (10 to 100 here)
    # in the finite differences: measured 5e-16 on the CPU. 1e-9 leaves room for other
    # convolution algorithms and deeper nets, and is far below any change of algorithm: the
    # published code's own 1e-7 probe offset moves the trace by 5e-8 of its scale.
    RTOL_FLOAT64 = 1e-9
    # float32: rounding of the reductions over the D elements of a sample, relative sqrt(D) *
    # 2^-24 (3e-6 at D = 3072, 2.3e-5 at 150,528), three times that: the lowest tolerance a
    # float32 comparison can have.
    RTOL_FLOAT32_PER_SQRT_D = 3 * 2.0**-24
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

    def __init__(self, w32: Workload) -> None:
        self.w32 = w32
        self.w64 = w32.head(w32.check_samples).to(torch.float64)
        self.samples = self.w64.batch
        self._outputs: dict[tuple[str, torch.dtype], dict[str, Tensor]] = {}

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
                self.FLOAT32_ERROR_FACTOR * ref_err.max(),
                self.RTOL_FLOAT32_PER_SQRT_D * math.sqrt(self.w32.x[0].numel()) * scale,
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


def main(argv: Sequence[str] | None = None) -> None:
    """Prints {variant: rss_peak_bytes result} of a CPU workload's variants, as JSON; run by
    peak_memory.RssPeakJob in a fresh process (see peak_memory.py)."""
    parser = argparse.ArgumentParser(description="CPU peak memory of a workload's variants")
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--quick", action="store_true", help="the workload's --quick size")
    args = parser.parse_args(argv)
    if "CURVKERN_BENCH_THREADS" in os.environ:  # as the benchmark run (--torch-threads)
        torch.set_num_threads(int(os.environ["CURVKERN_BENCH_THREADS"]))
    w = build_workload(args.workload, "cpu", args.quick)
    print(json.dumps({v: rss_peak_bytes(make_variant(w, v)) for v in args.variants}))


if __name__ == "__main__":
    main()
