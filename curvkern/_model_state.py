"""Context managers the scorer (and the benchmarks) wrap model passes in.

- :func:`scoring_mode`: eval mode and frozen parameters, and on exit the model exactly as found.
- :func:`ieee_float32`: float32 convolutions and matrix products in full precision (no TF32).
- :func:`float32_precision` and :func:`reduced_precision_passes`: the arithmetic of a scorer's
  ``precision`` ("fp32", "tf32" or "bf16", see :data:`PRECISIONS`).
- :func:`double_backward_attention`: scaled-dot-product attention through its math kernel, the
  one whose backward can itself be differentiated (for Hessian-vector products).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = [
    "PRECISIONS",
    "scoring_mode",
    "ieee_float32",
    "float32_precision",
    "reduced_precision_passes",
    "double_backward_attention",
]

# A scorer's precision settings: "fp32" IEEE float32 throughout; "tf32" float32 convolutions and
# matrix products on TF32 tensor cores (CUDA); "bf16" the probe passes under bfloat16 autocast.
PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def scoring_mode(model: Callable) -> Iterator[None]:
    """Eval mode and frozen parameters; on exit, the model exactly as it was found.

    Restores every submodule's training flag, every parameter's requires_grad and .grad, and the
    values of all buffers (BatchNorm running statistics included), also when the body raises.
    A plain callable (not an nn.Module) is left alone: it cannot be put in eval mode.

    Args:
        model: an nn.Module, or any callable (then nothing is done).
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modules = list(model.modules())
    training = [m.training for m in modules]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone(), b._version) for b in model.buffers()]
    try:
        model.eval()
        for p in params:
            # Gradients with respect to the input only: parameters need no graph of their own.
            p.requires_grad_(False)
        yield
    finally:
        for m, flag in zip(modules, training, strict=True):
            m.training = flag
        for p, flag, grad in zip(params, requires_grad, grads, strict=True):
            p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad
        with torch.no_grad():
            for b, saved, version in buffers:
                if b._version != version:
                    b.copy_(saved)


# Per device type, the torch.backends objects whose fp32_precision lets float32 convolutions and
# matrix products run in a reduced precision (TF32 on CUDA, by default for cuDNN convolutions;
# bf16/TF32 in oneDNN on some CPUs when asked for).
_FP32_PRECISION_KNOBS = {
    "cuda": ("cudnn.conv", "cuda.matmul"),
    "cpu": ("mkldnn.conv", "mkldnn.matmul"),
}


def ieee_float32(device_type: str) -> contextlib.AbstractContextManager[None]:
    """Float32 convolutions and matrix products in full IEEE precision, restored on exit.

    TF32 rounds to about 5e-4 relative, while a finite difference g(x + h r) - g(x) is about
    h = 1e-3 times smaller than g: in TF32 it would be mostly rounding. The fd and zo methods
    therefore score inside this context. It uses torch's fp32_precision settings (torch >= 2.9)
    and puts back each one's previous value, so the caller's TF32 choices are unchanged after.

    Args:
        device_type: "cuda" or "cpu" (other devices: nothing to set).
    """
    return _fp32_precision(device_type, "ieee")


def float32_precision(device_type: str, precision: str) -> contextlib.AbstractContextManager[None]:
    """The float32 arithmetic of a scoring ``precision`` (one of :data:`PRECISIONS`), restored
    on exit.

    "tf32" lets CUDA's float32 convolutions and matrix products round their inputs to TF32
    (10 mantissa bits, about 5e-4 relative); on other devices it is IEEE float32, as "fp32" is
    (the CPU kernels have no TF32 path torch enables by default). "fp32" and "bf16" keep float32
    operations IEEE ("bf16" lowers the probe passes through autocast, see
    :func:`reduced_precision_passes`, and leaves everything else in float32).

    Args:
        device_type: "cuda" or "cpu".
        precision: "fp32", "tf32" or "bf16".
    """
    tf32 = precision == "tf32" and device_type == "cuda"
    return _fp32_precision(device_type, "tf32" if tf32 else "ieee")


def reduced_precision_passes(
    device_type: str, precision: str
) -> contextlib.AbstractContextManager[None]:
    """The context of the probe passes of a scoring ``precision``: bfloat16 autocast for
    "bf16" (matrix products and convolutions in bfloat16, losses and reductions in float32),
    nothing otherwise.

    Args:
        device_type: "cuda" or "cpu" (CPU autocast takes bfloat16 too).
        precision: "fp32", "tf32" or "bf16".
    """
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fp32_precision(device_type: str, value: str) -> Iterator[None]:
    """Every fp32_precision knob of ``device_type`` set to ``value``, restored on exit."""
    knobs = []
    for path in _FP32_PRECISION_KNOBS.get(device_type, ()):
        obj = torch.backends
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            knobs.append((obj, obj.fp32_precision))
    try:
        for obj, _ in knobs:
            obj.fp32_precision = value
        yield
    finally:
        for obj, previous in knobs:
            obj.fp32_precision = previous


@contextlib.contextmanager
def double_backward_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` through its math kernel inside this context.

    The fused attention kernels (flash, memory-efficient, and the CPU flash kernel) have a
    backward that autograd cannot differentiate again ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); the math
    kernel is made of differentiable ops, so a double backward (Hessian-vector products) works.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield
