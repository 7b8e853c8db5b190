"""Curvature at a layer (CurvatureScorer(at=...)) against plain autograd with the same probes.

Two references, float64 throughout:
- plain autograd: the loss as a function of the activation a of the tapped module (the model's
  tail written out by hand), its gradient g(a) by torch.autograd.grad, the probes from
  curvkern.torch_ops.rademacher: curvature = mean_k ||m * (g(a + h m*r_k) - g(a))|| / h;
- the input-space scorer on the tail: CurvatureScorer(tail).score(a, y) runs the same float64
  operations on the same rows (zo's four-point rows, adaptive rounds and chunks included), so the
  two agree to rounding of reduction order only.
Both compute the same float64 numbers in another order: 1e-9 relative leaves room for summation
order and nothing else.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkern import CurvatureScorer, torch_ops

from .conftest import requires_kernels

H = 1e-4
EXACT = {"rtol": 1e-9, "atol": 1e-12}
BACKENDS = ["torch", pytest.param("kernels", marks=requires_kernels)]


def reference(tail, a, y, ids, n_probes, h=H, mask=None, seed=0):
    """Plain-autograd fd curvature (B,), trace (B,) and, for a of shape (B, T, ...), the
    per-position map (B, T), with the scorer's probes; mask (B, *p) or None."""
    m = torch.ones_like(a) if mask is None else mask.to(a.dtype)
    m = m.reshape(*m.shape, *([1] * (a.dim() - m.dim()))).expand_as(a)

    def grad(v):
        v = v.detach().requires_grad_(True)
        loss = F.cross_entropy(tail(v), y, reduction="none")
        return torch.autograd.grad(loss.sum(), v)[0]

    g0 = grad(a)
    r = torch_ops.rademacher(seed, torch.as_tensor(ids), n_probes, a.shape[1:], 0, 0, a.dtype)
    norms, traces, maps = [], [], []
    for k in range(n_probes):
        dg = m * (grad(a + h * m * r[k]) - g0)
        norms.append(torch.linalg.vector_norm(dg.flatten(1), dim=1) / h)
        traces.append((m * r[k] * dg).flatten(1).sum(1) / h)
        if a.dim() >= 3:
            maps.append(torch.linalg.vector_norm(dg.flatten(2), dim=2) / h)
    cmap = torch.stack(maps).mean(0) if maps else None
    return torch.stack(norms).mean(0), torch.stack(traces).mean(0), cmap


# ---------------------------------------------------------------------------------------------
# Models


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 4)
    ).double()


class SmallCNN(nn.Module):
    """A residual CNN whose block adds its input in place (as torchvision's ResNets do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        stem = torch.tanh(self.stem(x))
        out = self.conv(stem)
        out += stem  # in place on the tapped module's output
        return self.head(torch.tanh(out).flatten(1))

    def tail(self, a, x):
        """The model as a function of conv's output a (x fixes the residual branch)."""
        return self.head(torch.tanh(a + torch.tanh(self.stem(x))).flatten(1))


class Block(nn.Module):
    """A transformer block that returns (hidden states, attention weights), as many do."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x):
        h = self.norm(x)
        att, weights = self.attn(h, h, h, need_weights=True)
        x = x + att
        return x + self.mlp(x), weights


class TinyLM(nn.Module):
    """Token ids -> embedding (scaled, as Marian does on its input_ids path) -> 2 blocks -> a
    classifier on the mean of the last block's states."""

    def __init__(self, vocab=30, width=8, classes=3):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.1 * torch.randn(12, width))
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, classes)
        self.scale = width**0.5

    def forward(self, input_ids, weight=None):
        x = self.embed(input_ids) * self.scale + self.position[: input_ids.shape[1]]
        for block in self.blocks:
            x, _ = block(x)
        pooled = x.mean(1) if weight is None else (x * weight[:, :, None]).sum(1)
        return self.head(pooled)

    def tail_from(self, i, a, weight=None):
        """The model as a function of block i's hidden states a (B, T, E)."""
        x = a
        for block in self.blocks[i + 1 :]:
            x, _ = block(x)
        pooled = x.mean(1) if weight is None else (x * weight[:, :, None]).sum(1)
        return self.head(pooled)

    def tail_embed(self, a):
        """The model as a function of the embedding module's output a (B, T, E)."""
        x = a * self.scale + self.position[: a.shape[1]]
        for block in self.blocks:
            x, _ = block(x)
        return self.head(x.mean(1))


