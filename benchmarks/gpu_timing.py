"""ResNets at 224 x 224 on a GPU: the published algorithm, the scorer's methods, and the floor.

For each model (ResNet-18, then ResNet-50 if the time budget holds), batch 64, n = 10 probes,
torchvision's architecture with random weights and BatchNorm statistics of the batch, the rows:

- ``paper``: curvkern.reference.paper_curvature, the published algorithm (four passes per probe);
- ``fd fp32``: CurvatureScorer(method="fd"), the finite differences;
- ``floor``: the n + 1 forward and backward passes of the batch that fd cannot avoid;
- ``hvp fp32``: CurvatureScorer(method="hvp"), double backward;
- ``hvp tf32`` / ``hvp bf16``: the fast mode, CurvatureScorer(method="hvp", precision=...), when
  this build's CurvatureScorer takes ``precision`` (else the row says it is not available).

Everything but the fast mode runs in IEEE float32 (TF32 off for matrix products and
convolutions). Every row is checked before it is timed: the paper's score is h / B times the
scorer's curvature on the same probes; the floor's input gradients have the scorer's gradient
norms; the fast mode's rank correlation (Spearman) with fp32 hvp and fp32 fd is reported, with
the goal of DESIGN.md section 16 (>= 0.97 against fd). Times are the median of --repeats calls
after a warm-up call, each synchronized.

    python3 -m benchmarks.gpu_timing --out timing.json     # from the repo root, on a GPU

Exit status: 0 every run row passed its check, 1 a check or a row failed, 3 skipped (no GPU, or
no torchvision); the JSON says why.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import curvkern
from curvkern import CurvatureScorer, reference, torch_ops

from .models import calibrate_batchnorm
from .workloads import input_gradients

H = 1e-3
SEED = 0
CLASSES = 1000
# ResNet-50's passes cost about 2.3 times ResNet-18's (4.1 against 1.8 GFLOP per image) and move
# more activations; its rows are run when 3 times ResNet-18's measured time fits what is left.
RESNET50_COST_FACTOR = 3.0
# Paper against scorer, per sample, relative to the batch's largest curvature: the published
# algorithm's own float32 error on ResNet-18 was measured at up to 0.33% of the scale (CPU,
# against float64), and benchmarks/workloads.py allows FLOAT32_ERROR_FACTOR = 16 times the
# reference's error for another float32 path (other convolution algorithms flip ReLUs near 0).
FLOAT32_SCALE_TOLERANCE = 16 * 0.0033
FAST_MODE_GOAL = 0.97  # Spearman of hvp bf16 against fd fp32 (DESIGN.md section 16)


def spearman(a: Tensor, b: Tensor) -> float:
    """Rank correlation of two (B,) tensors (ties broken by position; scores are continuous)."""
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _ieee_float32() -> None:
    """TF32 off for matrix products and cuDNN convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(fn: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    """Seconds of ``repeats`` calls after one warm-up call, each synchronized."""
    fn()  # warm-up: cuDNN's algorithm choice, the caching allocator
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def has_precision() -> bool:
    """Whether this build's CurvatureScorer takes ``precision=`` (the fast mode)."""
    return "precision" in inspect.signature(CurvatureScorer.__init__).parameters


def _model(name: str, x: Tensor) -> torch.nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=CLASSES).to(x.device)
    calibrate_batchnorm(model, x)
    return model


