"""Loading of the compiled ops (curvkern._C) and what they are available for."""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.curvkern)
except ImportError as error:  # not built, or built against another torch
    _LOAD_ERROR: ImportError | None = error
else:
    _LOAD_ERROR = None

REBUILD_HINT = (
    "build them with `pip install --no-build-isolation -e .` in the curvkern checkout "
    "(with FORCE_CUDA=1 for the CUDA kernels when no GPU is visible at build time)"
)


def has_kernels() -> bool:
    """Whether the compiled ops (at least their CPU kernels) are loaded."""
    return _LOAD_ERROR is None


def has_cuda_kernels() -> bool:
    """Whether the compiled ops include CUDA kernels."""
    return has_kernels() and torch.ops.curvkern.cuda_version() >= 0


def kernels_available(device: torch.device | str) -> bool:
    """Whether the compiled ops have kernels for tensors on ``device`` (asks the dispatcher)."""
    if not has_kernels():
        return False
    device_type = torch.device(device).type
    try:
        key = torch._C._dispatch_key_for_device(device_type)
        return torch._C._dispatch_has_kernel_for_dispatch_key("curvkern::probe_reduce", key)
    except (AttributeError, RuntimeError):
        return device_type == "cpu" or (device_type == "cuda" and has_cuda_kernels())


def missing_kernels_message(device: torch.device | str) -> str:
    """Why the compiled ops cannot run on ``device``, and what to do about it."""
    device_type = torch.device(device).type
    if not has_kernels():
        return f"curvkern's compiled ops are not loaded ({_LOAD_ERROR}); {REBUILD_HINT}"
    return (
        f"curvkern's compiled ops were built without kernels for {device_type} tensors "
        f"(CUDA version of the build: {torch.ops.curvkern.cuda_version()}); {REBUILD_HINT}"
    )
