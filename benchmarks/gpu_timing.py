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

    torch.manual_seed(0)  # the random weights, so that a rerun scores the same model
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
    probes = torch_ops.rademacher(SEED, ids, n, x.shape[1:])  # (n, B, 3, 224, 224)
    passes = [(x, y)] * (n + 1)

    def scorer(method: str, precision: str | None = None) -> Callable[[], Any]:
        extra = {} if precision is None else {"precision": precision}
        s = CurvatureScorer(
            model, h=H, n_probes=n, seed=SEED, method=method, backend=backend, **extra
        )
        return lambda: s.score(x, y, ids)

    fns: dict[str, Callable[[], Any]] = {
        "fd fp32": scorer("fd"),
        "paper": lambda: reference.paper_curvature(model, x, y, H, n, probes=probes),
        "floor": lambda: input_gradients(model, passes),
        "hvp fp32": scorer("hvp"),
    }
    rows: dict[str, dict[str, Any]] = {row: {"row": row} for row in fns}
    for precision in ("tf32", "bf16"):
        row = f"hvp {precision}"
        rows[row] = {"row": row}
        if has_precision():
            fns[row] = scorer("hvp", precision)
        else:
            rows[row]["status"] = "not available in this build"

    # Phase 1: every row's result, then the checks (which compare rows), before any timing.
    results: dict[str, Any] = {}
    for row, fn in fns.items():
        try:
            results[row] = fn()
            _sync(device)
        except Exception as exc:  # a row's error (out of memory, say) is its result
            rows[row].update(status="failed", why=f"{type(exc).__name__}: {exc}"[:500])
        if on_gpu:
            torch.cuda.empty_cache()

    def curvature(row: str) -> Tensor:
        if row == "paper":  # (curv, eig), curv = h / B * curvkern's curvature
            return results[row][0].double().cpu() * batch / H
        return results[row].curvature.detach().double().cpu()

    if "fd fp32" in results and "paper" in results:
        got, want = curvature("paper"), curvature("fd fp32")
        error = float((got - want).abs().max() / want.abs().max())
        check = {
            "paper_vs_fd_max_error_of_scale": error,
            "tolerance": FLOAT32_SCALE_TOLERANCE,
            "spearman": spearman(got, want),
            "passed": error <= FLOAT32_SCALE_TOLERANCE,
        }
        rows["paper"]["check"] = rows["fd fp32"]["check"] = check
    if "fd fp32" in results and "floor" in results:
        norms = results["floor"].flatten(1).double().norm(dim=1).cpu()
        want = results["fd fp32"].grad_norm.detach().double().cpu()
        error = float(((norms - want).abs() / want.abs().max()).max())
        rows["floor"]["check"] = {
            "grad_norm_vs_fd_max_error_of_scale": error,
            "tolerance": FLOAT32_SCALE_TOLERANCE,
            "passed": error <= FLOAT32_SCALE_TOLERANCE,
        }
    for row in ("hvp fp32", "hvp tf32", "hvp bf16"):
        if row not in results:
            continue
        got = curvature(row)
        check: dict[str, Any] = {"finite": bool(torch.isfinite(got).all())}
        for ref in ("fd fp32", "hvp fp32"):
            if ref in results and ref != row:
                check[f"spearman_vs_{ref.replace(' ', '_')}"] = spearman(got, curvature(ref))
        if row == "hvp bf16" and "spearman_vs_fd_fp32" in check:
            check["meets_goal"] = check["spearman_vs_fd_fp32"] >= FAST_MODE_GOAL
        check["passed"] = check["finite"]
        rows[row]["check"] = check
    results.clear()  # the floor's gradients, the scores: not held while timing

    # Phase 2: time the rows whose check passed.
    for row, fn in fns.items():
        entry = rows[row]
        if "status" in entry:
            pass
        elif "check" not in entry:
            entry.update(status="failed", why="not checked: a row it is compared with failed")
        elif not entry["check"]["passed"]:
            entry.update(status="failed", why="check failed before timing")
        else:
            try:
                times = _times(fn, repeats, device)
                entry.update(status="passed", median_s=statistics.median(times), times_s=times)
            except Exception as exc:
                entry.update(status="failed", why=f"{type(exc).__name__}: {exc}"[:500])
        if on_gpu:
            torch.cuda.empty_cache()
        print(json.dumps(entry), flush=True)
    for row in rows.values():
        if row["row"] not in fns:
            print(json.dumps(row), flush=True)
    fd_s = rows["fd fp32"].get("median_s")
    for r in rows.values():
        if fd_s and "median_s" in r:
            r["speedup_vs_fd_fp32"] = fd_s / r["median_s"]
    failed = [r["row"] for r in rows.values() if r["status"] == "failed"]
    return {
        "status": "failed" if failed else "passed",
        "failed_rows": failed,
        "rows": list(rows.values()),
    }


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
