"""The scorer's checks (curvkern.checks): settings, batches, the step against x's resolution, and
the model and loss (dtype, device, determinism, rows independent of their pass)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkern import CurvatureScorer

from .conftest import Conditioned, counting_passes, labelled_batch, smooth_classifier


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"h": 0.0}, ValueError, "h must be a positive finite number"),
        ({"h": -1e-3}, ValueError, "h must be a positive finite number"),
        ({"h": math.nan}, ValueError, "h must be a positive finite number"),
        ({"h": math.inf}, ValueError, "h must be a positive finite number"),
        ({"n_probes": 0}, ValueError, r"n_probes must be >= 1"),
        ({"n_probes": 2.5}, TypeError, "n_probes must be an int"),
        ({"seed": -1}, ValueError, "seed must be"),
        ({"seed": 2**63}, ValueError, "seed must be"),
        ({"method": "exact"}, ValueError, "method must be one of"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"max_batch": 0}, ValueError, "max_batch must be >= 1"),
        ({"rtol": 0.0}, ValueError, "rtol must be a positive finite number"),
        ({"rtol": 0.1, "max_probes": 5}, ValueError, r"max_probes must be >= 10"),
        ({"max_probes": 50}, ValueError, "max_probes caps the adaptive rounds and needs rtol"),
    ],
)
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        CurvatureScorer(smooth_classifier(), **kwargs)


def test_bad_model_or_loss_fn():
    with pytest.raises(TypeError, match="model must be an nn.Module or a callable"):
        CurvatureScorer("resnet")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        CurvatureScorer(smooth_classifier(), loss_fn=3)


def test_bad_batches():
    model = smooth_classifier()
    scorer = CurvatureScorer(model, n_probes=2)
    x, y = labelled_batch(4)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        scorer.score(x.long(), y)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        scorer.score(x.numpy(), y)
    with pytest.raises(ValueError, match=r"y must have one row per sample of x \(B = 4\)"):
        scorer.score(x, y[:3])
    with pytest.raises(ValueError, match=r"ids must have shape \(B,\) = \(4,\)"):
        scorer.score(x, y, torch.arange(5))
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        scorer.score(x, y, torch.zeros(4))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 2\^56\), got ids\[2\] = -1"):
        scorer.score(x, y, torch.tensor([0, 1, -1, 3]))
    bad = x.clone()
    bad[2, 3] = math.nan
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in sample 2 \(id 12\)"):
        scorer.score(bad, y, torch.arange(10, 14))
    bad[2, 3] = math.inf
    with pytest.raises(ValueError, match="in sample 2"):
        scorer.score(bad, y)


@pytest.mark.parametrize("method", ["fd", "zo"])
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_refused(method, half):
    model = smooth_classifier(dtype=half)
    x, y = labelled_batch(4, dtype=half)
    with pytest.raises(TypeError, match=f"method='{method}' needs float32 or float64 input, got"):
        CurvatureScorer(model, method=method).score(x, y)


def test_autocast_refused():
    model = smooth_classifier(dtype=torch.float32)
    x, y = labelled_batch(4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="cannot run under autocast"):
            CurvatureScorer(model).score(x, y)


def test_input_key_is_not_also_a_model_input():
    scorer = CurvatureScorer(Conditioned(), input_key="inputs_embeds")
    x, y = labelled_batch(3)
    with pytest.raises(ValueError, match="model_inputs has the key 'inputs_embeds'"):
        scorer.score(x, y, inputs_embeds=x, cond=torch.zeros(3, 3, dtype=torch.float64))


def test_per_position_refusals():
    x, y = labelled_batch(3)
    with pytest.raises(ValueError, match="method='zo' has loss values only"):
        CurvatureScorer(smooth_classifier(), method="zo").score(x, y, per_position=True)
    with pytest.raises(ValueError, match=r"x of shape \(B, T, ...\)"):
        CurvatureScorer(lambda v: v.unsqueeze(1) * torch.ones(4, dtype=v.dtype)).score(
            x[:, 0], y, per_position=True
        )


def dropout_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 4)).double()


@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
def test_non_deterministic_loss_is_refused(method):
    module = dropout_classifier().train()
    x, y = labelled_batch(6)
    scorer = CurvatureScorer(lambda v: module(v), method=method, n_probes=2)  # not put in eval
    with pytest.raises(RuntimeError, match="the model is random at scoring time.*model.eval"):
        scorer.score(x, y)
    # the module itself is scored in eval mode, and so is a callable around an eval module
    CurvatureScorer(module, method=method, n_probes=2).score(x, y)
    module.eval()
    CurvatureScorer(lambda v: module(v), method=method, n_probes=2).score(x, y)


@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
def test_batch_dependent_loss_is_refused(method):
    model = smooth_classifier()
    x, y = labelled_batch(6)

    def per_batch_mean(output, target):  # the trap: a per-row loss divided by the rows
        return F.cross_entropy(output, target, reduction="none") / output.shape[0]

    def centred(output, target):  # a batch statistic
        return F.cross_entropy(output - output.mean(0), target, reduction="none")

    for loss_fn in (per_batch_mean, centred):
        with pytest.raises(RuntimeError, match="depends on the other rows of its pass"):
            CurvatureScorer(model, loss_fn, method=method, n_probes=2).score(x, y)
    # batch statistics in the model: BatchNorm in train mode inside a plain callable
    bn = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4)).double()
    with pytest.raises(RuntimeError, match="depends on the other rows of its pass"):
        CurvatureScorer(lambda v: bn(v), method=method, n_probes=2).score(x, y)


def test_consistency_check_runs_once_per_signature():
    counted, passes = counting_passes(smooth_classifier())
    x, y = labelled_batch(8)
    scorer = CurvatureScorer(counted, n_probes=3, max_batch=24)
    scorer.score(x, y)
    # the check (8 rows at x; x and x + h r of 8 samples and one more row, twice), x, the probes
    assert passes == [8, 17, 17, 8, 24]
    passes.clear()
    scorer.score(x, y)
    assert passes == [8, 24]
    passes.clear()
    scorer.score(x + 1, y)  # same signature: no check
    assert passes == [8, 24]
    passes.clear()
    scorer.score(x[:3], y[:3])  # the batch size is not part of the signature
    assert passes == [3, 9]


def test_h_below_the_resolution_of_x():
    model = smooth_classifier(dtype=torch.float32)
    x, y = labelled_batch(8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"h = 1e-12 is below the floating-point resolution"):
        CurvatureScorer(model, h=1e-12).score(x, y)
    with pytest.warns(UserWarning, match=r"h = 1e-07 is close to the floating-point resolution"):
        CurvatureScorer(model, h=1e-7).score(x, y)
    # the default step in float32, and any step in float64 at this scale: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CurvatureScorer(model, n_probes=2).score(x, y)
        CurvatureScorer(smooth_classifier(), h=1e-7, n_probes=2).score(x.double(), y)


def test_integer_inputs_point_to_embedding_space():
    tokens = torch.randint(0, 10, (3, 5))
    with pytest.raises(TypeError, match="TokenScorer.*input_key='inputs_embeds'"):
        CurvatureScorer(smooth_classifier()).score(tokens, torch.zeros(3, dtype=torch.long))


def test_dtype_and_device_unlike_the_model():
    model = smooth_classifier(dtype=torch.float32)
    x, y = labelled_batch(3)  # float64
    with pytest.raises(TypeError, match=r"x has dtype torch.float64, the model's parameters"):
        CurvatureScorer(model).score(x, y)
    with pytest.raises(TypeError, match="the model could not take x"):
        CurvatureScorer(lambda v: model(v)).score(x, y)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="x is on cuda"):
            CurvatureScorer(model).score(x.float().cuda(), y.cuda())
