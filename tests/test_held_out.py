"""Held-out misuse: other instances of the kinds of bad input the model check and the scorer
must catch (reduced precision inside forward, randomness eval mode leaves on, state changed by
forward, in-place writes into inputs, all-zero probe masks, never-scored ids, files that mix
things, curvature at a layer, token models), on real models where they are cheap. Each case
asserts the right outcome: the score of a known-good configuration (the same probes), or an
error or warning that names the cause."""

import functools
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkern import CurvatureScorer, CurvatureTracker, SampleWarning
from curvkern.text import TokenScorer

from .conftest import labelled_batch, small_cnn, smooth_classifier, tiny_bert

METHODS = ["fd", "hvp", "zo"]
FRESH = 10  # fresh scorers per random case: a refusal that depends on luck fails


def images(batch=8, size=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 3, size, size, generator=gen, dtype=dtype)
    return x, torch.randint(0, 4, (batch,), generator=gen)


class Wrap(nn.Module):
    """body(pre(x)), with pre a function of (module, x)."""

    def __init__(self, pre, body=None):
        super().__init__()
        self.body = smooth_classifier() if body is None else body
        self.pre = pre

    def forward(self, x):
        return self.body(self.pre(self, x))


# --- reduced precision inside forward -------------------------------------------------------


class HalfRegion(nn.Module):
    """A float16 autocast region around one submodule only (not the whole forward)."""

    def __init__(self):
        super().__init__()
        self.body = smooth_classifier(dtype=torch.float32)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.float16):
            h = self.body[1](self.body[0](x))
        return self.body[2:](h.float())


class ExplicitCast(nn.Module):
    """No autocast: an explicit bfloat16 copy of the first layer's output and a bfloat16 layer."""

    def __init__(self):
        super().__init__()
        self.body = smooth_classifier(dtype=torch.float32)
        self.body[5].to(torch.bfloat16)

    def forward(self, x):
        return self.body[5](self.body[:5](x).to(torch.bfloat16)).float()


@pytest.mark.parametrize("make", [HalfRegion, ExplicitCast], ids=["fp16-region", "bf16-cast"])
@pytest.mark.parametrize("method", ["fd", "zo"])
def test_other_reduced_precision_forwards_are_refused(make, method):
    x, y = labelled_batch(8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"computes in torch\.(bfloat16|float16) inside its"):
        CurvatureScorer(make(), method=method, n_probes=2).score(x, y)


def test_resnet_under_accelerate_style_autocast():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net = models.resnet18(num_classes=4).eval()
    inner = net.forward

    def forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return inner(*args, **kwargs).float()

    net.forward = forward
    x, y = images(2, 32)
    with pytest.raises(RuntimeError, match=r"computes in torch\.bfloat16"):
        CurvatureScorer(net, n_probes=1).score(x, y)
    with pytest.raises(RuntimeError, match=r"Pass precision='bf16'"):
        CurvatureScorer(net, method="hvp", n_probes=1).score(x, y)
    s = CurvatureScorer(net, method="hvp", n_probes=1, precision="bf16").score(x, y)
    assert torch.isfinite(s.curvature).all()


@pytest.mark.parametrize("precision", [torch.bfloat16, "BF16", "bfloat16"])
def test_precision_given_otherwise_is_refused(precision):
    with pytest.raises(ValueError, match=r"precision must be one of"):
        CurvatureScorer(smooth_classifier(), method="hvp", precision=precision)


# --- randomness that eval mode does not switch off ------------------------------------------


def random_cases():
    from torchvision.transforms import v2

    private = torch.Generator().manual_seed(0)
    return {
        # torchvision transforms as modules, other than the flip the tests cover
        "random-erasing": lambda: nn.Sequential(v2.RandomErasing(p=0.5), small_cnn()),
        "gaussian-noise": lambda: nn.Sequential(v2.GaussianNoise(sigma=1e-3), small_cnn()),
        "random-affine": lambda: nn.Sequential(v2.RandomAffine(degrees=5), small_cnn()),
        # dropout that ignores the module's mode
        "functional-dropout": lambda: Wrap(lambda m, x: F.dropout(x, 0.1, training=True)),
        "stochastic-depth": lambda: Wrap(
            lambda m, x: x + _stochastic_depth(x.sum(1, keepdim=True))
        ),
        # noise from a private torch.Generator passed as generator=
        "private-generator": lambda: Wrap(
            lambda m, x: x + 1e-4 * torch.randn(x.shape, generator=private, dtype=x.dtype)
        ),
        # in-place sampling methods
        "normal_-method": lambda: Wrap(lambda m, x: x + torch.empty_like(x).normal_(0, 1e-4)),
        "uniform_-mask": lambda: Wrap(lambda m, x: x * (torch.empty_like(x).uniform_() > 0.02)),
        # other ops of torch's random family: a random feature order, a random feature subset,
        # torch.distributions
        "randperm": lambda: Wrap(lambda m, x: x[:, torch.randperm(x.shape[1])]),
        "multinomial": lambda: Wrap(
            lambda m, x: (
                x
                * torch.zeros(x.shape[1], dtype=x.dtype).index_fill(
                    0, torch.multinomial(torch.ones(x.shape[1]), x.shape[1] - 1), 1.0
                )
            )
        ),
        "distributions": lambda: Wrap(
            lambda m, x: x + 1e-4 * torch.distributions.Normal(0.0, 1.0).sample(x.shape).to(x)
        ),
        # Python's global random, one coin per call
        "python-coin": lambda: Wrap(lambda m, x: x.flip(1) if random.random() < 0.5 else x),
        # numpy's global generator, rare per-row events
        "numpy-rare-rows": lambda: Wrap(
            lambda m, x: (
                x
                * torch.from_numpy(np.random.random(x.shape[0]) > 0.03)  # noqa: NPY002
                .to(x.dtype)
                .view(-1, 1)
            )
        ),
    }


