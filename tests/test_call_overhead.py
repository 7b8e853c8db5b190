"""The fixed cost of a score() call, kept small without giving up a check or a value: rows the
scorer made for one pass reach the model uncopied, the per-call checks take their cheap path
where there is nothing to report and their exact one where there is, and the model-state
context writes nothing that is already as it needs to be."""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from curvkern import CurvatureScorer
from curvkern._model_state import scoring_mode
from curvkern.checks import check_inputs
from curvkern.estimators import ESTIMATORS

from .conftest import labelled_batch, smooth_classifier


class _Ops(TorchDispatchMode):
    """The names of the aten ops run inside the context."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class _Recorder(nn.Module):
    """Records, per call, whether its input is an autograd leaf (an uncopied row tensor)."""

    def __init__(self, body, in_place=False):
        super().__init__()
        self.body, self.in_place, self.leaf = body, in_place, []

    def forward(self, x):
        self.leaf.append(x.is_leaf and x.requires_grad)
        return self.body(x.mul_(0.5) if self.in_place else x * 0.5)


@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_fd_probe_rows_reach_the_model_uncopied(backend):
    if backend == "kernels":
        from curvkern._extension import has_kernels

        if not has_kernels():
            pytest.skip("compiled kernels not built")
    model = _Recorder(smooth_classifier())
    x, y = labelled_batch(8)
    scorer = CurvatureScorer(model, n_probes=3, backend=backend)
    scorer.score(x, y)
    model.leaf.clear()
    scorer.score(x, y)  # the model check has run: the base pass and the probe passes only
    # The pass at x takes a copy (x is the caller's); the probe rows are perturb's own.
    assert model.leaf[0] is False
    assert model.leaf[1:] and all(model.leaf[1:]), model.leaf


def test_a_model_writing_into_its_probe_rows_gets_copies_and_right_scores():
    body = smooth_classifier()
    x, y = labelled_batch(8)
    kept = x.clone()
    scorer = CurvatureScorer(_Recorder(body, in_place=True), n_probes=3)
    got = scorer.score(x, y)
    assert torch.equal(x, kept)
    assert scorer._objective.copy_owned  # refused by autograd once, copied since
    want = CurvatureScorer(_Recorder(body), n_probes=3).score(x, y)
    assert torch.equal(got.curvature, want.curvature)
    assert torch.equal(got.trace, want.trace)


def test_finite_inputs_are_checked_by_one_sum():
    """The common case, every value finite, costs one reduction."""
    x, y = labelled_batch(8)
    with _Ops() as ops:
        check_inputs(x, y, None, ESTIMATORS["fd"], 1e-3)
    # isfinite's decomposition (abs, ne, eq, mul, all) runs only where the sum is not finite
    assert not {"aten.abs", "aten.ne", "aten.eq"} & set(ops.names), ops.names
    assert ops.names.count("aten.sum") == 1, ops.names


def test_a_finite_x_whose_sum_overflows_is_accepted_and_a_nan_refused():
    x, y = labelled_batch(4, dtype=torch.float32)
    big = torch.full_like(x, 3e38)  # finite, sum inf in float32
    assert math.isinf(float(big.sum()))
    out, _, _ = check_inputs(big, y, None, ESTIMATORS["fd"], 1e-3)
    assert out is big
    bad = x.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"non-finite values .* in sample 2"):
        check_inputs(bad, y, None, ESTIMATORS["fd"], 1e-3)


def test_scoring_mode_writes_no_flag_already_in_place():
    class Counting(nn.Sequential):
        writes = 0

        def __setattr__(self, name, value):
            if name == "training":
                type(self).writes += 1
            super().__setattr__(name, value)

    model = Counting(nn.Linear(3, 2)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    Counting.writes = 0
    with scoring_mode(model):
        pass
    assert Counting.writes == 0
    model.train()
    Counting.writes = 0
    with scoring_mode(model):
        assert not model.training
    assert model.training and Counting.writes == 2  # set to eval, and back
