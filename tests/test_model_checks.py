"""What the model check watches during its check pass (curvkern.checks.ModelCheck): reduced
precision inside forward, randomness that eval mode does not switch off, state changed by
forward; and the scorer-side cases that must give the right number or one clear sentence
(in-place writes into x, an all-zero probe mask, inputs and models the scorer cannot take)."""

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkern import CurvatureScorer, SampleWarning
from curvkern.checks import FD_RESOLVE

from .conftest import labelled_batch, small_cnn, smooth_classifier, tiny_bert

METHODS = ["fd", "hvp", "zo"]


def images(batch=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, 8, 8, generator=gen, dtype=dtype)
    return x, torch.randint(0, 4, (batch,), generator=gen)


# --- reduced precision inside forward -------------------------------------------------------


class AutocastInside(nn.Module):
    """A float32 model whose forward runs its body in a bfloat16 autocast region."""

    def __init__(self):
        super().__init__()
        self.body = smooth_classifier(dtype=torch.float32)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.body(x).float()


def accelerate_style():
    """What accelerate does to model.forward with mixed precision: the bound forward wrapped
    in autocast (and its output converted back to float32)."""
    model = smooth_classifier(dtype=torch.float32)
    inner = model.forward

    def forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return inner(*args, **kwargs).float()

    model.forward = forward
    return model


@pytest.mark.parametrize("make", [AutocastInside, accelerate_style], ids=["region", "wrapped"])
@pytest.mark.parametrize("method", ["fd", "zo"])
def test_reduced_precision_inside_forward_is_refused(make, method):
    x, y = labelled_batch(8, dtype=torch.float32)
    scorer = CurvatureScorer(make(), method=method, n_probes=2)
    with pytest.raises(RuntimeError, match=r"computes in torch.bfloat16 inside its forward") as e:
        scorer.score(x, y)
    assert "float32 model and forward" in str(e.value) and "method='hvp'" in str(e.value)


def test_accelerate_mixed_precision_is_refused_and_unwrapping_fixes_it():
    accelerate = pytest.importorskip("accelerate")
    # accelerate's state is process-wide (a Trainer run earlier leaves its own): start afresh,
    # and leave none for the tests after this one
    accelerate.state.AcceleratorState._reset_state(True)
    x, y = labelled_batch(8, dtype=torch.float32)
    try:
        accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
        prepared = accelerator.prepare(smooth_classifier(dtype=torch.float32))
        with pytest.raises(RuntimeError, match=r"computes in torch.bfloat16.*unwrap_model"):
            CurvatureScorer(prepared, n_probes=2).score(x, y)
        # the fix the message gives: the float32 forward of the same weights
        unwrapped = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    finally:
        accelerate.state.AcceleratorState._reset_state(True)
    got = CurvatureScorer(unwrapped, n_probes=2).score(x, y).curvature
    want = CurvatureScorer(smooth_classifier(dtype=torch.float32), n_probes=2).score(x, y)
    torch.testing.assert_close(got, want.curvature)


def test_reduced_precision_inside_forward_with_hvp_needs_precision_bf16():
    x, y = labelled_batch(8, dtype=torch.float32)
    scorer = CurvatureScorer(AutocastInside(), method="hvp", n_probes=2)
    with pytest.raises(RuntimeError, match=r"precision='fp32'.*Pass precision='bf16'"):
        scorer.score(x, y)
    # the scorer's reduced-precision mode for hvp admits it
    s = CurvatureScorer(AutocastInside(), method="hvp", n_probes=2, precision="bf16").score(x, y)
    assert torch.isfinite(s.curvature).all()


def test_float32_inside_a_float64_model_is_accepted():
    # As precise as a float32 scoring (which the scorer accepts): no refusal.
    body = smooth_classifier()

    def forward(x):
        return body(x).float().softmax(1).log().double()

    x, y = labelled_batch(8)
    s = CurvatureScorer(forward, loss_fn=lambda o, t: F.nll_loss(o, t, reduction="none")).score(
        x, y
    )
    assert torch.isfinite(s.curvature).all()


