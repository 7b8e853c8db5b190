"""SampleWarning and PassWarnings (curvkern.diagnostics): a pass's sample warnings merged per kind
and counted over the pass, other warnings once, pointing at the caller's line."""

import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

from curvkern import CurvatureScorer, CurvatureTracker, IndexedDataset, SampleWarning, score_dataset

from .conftest import N, PoisonedRows, indexed_loader, smooth_classifier


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
