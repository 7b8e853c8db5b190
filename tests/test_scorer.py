"""CurvatureScorer: agreement with the published algorithm, invariances, and its contract."""

import warnings

import pytest
import torch
from torch import nn

import curvkern
from curvkern import CurvatureScorer, CurvatureScores, reference, torch_ops

from .conftest import CUDA, PoisonedRows, labelled_batch, requires_kernels, smooth_classifier
from .probe_stats import stats_tolerance

# float64 throughout unless a test is about float32: differences between two computations of
# the same scores are then rounding of order 1e-16 amplified by 1 / h, far below the 1e-8
# relative tolerance used, while a wrong probe, id or scaling changes the scores at order one.
EXACT = dict(rtol=1e-8, atol=1e-12)


def small_cnn(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 4 * 4, 5),
    ).to(dtype)


@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
def test_backends_agree(method):
    model = smooth_classifier()
    x, y = labelled_batch(10)
    kw = dict(method=method, n_probes=6, seed=4, h=1e-3 if method != "zo" else 1e-2)
    a = CurvatureScorer(model, backend="kernels", **kw).score(x, y)
    b = CurvatureScorer(model, backend="torch", **kw).score(x, y)
    for field, value in a.to_dict().items():
        torch.testing.assert_close(value, getattr(b, field), equal_nan=True, **EXACT)


def test_paper_score_equals_published_algorithm():
    model = small_cnn().eval()
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (12,))
    h, n = 1e-3, 5
    scores = CurvatureScorer(model, h=h, n_probes=n, seed=9).score(x, y)
    probes = torch_ops.rademacher(9, torch.arange(12), n, x.shape[1:], dtype=torch.float64)
    curv, eig = reference.paper_curvature(model, x, y, h=h, n_probes=n, probes=probes)
    # The published probe is h (r + 1e-7): relative differences of order 1e-7 sqrt(D).
    torch.testing.assert_close(scores.paper_score(12), curv, rtol=1e-4, atol=0)
    scale = eig.abs().max()
    torch.testing.assert_close(h * h / 12 * scores.trace, eig, rtol=0, atol=1e-4 * scale)


def test_paper_score_float32_relu():
    # The published setting: a ReLU CNN in float32. Both compute g(x + h r) - g(x) in float32,
    # with rounding of order 1e-7 ||g|| / (h ||H r||) ~ 1e-3 relative.
    model = small_cnn(torch.float32).eval()
    x = torch.randn(16, 3, 8, 8)
    y = torch.randint(0, 5, (16,))
    scores = CurvatureScorer(model, n_probes=4, seed=1).score(x, y)
    probes = torch_ops.rademacher(1, torch.arange(16), 4, x.shape[1:])
    curv, _ = reference.paper_curvature(model, x, y, 1e-3, 4, probes=probes)
    torch.testing.assert_close(scores.paper_score(16), curv, rtol=2e-2, atol=0)


def test_independent_of_batch_mates_order_and_max_batch():
    model = smooth_classifier()
    x, y = labelled_batch(12)
    ids = torch.arange(100, 112)
    ref = CurvatureScorer(model, n_probes=7, seed=2).score(x, y, ids)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    cases = {
        "shuffled": (perm, {}),
        "half batch": (perm[:6], {}),
        "one sample": (perm[:1], {}),
        "max_batch=5": (perm, {"max_batch": 5}),
        "max_batch=1": (perm, {"max_batch": 1}),
        "max_batch=200": (perm, {"max_batch": 200}),
    }
    for name, (index, kw) in cases.items():
        got = CurvatureScorer(model, n_probes=7, seed=2, **kw).score(x[index], y[index], ids[index])
        for field, value in got.to_dict().items():
            torch.testing.assert_close(
                value, getattr(ref, field)[index], msg=f"{name}: {field}", **EXACT
            )


def test_ids_select_the_probes():
    model = smooth_classifier()
    x, y = labelled_batch(4)
    same = CurvatureScorer(model, n_probes=3).score(x, y, torch.arange(4))
    default = CurvatureScorer(model, n_probes=3).score(x, y)
    other = CurvatureScorer(model, n_probes=3).score(x, y, torch.arange(4) + 1)
    torch.testing.assert_close(same.curvature, default.curvature, rtol=0, atol=0)
    assert not torch.allclose(same.curvature, other.curvature, rtol=1e-3)
    assert default.ids.tolist() == [0, 1, 2, 3] and other.ids.tolist() == [1, 2, 3, 4]


def test_seed_changes_scores_within_their_error():
    model = smooth_classifier()
    x, y = labelled_batch(32)
    a = CurvatureScorer(model, n_probes=32, seed=0, method="hvp").score(x, y)
    b = CurvatureScorer(model, n_probes=32, seed=1, method="hvp").score(x, y)
    assert not torch.equal(a.curvature, b.curvature)
    z = (a.curvature - b.curvature) / torch.sqrt(a.curvature_stderr**2 + b.curvature_stderr**2)
    assert z.abs().max() < 4.5  # 32 independent differences of two estimates