# --- randomness that eval mode does not switch off ------------------------------------------


class PerSampleErasing(nn.Module):
    """Zeroes a random 4x4 patch of a few per cent of the rows, drawn per row and per call."""

    def __init__(self, p=0.03):
        super().__init__()
        self.p = p

    def forward(self, x):
        hit = torch.rand(x.shape[0], device=x.device) < self.p
        patch = torch.zeros_like(x)
        patch[..., :4, :4] = 1
        return torch.where(hit.view(-1, 1, 1, 1) & (patch > 0), torch.zeros_like(x), x)


class InputNoise(nn.Module):
    def __init__(self, std=1e-3):
        super().__init__()
        self.std = std

    def forward(self, x):
        return x + self.std * torch.randn_like(x)


def random_models():
    from torchvision.transforms import v2

    return {
        "flip": lambda: nn.Sequential(v2.RandomHorizontalFlip(), small_cnn()),
        "erasing": lambda: nn.Sequential(PerSampleErasing(0.03), small_cnn()),
        "noise": lambda: nn.Sequential(InputNoise(1e-3), small_cnn()),
    }


@pytest.mark.parametrize("case", ["flip", "erasing", "noise"])
@pytest.mark.parametrize("method", METHODS)
def test_randomness_is_refused_every_time(case, method):
    x, y = images()
    for _ in range(10):  # fresh scorers: a refusal that depends on luck fails here
        scorer = CurvatureScorer(random_models()[case](), method=method, n_probes=2)
        with pytest.raises(RuntimeError, match="the model is random at scoring time") as e:
            scorer.score(x, y)
        assert "depends on the other rows" not in str(e.value)


class PrivateNoise(nn.Module):
    """Input noise from a generator torch does not see (numpy's, not the global one)."""

    def __init__(self, body, std):
        super().__init__()
        self.body, self.std = body, std
        self.rng = np.random.default_rng(0)

    def forward(self, x):
        noise = torch.from_numpy(self.rng.standard_normal(tuple(x.shape)))
        return self.body(x + self.std * noise.to(x.dtype))


def test_randomness_outside_torch_is_seen_in_the_gradients():
    # Noise of std s adds about sqrt(2) s |H e| to a gradient difference of h |H r| (e, r of
    # unit variance): refused where that is 20 times FD_RESOLVE, accepted (and the scores right
    # to FD_RESOLVE) where it is FD_RESOLVE / 20.
    h = 1e-3
    x, y = labelled_batch(8)
    clean = CurvatureScorer(smooth_classifier(), n_probes=4, h=h).score(x, y).curvature
    loud = PrivateNoise(smooth_classifier(), 20 * FD_RESOLVE * h / math.sqrt(2))
    with pytest.raises(RuntimeError, match="random at scoring time.*two evaluations"):
        CurvatureScorer(loud, n_probes=4, h=h).score(x, y)
    quiet = PrivateNoise(smooth_classifier(), FD_RESOLVE * h / 20 / math.sqrt(2))
    s = CurvatureScorer(quiet, n_probes=4, h=h).score(x, y)
    assert ((s.curvature - clean).abs() / clean).max() < FD_RESOLVE


def test_python_global_randomness_is_refused():
    body = smooth_classifier()

    def noisy(x):
        noise = torch.from_numpy(np.random.standard_normal(tuple(x.shape)))  # noqa: NPY002
        return body(x + 1e-9 * noise)

    x, y = labelled_batch(8)
    with pytest.raises(RuntimeError, match="random at scoring time.*numpy's global random"):
        CurvatureScorer(noisy, n_probes=2).score(x, y)


# --- state changed by forward ---------------------------------------------------------------


class Annealed(nn.Module):
    """A call counter that anneals a temperature."""

    def __init__(self):
        super().__init__()
        self.body = smooth_classifier()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return self.body(x) / (1 + 0.1 * self.calls)


