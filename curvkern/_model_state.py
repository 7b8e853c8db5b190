"""Context managers the scorer (and the benchmarks) wrap model passes in.

- :func:`scoring_mode`: eval mode and frozen parameters, and on exit the model exactly as found.
- :func:`ieee_float32`: float32 convolutions and matrix products in full precision (no TF32).
- :func:`double_backward_attention`: scaled-dot-product attention through its math kernel, the
  one whose backward can itself be differentiated (for Hessian-vector products).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["scoring_mode", "ieee_float32", "double_backward_attention"]


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


@contextlib.contextmanager
def ieee_float32(device_type: str) -> Iterator[None]:
    """Float32 convolutions and matrix products in full IEEE precision, restored on exit.

    TF32 rounds to about 5e-4 relative, while a finite difference g(x + h r) - g(x) is about
    h = 1e-3 times smaller than g: in TF32 it would be mostly rounding. The fd and zo methods
    therefore score inside this context. It uses torch's fp32_precision settings (torch >= 2.9)
    and puts back each one's previous value, so the caller's TF32 choices are unchanged after.

    Args:
        device_type: "cuda" or "cpu" (other devices: nothing to set).
    """
    knobs = []
    for path in _FP32_PRECISION_KNOBS.get(device_type, ()):
        obj = torch.backends
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            knobs.append((obj, obj.fp32_precision))
    try:
        for obj, _ in knobs:
            obj.fp32_precision = "ieee"
        yield
    finally:
        for obj, value in knobs:
            obj.fp32_precision = value


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