def _with_dropout():
    m = Wrap(lambda m, x: m.drop.train()(x))
    m.drop = nn.Dropout(0.1)
    return m


def _stochastic_depth(x):
    from torchvision.ops import stochastic_depth

    return stochastic_depth(x, 0.2, "row", training=True)


RANDOM = [
    "random-erasing",
    "gaussian-noise",
    "random-affine",
    "functional-dropout",
    "stochastic-depth",
    "private-generator",
    "normal_-method",
    "uniform_-mask",
    "randperm",
    "multinomial",
    "distributions",
    "python-coin",
    "numpy-rare-rows",
]


def _input_for(case):
    if case in ("random-erasing", "gaussian-noise", "random-affine"):
        return images()
    return labelled_batch(8)


@pytest.mark.parametrize("case", RANDOM)
@pytest.mark.parametrize("method", METHODS)
def test_other_randomness_is_refused_every_time(case, method):
    x, y = _input_for(case)
    for _ in range(FRESH):
        model = random_cases()[case]()
        with pytest.raises(RuntimeError, match="the model is random at scoring time") as e:
            CurvatureScorer(model, method=method, n_probes=2).score(x, y)
        assert "depends on the other rows" not in str(e.value)


def test_dropout_forced_back_into_train_mode_is_refused():
    x, y = labelled_batch(8)
    for _ in range(FRESH):
        with pytest.raises(RuntimeError, match="the model is random at scoring time"):
            CurvatureScorer(_with_dropout(), n_probes=2).score(x, y)


def test_gpt2_switched_to_train_mode_in_forward_is_refused():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.1
    )
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(config)
    inner = lm.forward

    def forward(*args, **kwargs):  # a wrapper that puts the model back into training
        lm.train()
        return inner(*args, **kwargs)

    lm.forward = forward
    ids = torch.randint(0, 40, (4, 6))
    from curvkern.losses import sequence_cross_entropy

    for _ in range(3):
        scorer = TokenScorer(lm, sequence_cross_entropy, n_probes=2)
        with pytest.raises(RuntimeError, match="random at scoring time"):
            scorer.score(ids, ids, attention_mask=torch.ones_like(ids))


def test_randomness_after_a_tapped_layer_is_refused():
    # at= a layer inside a random module: the noise after the layer changes what is scored
    class NoisyBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6).double()
            self.head = smooth_classifier()

        def forward(self, x):
            a = self.lin(x)
            return self.head(a + 1e-4 * torch.randn_like(a))

    x, y = labelled_batch(8)
    for method in METHODS:
        for _ in range(FRESH):
            with pytest.raises(RuntimeError, match="the model is random at scoring time"):
                CurvatureScorer(NoisyBlock(), method=method, n_probes=2, at="lin").score(x, y)


# --- state changed by forward ---------------------------------------------------------------