class EmaNormalized(nn.Module):
    """An input normalizer whose running mean is updated in every forward."""

    def __init__(self):
        super().__init__()
        self.body = smooth_classifier()
        self.register_buffer("mean", torch.zeros(6, dtype=torch.float64))

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.99).add_(0.01 * x.mean(0))
        return self.body(x - self.mean)


class LazyCache(nn.Module):
    """Fills a buffer on its first forward and reads it afterwards (a lazily built cache)."""

    def __init__(self):
        super().__init__()
        self.body = smooth_classifier()
        self.register_buffer("scale", torch.zeros(6, dtype=torch.float64), persistent=False)

    def forward(self, x):
        if not bool(self.scale.any()):
            self.scale.copy_(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))
        return self.body(x * self.scale)


def test_a_buffer_filled_once_by_the_first_forward_is_not_a_change():
    x, y = labelled_batch(8)
    s = CurvatureScorer(LazyCache(), n_probes=2).score(x, y)
    assert torch.isfinite(s.curvature).all()


@pytest.mark.parametrize("method", METHODS)
def test_state_changed_by_forward_is_refused_and_put_back(method):
    x, y = labelled_batch(8)
    for model, name in ((Annealed(), "calls"), (EmaNormalized(), "mean")):
        before = getattr(model, name).clone()
        with pytest.raises(RuntimeError, match=rf"forward changed its buffer '{name}'"):
            CurvatureScorer(model, method=method, n_probes=2).score(x, y)
        assert torch.equal(getattr(model, name), before)


# --- in-place writes into x -----------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_in_place_ops_on_x_leave_it_and_the_scores_right(method):
    body = smooth_classifier()

    class Halving(nn.Module):
        def __init__(self, in_place):
            super().__init__()
            self.body, self.in_place = body, in_place

        def forward(self, x):
            return self.body(x.mul_(0.5) if self.in_place else x * 0.5)

    x, y = labelled_batch(8)
    kept = x.clone()
    got = CurvatureScorer(Halving(True), method=method, n_probes=3).score(x, y)
    assert torch.equal(x, kept)
    want = CurvatureScorer(Halving(False), method=method, n_probes=3).score(x, y)
    torch.testing.assert_close(got.curvature, want.curvature, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.trace, want.trace, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_in_place_ops_on_x_at_a_layer_leave_it(method):
    body = smooth_classifier()

    class Halving(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x.mul_(0.5))

    x, y = labelled_batch(8)
    kept = x.clone()
    CurvatureScorer(Halving(), method=method, n_probes=2, at="body.2").score(x, y)
    assert torch.equal(x, kept)


# --- an all-zero probe mask -----------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_probe_mask_gives_nan_and_a_warning(method):
    x, y = labelled_batch(4)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1] = False
    with pytest.warns(SampleWarning, match=r"1 of 4 samples \(first: id 1\) have an all-zero"):
        s = CurvatureScorer(smooth_classifier(), method=method, n_probes=2).score(
            x, y, probe_mask=mask
        )
    assert int(s.n_probes[1]) == 0 and (s.n_probes[[0, 2, 3]] == 2).all()
    for field in ("curvature", "curvature_stderr", "trace", "frobenius_sq"):
        value = getattr(s, field)
        assert math.isnan(float(value[1])) and torch.isfinite(value[[0, 2, 3]]).all(), field
    assert torch.isfinite(s.loss).all()


# --- one clear sentence for what the scorer cannot take -------------------------------------


class Prototypes(nn.Module):
    """Logits = minus the distance to each class prototype (a shared (C, D) input)."""

    def forward(self, x, prototypes):
        return -torch.cdist(x, prototypes)


def test_shared_input_with_b_rows_is_named():
    x, y = labelled_batch(10)
    y = torch.arange(10)  # ten classes
    prototypes = torch.randn(10, 6, dtype=torch.float64)
    scorer = CurvatureScorer(Prototypes(), n_probes=2)
    with pytest.raises(Exception, match=r"'prototypes' \(shape \(10, 6\)\) were taken as per-samp"):
        scorer.score(x, y, prototypes=prototypes)
    # the fix the message gives
    s = CurvatureScorer(functools.partial(Prototypes(), prototypes=prototypes), n_probes=2)
    assert torch.isfinite(s.score(x, y).curvature).all()