def test_field_shapes_dtypes_and_n_probes():
    model = smooth_classifier(dtype=torch.float32)
    x, y = labelled_batch(5, dtype=torch.float32)
    s = CurvatureScorer(model, n_probes=3).score(x, y)
    for name in curvkern.scores.SCORE_FIELDS:
        t = getattr(s, name)
        assert t.shape == (5,) and t.dtype == torch.float32, name
    assert s.ids.dtype == torch.int64 and s.n_probes.tolist() == [3] * 5
    assert set(s.to_dict()) == {*curvkern.scores.SCORE_FIELDS, "ids", "n_probes"}
    assert (s.curvature_stderr > 0).all()
    one = CurvatureScorer(model, n_probes=1).score(x, y)
    assert (one.curvature_stderr == 0).all() and (one.trace_stderr == 0).all()
    torch.testing.assert_close(s.paper_score(5), 1e-3 / 5 * s.curvature)
    torch.testing.assert_close(
        s.paper_score(torch.tensor([5, 5, 5, 2, 2])),
        1e-3 / torch.tensor([5.0, 5, 5, 2, 2]) * s.curvature,
    )


def test_empty_batch():
    model = smooth_classifier()
    s = CurvatureScorer(model).score(
        torch.empty(0, 6, dtype=torch.float64), torch.empty(0, dtype=torch.long)
    )
    assert len(s) == 0 and s.curvature.shape == (0,) and s.curvature.dtype == torch.float64


def test_scores_concatenate_and_index():
    model = smooth_classifier()
    x, y = labelled_batch(6)
    s = CurvatureScorer(model, n_probes=2).score(x, y)
    joined = CurvatureScores.cat([s[:2], s[2:]])
    for field, value in joined.to_dict().items():
        assert torch.equal(value, getattr(s, field))
    other_h = CurvatureScorer(model, n_probes=2, h=1e-2).score(x, y)
    with pytest.raises(ValueError, match="different h or method"):
        CurvatureScores.cat([s, other_h])


# --- the model is left exactly as found ------------------------------------------------------