class BatchNormForcedTrain(nn.Module):
    """A BatchNorm forced into train mode inside forward: running stats move every call."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(6).double()
        self.body = smooth_classifier()

    def forward(self, x):
        self.bn.train()
        return self.body(self.bn(x))


class ShrinkingWeight(nn.Module):
    """Weight decay applied in forward (a parameter changed in place)."""

    def __init__(self):
        super().__init__()
        self.body = smooth_classifier()

    def forward(self, x):
        with torch.no_grad():
            self.body[1].weight.mul_(0.999)
        return self.body(x)


class HookEma(nn.Module):
    """An EMA of an activation kept by a forward hook, read by the next call."""

    def __init__(self):
        super().__init__()
        self.body = smooth_classifier()
        self.register_buffer("ema", torch.zeros(16, dtype=torch.float64))
        self.body[2].register_forward_hook(self._update)

    def _update(self, module, args, output):
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * output.mean(0))

    def forward(self, x):
        return self.body[3:](self.body[:3](x) - self.ema)


@pytest.mark.parametrize(
    "make, name",
    [
        (BatchNormForcedTrain, "bn.running_mean"),
        (ShrinkingWeight, "body.1.weight"),
        (HookEma, "ema"),
    ],
    ids=["bn-forced-train", "shrinking-weight", "hook-ema"],
)
@pytest.mark.parametrize("method", METHODS)
def test_other_state_changes_are_refused(make, name, method):
    x, y = labelled_batch(8)
    model = make()
    with pytest.raises(RuntimeError, match=rf"'{re_escape(name)}'|random|other rows"):
        CurvatureScorer(model, method=method, n_probes=2).score(x, y)


def re_escape(s):
    import re

    return re.escape(s)


class BatchNormWithoutRunningStats(nn.Module):
    """BatchNorm with track_running_stats=False normalizes by the pass's rows even in eval."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(6, track_running_stats=False).double()
        self.body = smooth_classifier()

    def forward(self, x):
        return self.body(self.bn(x))


@pytest.mark.parametrize("method", METHODS)
def test_batch_statistics_in_eval_mode_are_refused(method):
    x, y = labelled_batch(8)
    with pytest.raises(RuntimeError, match=r"depends on the other rows of its pass"):
        CurvatureScorer(BatchNormWithoutRunningStats(), method=method, n_probes=2).score(x, y)


@pytest.mark.xfail(
    strict=True,
    reason="documented limit (docs/method.md, What the checks cannot see): reduced precision "
    "that no torch function returns is invisible to the check; a float16 round trip through "
    "numpy inside forward gives zo curvature 8 to 11 times the float64 one, without a word",
)
def test_reduced_precision_in_numpy_is_seen():
    body = smooth_classifier()

    def through_numpy(v):
        return body(torch.from_numpy(v.detach().numpy().astype(np.float16).astype(np.float64)))

    x, y = labelled_batch(8)
    clean = CurvatureScorer(body, method="zo", n_probes=4).score(x, y).curvature
    got = CurvatureScorer(through_numpy, method="zo", n_probes=4).score(x, y).curvature
    assert ((got - clean).abs() / clean).max() < 0.1  # or a warning/error: neither comes


def test_state_change_through_a_partial_is_refused():
    ema = HookEma()
    x, y = labelled_batch(8)

    with pytest.raises(RuntimeError, match=r"'ema'"):
        CurvatureScorer(functools.partial(ema), n_probes=2).score(x, y)


class TensorAttributeCounter(nn.Module):
    """A call counter kept in a plain tensor attribute (not a registered buffer)."""

    def __init__(self):
        super().__init__()
        self.body = smooth_classifier()
        self.calls = torch.zeros((), dtype=torch.float64)

    def forward(self, x):
        self.calls += 1
        return self.body(x) / (1 + 0.1 * self.calls)


@pytest.mark.parametrize("method", METHODS)
def test_state_in_a_plain_tensor_attribute_is_named_and_put_back(method):
    # was: refused as "random at scoring time", the counter left at 3
    model = TensorAttributeCounter()
    x, y = labelled_batch(8)
    with pytest.raises(RuntimeError, match=r"changed its tensor attribute 'calls'") as e:
        CurvatureScorer(model, method=method, n_probes=2).score(x, y)
    assert "random" not in str(e.value)
    assert float(model.calls) == 0


