"""The zeroth-order estimator (method="zo") and adaptive probing (rtol, max_probes)."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvkern import CurvatureScorer, CurvatureTracker, IndexedDataset, reference, score_dataset

from .conftest import counting_passes, labelled_batch, smooth_classifier

BATCH = 48
N_PROBES = 64
Z_MAX = 4.5  # P(max of 48 |standard normals| > 4.5) < 4e-4


@pytest.fixture(scope="module", params=[nn.Tanh, nn.GELU], ids=lambda a: a.__name__)
def problem(request):
    model = smooth_classifier(sample_shape=(6,), activation=request.param)
    x, y = labelled_batch(BATCH)
    return model, x, y, reference.input_hessians(model, x, y)


def _check_z(estimate, truth, variance, what):
    z = (estimate - truth) / reference.standard_error(variance, N_PROBES)
    assert z.abs().max() < Z_MAX, f"{what}: max |z| = {z.abs().max():.2f}"
    assert abs(z.mean()) < 4 / math.sqrt(BATCH), f"{what}: mean z = {z.mean():.3f}"


def test_zo_against_exact_hessians(problem):
    model, x, y, hess = problem
    # float64, h = 1e-3: the O(h^2) error of the four-point difference is ~1e-6 relative and
    # rounding eps * L / h^2 ~ 1e-10, both far below the standard errors (~5e-2 relative).
    s = CurvatureScorer(model, method="zo", h=1e-3, n_probes=N_PROBES, seed=5).score(x, y)
    mean_abs, mean_sq, mean_4 = reference.bilinear_moments(hess)
    _check_z(s.curvature, mean_abs, mean_sq - mean_abs**2, "curvature = mean |r^T H s|")
    _check_z(s.frobenius_sq, mean_sq, mean_4 - mean_sq**2, "frobenius_sq = mean (r^T H s)^2")
    torch.testing.assert_close(mean_sq, reference.hessian_frobenius_sq(hess))
    # trace: (r^T H r + s^T H s) / 2 per pair, Hutchinson with two independent probes
    _check_z(
        s.trace, reference.hessian_trace(hess), reference.hutchinson_variance(hess) / 2, "trace"
    )
    assert torch.isnan(s.grad_norm).all()
    xr = x.clone()
    loss = nn.functional.cross_entropy(model(xr), y, reduction="none")
    torch.testing.assert_close(s.loss, loss.detach(), rtol=1e-12, atol=0)


def test_zo_needs_no_autograd():
    model = smooth_classifier()
    x, y = labelled_batch(6)
    grad_enabled = []

    class Opaque(nn.Module):
        """Cuts the graph (as a model outside autograd would): only loss values are usable."""

        def forward(self, inp):
            grad_enabled.append(torch.is_grad_enabled())
            return model(inp.detach())

    kw = dict(method="zo", n_probes=4, h=1e-3)
    a = CurvatureScorer(Opaque(), **kw).score(x, y)
    assert not any(grad_enabled)  # every forward ran without building a graph
    b = CurvatureScorer(model, **kw).score(x, y)
    torch.testing.assert_close(a.curvature, b.curvature, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="does not depend on x through autograd"):
        CurvatureScorer(Opaque()).score(x, y)
    with torch.no_grad():
        c = CurvatureScorer(model, **kw).score(x, y)
    torch.testing.assert_close(c.curvature, b.curvature, rtol=0, atol=0)


def test_zo_passes_stay_within_max_batch():
    model = smooth_classifier()
    x, y = labelled_batch(10)
    counted, rows = counting_passes(model)
    ref = CurvatureScorer(model, method="zo", n_probes=5, h=1e-3).score(x, y)
    got = CurvatureScorer(counted, method="zo", n_probes=5, h=1e-3, max_batch=12).score(x, y)
    assert max(rows) <= 12
    torch.testing.assert_close(got.curvature, ref.curvature, rtol=1e-8, atol=1e-12)


# --- adaptive probes ---------------------------------------------------------------------------


# |r^T H s| spreads far more than ||H r|| (relative standard deviation near 1 against ~0.3),
# so zo needs a looser rtol to stop within 40 probes.
@pytest.mark.parametrize("method,rtol", [("fd", 0.08), ("hvp", 0.08), ("zo", 0.25)])
@pytest.mark.parametrize("max_batch", [None, 96], ids=["many-rounds-per-pass", "one-round-first"])
def test_adaptive_equals_fixed_run_with_the_probes_it_got(method, rtol, max_batch):
    model = smooth_classifier()
    x, y = labelled_batch(24)
    h = 1e-2 if method == "zo" else 1e-3
    adaptive = CurvatureScorer(
        model, method=method, h=h, n_probes=4, rtol=rtol, max_probes=40, max_batch=max_batch
    ).score(x, y)
    counts = adaptive.n_probes
    assert counts.min() >= 4 and counts.max() <= 40 and (counts % 4 == 0).all()
    assert len(set(counts.tolist())) > 1, "the test needs samples that stop at different rounds"
    for n in counts.unique().tolist():
        rows = (counts == n).nonzero().flatten()
        fixed = CurvatureScorer(model, method=method, h=h, n_probes=n).score(x[rows], y[rows], rows)
        for field, value in fixed.to_dict().items():
            torch.testing.assert_close(
                getattr(adaptive, field)[rows],
                value,
                rtol=1e-8,
                atol=1e-12,
                equal_nan=True,
                msg=field,
            )


def test_adaptive_stopping_rule():
    model = smooth_classifier()
    x, y = labelled_batch(32)
    rtol, n, cap = 0.05, 3, 30
    s = CurvatureScorer(model, n_probes=n, rtol=rtol, max_probes=cap).score(x, y)
    done = s.curvature_stderr <= rtol * s.curvature
    capped = s.n_probes == cap
    assert (done | capped).all()
    assert capped.any() and (~capped).any()
    # every sample that stopped early stopped at the first round where the rule held
    for b in (~capped).nonzero().flatten().tolist():
        got = int(s.n_probes[b])
        if got > n:
            before = CurvatureScorer(model, n_probes=got - n).score(x[b : b + 1], y[b : b + 1], [b])
            assert before.curvature_stderr[0] > rtol * before.curvature[0]


def test_adaptive_batches_shrink():
    model = smooth_classifier()
    x, y = labelled_batch(16)
    passes = []

    def counted(inp):
        passes.append(inp.shape[0])
        return model(inp)

    n, budget = 4, 64
    scorer = CurvatureScorer(counted, n_probes=n, rtol=0.1, max_probes=64, max_batch=budget)
    scorer.score(x, y)  # the first batch of a shape also runs the scorer's consistency check
    passes.clear()
    s = scorer.score(x, y)
    probe_passes = passes[1:]  # after the pass at x
    assert max(probe_passes) <= budget
    # The first pass is one round over all 16 samples; as samples converge, later passes hold
    # fewer samples and, within the same row budget, several rounds each.
    assert probe_passes[0] == 16 * n
    samples = [int((s.n_probes > n * k).sum()) for k in range(64 // n)]
    assert samples[0] == 16 and samples[-1] < 16 and samples == sorted(samples, reverse=True)
    assert len(probe_passes) < len([k for k in samples if k])  # fewer passes than rounds


def test_max_probes_default_and_cap():
    model = smooth_classifier()
    x, y = labelled_batch(4)
    scorer = CurvatureScorer(model, n_probes=3, rtol=1e-9)  # unreachable: every sample capped
    assert scorer.max_probes == 30
    assert scorer.score(x, y).n_probes.tolist() == [30] * 4
    s = CurvatureScorer(model, n_probes=4, rtol=1e-9, max_probes=10).score(x, y)
    assert s.n_probes.tolist() == [10] * 4  # rounds of 4, 4 and 2


def test_adaptive_with_score_dataset_and_tracker(tmp_path):
    model = smooth_classifier()
    x, y = labelled_batch(20)
    data = IndexedDataset(TensorDataset(x, y))
    scorer = CurvatureScorer(model, n_probes=4, rtol=0.1, max_probes=40)
    direct = scorer.score(x, y)
    result = score_dataset(scorer, DataLoader(data, batch_size=6, shuffle=True), progress=False)
    assert torch.equal(result.n_probes, direct.n_probes)
    torch.testing.assert_close(result.curvature, direct.curvature, rtol=1e-8, atol=1e-12)
    tracker = CurvatureTracker(scorer, 20, tmp_path / "t.npz")
    tracker.score_epoch(DataLoader(data, batch_size=7), 0, progress=False)
    with pytest.raises(ValueError, match="rtol: file 0.1, scorer 0.2"):
        CurvatureTracker(CurvatureScorer(model, n_probes=4, rtol=0.2), 20, tmp_path / "t.npz")
