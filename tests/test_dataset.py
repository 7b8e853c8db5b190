"""score_dataset and IndexedDataset: one row per id, ids through Subsets, ids that collide."""

import re
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from curvkern import (
    CurvatureScorer,
    CurvatureTracker,
    IndexedDataset,
    SampleWarning,
    score_dataset,
)
from curvkern.scores import SCORE_FIELDS

from .conftest import EXACT, N, PoisonedRows, indexed_loader, smooth_classifier


def _assert_same(a, b):
    for field, value in a.to_dict().items():
        torch.testing.assert_close(value, getattr(b, field), msg=field, **EXACT)


def test_indexed_dataset(data):
    x, y, i = data[4]
    assert i == 4 and len(data) == N
    with pytest.raises(
        TypeError,
        match=r"expects \(x, y\) or \(x, y, model_inputs: dict\) items, got tuple of length 3",
    ):
        IndexedDataset([(1, 2, 3)])[0]


def test_one_row_per_id_whatever_the_batching(data):
    model = smooth_classifier()
    scorer = CurvatureScorer(model, n_probes=4)
    x, y = data.dataset.tensors
    direct = scorer.score(x, y, torch.arange(N))
    for kw in (dict(batch_size=5), dict(batch_size=1), dict(batch_size=N, shuffle=True)):
        result = score_dataset(scorer, indexed_loader(data, **kw), progress=False)
        assert len(result) == N and result.ids.tolist() == list(range(N))
        _assert_same(result, direct)


def test_unseen_ids_are_nan(data):
    scorer = CurvatureScorer(smooth_classifier(), n_probes=2)
    seen = [0, 3, 4, 10, 22]
    result = score_dataset(
        scorer, indexed_loader(Subset(data, seen)), num_samples=N, progress=False
    )
    assert len(result) == N
    unseen = torch.ones(N, dtype=torch.bool)
    unseen[seen] = False
    for field in SCORE_FIELDS:
        assert torch.isnan(getattr(result, field)[unseen]).all()
        assert torch.isfinite(getattr(result, field)[~unseen]).all()
    assert (result.n_probes[unseen] == 0).all() and (result.n_probes[~unseen] == 2).all()
    # without num_samples or a sized dataset: the largest id + 1
    batches = [(data.dataset.tensors[0][[3]], data.dataset.tensors[1][[3]], torch.tensor([3]))]
    assert len(score_dataset(scorer, batches, progress=False)) == 4


def test_bad_loaders(data):
    scorer = CurvatureScorer(smooth_classifier(), n_probes=1)
    with pytest.raises(
        TypeError, match=r"must yield \(x, y, ids\) or .* batches, got list of length 2"
    ):
        score_dataset(scorer, indexed_loader(data.dataset), progress=False)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, num_samples = 10\), got id 1"):
        score_dataset(scorer, indexed_loader(Subset(data, [1, 12])), num_samples=10, progress=False)


def test_progress_bar_on_a_terminal_only(data, capsys, monkeypatch):
    scorer = CurvatureScorer(smooth_classifier(), n_probes=1)
    score_dataset(scorer, indexed_loader(data), progress=True)
    assert capsys.readouterr().err == ""  # not a terminal under pytest
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    score_dataset(scorer, indexed_loader(data), progress=True)
    err = capsys.readouterr().err
    assert re.search(rf"100%.*{N}(\.0)?/{N}(\.0)?", err) and "sample/s" in err
    score_dataset(scorer, indexed_loader(data), progress=False)
    assert capsys.readouterr().err == ""


# --- ids through Subsets, model inputs, any scorer, ids that collide ---------------------------


