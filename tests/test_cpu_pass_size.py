"""The CPU's default pass size (max_batch=None): 2^18 input elements' worth of rows, at least 8,
at most 4,096 with the pass pool and 512 without."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkern
from curvkern import CurvatureScorer, _pass_memory


def _passes(sample_shape: tuple[int, ...], batch: int, n_probes: int) -> list[int]:
    """Rows of every forward pass the default scorer makes on a batch of that shape (CPU).

    Counted on a second call: the first also runs the scorer's once-per-input-signature model
    checks (a few small passes), which are not part of the pass schedule tested here.
    """
    numel = torch.Size(sample_shape).numel()
    model = nn.Sequential(nn.Flatten(), nn.Linear(numel, 3))
    rows = []

    def counted(x):
        rows.append(x.shape[0])
        return model(x)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *sample_shape, generator=gen)
    y = torch.randint(0, 3, (batch,), generator=gen)
    scorer = CurvatureScorer(counted, n_probes=n_probes, backend="torch")
    scorer.score(x, y)
    rows.clear()
    scorer.score(x, y)
    return rows


@pytest.mark.parametrize(
    "sample_shape, batch, n_probes, want",
    [
        # 3x32x32: 85 rows per pass, so all 4 samples' 10 probes (40 rows) in one pass after x's
        ((3, 32, 32), 4, 10, [4, 40]),
        # 3x32x32, B = 64: one probe of every sample per pass (64 rows; 2 would be 128 > 85)
        ((3, 32, 32), 64, 3, [64, 64, 64, 64]),
        # 2^16 elements: the element budget gives 4 rows, the minimum 8: one probe of all 8
        # samples per pass, as the floor's passes (the element budget alone gave two groups of
        # 4 samples, 2 x (1 + 3) passes of 4 rows)
        ((4, 128, 128), 8, 3, [8, 8, 8, 8]),
        # 2^16 elements, 2 samples: 8 rows hold 4 probes of both
        ((4, 128, 128), 2, 4, [2, 8]),
    ],
)
def test_default_cpu_passes(sample_shape, batch, n_probes, want):
    assert _passes(sample_shape, batch, n_probes) == want


@pytest.mark.skipif(not curvkern.has_kernels(), reason="the pass pool is in curvkern._C")
def test_small_inputs_take_large_passes_only_with_the_pass_pool(monkeypatch):
    """64 features, B = 256, 10 probes: the element budget allows 4,096 rows. With the pool all
    2,560 probe rows take one pass; without it (CURVKERN_CPU_POOL=0, no compiled library, or
    another CPU allocator installed) passes of at most 512 rows, which glibc serves without
    faulting the activations back in every pass (docs/method.md, "The CPU pass size")."""
    assert _passes((64,), 256, 10) == [256, 2560]
    monkeypatch.setattr(_pass_memory, "ENABLED", False)
    assert _passes((64,), 256, 10) == [256] + [512] * 5