def time_model(
    name: str, batch: int, n: int, repeats: int, device: torch.device, size: int = 224
) -> dict[str, Any]:
    """Checks, then times every row for one model; a row's failure does not stop the others."""
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen, device=device)
    y = torch.randint(0, CLASSES, (batch,), generator=gen, device=device)
    ids = torch.arange(batch, device=device)
    model = _model(name, x)
    on_gpu = device.type == "cuda"
    backend = (
        "kernels"
        if (curvkern.has_cuda_kernels() if on_gpu else curvkern.has_kernels())
        else "torch"
    )
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}

    def run(row: str, fn: Callable[[], Any], check: Callable[[Any], dict[str, Any]]) -> None:
        entry: dict[str, Any] = {"row": row}
        try:
            out = fn()
            _sync(device)
            results[row] = out
            entry["check"] = check(out)
            if entry["check"].get("passed", True):
                times = _times(fn, repeats, device)
                entry.update(status="passed", median_s=statistics.median(times), times_s=times)
            else:
                entry["status"] = "failed"
                entry["why"] = "check failed before timing"
        except Exception as exc:  # a row's error (out of memory, say) is its result
            entry.update(status="failed", why=f"{type(exc).__name__}: {exc}"[:500])
        if on_gpu:
            torch.cuda.empty_cache()
        rows.append(entry)
        print(json.dumps(entry), flush=True)

    probes = torch_ops.rademacher(SEED, ids, n, x.shape[1:])  # (n, B, 3, 224, 224)
    fd = CurvatureScorer(model, h=H, n_probes=n, seed=SEED, method="fd", backend=backend)
    run("fd fp32", lambda: fd.score(x, y, ids), lambda out: {})

    def check_paper(out: Any) -> dict[str, Any]:
        if "fd fp32" not in results:
            return {"passed": False, "why": "no fd fp32 result to compare with"}
        curv = out[0].double().cpu() * batch / H  # paper = h / B * curvature
        want = results["fd fp32"].curvature.detach().double().cpu()
        error = float((curv - want).abs().max() / want.abs().max())
        return {
            "max_error_of_scale": error,
            "tolerance": FLOAT32_SCALE_TOLERANCE,
            "spearman": spearman(curv, want),
            "passed": error <= FLOAT32_SCALE_TOLERANCE,
        }

    run(
        "paper",
        lambda: reference.paper_curvature(model, x, y, H, n, probes=probes),
        check_paper,
    )

    def check_floor(out: Any) -> dict[str, Any]:
        if "fd fp32" not in results:
            return {"passed": False, "why": "no fd fp32 result to compare with"}
        norms = out.flatten(1).double().norm(dim=1).cpu()
        want = results["fd fp32"].grad_norm.detach().double().cpu()
        error = float(((norms - want).abs() / want.abs().max()).max())
        return {
            "max_error_of_scale": error,
            "tolerance": FLOAT32_SCALE_TOLERANCE,
            "passed": error <= FLOAT32_SCALE_TOLERANCE,
        }

    passes = [(x, y)] * (n + 1)
    run("floor", lambda: input_gradients(model, passes), check_floor)

    def against_fp32(out: Any) -> dict[str, Any]:
        curv = out.curvature.detach().double().cpu()
        check = {}
        for ref in ("fd fp32", "hvp fp32"):
            if ref in results and results[ref] is not out:
                ref_curv = results[ref].curvature.detach().double().cpu()
                check[f"spearman_vs_{ref.replace(' ', '_')}"] = spearman(curv, ref_curv)
        check["finite"] = bool(torch.isfinite(curv).all())
        check["passed"] = check["finite"]
        return check

    hvp = CurvatureScorer(model, h=H, n_probes=n, seed=SEED, method="hvp", backend=backend)
    run("hvp fp32", lambda: hvp.score(x, y, ids), against_fp32)
    for precision in ("tf32", "bf16"):
        row = f"hvp {precision}"
        if not has_precision():
            rows.append({"row": row, "status": "not available in this build"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        fast = CurvatureScorer(
            model, h=H, n_probes=n, seed=SEED, method="hvp", backend=backend, precision=precision
        )
        run(row, lambda fast=fast: fast.score(x, y, ids), against_fp32)
        if precision == "bf16" and "spearman_vs_fd_fp32" in rows[-1].get("check", {}):
            rows[-1]["check"]["meets_goal"] = (
                rows[-1]["check"]["spearman_vs_fd_fp32"] >= FAST_MODE_GOAL
            )
    by_row = {r["row"]: r for r in rows}
    fd_s = by_row["fd fp32"].get("median_s")
    for r in rows:
        if fd_s and "median_s" in r:
            r["speedup_vs_fd_fp32"] = fd_s / r["median_s"]
    failed = [r["row"] for r in rows if r["status"] == "failed"]
    return {"status": "failed" if failed else "passed", "failed_rows": failed, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_timing.json")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-probes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=60.0,
        help="seconds this may take (ResNet-50 is skipped "
        "when ResNet-18's time x 3 does not fit what is left)",
    )
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    parser.add_argument("--image-size", type=int, default=224, help="smaller for a smoke run")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "batch": args.batch,
        "image_size": args.image_size,
        "n_probes": args.n_probes,
        "h": H,
        "repeats": args.repeats,
        "float32": "IEEE (TF32 off) except the tf32/bf16 rows",
        "fast_mode_in_build": has_precision(),
        "models": {},
    }

    def finish(status: str, code: int, why: str | None = None) -> int:
        result.update(status=status, seconds=time.perf_counter() - start)
        if why:
            result["why"] = why
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"gpu_timing: {status}" + (f" ({why})" if why else ""))
        return code

    if device.type == "cuda" and not torch.cuda.is_available():
        return finish("skipped", 3, "no GPU")
    result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    try:
        import torchvision  # noqa: F401
    except ImportError as exc:
        return finish("skipped", 3, f"torchvision is not importable ({exc})")
    _ieee_float32()
    for name in ("resnet18", "resnet50"):
        elapsed = time.perf_counter() - start
        if name == "resnet50":
            needed = RESNET50_COST_FACTOR * elapsed
            if needed > args.budget_s - elapsed:
                result["models"][name] = {
                    "status": "skipped",
                    "why": f"needs about {needed:.0f} s (3 x ResNet-18's), "
                    f"{args.budget_s - elapsed:.0f} s of the budget left",
                }
                continue
        t0 = time.perf_counter()
        result["models"][name] = time_model(
            name, args.batch, args.n_probes, args.repeats, device, args.image_size
        )
        result["models"][name]["seconds"] = time.perf_counter() - t0
    failed = [m for m, r in result["models"].items() if r["status"] == "failed"]
    if failed:
        return finish("failed", 1, f"rows failed in {', '.join(failed)}")
    return finish("passed", 0)


if __name__ == "__main__":
    sys.exit(main())