def test_meta_device():
    x, y = labelled_batch(4)
    with pytest.raises(ValueError, match=r"parameter '1.weight' is on the meta device"):
        CurvatureScorer(smooth_classifier().to("meta")).score(x, y)
    with pytest.raises(ValueError, match="x is on the meta device"):
        CurvatureScorer(smooth_classifier()).score(x.to("meta"), y)


def test_y_on_another_device():
    x, y = labelled_batch(4)
    with pytest.raises(ValueError, match=r"y is on meta, x on cpu: give y on x's device"):
        CurvatureScorer(smooth_classifier()).score(x, y.to("meta"))


def test_model_input_named_y():
    body = smooth_classifier()

    class TakesY(nn.Module):
        def forward(self, x, y):
            return body(x + y)

    x, y = labelled_batch(4)
    with pytest.raises(TypeError, match=r"score\(\)'s y is the target.*functools.partial"):
        CurvatureScorer(TakesY()).score(x, y)


def test_compiled_model_with_hvp():
    x, y = labelled_batch(4, dtype=torch.float32)
    compiled = torch.compile(smooth_classifier(dtype=torch.float32))
    with pytest.raises(RuntimeError, match=r"torch.compile.*model._orig_mod.*method='fd'"):
        CurvatureScorer(compiled, method="hvp", n_probes=2).score(x, y)


def test_token_model_on_embeddings_without_input_key():
    model = tiny_bert()
    ids = torch.randint(0, 30, (4, 5))
    x = model.get_input_embeddings()(ids).detach()
    y = torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=r"input_key='inputs_embeds'"):
        CurvatureScorer(model, n_probes=2).score(x, y)
    s = CurvatureScorer(model, input_key="inputs_embeds", n_probes=2).score(x, y)
    assert torch.isfinite(s.curvature).all()


def test_loss_fn_failing_on_a_tuple_output_says_what_came():
    body = smooth_classifier()
    x, y = labelled_batch(4)
    with pytest.raises(TypeError, match=r"loss_fn\(output, y\) failed on the model's output \(a "):
        CurvatureScorer(
            lambda v: (body(v), v.sum(1)), loss_fn=nn.CrossEntropyLoss(reduction="none")
        ).score(x, y)


# --- the zero-differences warning names its real cause --------------------------------------


@pytest.mark.parametrize("method", ["fd", "zo"])
def test_zero_differences_of_ignored_labels(method):
    x, _ = labelled_batch(4)
    y = torch.full((4,), -100)
    with pytest.warns(UserWarning, match=r"labels are all -100") as caught:
        CurvatureScorer(smooth_classifier(), method=method, n_probes=2).score(x, y)
    assert not any("softmax" in str(w.message) for w in caught)


def test_zero_differences_of_a_zero_initialized_head():
    model = smooth_classifier()
    with torch.no_grad():  # as torchvision's ViT before training
        model[-1].weight.zero_()
        model[-1].bias.zero_()
    x, y = labelled_batch(4)
    with pytest.warns(UserWarning, match=r"output does not change with x") as caught:
        CurvatureScorer(model, n_probes=2).score(x, y)
    assert not any("softmax" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match=r"zero-initialized last layer"):
        CurvatureScorer(model, method="zo", n_probes=2).score(x, y)


def test_deterministic_models_pass_the_check():
    # no false alarm: float32 and float64, an MLP and a CNN, every method
    for model, (x, y) in (
        (smooth_classifier(dtype=torch.float32), labelled_batch(16, dtype=torch.float32)),
        (smooth_classifier(), labelled_batch(16)),
        (small_cnn(), images(16)),
    ):
        for method in METHODS:
            s = CurvatureScorer(model, method=method, n_probes=2).score(x, y)
            assert torch.isfinite(s.curvature).all()