def test_indexed_subset_yields_the_parents_indices(data):
    base = data.dataset  # TensorDataset of N (x, y) items
    idx = [7, 2, 19, 11, 4, 22]
    sub = IndexedDataset(Subset(base, idx))
    assert [sub[i][2] for i in range(len(sub))] == idx and sub.num_samples == N
    torch.testing.assert_close(sub[2][0], base[19][0])
    # nested Subsets compose; index containers of any kind; negative indices count from the end
    nested = IndexedDataset(Subset(Subset(base, np.array(idx)), torch.tensor([5, 0, -1])))
    assert [nested[i][2] for i in range(3)] == [22, 7, 22] and nested.num_samples == N
    assert IndexedDataset(Subset(base, range(N - 3, N)))[0][2] == N - 3
    assert IndexedDataset(Subset(base, [-2]))[0][2] == N - 2
    # positions in the Subset itself, when asked
    local = IndexedDataset(Subset(base, idx), through_subsets=False)
    assert [local[i][2] for i in range(len(local))] == list(range(6)) and local.num_samples == 6


def test_scores_through_a_subset_land_in_the_parents_rows(data):
    base = data.dataset
    scorer = CurvatureScorer(smooth_classifier(), n_probes=3)
    full = score_dataset(scorer, indexed_loader(IndexedDataset(base)), progress=False)
    idx = [7, 2, 19, 11, 4, 22]
    part = score_dataset(scorer, indexed_loader(IndexedDataset(Subset(base, idx))), progress=False)
    assert len(part) == N  # num_samples defaults to len(base)
    _assert_same(part[idx], full[idx])  # same rows, same probes
    rest = torch.ones(N, dtype=torch.bool)
    rest[idx] = False
    assert torch.isnan(part.curvature[rest]).all()
    # Subset(IndexedDataset(ds)) also yields ds's ids, and N defaults to len(ds)
    outer = score_dataset(scorer, indexed_loader(Subset(IndexedDataset(base), idx)), progress=False)
    _assert_same(outer, part)


class _Shifted:
    """A scorer of a model with a keyword input: model(x + shift) through score(**inputs)."""

    def __init__(self, scorer):
        self.scorer = scorer

    def score(self, x, y, ids, *, shift):
        return self.scorer.score(x + shift, y, ids)


def test_model_inputs_reach_any_scorer(data):
    x, y = data.dataset.tensors
    shift = torch.linspace(-1, 1, N, dtype=x.dtype)[:, None].expand_as(x)
    items = [(x[i], y[i], {"shift": shift[i]}) for i in range(N)]
    indexed = IndexedDataset(items)
    assert len(indexed[3]) == 4 and indexed[3][2] == 3
    inner = CurvatureScorer(smooth_classifier(), n_probes=2)
    result = score_dataset(_Shifted(inner), indexed_loader(indexed, batch_size=4), progress=False)
    _assert_same(result, inner.score(x + shift, y, torch.arange(N)))


def test_one_id_twice_with_other_scores_is_refused(data):
    from torch.utils.data import ConcatDataset

    x, y = data.dataset.tensors
    scorer = CurvatureScorer(smooth_classifier(), n_probes=2)
    first = IndexedDataset(TensorDataset(x[:12], y[:12]))
    second = IndexedDataset(TensorDataset(x[12:], y[12:]))
    with pytest.raises(ValueError, match=r"id 0 arrived twice with different scores .*11 ids"):
        score_dataset(scorer, indexed_loader(ConcatDataset([first, second])), progress=False)
    # the fix the message gives: index the concatenation
    joined = IndexedDataset(
        ConcatDataset([TensorDataset(x[:12], y[:12]), TensorDataset(x[12:], y[12:])])
    )
    _assert_same(
        score_dataset(scorer, indexed_loader(joined), progress=False),
        score_dataset(scorer, indexed_loader(data), progress=False),
    )
    # one sample scored twice (in other batches, e.g. a sampler's padding) is harmless
    twice = Subset(data, [*range(N), 3, 3, 17])
    _assert_same(
        score_dataset(scorer, indexed_loader(twice, batch_size=4), progress=False),
        score_dataset(scorer, indexed_loader(data), progress=False),
    )


def test_batch_forms(data):
    scorer = CurvatureScorer(smooth_classifier(), n_probes=1)
    x, y = data.dataset.tensors
    with pytest.raises(
        TypeError, match=r"\(x, y, ids, model_inputs: dict\) batches, got tuple of length 4"
    ):
        score_dataset(scorer, [(x, y, torch.arange(N), "inputs")], progress=False)
    with pytest.raises(TypeError, match="got dict"):
        score_dataset(scorer, [{"x": x}], progress=False)


