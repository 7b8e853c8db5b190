"""Checkpoints: epochs from file names, loading, and score_checkpoints (resume)."""

import pytest
import torch

from curvkern import CurvatureScorer, score_checkpoints
from curvkern.checkpoints import checkpoint_epochs

from .conftest import indexed_loader, smooth_classifier
from .test_tracker import _train_step


def test_score_checkpoints(data, tmp_path):
    model = smooth_classifier()
    states = {}
    for epoch in (1, 5, 9):
        _train_step(model)
        states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(states[epoch], tmp_path / f"ckpt_{epoch:03d}.pt")
    torch.save({"model_state_dict": states[9], "epoch": 9}, tmp_path / "wrapped.pt")
    final = {k: v.clone() for k, v in model.state_dict().items()}

    files = sorted(tmp_path.glob("ckpt_*.pt"))
    tracker = score_checkpoints(
        model, files, indexed_loader(data), n_probes=2, progress=False, path=tmp_path / "series.npz"
    )
    assert tracker.epochs == [1, 5, 9]
    for epoch, state in states.items():
        reference = smooth_classifier()
        reference.load_state_dict(state)
        want = CurvatureScorer(reference, n_probes=2).score(*data.dataset.tensors)
        torch.testing.assert_close(tracker.history[tracker.epochs.index(epoch)], want.curvature)
    for k, v in model.state_dict().items():  # the model's own weights are back
        assert torch.equal(v, final[k])

    # a dict with the state under a common key; explicit epochs
    wrapped = score_checkpoints(
        model, {9: tmp_path / "wrapped.pt"}, indexed_loader(data), n_probes=2, progress=False
    )
    torch.testing.assert_close(wrapped.history[0], tracker.history[2])

    # resuming from the tracker's file skips the epochs already scored
    calls = []

    class CountingLoader:
        dataset = data

        def __iter__(self):
            calls.append(1)
            return iter(indexed_loader(data))

    files.append(tmp_path / "ckpt_011.pt")
    torch.save(states[9], files[-1])
    resumed = score_checkpoints(
        model, files, CountingLoader(), n_probes=2, progress=False, path=tmp_path / "series.npz"
    )
    assert resumed.epochs == [1, 5, 9, 11] and len(calls) == 1


def test_score_checkpoints_refuses_pickled_code(data, tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": smooth_classifier().state_dict(), "extra": CurvatureScorer}, bad)
    with pytest.raises(Exception, match="Weights only load failed"):
        score_checkpoints(smooth_classifier(), [bad], indexed_loader(data), progress=False)
    plain = tmp_path / "plain.pt"
    torch.save([1, 2], plain)
    with pytest.raises(ValueError, match="expected a state_dict"):
        score_checkpoints(smooth_classifier(), [plain], indexed_loader(data), progress=False)


def test_checkpoint_epochs_from_names():
    assert checkpoint_epochs(["a/run3_ep10.pt", "a/run3_ep2.pt"]) == [
        (2, "a/run3_ep2.pt"),
        (10, "a/run3_ep10.pt"),
    ]
    assert checkpoint_epochs(["last.pt", "best.pt"]) == [(0, "last.pt"), (1, "best.pt")]
    assert checkpoint_epochs({3: "x.pt", 1: "y.pt"}) == [(1, "y.pt"), (3, "x.pt")]