def test_a_tensor_attribute_the_forward_only_writes_is_no_refusal():
    # an activation saved for inspection changes every call but is never read back
    class Saves(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = smooth_classifier()
            self.last = torch.zeros(())

        def forward(self, x):
            out = self.body(x)
            self.last = out.detach()
            return out

    x, y = labelled_batch(8)
    got = CurvatureScorer(Saves(), n_probes=2).score(x, y).curvature
    want = CurvatureScorer(smooth_classifier(), n_probes=2).score(x, y).curvature
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_random_loss_function_is_refused(method):
    def noisy(output, y):
        return F.cross_entropy(output + 1e-3 * torch.randn_like(output), y, reduction="none")

    x, y = labelled_batch(8)
    with pytest.raises(RuntimeError, match=r"random at scoring time.*torch\.randn_like drew"):
        CurvatureScorer(smooth_classifier(), noisy, method=method, n_probes=2).score(x, y)


# --- in-place writes into the inputs --------------------------------------------------------


class InPlaceNormalize(nn.Module):
    def __init__(self, in_place, body):
        super().__init__()
        self.body, self.in_place = body, in_place

    def forward(self, x):
        if self.in_place:
            return self.body(x.sub_(0.1).div_(2.0).clamp_(-3, 3))
        return self.body(((x - 0.1) / 2.0).clamp(-3, 3))


@pytest.mark.parametrize("method", METHODS)
def test_in_place_normalization_of_x(method):
    x, y = images(4)
    kept = x.clone()
    body = small_cnn(dtype=torch.float64)
    got = CurvatureScorer(InPlaceNormalize(True, body), method=method, n_probes=2).score(
        x.double(), y
    )
    want = CurvatureScorer(InPlaceNormalize(False, body), method=method, n_probes=2).score(
        x.double(), y
    )
    assert torch.equal(x, kept)
    torch.testing.assert_close(got.curvature, want.curvature, rtol=1e-12, atol=0)


class WritesIntoKeyword(nn.Module):
    """Scales a per-sample keyword input in place (a weight map the model normalizes)."""

    def __init__(self, in_place):
        super().__init__()
        self.body, self.in_place = smooth_classifier(), in_place

    def forward(self, x, weight):
        w = weight.mul_(2.0) if self.in_place else weight * 2.0
        return self.body(x * w)


IN_PLACE = r"forward writes into its input '{}' in place"


@pytest.mark.parametrize("method", METHODS)
def test_in_place_write_into_a_per_sample_keyword_is_named(method):
    # was: refused as "random at scoring time"
    x, y = labelled_batch(6)
    weight = torch.linspace(0.5, 1.5, 36, dtype=torch.float64).view(6, 6)
    kept = weight.clone()
    with pytest.raises(RuntimeError, match=IN_PLACE.format("weight")) as e:
        CurvatureScorer(WritesIntoKeyword(True), method=method, n_probes=2).score(
            x, y, weight=weight
        )
    assert "random" not in str(e.value)
    assert torch.equal(weight, kept)
    s = CurvatureScorer(WritesIntoKeyword(False), method=method, n_probes=2).score(
        x, y, weight=weight
    )
    assert torch.isfinite(s.curvature).all()


@pytest.mark.parametrize("method", METHODS)
def test_in_place_write_into_a_shared_keyword_is_named_and_put_back(method):
    # was: refused as "random at scoring time", with the caller's tensor multiplied by 8
    class Scales(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = smooth_classifier()

        def forward(self, x, scale):
            return self.body(x * scale.mul_(2.0))

    x, y = labelled_batch(5)
    scale = torch.ones(6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=IN_PLACE.format("scale")):
        CurvatureScorer(Scales(), method=method, n_probes=2).score(x, y, scale=scale)
    assert torch.equal(scale, torch.ones(6, dtype=torch.float64))


def test_an_in_place_op_that_leaves_a_keyword_input_as_it_was_is_no_refusal():
    class Clamps(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = smooth_classifier()

        def forward(self, x, weight):
            return self.body(x * weight.clamp_(0, 1))  # a 0/1 weight: the same values

    x, y = labelled_batch(6)
    weight = (torch.arange(36).view(6, 6) % 3 > 0).double()
    got = CurvatureScorer(Clamps(), n_probes=2).score(x, y, weight=weight).curvature
    body = smooth_classifier()
    want = CurvatureScorer(lambda v, weight: body(v * weight), n_probes=2)
    torch.testing.assert_close(got, want.score(x, y, weight=weight).curvature, rtol=0, atol=0)


# --- all-zero probe masks -------------------------------------------------------------------


def test_all_zero_float_mask_and_its_tracker_mean():
    x, y = labelled_batch(5)
    mask = torch.ones(5, 6, dtype=torch.float64)
    mask[3] = 0.0
    scorer = CurvatureScorer(smooth_classifier(), n_probes=2)
    with pytest.warns(SampleWarning, match=r"id 3\) have an all-zero"):
        s = scorer.score(x, y, probe_mask=mask)
    assert int(s.n_probes[3]) == 0 and math.isnan(float(s.curvature[3]))
    # a tracker whose first epoch scored sample 3 and second did not: the mean is the first's
    full = scorer.score(x, y)
    tracker = CurvatureTracker(scorer, 5)
    tracker.record(0, full)
    with pytest.warns(UserWarning, match="left 1 of 5 ids"):
        tracker.record(1, s)
    assert float(tracker.mean[3]) == pytest.approx(float(full.curvature[3]), rel=1e-12)


def test_fully_padded_sequence_in_a_token_scorer():
    model = tiny_bert()
    ids = torch.randint(1, 30, (3, 5))
    attention = torch.ones_like(ids)
    attention[1] = 0  # sample 1 is padding only
    y = torch.tensor([0, 1, 2])
    with pytest.warns(SampleWarning, match=r"id 1\)"):
        s = TokenScorer(model, n_probes=2).score(ids, y, attention_mask=attention)
    assert int(s.n_probes[1]) == 0 and math.isnan(float(s.curvature[1]))
    assert torch.isfinite(s.curvature[[0, 2]]).all()


# --- never-scored ids -----------------------------------------------------------------------


def test_unscored_ids_rank_last_in_top_and_baselines():
    scorer = CurvatureScorer(smooth_classifier(), n_probes=2)
    x, y = labelled_batch(6)
    s = scorer.score(x, y)
    tracker = CurvatureTracker(scorer, 10)  # ids 6 .. 9 never scored
    from curvkern.scores import CurvatureScores  # noqa: F401

    with pytest.warns(UserWarning, match="left 4 of 10 ids"):
        tracker.record(0, _padded(s, 10))
    top = tracker.top(6)
    assert sorted(top.indices.tolist()) == list(range(6))
    with pytest.raises(ValueError, match=r"k must lie in \[0, 6\]"):
        tracker.top(7)


def _padded(scores, n):
    import dataclasses

    fields = {}
    for f in dataclasses.fields(scores):
        v = getattr(scores, f.name)
        if isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == scores.curvature.shape[0]:
            pad = torch.full((n - v.shape[0],), float("nan") if v.is_floating_point() else 0)
            if f.name == "ids":
                pad = torch.arange(v.shape[0], n)
            fields[f.name] = torch.cat([v, pad.to(v.dtype)])
        else:
            fields[f.name] = v
    return type(scores)(**fields)


# --- files that mix things ------------------------------------------------------------------


def test_record_refuses_scores_of_another_loss_function():
    x, y = labelled_batch(6)
    mine = CurvatureScorer(smooth_classifier(), n_probes=2)
    other = CurvatureScorer(
        smooth_classifier(), lambda o, t: F.multi_margin_loss(o, t, reduction="none"), n_probes=2
    )
    tracker = CurvatureTracker(mine, 6)
    with pytest.raises(ValueError, match="loss_fn"):
        tracker.record(0, other.score(x, y))


def test_record_refuses_scores_of_another_n_probes_or_method():
    # (another seed is not refused: other probes of the same distribution average correctly)
    x, y = labelled_batch(6)
    tracker = CurvatureTracker(CurvatureScorer(smooth_classifier(), n_probes=2), 6)
    with pytest.raises(ValueError, match="n_probes = 3"):
        tracker.record(0, CurvatureScorer(smooth_classifier(), n_probes=3).score(x, y))
    with pytest.raises(ValueError, match="method = 'zo'"):
        tracker.record(0, CurvatureScorer(smooth_classifier(), method="zo", n_probes=2).score(x, y))


# --- curvature at a layer -------------------------------------------------------------------


def test_dict_layer_whose_first_tensor_is_unused():
    # The module returns {"aux": ..., "main": ...}; forward uses only "main". Perturbing "aux"
    # gives zero curvature: that must not pass without a word.
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6).double()
            self.b = nn.Linear(6, 6).double()

        def forward(self, x):
            return {"aux": self.a(x), "main": self.b(x)}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = TwoHeads()
            self.body = smooth_classifier()

        def forward(self, x):
            return self.body(self.heads(x)["main"])

    x, y = labelled_batch(6)
    # was: "loss_fn(model(x), y) does not depend on x through autograd ... (a detach(), numpy
    # round trip ...)", which names neither the layer nor the entry perturbed
    for method in ("fd", "hvp"):
        with pytest.raises(RuntimeError, match=r"at='heads'.*entry 'aux' of a dict"):
            CurvatureScorer(Net(), method=method, n_probes=2, at="heads").score(x, y)
    # zo differences only losses: every one is exactly zero, which its warning says
    with pytest.warns(
        UserWarning, match=r"differences exactly zero.*does not change with x.*at='heads'"
    ):
        s = CurvatureScorer(Net(), method="zo", n_probes=2, at="heads").score(x, y)
    assert (s.curvature == 0).all()


class LstmClassifier(nn.Module):
    """Classifies by the LSTM's final hidden state, not its output sequence."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(6, 8, batch_first=True).double()
        self.head = nn.Linear(8, 4).double()

    def forward(self, x):
        _, (hidden, _) = self.lstm(x)
        return self.head(hidden[-1])


def test_lstm_tapped_where_its_output_sequence_is_unused():
    x = torch.randn(6, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 4
    for method in ("fd", "hvp"):
        with pytest.raises(RuntimeError, match=r"at='lstm'.*entry 0 of a tuple"):
            CurvatureScorer(LstmClassifier(), method=method, n_probes=2, at="lstm").score(x, y)
    with pytest.warns(UserWarning, match=r"differences exactly zero"):
        CurvatureScorer(LstmClassifier(), method="zo", n_probes=2, at="lstm").score(x, y)


def test_probe_mask_at_a_layer_is_in_the_activation_shape():
    x, y = labelled_batch(8)
    scorer = CurvatureScorer(smooth_classifier(), n_probes=2, at="2")
    x_shaped = torch.ones(8, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"probe_mask must have shape .*\(8, 16\).*got \(8, 6\)"):
        scorer.score(x, y, probe_mask=x_shaped)
    mask = torch.ones(8, 16, dtype=torch.bool)
    mask[2] = False
    with pytest.warns(SampleWarning, match=r"id 2\) have an all-zero"):
        s = scorer.score(x, y, probe_mask=mask)
    assert int(s.n_probes[2]) == 0 and math.isnan(float(s.curvature[2]))
    full = scorer.score(x, y)
    keep = torch.arange(8) != 2
    torch.testing.assert_close(s.curvature[keep], full.curvature[keep], rtol=1e-12, atol=0)


def test_resnet_layer_followed_by_in_place_residual_and_relu():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net = models.resnet18(num_classes=4).double().eval()
    x, y = images(2, 32, dtype=torch.float64)
    # bn2 of the first block: its output is added to in place and relu'd in place afterwards
    block = net.layer1[0]
    got = CurvatureScorer(net, n_probes=2, at="layer1.0.bn2", method="hvp").score(x, y)

    with torch.no_grad():
        pre = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        a = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(pre)))))

    def tail(a, pre):
        out = torch.relu(a + pre)
        for layer in (net.layer1[1], net.layer2, net.layer3, net.layer4):
            out = layer(out)
        return net.fc(torch.flatten(net.avgpool(out), 1))

    want = CurvatureScorer(tail, n_probes=2, method="hvp").score(a, y, pre=pre)
    torch.testing.assert_close(got.curvature, want.curvature, rtol=1e-10, atol=0)


def test_mobilenet_layer_followed_by_in_place_relu6():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net = models.mobilenet_v2(num_classes=4).double().eval()
    x, y = images(2, 32, dtype=torch.float64)
    # features.0 is Conv-BN-ReLU6(inplace): perturb the BN's output, which ReLU6 overwrites
    got = CurvatureScorer(net, n_probes=2, at="features.0.1").score(x, y)
    with torch.no_grad():
        a = net.features[0][1](net.features[0][0](x))

    def tail(a):
        out = F.relu6(a)
        out = net.features[1:](out)
        return net.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    want = CurvatureScorer(tail, n_probes=2).score(a, y)
    torch.testing.assert_close(got.curvature, want.curvature, rtol=1e-9, atol=0)


def test_at_a_layer_whose_output_is_reused_is_refused_or_right():
    # The layer's output is read twice (a skip); both reads must see the perturbation
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6).double()
            self.body = smooth_classifier()

        def forward(self, x):
            a = self.lin(x)
            return self.body(a + torch.tanh(a))

    model = Skip()
    x, y = labelled_batch(6)
    got = CurvatureScorer(model, n_probes=2, at="lin").score(x, y)
    with torch.no_grad():
        a = model.lin(x)
    want = CurvatureScorer(lambda v: model.body(v + torch.tanh(v)), n_probes=2).score(a, y)
    torch.testing.assert_close(got.curvature, want.curvature, rtol=1e-9, atol=0)


# --- token models ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fd", "zo"])
def test_token_scorer_on_a_bf16_model_refuses_differences(method):
    ids = torch.randint(1, 30, (3, 5))
    y = torch.tensor([0, 1, 2])
    with pytest.raises((TypeError, RuntimeError), match=r"bfloat16"):
        TokenScorer(tiny_bert(torch.bfloat16), method=method, n_probes=2).score(
            ids, y, attention_mask=torch.ones_like(ids)
        )


def test_token_scorer_on_a_bf16_model_with_hvp():
    ids = torch.randint(1, 30, (3, 5))
    y = torch.tensor([0, 1, 2])
    s = TokenScorer(tiny_bert(torch.bfloat16), method="hvp", n_probes=2).score(
        ids, y, attention_mask=torch.ones_like(ids)
    )
    want = TokenScorer(tiny_bert(torch.float64), method="hvp", n_probes=2).score(
        ids, y, attention_mask=torch.ones_like(ids)
    )
    # bfloat16 keeps 8 bits: the scores within a few per cent, never silently far off
    rel = ((s.curvature.double() - want.curvature) / want.curvature).abs()
    assert float(rel.max()) < 0.25, rel


def test_bert_under_accelerate_style_autocast_through_token_scorer():
    model = tiny_bert(torch.float32)
    inner = model.forward

    def forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return inner(*args, **kwargs)

    model.forward = forward
    ids = torch.randint(1, 30, (3, 5))
    y = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match=r"computes in torch\.bfloat16"):
        TokenScorer(model, n_probes=2).score(ids, y, attention_mask=torch.ones_like(ids))


def test_t5_left_padded_encoder_matches_its_own_embedding_scoring():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=32,
        d_model=8,
        d_kv=4,
        d_ff=16,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(config).double().eval()
    ids = torch.randint(2, 32, (3, 6))
    attention = torch.ones_like(ids)
    attention[0, :2] = 0  # left padding
    ids[0, :2] = 0
    labels = torch.randint(2, 32, (3, 4))
    from curvkern.losses import sequence_cross_entropy

    got = TokenScorer(t5, sequence_cross_entropy, n_probes=2).score(
        ids, labels, attention_mask=attention, labels=labels
    )
    # the reference: the same sequences right-padded (the layout TokenScorer scores in; T5's
    # relative positions make the model's loss the same), scored on their embeddings
    ids[0], attention[0] = ids[0].roll(-2), attention[0].roll(-2)
    embeds = t5.get_input_embeddings()(ids).detach()

    def on_embeddings(e, attention_mask, labels):
        return t5(inputs_embeds=e, attention_mask=attention_mask, labels=labels)

    want = CurvatureScorer(on_embeddings, sequence_cross_entropy, n_probes=2).score(
        embeds, labels, attention_mask=attention, labels=labels, probe_mask=attention.bool()
    )
    torch.testing.assert_close(got.curvature, want.curvature, rtol=1e-9, atol=0)


# --- more instances: shared inputs, ViT, masks, loss identity, the command line -------------


def test_shared_class_matrix_with_b_rows_is_named():
    # A cosine classifier's (C, D) class matrix at C == B: taken as per-sample, named
    class Cosine(nn.Module):
        def forward(self, x, classes):
            return 5 * F.normalize(x, dim=1) @ F.normalize(classes, dim=1).T

    x, _ = labelled_batch(4)
    y = torch.arange(4)
    classes = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for method in METHODS:
        with pytest.raises(RuntimeError, match=r"'classes' \(shape \(4, 6\)\) were taken as per"):
            CurvatureScorer(Cosine(), method=method, n_probes=2).score(x, y, classes=classes)
    bound = functools.partial(Cosine(), classes=classes)
    assert torch.isfinite(CurvatureScorer(bound, n_probes=2).score(x, y).curvature).all()


def tiny_vit(dtype=torch.float64):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=4,
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).eval().to(dtype)


def _logits_ce(output, y):
    return F.cross_entropy(output.logits, y, reduction="none")


def test_vit_at_its_embeddings_equals_scoring_the_rest():
    vit = tiny_vit()
    x, y = images(3, dtype=torch.float64)
    got = CurvatureScorer(
        vit, _logits_ce, input_key="pixel_values", n_probes=2, at="vit.embeddings"
    )
    got = got.score(x, y)
    with torch.no_grad():
        a = vit.vit.embeddings(x)

    def rest(a):
        for layer in vit.vit.layers:
            a = layer(a, None)
            a = a[0] if isinstance(a, tuple) else a
        return vit.classifier(vit.vit.layernorm(a)[:, 0])

    want = CurvatureScorer(rest, n_probes=2).score(a, y)
    torch.testing.assert_close(got.curvature, want.curvature, rtol=1e-9, atol=0)


def test_vit_under_accelerate_style_autocast_is_refused():
    vit = tiny_vit(torch.float32)
    inner = vit.forward

    def forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return inner(*args, **kwargs)

    vit.forward = forward
    x, y = images(3)
    for method in ("fd", "zo"):
        with pytest.raises(RuntimeError, match=r"computes in torch\.bfloat16"):
            CurvatureScorer(vit, _logits_ce, input_key="pixel_values", method=method).score(x, y)


def test_token_scorer_probe_mask_leaving_a_sequence_out():
    ids = torch.randint(1, 30, (3, 5))
    y = torch.tensor([0, 1, 2])
    probe_mask = torch.ones_like(ids, dtype=torch.bool)
    probe_mask[2] = False
    with pytest.warns(SampleWarning, match=r"id 2\)"):
        s = TokenScorer(tiny_bert(), n_probes=2).score(ids, y, probe_mask=probe_mask)
    assert int(s.n_probes[2]) == 0 and math.isnan(float(s.curvature[2]))
    assert torch.isfinite(s.curvature[:2]).all()


def test_metrics_leave_unscored_samples_out():
    from curvkern import metrics

    s = torch.tensor([0.1, math.nan, 0.5, 0.9, math.nan, 0.3])
    positives = torch.tensor([0, 1, 0, 1, 1, 0])
    scored = ~torch.isnan(s)
    assert metrics.auroc(s, positives) == metrics.auroc(s[scored], positives[scored])
    assert metrics.topk(s, 4).indices.tolist() == [3, 2, 5, 0]


@pytest.mark.parametrize("kind", ["partial", "module"])
def test_record_refuses_the_same_loss_with_other_arguments(kind):
    if kind == "partial":
        plain = functools.partial(F.cross_entropy, reduction="none")
        other = functools.partial(F.cross_entropy, reduction="none", label_smoothing=0.2)
    else:
        plain = nn.CrossEntropyLoss(reduction="none")
        other = nn.CrossEntropyLoss(reduction="none", label_smoothing=0.2)
    x, y = labelled_batch(6)
    tracker = CurvatureTracker(CurvatureScorer(smooth_classifier(), plain, n_probes=2), 6)
    scores = CurvatureScorer(smooth_classifier(), other, n_probes=2).score(x, y)
    with pytest.raises(ValueError, match="loss_fn"):
        tracker.record(0, scores)


def test_cli_refuses_a_shuffled_copy_of_the_data(tmp_path, monkeypatch, capsys):
    from curvkern.cli import main

    from .test_cli import _score
    from .test_cli import workdir as make_workdir

    make_workdir.__wrapped__(tmp_path, monkeypatch)
    assert _score() == 0
    with np.load("data.npz") as data:
        x, y = data["x"], data["y"]
    order = np.random.default_rng(0).permutation(len(y))
    np.savez("shuffled.npz", x=x[order], y=y[order])  # the same samples, other ids
    capsys.readouterr()
    assert _score("--data", "shuffled.npz") == 2
    assert "holds scores of other data" in capsys.readouterr().err
    assert main(["report", "scores.npz", "--data", "shuffled.npz", "--out", "r.html"]) == 2
    assert "holds scores of other data" in capsys.readouterr().err


def test_all_zero_mask_with_adaptive_probes_and_per_position():
    x, y = labelled_batch(6)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[4] = False
    scorer = CurvatureScorer(smooth_classifier(), n_probes=2, rtol=0.05, max_probes=8)
    with pytest.warns(SampleWarning, match=r"id 4\) have an all-zero"):
        s = scorer.score(x, y, probe_mask=mask)
    assert int(s.n_probes[4]) == 0 and math.isnan(float(s.curvature[4]))
    assert torch.isfinite(s.curvature[torch.arange(6) != 4]).all()
    ids = torch.randint(1, 30, (3, 5), generator=torch.Generator().manual_seed(0))
    probe_mask = torch.ones_like(ids, dtype=torch.bool)
    probe_mask[1] = False
    with pytest.warns(SampleWarning, match=r"id 1\)"):
        s = TokenScorer(tiny_bert(), n_probes=2).score(
            ids, torch.tensor([0, 1, 2]), probe_mask=probe_mask, per_position=True
        )
    assert s.curvature_map[1].isnan().all() and torch.isfinite(s.curvature_map[[0, 2]]).all()


def test_bart_with_scaled_embeddings_matches_scoring_its_embeddings():
    # BART with scale_embedding=True scales inside its embedding module: the token scorer
    # perturbs the scaled vectors, which the model also takes as inputs_embeds
    transformers = pytest.importorskip("transformers")
    from curvkern.losses import sequence_cross_entropy

    config = transformers.BartConfig(
        vocab_size=32, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
        max_position_embeddings=16, scale_embedding=True,
    )  # fmt: skip
    torch.manual_seed(0)
    bart = transformers.BartForConditionalGeneration(config).double().eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32, (3, 6), generator=gen)
    attention = torch.ones_like(ids)
    attention[2, 4:] = 0
    labels = torch.randint(3, 32, (3, 4), generator=gen)
    got = TokenScorer(bart, sequence_cross_entropy, n_probes=2).score(
        ids, labels, attention_mask=attention, labels=labels
    )
    embeds = bart.model.encoder.embed_tokens(ids).detach()

    def on_embeddings(e, attention_mask, labels):
        return bart(inputs_embeds=e, attention_mask=attention_mask, labels=labels)

    want = CurvatureScorer(on_embeddings, sequence_cross_entropy, n_probes=2).score(
        embeds, labels, attention_mask=attention, labels=labels, probe_mask=attention.bool()
    )
    torch.testing.assert_close(got.curvature, want.curvature, rtol=1e-9, atol=0)


def test_huggingface_callback_scores_the_float32_vit_under_accelerate_bf16():
    accelerate = pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    from curvkern.integrations.huggingface import CurvatureCallback

    x, y = images(4)
    items = [{"pixel_values": p, "label": int(c)} for p, c in zip(x, y, strict=True)]
    accelerate.state.AcceleratorState._reset_state(True)
    try:
        accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
        prepared = accelerator.prepare(tiny_vit(torch.float32))
    finally:
        accelerate.state.AcceleratorState._reset_state(True)
    with pytest.raises(RuntimeError, match=r"computes in torch\.bfloat16"):
        CurvatureScorer(prepared, _logits_ce, input_key="pixel_values", n_probes=2).score(x, y)
    callback = CurvatureCallback(items, batch_size=4, n_probes=2)
    callback.on_epoch_end(None, transformers.TrainerState(epoch=1.0), None, model=prepared)
    plain = tiny_vit(torch.float32)
    want = CurvatureScorer(plain, _logits_ce, input_key="pixel_values", n_probes=2).score(
        x, y, torch.arange(4)
    )
    torch.testing.assert_close(callback.tracker.history[-1], want.curvature, rtol=0, atol=0)