def _sample_warnings(caught):
    return [w.message for w in caught if isinstance(w.message, SampleWarning)]


def test_sample_warnings_are_merged_over_the_pass(data):
    # Non-finite rows in three of the five batches: one warning, counted over all 23 samples.
    x, y = data.dataset.tensors
    x = x.clone()
    x[[2, 8, 14], 0] = 50.0  # NaN logits there
    dataset = IndexedDataset(TensorDataset(x, y))
    scorer = CurvatureScorer(PoisonedRows(smooth_classifier()), n_probes=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = score_dataset(scorer, indexed_loader(dataset), progress=False)
    (message,) = _sample_warnings(caught)
    assert str(message) == (
        f"3 of {N} samples (first: id 2) had a non-finite loss or gradient; their scores are NaN"
    )
    assert caught[0].filename == __file__  # points at the caller of score_dataset
    assert torch.isnan(scores.curvature).sum() == 3


def test_tracker_warnings_point_at_the_callers_line(data):
    x, y = data.dataset.tensors
    x = x.clone()
    x[[1, 12], 0] = 50.0  # NaN logits there
    dataset = IndexedDataset(TensorDataset(x, y))
    tracker = CurvatureTracker(CurvatureScorer(PoisonedRows(smooth_classifier()), n_probes=2), N)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.score_epoch(indexed_loader(dataset), epoch=1, progress=False)
    (w,) = [w for w in caught if isinstance(w.message, SampleWarning)]
    assert str(w.message).startswith(f"2 of {N} samples (first: id 1)")
    assert w.filename == __file__  # not curvkern/tracker.py


def test_zo_rounding_warning_merged_as_its_batches(data):
    # A float32 model fitted with large logits: method="zo" flags samples in most batches. The
    # merged warning counts them all and suggests the h of the median over all of them, as the
    # batches' own warnings merged say.
    model = smooth_classifier(dtype=torch.float32)
    with torch.no_grad():
        model[-1].weight.mul_(8)
        model[-1].bias.mul_(8)
    x, _ = data.dataset.tensors
    x = x.float()
    y = model(x).argmax(1)
    dataset = IndexedDataset(TensorDataset(x, y))
    scorer = CurvatureScorer(model, method="zo", n_probes=4)
    per_batch = []
    for xb, yb, ids in indexed_loader(dataset):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scorer.score(xb, yb, ids)
        per_batch += [w for w in _sample_warnings(caught) if w.kind.startswith("zo rounding")]
    assert len(per_batch) >= 2
    want = SampleWarning.combined(per_batch, N)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score_dataset(scorer, indexed_loader(dataset), progress=False)
    got = [w for w in _sample_warnings(caught) if w.kind.startswith("zo rounding")]
    assert len(got) == 1 and got[0].count == want.count and got[0].total == N
    assert str(got[0]) == want.render(want.count, N, want.first_id, want.values)
    assert f"{want.count} of {N} samples (first: id {want.first_id})" in str(got[0])


def test_other_warnings_once_per_pass(data):
    # A warning the scorer raises on every batch (here: token labels at padding would be one;
    # a plain UserWarning from the model stands in) is shown once, not once per batch.
    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = smooth_classifier()

        def forward(self, x):
            warnings.warn("the same words every call", UserWarning, stacklevel=1)
            return self.inner(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score_dataset(CurvatureScorer(Noisy(), n_probes=2), indexed_loader(data), progress=False)
    assert [str(w.message) for w in caught] == ["the same words every call"]


def test_error_filter_still_raises_in_the_batch(data):
    x, y = data.dataset.tensors
    x = x.clone()
    x[7, 0] = 50.0  # NaN logits there
    dataset = IndexedDataset(TensorDataset(x, y))
    scorer = CurvatureScorer(PoisonedRows(smooth_classifier()), n_probes=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleWarning)
        with pytest.raises(SampleWarning, match="1 of 5 samples .first: id 7."):
            score_dataset(scorer, indexed_loader(dataset), progress=False)