def tiny_lm():
    return TinyLM().double().eval()


def token_batch(b=3, t=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30, (b, t), generator=gen), torch.randint(0, 3, (b,), generator=gen)


# ---------------------------------------------------------------------------------------------
# Against plain autograd


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_hidden_layer_matches_autograd(backend):
    model = mlp()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    ids = torch.tensor([3, 1, 4, 1, 5])
    a = model[:2](x).detach()
    want, want_trace, _ = reference(model[2:], a, y, ids, 4)
    fd = CurvatureScorer(model, at="1", h=H, n_probes=4, backend=backend).score(x, y, ids)
    torch.testing.assert_close(fd.curvature, want, **EXACT)
    torch.testing.assert_close(fd.trace, want_trace, **EXACT)
    # hvp: H r exactly; the fd reference's O(h) term at h = 1e-4 on O(1) curvatures is ~1e-4.
    hvp = CurvatureScorer(model, at="1", method="hvp", n_probes=4, backend=backend).score(x, y, ids)
    torch.testing.assert_close(hvp.curvature, want, rtol=1e-3, atol=0)


@pytest.mark.parametrize("method", ["fd", "hvp", "zo"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_equals_input_space_scoring_of_the_tail(method, backend):
    """Every method and backend: scoring at layer '3' equals scoring the tail's input."""
    model = mlp()
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 4, (6,))
    kwargs = {"h": 1e-3, "n_probes": 3, "method": method, "backend": backend, "seed": 7}
    at = CurvatureScorer(model, at=model[3], **kwargs).score(x, y)
    tail = CurvatureScorer(model[4:], **kwargs).score(model[:4](x).detach(), y)
    for field in ("curvature", "trace", "frobenius_sq", "loss", "grad_norm", "margin"):
        torch.testing.assert_close(getattr(at, field), getattr(tail, field), **EXACT,
                                   equal_nan=True, msg=field)  # fmt: skip


def test_cnn_hidden_layer_with_in_place_residual_matches_autograd():
    model = SmallCNN().double().eval()
    x, y = torch.randn(3, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (3,))
    ids = torch.tensor([0, 5, 2])
    a = model.conv(torch.tanh(model.stem(x))).detach()
    want, _, want_map = reference(lambda v: model.tail(v, x), a, y, ids, 3)
    scorer = CurvatureScorer(model, at="conv", h=H, n_probes=3, backend="torch")
    out = scorer.score(x, y, ids, per_position=True)  # positions: the 4 channels
    torch.testing.assert_close(out.curvature, want, **EXACT)
    torch.testing.assert_close(out.curvature_map, want_map, **EXACT)
    # The in-place residual did not reach the scored activation: the model is left as found.
    assert not any(p.grad is not None for p in model.parameters())


def test_transformer_block_with_tuple_output_and_per_token_map():
    model = tiny_lm()
    input_ids, y = token_batch()
    ids = torch.tensor([2, 0, 9])
    with torch.no_grad():
        a = model.embed(input_ids) * model.scale + model.position[:7]
        a, _ = model.blocks[0](a)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :3] = False
    mask[2, 5:] = False
    want, want_trace, want_map = reference(lambda v: model.tail_from(0, v), a, y, ids, 3, mask=mask)
    for at in ("blocks.0", model.blocks[0]):
        scorer = CurvatureScorer(model, at=at, h=H, n_probes=3, backend="torch")
        out = scorer.score(input_ids, y, ids, probe_mask=mask, per_position=True)
        torch.testing.assert_close(out.curvature, want, **EXACT)
        torch.testing.assert_close(out.trace, want_trace, **EXACT)
        torch.testing.assert_close(out.curvature_map, want_map, **EXACT)
        assert bool((out.curvature_map[~mask] == 0).all())


def test_embedding_module_with_integer_ids_matches_autograd():
    """At the embedding: the scale the model applies after the lookup is the model's own."""
    model = tiny_lm()
    input_ids, y = token_batch(seed=1)
    a = model.embed(input_ids).detach()
    want, _, want_map = reference(model.tail_embed, a, y, torch.arange(3), 4)
    for method in ("fd", "hvp"):
        out = CurvatureScorer(model, at="embed", h=H, n_probes=4, method=method,
                              backend="torch").score(input_ids, y, per_position=True)  # fmt: skip
        tol = EXACT if method == "fd" else {"rtol": 1e-3, "atol": 0}
        torch.testing.assert_close(out.curvature, want, **tol)
        torch.testing.assert_close(out.curvature_map, want_map, **tol)