def _snapshot(model):
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [p.grad for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(a is b for a, b in zip(after["grad"], before["grad"], strict=True))
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def _prepared_model():
    model = small_cnn()
    model.train()
    model[1].eval()  # a mix of flags
    model[0].weight.requires_grad_(False)
    model[6].weight.grad = torch.ones_like(model[6].weight)
    with torch.no_grad():
        model[1].running_mean.uniform_()
    return model


@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
def test_model_left_as_found(method):
    model = _prepared_model()
    before = _snapshot(model)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    a = CurvatureScorer(model, method=method, n_probes=2).score(x, y)
    _assert_unchanged(model, before)
    # eval mode: dropout off and BatchNorm on running statistics, so scores are deterministic
    b = CurvatureScorer(model, method=method, n_probes=2).score(x, y)
    torch.testing.assert_close(a.curvature, b.curvature, rtol=0, atol=0)


def test_model_left_as_found_after_an_exception():
    model = _prepared_model()
    before = _snapshot(model)
    calls = []

    def failing_loss(out, y):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("loss failed mid-way")
        return nn.functional.cross_entropy(out, y, reduction="none")

    with pytest.raises(RuntimeError, match="loss failed mid-way"):
        CurvatureScorer(model, failing_loss, n_probes=3).score(
            torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
        )
    assert len(calls) == 2
    _assert_unchanged(model, before)


class _CountingModel(nn.Module):
    """Changes a buffer in forward, as some custom modules do, even in eval mode."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3).double()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.linear(x)


def test_buffers_restored():
    # A forward that changes a buffer is refused, naming it (every pass would see another
    # model), and the buffer is put back.
    model = _CountingModel()
    x, y = labelled_batch(3, classes=3)
    with pytest.raises(RuntimeError, match=r"changed its buffer 'calls' \(from 1 to 3\)"):
        CurvatureScorer(model, n_probes=2).score(x, y)
    assert model.calls.item() == 0


def test_plain_callable_and_custom_loss():
    weight = torch.randn(6, 3, dtype=torch.float64)

    def model(x):
        return torch.tanh(x @ weight)

    def loss_fn(out, target):  # a regression loss with (B, 3) targets
        return ((out - target) ** 2).sum(dim=1)

    x = torch.randn(5, 6, dtype=torch.float64)
    target = torch.randn(5, 3, dtype=torch.float64)
    s = CurvatureScorer(model, loss_fn, method="hvp", n_probes=4).score(x, target)
    hess = reference.input_hessians(model, x, target, loss_fn)
    assert (s.curvature > 0).all()
    z = (s.trace - reference.hessian_trace(hess)) / reference.standard_error(
        reference.hutchinson_variance(hess), 4
    )
    assert z.abs().max() < 4.5


def test_grad_mode_and_inference_mode():
    model = smooth_classifier()
    x, y = labelled_batch(4)
    ref = CurvatureScorer(model, n_probes=2).score(x, y)
    with torch.no_grad():
        a = CurvatureScorer(model, n_probes=2).score(x, y)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        b = CurvatureScorer(model, n_probes=2).score(xi, yi)
    torch.testing.assert_close(a.curvature, ref.curvature, rtol=0, atol=0)
    torch.testing.assert_close(b.curvature, ref.curvature, rtol=0, atol=0)


# --- losses without per-sample values or input gradients, non-finite samples -----------------


def test_loss_fn_must_return_per_sample_losses():
    model = smooth_classifier()
    x, y = labelled_batch(4)
    with pytest.raises(ValueError, match=r"one loss per sample, shape \(4,\), got \(\)"):
        CurvatureScorer(model, nn.CrossEntropyLoss()).score(x, y)
    with pytest.raises(ValueError, match=r"shape \(4,\), got \(4, 1\)"):
        CurvatureScorer(model, lambda o, t: o[:, :1]).score(x, y)


def test_model_without_input_gradient():
    frozen = lambda x: torch.zeros(x.shape[0], 3, dtype=x.dtype)  # noqa: E731
    x, y = labelled_batch(4, classes=3)
    with pytest.raises(RuntimeError, match="does not depend on x through autograd"):
        CurvatureScorer(frozen).score(x, y)
    # zo needs loss values only (and says that a constant loss has zero differences)
    with pytest.warns(UserWarning, match="4 of 4 samples .* exactly zero for every probe"):
        s = CurvatureScorer(frozen, method="zo", n_probes=2).score(x, y)
    assert torch.equal(s.curvature, torch.zeros(4, dtype=torch.float64))


@requires_kernels
@pytest.mark.parametrize("method", ["fd", "hvp"])
def test_float32_tiny_gradients_keep_their_curvature(method):
    # A fitted sample's float32 gradient can be 1e-24 (its softmax saturated): the squares of
    # its gradient differences underflow float32. A loss scaled by 2^-80 (exact in float32)
    # must give 2^-80 times the curvature, not 0 with a warning about h. The gradients scale
    # exactly; only the CPU kernel's float32 block sums (double for such blocks) differ.
    dim = 200
    model = smooth_classifier(sample_shape=(dim,), dtype=torch.float32)
    x, y = labelled_batch(6, sample_shape=(dim,), dtype=torch.float32)
    scale = 2.0**-80
    scaled_loss = lambda o, t: curvkern.losses.cross_entropy(o, t) * scale  # noqa: E731
    plain = CurvatureScorer(model, method=method, n_probes=3, backend="kernels").score(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny = CurvatureScorer(model, scaled_loss, method=method, n_probes=3, backend="kernels")
        tiny = tiny.score(x, y)
    assert torch.equal(tiny.grad_norm, plain.grad_norm * scale)
    rtol = stats_tolerance(torch.float32, dim)
    for field in ("curvature", "trace"):
        want = getattr(plain, field).double() * scale
        torch.testing.assert_close(getattr(tiny, field).double(), want, rtol=rtol, atol=0.0)
    # frobenius_sq ~ 2^-160 is below float32's range itself: the scores (float32, as the model)
    # hold it rounded, within half the smallest subnormal.
    want = plain.frobenius_sq.double() * scale**2
    torch.testing.assert_close(tiny.frobenius_sq.double(), want, rtol=rtol, atol=2.0**-150)


def test_non_finite_loss_gives_nan_for_that_sample_only():
    model = smooth_classifier()
    x, y = labelled_batch(5)
    x[3, 0] = 50.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = CurvatureScorer(PoisonedRows(model), n_probes=3).score(x, y)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "1 of 5 samples (first: id 3) had a non-finite loss or gradient; their scores are NaN"
    ]
    assert isinstance(caught[0].message, curvkern.SampleWarning)
    for name in curvkern.scores.SCORE_FIELDS:
        value = getattr(s, name)
        assert torch.isnan(value[3]), name
        assert torch.isfinite(value[[0, 1, 2, 4]]).all(), name
    keep = [0, 1, 2, 4]
    clean = CurvatureScorer(model, n_probes=3).score(x[keep], y[keep], keep)
    torch.testing.assert_close(s.curvature[keep], clean.curvature, **EXACT)


# --- backends and memory ---------------------------------------------------------------------


def test_kernels_backend_errors_where_missing(monkeypatch):
    from curvkern import scorer as scorer_module

    monkeypatch.setattr(scorer_module, "kernels_available", lambda device: False)
    model = smooth_classifier()
    x, y = labelled_batch(3)
    with pytest.raises(RuntimeError, match="backend='kernels'"):
        CurvatureScorer(model, backend="kernels").score(x, y)
    auto = CurvatureScorer(model, n_probes=2)
    with pytest.warns(UserWarning, match="Falling back to backend='torch'") as caught:
        a = auto.score(x, y)
        auto.score(x, y)  # warned once per scorer and device
    assert len(caught) == 1
    b = CurvatureScorer(model, n_probes=2, backend="kernels")
    monkeypatch.undo()
    torch.testing.assert_close(a.curvature, b.score(x, y).curvature, **EXACT)


def test_out_of_memory_halves_the_passes():
    model = smooth_classifier()
    x, y = labelled_batch(8)
    seen = []

    def limited(inp):
        seen.append(inp.shape[0])
        if inp.shape[0] > 12:
            raise torch.cuda.OutOfMemoryError("simulated: too many rows")
        return model(inp)

    scorer = CurvatureScorer(limited, n_probes=5)
    s = scorer.score(x, y)
    assert max(seen[-6:]) <= 12
    ref = CurvatureScorer(model, n_probes=5, max_batch=8).score(x, y)
    torch.testing.assert_close(s.curvature, ref.curvature, **EXACT)
    # the budget is remembered: no further failures
    seen.clear()
    scorer.score(x, y)
    assert max(seen) <= 12
    with pytest.raises(torch.cuda.OutOfMemoryError):  # with max_batch set, no retry
        CurvatureScorer(limited, n_probes=5, max_batch=40).score(x, y)


@pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
def test_cuda_scores_match_cpu(method):
    # The same probes on both devices (one shared generator); float64 differences are rounding.
    model = smooth_classifier()
    x, y = labelled_batch(16)
    kw = dict(method=method, n_probes=6, h=1e-3 if method != "zo" else 1e-2, backend="kernels")
    cpu = CurvatureScorer(model, **kw).score(x, y)
    gpu = CurvatureScorer(model.cuda(), **kw).score(x.cuda(), y.cuda())
    for field, value in cpu.to_dict().items():
        torch.testing.assert_close(getattr(gpu, field).cpu(), value, equal_nan=True, **EXACT)


def test_hvp_in_bfloat16():
    # hvp takes no differences, so reduced precision only costs its rounding (bfloat16: 8
    # significant bits, ~4e-3 relative per operation, a few percent through a small network).
    model = smooth_classifier()
    x, y = labelled_batch(8)
    exact = CurvatureScorer(model, method="hvp", n_probes=4).score(x, y)
    low = CurvatureScorer(model.to(torch.bfloat16), method="hvp", n_probes=4).score(
        x.to(torch.bfloat16), y
    )
    assert low.curvature.dtype == torch.float32
    torch.testing.assert_close(low.curvature, exact.curvature.float(), rtol=0.05, atol=0)


def test_full_float32_precision_while_differencing():
    # TF32 (or bf16) float32 arithmetic rounds at ~5e-4, the size of the finite differences:
    # fd and zo score in IEEE float32 and leave the caller's settings as they were.
    from curvkern.scorer import ieee_float32

    backends = torch.backends
    before = {
        "cudnn.conv": backends.cudnn.conv.fp32_precision,
        "mkldnn.conv": backends.mkldnn.conv.fp32_precision,
        "mkldnn.matmul": backends.mkldnn.matmul.fp32_precision,
    }
    with ieee_float32("cuda"):
        assert backends.cudnn.conv.fp32_precision == "ieee"
        assert backends.cuda.matmul.fp32_precision == "ieee"
    assert backends.cudnn.conv.fp32_precision == before["cudnn.conv"]

    seen = []
    model = smooth_classifier(dtype=torch.float32)

    def recording(x):
        seen.append((backends.mkldnn.conv.fp32_precision, backends.mkldnn.matmul.fp32_precision))
        return model(x)

    x, y = labelled_batch(3, dtype=torch.float32)
    backends.mkldnn.matmul.fp32_precision = "tf32"
    try:
        for method in ("fd", "zo"):
            seen.clear()
            CurvatureScorer(recording, method=method, n_probes=2).score(x, y)
            assert set(seen) == {("ieee", "ieee")}, method
            assert backends.mkldnn.matmul.fp32_precision == "tf32"
        seen.clear()
        CurvatureScorer(recording, method="hvp", n_probes=2).score(x, y)  # precision="fp32"
        assert set(seen) == {("ieee", "ieee")}
        assert backends.mkldnn.matmul.fp32_precision == "tf32"
    finally:
        backends.mkldnn.matmul.fp32_precision = before["mkldnn.matmul"]
