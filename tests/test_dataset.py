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
    IndexedDataset,
    score_dataset,
)
from curvkern.scores import SCORE_FIELDS

from .conftest import EXACT, N, indexed_loader, smooth_classifier


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


def test_near_copies_sharing_ids_are_refused_and_copies_warned_about(data):
    from torch.utils.data import ConcatDataset

    x, y = data.dataset.tensors
    x = x.float()
    data = IndexedDataset(TensorDataset(x, y))
    scorer = CurvatureScorer(smooth_classifier(dtype=torch.float32), n_probes=2)
    plain = score_dataset(scorer, indexed_loader(data), progress=False)
    # A near copy scores within the rounding tolerance of the score check (that is how the two
    # parts were merged into one row per pair, leaving the other N rows NaN without a word) ...
    near = x + 1e-6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    copy = scorer.score(near, y, torch.arange(N))
    assert (copy.loss - plain.loss).abs().max() <= 1e-4 * plain.loss.abs().max()
    # ... but its inputs differ: refused, naming the cause and the fix.
    parts = ConcatDataset([data, IndexedDataset(TensorDataset(near, y))])
    with pytest.raises(
        ValueError,
        match=rf"id 0 arrived twice with different inputs .*{N} ids in all.*"
        r"IndexedDataset\(ConcatDataset",
    ):
        score_dataset(scorer, indexed_loader(parts, batch_size=7), progress=False)
    relabeled = ConcatDataset([data, IndexedDataset(TensorDataset(x, (y + 1) % 4))])
    with pytest.raises(ValueError, match="arrived twice with different"):
        score_dataset(scorer, indexed_loader(relabeled), progress=False)
    # An exact copy cannot be told apart by its values, but leaves the N rows of the
    # concatenation's second half NaN: warned about.
    doubled = ConcatDataset([data, data])
    with pytest.warns(UserWarning, match=rf"{N} rows repeated an id .* {N} of the {2 * N} ids"):
        result = score_dataset(scorer, indexed_loader(doubled), progress=False)
    assert torch.isnan(result.curvature[N:]).all()
    # Repeats that leave no id out (a sampler's padding), and ids left out without repeats (a
    # Subset), are no such sign.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score_dataset(scorer, indexed_loader(Subset(data, [*range(N), 0, 5])), progress=False)
        score_dataset(scorer, indexed_loader(Subset(data, [3, 4, 9])), progress=False)
    # The same sample in batches of other padded lengths (a token model's rows) is not compared
    # by its inputs: tensors of another row size.
    from curvkern.dataset import _different_inputs, _fingerprint

    short = _fingerprint(torch.tensor([[5, 6, 0]]), torch.tensor([1]), 1)
    long = _fingerprint(torch.tensor([[5, 6, 0, 0, 0]]), torch.tensor([1]), 1)
    assert not _different_inputs(short, long).any()
    assert _different_inputs(short, _fingerprint(torch.tensor([[5, 7, 0]]), torch.tensor([1]), 1))


def test_batch_forms(data):
    scorer = CurvatureScorer(smooth_classifier(), n_probes=1)
    x, y = data.dataset.tensors
    with pytest.raises(
        TypeError, match=r"\(x, y, ids, model_inputs: dict\) batches, got tuple of length 4"
    ):
        score_dataset(scorer, [(x, y, torch.arange(N), "inputs")], progress=False)
    with pytest.raises(TypeError, match="got dict"):
        score_dataset(scorer, [{"x": x}], progress=False)