def test_per_sample_keyword_inputs_travel_with_the_rows():
    model = tiny_lm()
    input_ids, y = token_batch(seed=2)
    weight = torch.rand(3, 7, dtype=torch.float64)
    with torch.no_grad():
        a, _ = model.blocks[0](model.embed(input_ids) * model.scale + model.position[:7])
    want, _, _ = reference(lambda v: model.tail_from(0, v, weight), a, y, torch.arange(3), 3)
    scorer = CurvatureScorer(model, at="blocks.0", h=H, n_probes=3, backend="torch", max_batch=4)
    out = scorer.score(input_ids, y, weight=weight)
    torch.testing.assert_close(out.curvature, want, **EXACT)


class Twice(nn.Module):
    """Applies the same layer twice in one forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.layer = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


def test_at_call_names_the_call():
    model = Twice().double().eval()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    first = model.layer(x).detach()
    second = model.layer(torch.tanh(first)).detach()
    tails = {
        0: (first, lambda v: model.head(torch.tanh(model.layer(torch.tanh(v))))),
        1: (second, lambda v: model.head(torch.tanh(v))),
    }
    for call, (a, tail) in tails.items():
        want, _, _ = reference(tail, a, y, torch.arange(4), 3)
        out = CurvatureScorer(model, at="layer", at_call=call, h=H, n_probes=3,
                              backend="torch").score(x, y)  # fmt: skip
        torch.testing.assert_close(out.curvature, want, **EXACT)


class DictOutput(nn.Module):
    """A module returning a mapping whose first floating entry is the activation."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 6)

    def forward(self, x):
        return {"steps": torch.tensor(1), "hidden": torch.tanh(self.lin(x)), "aux": x.sum(1)}


class WithDictLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.inner = DictOutput()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out = self.inner(x)
        return self.head(out["hidden"]) + out["aux"][:, None] * out["steps"]


def test_mapping_output_perturbs_its_first_floating_tensor():
    model = WithDictLayer().double().eval()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    a = model.inner(x)["hidden"].detach()
    aux = x.sum(1)[:, None]
    want, _, _ = reference(lambda v: model.head(v) + aux, a, y, torch.arange(4), 3)
    out = CurvatureScorer(model, at="inner", h=H, n_probes=3, backend="torch").score(x, y)
    torch.testing.assert_close(out.curvature, want, **EXACT)


# ---------------------------------------------------------------------------------------------
# The schedule: adaptive rounds and chunks at a layer


def test_rtol_and_max_batch_equal_one_pass():
    model = tiny_lm()
    input_ids, y = token_batch(b=4, seed=3)
    base = CurvatureScorer(model, at="blocks.1", h=1e-3, n_probes=6, backend="torch")
    whole = base.score(input_ids, y, per_position=True)
    chunked = CurvatureScorer(model, at="blocks.1", h=1e-3, n_probes=6, backend="torch",
                              max_batch=5).score(input_ids, y, per_position=True)  # fmt: skip
    torch.testing.assert_close(chunked.curvature, whole.curvature, **EXACT)
    torch.testing.assert_close(chunked.curvature_map, whole.curvature_map, **EXACT)
    with torch.no_grad():
        a = model.embed(input_ids) * model.scale + model.position[:7]
        a, _ = model.blocks[0](a)
        a, _ = model.blocks[1](a)
    kwargs = {"h": 1e-3, "n_probes": 2, "backend": "torch", "rtol": 0.05, "max_probes": 12}
    for max_batch in (None, 7):
        at = CurvatureScorer(model, at="blocks.1", max_batch=max_batch, **kwargs)
        tail = CurvatureScorer(lambda v: model.head(v.mean(1)), max_batch=max_batch, **kwargs)
        got, want = at.score(input_ids, y), tail.score(a, y)
        assert torch.equal(got.n_probes, want.n_probes)
        assert int(got.n_probes.max()) > 2  # some samples took more than one round
        torch.testing.assert_close(got.curvature, want.curvature, **EXACT)


