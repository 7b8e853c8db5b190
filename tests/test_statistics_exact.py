"""Every statistic CurvatureScorer reports, against its formula computed by hand.

DESIGN section 1, per sample with n probes r_k (curvkern.ops.rademacher, probe indices
offset .. offset + n - 1) and dg_k = g(x + h r_k) - g(x) (fd) or h H r_k (hvp):
  curvature        = mean_k a_k,  a_k = ||dg_k|| / h
  curvature_stderr = std_k(a_k, ddof 1) / sqrt(n), 0 when n == 1
  trace            = mean_k t_k,  t_k = r_k . dg_k / h;  trace_stderr likewise from t_k
  frobenius_sq     = mean_k a_k^2
and for zo, per probe pair (r_k, s_k) the four-point values of section 1. The adaptive rule:
rounds of n_probes, probe indices continuing, until curvature_stderr <= rtol * curvature or
max_probes (a sample needs two probes for an error estimate). DESIGN section 9: margin,
p_label, correct and el2n of the unperturbed logits. The references below are plain autograd
in float64 on a smooth model; they and the scorer compute the same float64 numbers batched
differently. Rounding in g (~1e-16 relative) becomes ~1e-16 / h relative in dg, ~1e-13 at
h = 1e-3, so rtol 1e-9 leaves room for summation order and nothing else (zo: loss
differences of order h^2 L, so h = 1e-2 there).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkern
from curvkern import CurvatureScorer
from curvkern.ops import rademacher

EXACT = {"rtol": 1e-9, "atol": 1e-12}
SHAPE = (3, 4)  # sample shape; a probe mask covers its first dimension
SEED = 7
kernels = pytest.mark.skipif(not curvkern.has_kernels(), reason="compiled ops not built")


def model_and_batch(batch=5, classes=4):
    gen = torch.Generator().manual_seed(0)
    d = math.prod(SHAPE)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, classes),
    ).double()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 1.5 / 4)
    x = torch.randn(batch, *SHAPE, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    ids = torch.tensor([3, 11, 0, 42, 7])[:batch]
    return model.eval(), x, y, ids


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")  # (B,)


def grad(model, x, y, create_graph=False):
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(loss_of(model, x, y).sum(), x, create_graph=create_graph)[0], x


def per_probe(method, model, x, y, ids, n, h, offset=0, mask=None):
    """(a, t, f) each (n, B): ||dg_k|| / h, r_k . dg_k / h and ||dg_k||^2 / h^2 by hand."""
    m = torch.ones(x.shape[:2], dtype=x.dtype) if mask is None else mask.to(x.dtype)
    m = m.view(*m.shape, *[1] * (x.dim() - 2))  # (B, p, 1...)
    r = m * rademacher(SEED, ids, n, x.shape[1:], offset, 0, x.dtype)  # (n, B, ...)
    g0, _ = grad(model, x, y)
    a, t, f = [], [], []
    for k in range(n):
        if method == "fd":
            dg = m * (grad(model, x + h * r[k], y)[0] - g0) / h
        else:  # hvp: H r_k by double backward
            g, leaf = grad(model, x, y, create_graph=True)
            dg = m * torch.autograd.grad((g * r[k]).sum(), leaf)[0]
        norm = torch.linalg.vector_norm(dg.flatten(1), dim=1)
        a.append(norm)
        t.append((r[k] * dg).flatten(1).sum(1))
        f.append(norm * norm)
    return torch.stack(a), torch.stack(t), torch.stack(f)


def per_probe_zo(model, x, y, ids, n, h):
    """(|bilinear|, trace, bilinear^2) each (n, B) from the four loss values per probe pair."""
    r = rademacher(SEED, ids, n, x.shape[1:], 0, 0, x.dtype)
    s = rademacher(SEED, ids, n, x.shape[1:], 0, 1, x.dtype)
    a, t, f = [], [], []
    with torch.no_grad():
        base = loss_of(model, x, y)
        for k in range(n):
            pp, mp = (
                loss_of(model, x + h * r[k] + h * s[k], y),
                loss_of(model, x - h * r[k] + h * s[k], y),
            )
            pm, mm = (
                loss_of(model, x + h * r[k] - h * s[k], y),
                loss_of(model, x - h * r[k] - h * s[k], y),
            )
            bilinear = (pp - mp - pm + mm) / (4 * h * h)
            a.append(bilinear.abs())
            t.append((pp + mp + pm + mm - 4 * base) / (4 * h * h))
            f.append(bilinear * bilinear)
    return torch.stack(a), torch.stack(t), torch.stack(f)


def stderr(values):
    """std(ddof 1) / sqrt(n) over dim 0, 0 when n == 1: the formula, written out."""
    n = values.shape[0]
    if n == 1:
        return torch.zeros(values.shape[1:], dtype=values.dtype)
    mean = values.mean(0)
    return (((values - mean) ** 2).sum(0) / (n - 1)).sqrt() / math.sqrt(n)


def check(out, a, t, f):
    want = {
        "curvature": a.mean(0),
        "curvature_stderr": stderr(a),
        "trace": t.mean(0),
        "trace_stderr": stderr(t),
        "frobenius_sq": f.mean(0),
    }
    for name, value in want.items():
        torch.testing.assert_close(getattr(out, name), value, **EXACT, msg=name)


BACKENDS = ["torch", pytest.param("kernels", marks=kernels)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["fd", "hvp"])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_statistics_of_fd_and_hvp(method, n, backend):
    model, x, y, ids = model_and_batch()
    h = 1e-3
    scorer = CurvatureScorer(model, h=h, n_probes=n, seed=SEED, method=method, backend=backend)
    out = scorer.score(x, y, ids)
    check(out, *per_probe(method, model, x, y, ids, n, h))
    assert out.n_probes.tolist() == [n] * len(ids)
    if n == 1:
        assert bool((out.curvature_stderr == 0).all()) and bool((out.trace_stderr == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_with_a_probe_mask(backend):
    model, x, y, ids = model_and_batch()
    mask = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    h, n = 1e-3, 4
    scorer = CurvatureScorer(model, h=h, n_probes=n, seed=SEED, backend=backend)
    out = scorer.score(x, y, ids, probe_mask=mask)
    check(out, *per_probe("fd", model, x, y, ids, n, h, mask=mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 3])
def test_statistics_of_zo(n, backend):
    model, x, y, ids = model_and_batch()
    h = 1e-2
    scorer = CurvatureScorer(model, h=h, n_probes=n, seed=SEED, method="zo", backend=backend)
    check(scorer.score(x, y, ids), *per_probe_zo(model, x, y, ids, n, h))


def adaptive_by_hand(a, n_probes, max_probes, rtol):
    """(probes, curvature, stderr) per sample: rounds of n_probes until stderr <= rtol * mean."""
    probes, curvature, error = [], [], []
    for b in range(a.shape[1]):
        n = 0
        while True:
            n = min(n + n_probes, max_probes)
            mean, se = a[:n, b].mean(), stderr(a[:n, b : b + 1])[0]
            if n >= max_probes or (n >= 2 and se <= rtol * mean):
                break
        probes.append(n)
        curvature.append(mean)
        error.append(se)
    return probes, torch.stack(curvature), torch.stack(error)


# (n_probes, max_probes, rtol): rtol between the samples' relative errors, so that they stop at
# different rounds (with n_probes = 1 the first round gives no error estimate and never stops).
ADAPTIVE = [(2, 12, 0.12), (1, 8, 0.25)]


@pytest.mark.parametrize("max_batch", [None, 10])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_probes, max_probes, rtol", ADAPTIVE)
def test_adaptive_stopping_rule(n_probes, max_probes, rtol, backend, max_batch):
    model, x, y, ids = model_and_batch()
    h = 1e-3
    a, t, f = per_probe("fd", model, x, y, ids, max_probes, h)
    # No ratio within 1e-6 of rtol, so that the decisions do not hang on rounding.
    ratios = torch.stack([stderr(a[:n]) / a[:n].mean(0) for n in range(2, max_probes + 1)])
    assert bool(((ratios - rtol).abs() > 1e-6 * rtol).all())
    probes, curvature, error = adaptive_by_hand(a, n_probes, max_probes, rtol)
    assert len(set(probes)) >= 3, f"rtol should split the samples over rounds, got {probes}"
    scorer = CurvatureScorer(
        model, h=h, n_probes=n_probes, seed=SEED, rtol=rtol, max_probes=max_probes,
        max_batch=max_batch, backend=backend,
    )  # fmt: skip
    out = scorer.score(x, y, ids)
    assert out.n_probes.tolist() == probes
    torch.testing.assert_close(out.curvature, curvature, **EXACT)
    torch.testing.assert_close(out.curvature_stderr, error, **EXACT)
    # The other statistics over the same probes, each sample's own count of them.
    for b, n in enumerate(probes):
        want = {
            "trace": t[:n, b].mean(),
            "trace_stderr": stderr(t[:n, b : b + 1])[0],
            "frobenius_sq": f[:n, b].mean(),
        }
        for name, value in want.items():
            torch.testing.assert_close(getattr(out, name)[b], value, **EXACT, msg=f"{name}[{b}]")


@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
def test_classification_fields(method):
    """margin, p_label, correct and el2n of the unperturbed logits (DESIGN section 9)."""
    model, x, y, ids = model_and_batch()
    y = y.clone()
    with torch.no_grad():
        logits = model(x)  # (B, C)
    y[:2] = logits[:2].argmax(1)  # rows 0, 1 right; the rest as drawn, and row 2 made wrong
    y[2] = (logits[2].argmax() + 1) % logits.shape[1]
    out = CurvatureScorer(model, n_probes=2, seed=SEED, method=method).score(x, y, ids)
    for b in range(len(y)):
        row, label = logits[b].tolist(), int(y[b])
        others = max(v for j, v in enumerate(row) if j != label)
        p = [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
        want = {
            "margin": row[label] - others,
            "p_label": p[label],
            "correct": float(max(range(len(row)), key=row.__getitem__) == label),
            "el2n": math.sqrt(sum((pj - (j == label)) ** 2 for j, pj in enumerate(p))),
        }
        for name, value in want.items():
            got = getattr(out, name)[b]
            torch.testing.assert_close(got, torch.tensor(value, dtype=got.dtype), **EXACT,
                                       msg=f"{name}[{b}]")  # fmt: skip
    assert set(out.correct.tolist()) == {0.0, 1.0}
