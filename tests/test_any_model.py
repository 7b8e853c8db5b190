"""Any model: output forms, side and keyword inputs, probe masks, maps, and refused cases."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from curvkern import CurvatureScorer, CurvatureScores, losses, torch_ops

from .conftest import Conditioned, labelled_batch, smooth_classifier

EXACT = dict(rtol=1e-8, atol=1e-12)


# --- output selection and the default loss ---------------------------------------------------


def test_logits_of_every_output_form():
    logits = torch.randn(3, 4)
    for output in (
        logits,
        (logits, torch.zeros(1)),
        [logits],
        {"logits": logits, "hidden": None},
        SimpleNamespace(logits=logits, loss=None),
    ):
        assert losses.logits_of(output) is logits
    with pytest.raises(TypeError, match="mapping without a 'logits' tensor.*keys: \\['out'\\]"):
        losses.logits_of({"out": logits})
    with pytest.raises(TypeError, match="first element is NoneType"):
        losses.logits_of((None, logits))
    with pytest.raises(TypeError, match="type int: expected a tensor"):
        losses.logits_of(3)


def test_default_loss_is_per_sample_cross_entropy():
    logits, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    expected = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(losses.cross_entropy({"logits": logits}, y), expected, **EXACT)
    # (B, C, T) logits with (B, T) labels: the mean over positions, one loss per sample
    seq, labels = torch.randn(2, 3, 4, dtype=torch.float64), torch.randint(0, 3, (2, 4))
    per_token = F.cross_entropy(seq, labels, reduction="none")
    torch.testing.assert_close(losses.cross_entropy(seq, labels), per_token.mean(1), **EXACT)


def test_classification_stats_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    stats = losses.classification_stats(logits, y)
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(stats[:, 0], torch.tensor([1.5, -2.0], dtype=torch.float64))
    torch.testing.assert_close(stats[:, 1], p[[0, 1], [0, 1]])
    torch.testing.assert_close(stats[:, 2], torch.tensor([1.0, 0.0], dtype=torch.float64))
    onehot = torch.eye(3, dtype=torch.float64)[y]
    torch.testing.assert_close(stats[:, 3], torch.linalg.vector_norm(p - onehot, dim=1))
    # an ignored label gives NaN in its row only; regression outputs give NaN everywhere
    ignored = losses.classification_stats(logits, torch.tensor([-100, 1]))
    assert torch.isnan(ignored[0]).all() and torch.equal(ignored[1], stats[1])
    assert torch.isnan(losses.classification_stats(logits[:, :1], torch.zeros(2))).all()
    assert torch.isnan(losses.classification_stats(logits, torch.zeros(2))).all()


@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
def test_scores_carry_classification_fields_of_the_unperturbed_output(method):
    model = smooth_classifier()
    x, y = labelled_batch(6)
    s = CurvatureScorer(model, n_probes=2, method=method, h=1e-2).score(x, y)
    expected = losses.classification_stats(model(x), y)
    for i, name in enumerate(("margin", "p_label", "correct", "el2n")):
        torch.testing.assert_close(getattr(s, name), expected[:, i], **EXACT)


def test_regression_output_has_nan_classification_fields():
    model = smooth_classifier(classes=2)
    x, _ = labelled_batch(4)
    target = torch.randn(4, 2, dtype=torch.float64)

    def mse(output, t):
        return ((output - t) ** 2).sum(1)

    s = CurvatureScorer(model, mse, n_probes=2).score(x, target)
    assert torch.isfinite(s.curvature).all()
    for name in ("margin", "p_label", "correct", "el2n"):
        assert torch.isnan(getattr(s, name)).all(), name


def test_curvature_map_follows_rows():
    a = CurvatureScores.empty(1e-3, "fd", size=2)
    b = CurvatureScores.empty(1e-3, "fd", size=1)
    a.curvature_map = torch.arange(6.0).reshape(2, 3)
    b.curvature_map = torch.ones(1, 2)
    both = CurvatureScores.cat([a, b])
    assert both.curvature_map.shape == (3, 3)
    assert torch.equal(both.curvature_map[:2], a.curvature_map)
    assert both.curvature_map[2, :2].tolist() == [1.0, 1.0] and math.isnan(both.curvature_map[2, 2])
    assert torch.equal(both[1:2].curvature_map, a.curvature_map[1:2])
    assert "curvature_map" not in both.to_dict()
    with pytest.raises(ValueError, match="with and without curvature_map"):
        CurvatureScores.cat([a, CurvatureScores.empty(1e-3, "fd", size=1)])


# --- plain-autograd references with the scorer's probes -------------------------------------


def reference_per_probe(loss_of, x, ids, n, h, seed, method, mask=None):
    """Per-probe values (c, t), each (n, B), by plain autograd on B rows at a time.

    Args:
        loss_of: x (B, ...) -> (B,) per-sample losses (side inputs held for exactly B rows).
        mask: None or (B, *p) 0/1, broadcast over the rest of the sample shape.
    Returns:
        fd: c_k = ||m (g(x + h m r_k) - g(x))|| / h, t_k = (m r_k) . that / h; hvp: the same
        with m H (m r_k); zo: c_k = |four-point difference| / (4 h^2), t_k its trace term.
    """
    b = x.shape[0]
    m = torch.ones_like(x)
    if mask is not None:
        m = mask.to(x.dtype).reshape(*mask.shape, *[1] * (x.dim() - mask.dim())).expand_as(x)
    r = torch_ops.rademacher(seed, ids, n, x.shape[1:], dtype=x.dtype) * m  # (n, B, ...)

    def grad(at, create_graph=False):
        at = at if at.requires_grad else at.detach().requires_grad_()
        (g,) = torch.autograd.grad(loss_of(at).sum(), at, create_graph=create_graph)
        return g

    c, t = [], []
    for k in range(n):
        if method == "fd":
            d = m * (grad(x + h * r[k]) - grad(x)) / h
        elif method == "hvp":
            xr = x.detach().requires_grad_()
            (hv,) = torch.autograd.grad(grad(xr, create_graph=True), xr, grad_outputs=r[k])
            d = m * hv
        else:
            s = torch_ops.rademacher(seed, ids, n, x.shape[1:], stream=1, dtype=x.dtype) * m
            with torch.no_grad():
                lp = [loss_of(x + a * h * r[k] + c_ * h * s[k]) for c_, a in _SIGNS]
                l0 = loss_of(x)
            e = (lp[0] - lp[1] - lp[2] + lp[3]) / (4 * h * h)
            c.append(e.abs())
            t.append((sum(lp) - 4 * l0) / (4 * h * h))
            continue
        c.append(torch.linalg.vector_norm(d.reshape(b, -1), dim=1))
        t.append((r[k] * d).reshape(b, -1).sum(1))
    return torch.stack(c), torch.stack(t)


_SIGNS = [(1, 1), (1, -1), (-1, 1), (-1, -1)]  # (s sign, r sign): rows (+,+), (-,+), (+,-), (-,-)


def assert_matches_reference(scores, c, t, counts=None):
    """scores against the per-probe reference values, sample b using its first counts[b]."""
    batch = c.shape[1]
    counts = [c.shape[0]] * batch if counts is None else counts.tolist()
    for b in range(batch):
        ck, tk = c[: counts[b], b], t[: counts[b], b]
        got = torch.stack([scores.curvature[b], scores.trace[b], scores.frobenius_sq[b]])
        want = torch.stack([ck.mean(), tk.mean(), (ck * ck).mean()])
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10, msg=f"sample {b}")


FORMS = ["tensor", "tuple", "dict", "object", "input_key"]


@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
@pytest.mark.parametrize("form", FORMS)
def test_side_inputs_and_output_forms_against_autograd(form, method):
    model = Conditioned("tensor" if form == "input_key" else form)
    x, y = labelled_batch(5)
    cond = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ids = torch.tensor([4, 11, 2, 30, 8])
    h, n = (1e-2, 3) if method == "zo" else (1e-4, 3)
    # max_batch 3 < n * B: one sample's probes are split over several chunks (and zo, with 4
    # rows per probe, scores one sample per pass)
    kw = dict(method=method, h=h, n_probes=n, seed=2, max_batch=3)
    key = "inputs_embeds" if form == "input_key" else None
    scorer = CurvatureScorer(model, input_key=key, **kw)
    s = scorer.score(x, y, ids, cond=cond, scale=0.7)

    def loss_of(at):
        return F.cross_entropy(model.logits(at, cond, 0.7), y, reduction="none")

    c, t = reference_per_probe(loss_of, x, ids, n, h, 2, method)
    assert_matches_reference(s, c, t)
    torch.testing.assert_close(s.loss, loss_of(x).detach(), rtol=1e-12, atol=0)
    stats = losses.classification_stats(model.logits(x, cond, 0.7), y)
    torch.testing.assert_close(s.margin, stats[:, 0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
def test_side_inputs_follow_samples_through_adaptive_rounds(method):
    model = Conditioned()
    x, y = labelled_batch(12)
    cond = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    h = 1e-2 if method == "zo" else 1e-4
    rtol = 0.3 if method == "zo" else 0.1
    s = CurvatureScorer(
        model, method=method, h=h, n_probes=2, rtol=rtol, max_probes=12, max_batch=10
    ).score(x, y, cond=cond, scale=1.3)
    assert len(set(s.n_probes.tolist())) > 1, "the test needs samples stopping at other rounds"

    def loss_of(at):
        return F.cross_entropy(model.logits(at, cond, 1.3), y, reduction="none")

    c, t = reference_per_probe(loss_of, x, torch.arange(12), 12, h, 0, method)
    assert_matches_reference(s, c, t, s.n_probes)


def test_model_inputs_of_other_first_dimensions_are_passed_unchanged():
    seen = {}

    def model(x, bias, table):
        seen["bias"], seen["table"] = bias, table
        return torch.tanh(x) @ table + bias

    x, y = labelled_batch(5)
    bias = torch.zeros(4, dtype=torch.float64)  # (C,) with C != B: shared
    table = torch.randn(6, 4, dtype=torch.float64)
    CurvatureScorer(model, n_probes=2, max_batch=4).score(x, y, bias=bias, table=table)
    assert seen["bias"] is bias and seen["table"] is table


# --- probe masks and curvature maps on padded sequences --------------------------------------


class Pooled(nn.Module):
    """(B, T, E) sequences and an attention mask (B, T): a smooth per-position map, mean-pooled
    over the real positions, then a smooth head. Padded positions do not reach the output."""

    def __init__(self, embed=3, hidden=8, classes=4):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.w1 = nn.Parameter(torch.randn(embed, hidden, generator=gen, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(hidden, hidden, generator=gen, dtype=torch.float64))
        self.w3 = nn.Parameter(torch.randn(hidden, classes, generator=gen, dtype=torch.float64))

    def forward(self, x, attention_mask):
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (torch.tanh(x @ self.w1) * m).sum(1) / m.sum(1)
        return torch.tanh(pooled @ self.w2) @ self.w3


def padded_sequences(batch=4, length=5, embed=3):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(batch, length, embed, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 4, 2])[:batch]
    attention = (torch.arange(length) < lengths.unsqueeze(1)).long()  # (B, T), padding at the end
    y = torch.randint(0, 4, (batch,), generator=gen)
    return x, y, attention


def reference_map(loss_of, x, ids, n, h, seed, method, mask):
    """mean_k ||m dg_k[t]|| / h per position: (B, T), plain autograd."""
    m = mask.to(x.dtype).unsqueeze(-1).expand_as(x)
    r = torch_ops.rademacher(seed, ids, n, x.shape[1:], dtype=x.dtype) * m
    maps = []
    for k in range(n):
        xr = x.detach().requires_grad_()
        (g0,) = torch.autograd.grad(loss_of(xr).sum(), xr, create_graph=method == "hvp")
        if method == "hvp":
            (d,) = torch.autograd.grad(g0, xr, grad_outputs=r[k])
        else:
            xp = (x + h * r[k]).requires_grad_()
            (g,) = torch.autograd.grad(loss_of(xp).sum(), xp)
            d = (g - g0) / h
        maps.append(torch.linalg.vector_norm(m * d, dim=-1))
    return torch.stack(maps).mean(0)


@pytest.mark.parametrize("backend", ["torch", "kernels"])
@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
def test_probe_mask_and_map_on_padded_sequences(method, backend):
    model = Pooled()
    x, y, attention = padded_sequences()
    ids = torch.tensor([3, 1, 7, 0])
    # probes on the real tokens except the first ("prompt") one of each sequence
    probe_mask = attention.bool().clone()
    probe_mask[:, 0] = False
    h, n = (1e-2, 3) if method == "zo" else (1e-4, 3)
    scorer = CurvatureScorer(
        model, method=method, h=h, n_probes=n, seed=1, max_batch=5, backend=backend
    )
    per_position = method != "zo"
    s = scorer.score(
        x, y, ids, probe_mask=probe_mask, per_position=per_position, attention_mask=attention
    )

    def loss_of(at):
        return F.cross_entropy(model(at, attention), y, reduction="none")

    c, t = reference_per_probe(loss_of, x, ids, n, h, 1, method, probe_mask)
    assert_matches_reference(s, c, t)
    if per_position:
        want = reference_map(loss_of, x, ids, n, h, 1, method, probe_mask)
        torch.testing.assert_close(s.curvature_map, want, rtol=1e-7, atol=1e-10)
        assert (s.curvature_map[~probe_mask] == 0).all()
        assert (s.curvature_map[probe_mask] > 0).all()
    else:
        assert s.curvature_map is None
    # the mask changes the scores: without it the first tokens count too
    full = scorer.score(x, y, ids, attention_mask=attention)
    assert not torch.allclose(full.curvature, s.curvature, rtol=1e-3)


@pytest.mark.parametrize("method", ["fd", "hvp"])
def test_padding_does_not_change_masked_scores(method):
    # Probes are indexed by element, so a sequence padded at the end and masked there has the
    # probes, and the scores, of the same sequence unpadded.
    model = Pooled()
    x, y, attention = padded_sequences()
    ids = torch.tensor([3, 1, 7, 0])
    scorer = CurvatureScorer(model, method=method, h=1e-4, n_probes=4)
    padded = scorer.score(x, y, ids, probe_mask=attention.bool(), attention_mask=attention)
    b, length = 1, 3  # sample 1 has 3 real tokens
    alone = scorer.score(
        x[b : b + 1, :length],
        y[b : b + 1],
        ids[b : b + 1],
        probe_mask=attention[b : b + 1, :length].bool(),
        attention_mask=attention[b : b + 1, :length],
    )
    torch.testing.assert_close(alone.curvature[0], padded.curvature[b], rtol=1e-9, atol=0)
    torch.testing.assert_close(alone.trace[0], padded.trace[b], rtol=1e-9, atol=1e-12)


def test_mask_over_a_prefix_broadcasts():
    model = Pooled()
    x, y, attention = padded_sequences()
    scorer = CurvatureScorer(model, h=1e-4, n_probes=2)
    per_position = scorer.score(x, y, probe_mask=attention.bool(), attention_mask=attention)
    full = attention.unsqueeze(-1).expand_as(x).double()
    per_element = scorer.score(x, y, probe_mask=full, attention_mask=attention)
    torch.testing.assert_close(per_position.curvature, per_element.curvature, rtol=0, atol=0)
    torch.testing.assert_close(per_position.grad_norm, per_element.grad_norm, rtol=0, atol=0)


# --- no silent wrong numbers -----------------------------------------------------------------


def test_samples_with_all_differences_zero_warn():
    # Integer weights: the gradient (the weights' row sums) is exact in any summation order, so
    # the differences are exactly 0 whatever BLAS kernel each pass size picks.
    weight = torch.randint(-3, 4, (6, 4)).double()

    def linear_loss(output, target):  # linear in x: every gradient difference is exactly 0
        return output.sum(1)

    x, y = labelled_batch(4)
    with pytest.warns(UserWarning, match="4 of 4 samples .* exactly zero for every probe"):
        s = CurvatureScorer(lambda v: v @ weight, linear_loss, n_probes=2).score(x, y)
    assert (s.curvature == 0).all()
    # a sample masked out entirely has nothing to probe: NaN with n_probes 0 and its own
    # warning (tests/test_model_checks.py), not the zero-differences one
    model = smooth_classifier()
    mask = torch.tensor([True, False, True, True])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = CurvatureScorer(model, n_probes=2).score(x, y, probe_mask=mask)
    assert [str(w.message) for w in caught if "exactly zero" in str(w.message)] == []
    assert math.isnan(s.curvature[1]) and (s.curvature[[0, 2, 3]] > 0).all()


class TinyAttention(nn.Module):
    """One self-attention layer on (B, T, E) through F.scaled_dot_product_attention."""

    def __init__(self, embed=4, classes=3):
        super().__init__()
        torch.manual_seed(2)
        self.qkv = nn.Linear(embed, 3 * embed)
        self.head = nn.Linear(embed, classes)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # (B, 1, T, E) each
        return self.head(F.scaled_dot_product_attention(q, k, v).squeeze(1).mean(1))


def test_hvp_through_fused_attention():
    model = TinyAttention().double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    # The fused CPU kernel has no double backward: plain autograd fails here ...
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
        torch.autograd.grad(g, xr, grad_outputs=torch.ones_like(g))
    # ... and the scorer's hvp takes the math kernel. fd differs from it by O(h) with the same
    # probes: halving h halves the difference.
    hvp = CurvatureScorer(model, method="hvp", n_probes=4).score(x, y)

    def error(h):
        fd = CurvatureScorer(model, method="fd", h=h, n_probes=4).score(x, y)
        return ((fd.curvature - hvp.curvature) / hvp.curvature).abs().max().item()

    coarse, fine = error(1e-3), error(5e-4)
    assert 1.8 < coarse / fine < 2.2, (coarse, fine)
    assert coarse < 1e-2


class _TanhOnce(torch.autograd.Function):
    """tanh with a backward that cannot be differentiated again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