# ---------------------------------------------------------------------------------------------
# Misuse


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


class Ids(nn.Module):
    """A tokenizer-like module whose output is integer."""

    def forward(self, x):
        return (x * 10).long()


class IntegerLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.ids = Ids()
        self.embed = nn.Embedding(100, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.embed(self.ids(x).clamp(0, 99)).sum(1))


def test_misuse_is_refused_with_a_clear_error():
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match=r"at='unused' \(Linear\) was never called"):
        CurvatureScorer(Unused(), at="unused").score(x, y)
    twice = Twice()
    x5 = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match=r"called 2 times in one forward.*at_call=k, 0 <= k < 2"):
        CurvatureScorer(twice, at="layer").score(x5, y)
    with pytest.raises(RuntimeError, match=r"at_call=2, but .* called 2 time\(s\).*below 2"):
        CurvatureScorer(twice, at="layer", at_call=2).score(x5, y)
    with pytest.raises(TypeError, match=r"no floating-point tensor to perturb.*torch.int64"):
        CurvatureScorer(IntegerLayer(), at="ids").score(torch.rand(2, 4), y)
    with pytest.raises(ValueError, match=r"at='missing' is not a submodule of Unused"):
        CurvatureScorer(Unused(), at="missing")
    with pytest.raises(ValueError, match="at must be a submodule of the model"):
        CurvatureScorer(Unused(), at=nn.Linear(4, 4))
    with pytest.raises(TypeError, match="at must be a submodule of the model or its qualified"):
        CurvatureScorer(Unused(), at=3)
    with pytest.raises(ValueError, match="at_call=0 names a call of the module at, and at is None"):
        CurvatureScorer(Unused(), at_call=0)
    with pytest.raises(ValueError, match="at_call must be a call index >= 0"):
        CurvatureScorer(Unused(), at="used", at_call=-1)


def test_integer_input_is_refused_only_without_at():
    model = IntegerLayer()
    ids = torch.randint(0, 99, (2, 4))
    y = torch.tensor([0, 1])

    class FromIds(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids):
            return self.inner.head(self.inner.embed(ids).sum(1))

    wrapped = FromIds()
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        CurvatureScorer(wrapped).score(ids, y)
    out = CurvatureScorer(wrapped, at="inner.embed", h=1e-2, n_probes=2).score(ids, y)
    assert bool(torch.isfinite(out.curvature).all())


def test_low_precision_activation_refuses_fd():
    model = mlp().to(torch.bfloat16)
    x, y = torch.randn(2, 6, dtype=torch.bfloat16), torch.tensor([0, 1])
    with pytest.raises(TypeError, match=r"float32 or float64 activation.*bfloat16.*method='hvp'"):
        CurvatureScorer(model, at="1").score(x, y)


def test_activation_without_batch_rows_is_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x.reshape(-1, 4)).reshape(x.shape[0], -1)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.flat = Flat()
            self.pool = nn.Flatten(0)

        def forward(self, x):
            return self.pool(self.flat(x)).reshape(x.shape[0], -1)[:, :2]

    with pytest.raises(ValueError, match=r"first dimension is not the batch's B = 2"):
        CurvatureScorer(Outer(), at="pool").score(torch.randn(2, 1, 4), torch.tensor([0, 1]))


def test_integer_input_error_points_to_at():
    with pytest.raises(TypeError, match=r"at=<its embedding module>\) on the ids themselves"):
        CurvatureScorer(mlp()).score(torch.randint(0, 9, (2, 6)), torch.tensor([0, 1]))


def test_inference_mode_and_empty_batches():
    model = tiny_lm()
    input_ids, y = token_batch(seed=4)
    scorer = CurvatureScorer(model, at="blocks.0", h=1e-3, n_probes=2, backend="torch")
    want = scorer.score(input_ids, y, per_position=True)
    with torch.inference_mode():
        got = scorer.score(input_ids, y, per_position=True)
    torch.testing.assert_close(got.curvature, want.curvature, rtol=0, atol=0)
    torch.testing.assert_close(got.curvature_map, want.curvature_map, rtol=0, atol=0)
    empty = scorer.score(input_ids[:0], y[:0], per_position=True)
    assert empty.curvature.shape == (0,) and empty.curvature_map.shape == (0, 7)
