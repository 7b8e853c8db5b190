"""classification_stats against the definitions, on the shapes and dtypes the scorer sees."""

import math

import pytest
import torch
import torch.nn.functional as F

from curvkern import losses

EPS = torch.finfo(torch.float64).eps


def test_correct_is_the_first_largest_logit_on_ties():
    # argmax's convention: of tied largest logits, the first one is the prediction
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0]])
    y = torch.tensor([0, 1, 2, 0])
    stats = losses.classification_stats(logits, y)
    assert stats[:, 2].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert stats[:, 0].tolist() == [0.0, 0.0, 0.0, 0.0]  # margin against the tied other class


@pytest.mark.parametrize("classes", [2, 10, 1000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_against_the_definitions(classes, dtype):
    gen = torch.Generator().manual_seed(classes)
    logits = (torch.randn(37, classes, generator=gen) * 8).to(dtype)
    y = torch.randint(0, classes, (37,), generator=gen)
    y[3] = -100  # an ignored label
    stats = losses.classification_stats(logits, y)
    assert stats.shape == (37, 4) and stats.dtype == torch.float64
    assert torch.isnan(stats[3]).all() and not torch.isnan(stats[torch.arange(37) != 3]).any()
    keep = y != -100
    z, t = logits.double()[keep], y[keep]
    own = z.gather(1, t.unsqueeze(1)).squeeze(1)
    others = z.masked_fill(F.one_hot(t, classes).bool(), -math.inf).amax(1)
    p = torch.softmax(z, 1)
    onehot = F.one_hot(t, classes).double()
    # margin and correct take no rounding: exact
    assert torch.equal(stats[keep, 0], own - others)
    assert torch.equal(stats[keep, 2], (z.argmax(1) == t).double())
    # a probability is a quotient of an exp (1 ulp) by a sum of C of them (C ulp), each side's
    # rounding within 2 (C + 2) eps of the value; el2n sums C squares of such components
    bound = 2 * (classes + 2) * EPS
    torch.testing.assert_close(
        stats[keep, 1], p.gather(1, t.unsqueeze(1)).squeeze(1), rtol=bound, atol=0
    )
    torch.testing.assert_close(
        stats[keep, 3], torch.linalg.vector_norm(p - onehot, dim=1), rtol=bound, atol=bound
    )