def test_hvp_says_the_fix_for_ops_without_double_backward():
    weight = torch.randn(6, 4, dtype=torch.float64)
    x, y = labelled_batch(3)
    for model in (
        lambda v: _TanhOnce.apply(v) @ weight,  # all of H would be dropped
        lambda v: (_TanhOnce.apply(v) + v**2) @ weight,  # a share of H would be dropped
    ):
        scorer = CurvatureScorer(model, method="hvp", n_probes=2)
        with pytest.raises(RuntimeError, match="method='hvp' differentiates .* Use method='fd'"):
            scorer.score(x, y)
    CurvatureScorer(lambda v: _TanhOnce.apply(v) @ weight, n_probes=2).score(x, y)  # fd works


# --- a Hugging Face model: keyword input, attention mask, ModelOutput, SDPA attention ----------


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).double()


def test_hugging_face_model_in_embedding_space():
    model = tiny_bert()  # in train mode, with dropout: the scorer scores it in eval mode
    tokens = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))
    attention = torch.ones(4, 7, dtype=torch.long)
    attention[1, 4:] = 0
    attention[3, 2:] = 0
    embeds = model.get_input_embeddings()(tokens).detach()
    y = torch.tensor([0, 1, 2, 1])
    kw = dict(probe_mask=attention.bool(), per_position=True, attention_mask=attention)
    fd = CurvatureScorer(model, input_key="inputs_embeds", h=1e-5, n_probes=3, max_batch=5)
    s = fd.score(embeds, y, **kw)
    assert model.training  # left as found

    model.eval()

    def loss_of(at):
        return F.cross_entropy(
            model(inputs_embeds=at, attention_mask=attention).logits, y, reduction="none"
        )

    c, t = reference_per_probe(loss_of, embeds, torch.arange(4), 3, 1e-5, 0, "fd", attention)
    assert_matches_reference(s, c, t)
    assert (s.curvature_map[attention == 0] == 0).all()
    # hvp through BERT's scaled-dot-product attention agrees with fd to O(h): measured, the
    # relative difference is 1e-3 at h = 1e-4 and 1e-4 at h = 1e-5 (first order); 3x that here
    hvp = CurvatureScorer(model, input_key="inputs_embeds", method="hvp", n_probes=3)
    exact = hvp.score(embeds, y, **kw)
    torch.testing.assert_close(s.curvature, exact.curvature, rtol=3e-4, atol=0)
    # (per position, against the sample's largest value: small positions carry the same
    # absolute O(h) term)
    scale = exact.curvature_map.amax(1, keepdim=True)
    assert ((s.curvature_map - exact.curvature_map).abs() / scale).max() < 3e-4
