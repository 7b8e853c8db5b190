"""score_dataset, IndexedDataset, CurvatureTracker and score_checkpoints."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from curvkern import (
    CurvatureScorer,
    CurvatureTracker,
    IndexedDataset,
    score_checkpoints,
    score_dataset,
)
from curvkern.scores import SCORE_FIELDS

from .conftest import labelled_batch, smooth_classifier

N = 23
EXACT = dict(rtol=1e-8, atol=1e-12, equal_nan=True)


@pytest.fixture
def data():
    x, y = labelled_batch(N)
    return IndexedDataset(TensorDataset(x, y))


def _loader(dataset, **kw):
    return DataLoader(dataset, batch_size=kw.pop("batch_size", 5), **kw)


def _assert_same(a, b):
    for field, value in a.to_dict().items():
        torch.testing.assert_close(value, getattr(b, field), msg=field, **EXACT)


def test_indexed_dataset(data):
    x, y, i = data[4]
    assert i == 4 and len(data) == N
    with pytest.raises(TypeError, match=r"expects \(x, y\) items"):
        IndexedDataset([(1, 2, 3)])[0]


def test_one_row_per_id_whatever_the_batching(data):
    model = smooth_classifier()
    scorer = CurvatureScorer(model, n_probes=4)
    x, y = data.dataset.tensors
    direct = scorer.score(x, y, torch.arange(N))
    for kw in (dict(batch_size=5), dict(batch_size=1), dict(batch_size=N, shuffle=True)):
        result = score_dataset(scorer, _loader(data, **kw), progress=False)
        assert len(result) == N and result.ids.tolist() == list(range(N))
        _assert_same(result, direct)


def test_unseen_ids_are_nan(data):
    scorer = CurvatureScorer(smooth_classifier(), n_probes=2)
    seen = [0, 3, 4, 10, 22]
    result = score_dataset(scorer, _loader(Subset(data, seen)), num_samples=N, progress=False)
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
    with pytest.raises(TypeError, match=r"must yield \(x, y, ids\) batches"):
        score_dataset(scorer, _loader(data.dataset), progress=False)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, num_samples = 10\), got id 1"):
        score_dataset(scorer, _loader(Subset(data, [1, 12])), num_samples=10, progress=False)


def test_progress_bar_on_a_terminal_only(data, capsys, monkeypatch):
    scorer = CurvatureScorer(smooth_classifier(), n_probes=1)
    score_dataset(scorer, _loader(data), progress=True)
    assert capsys.readouterr().err == ""  # not a terminal under pytest
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    score_dataset(scorer, _loader(data), progress=True)
    err = capsys.readouterr().err
    assert re.search(rf"100%.*{N}(\.0)?/{N}(\.0)?", err) and "sample/s" in err
    score_dataset(scorer, _loader(data), progress=False)
    assert capsys.readouterr().err == ""


# --- CurvatureTracker -------------------------------------------------------------------------


def _train_step(model, lr=0.5):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + lr * 0.1)


def test_tracker_averages_epochs(data, tmp_path):
    model = smooth_classifier()
    scorer = CurvatureScorer(model, n_probes=3)
    tracker = CurvatureTracker(scorer, N, tmp_path / "curv.npz")
    per_epoch = {}
    for epoch in (0, 2, 4):
        per_epoch[epoch] = tracker.score_epoch(_loader(data), epoch, progress=False)
        _train_step(model)
    assert tracker.epochs == [0, 2, 4]
    assert tracker.history.shape == (3, N)
    expected = torch.stack([per_epoch[e].curvature for e in (0, 2, 4)]).mean(0)
    torch.testing.assert_close(tracker.mean, expected)
    torch.testing.assert_close(tracker.field_history("loss")[1], per_epoch[2].loss)
    torch.testing.assert_close(
        tracker.field_mean("trace"), torch.stack([per_epoch[e].trace for e in (0, 2, 4)]).mean(0)
    )
    with pytest.raises(ValueError, match="name must be one of"):
        tracker.field_history("accuracy")

    # re-scoring an epoch replaces it
    again = tracker.score_epoch(_loader(data), 2, progress=False)
    assert tracker.epochs == [0, 2, 4]
    torch.testing.assert_close(tracker.history[1], again.curvature)

    # a new tracker on the file resumes with the same history
    resumed = CurvatureTracker(CurvatureScorer(model, n_probes=3), N, tmp_path / "curv.npz")
    assert resumed.epochs == [0, 2, 4]
    for name in SCORE_FIELDS:
        torch.testing.assert_close(resumed.field_history(name), tracker.field_history(name))
    # the file is plain arrays: it loads without pickle
    with np.load(tmp_path / "curv.npz", allow_pickle=False) as f:
        assert f["curvature"].shape == (3, N) and f["epochs"].tolist() == [0, 2, 4]


def test_tracker_mean_ignores_unscored_epochs_per_sample(data):
    scorer = CurvatureScorer(smooth_classifier(), n_probes=2)
    tracker = CurvatureTracker(scorer, N)
    full = tracker.score_epoch(_loader(data), 0, progress=False)
    tracker.score_epoch(_loader(Subset(data, [1, 2])), 1, progress=False)
    # samples scored only at epoch 0 keep their epoch-0 curvature as their mean
    torch.testing.assert_close(tracker.mean[5:], full.curvature[5:])
    assert tracker.history.shape == (2, N) and torch.isnan(tracker.history[1, 5:]).all()


def test_tracker_refuses_other_settings(data, tmp_path):
    path = tmp_path / "t.npz"
    CurvatureTracker(CurvatureScorer(smooth_classifier(), n_probes=2), N, path).score_epoch(
        _loader(data), 0, progress=False
    )
    with pytest.raises(ValueError, match="n_probes: file 2, scorer 3"):
        CurvatureTracker(CurvatureScorer(smooth_classifier(), n_probes=3), N, path)
    with pytest.raises(ValueError, match="holds 23 samples, this tracker has num_samples = 24"):
        CurvatureTracker(CurvatureScorer(smooth_classifier(), n_probes=2), N + 1, path)
    with pytest.raises(ValueError, match="scores must have num_samples = 23 rows"):
        CurvatureTracker(CurvatureScorer(smooth_classifier()), N).record(
            0, CurvatureScorer(smooth_classifier()).score(*labelled_batch(3))
        )


def test_failed_save_keeps_the_previous_file(data, tmp_path, monkeypatch):
    path = tmp_path / "t.npz"
    tracker = CurvatureTracker(CurvatureScorer(smooth_classifier(), n_probes=2), N, path)
    tracker.score_epoch(_loader(data), 0, progress=False)
    before = path.read_bytes()

    def failing_savez(file, **arrays):  # writes part of a file, then the disk fills up
        file.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="No space left"):
        tracker.score_epoch(_loader(data), 1, progress=False)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.npz"]  # the temporary file is gone
    monkeypatch.undo()
    assert CurvatureTracker(CurvatureScorer(smooth_classifier(), n_probes=2), N, path).epochs == [0]


def test_killed_during_saves_leaves_a_loadable_file(tmp_path):
    # A process saves a large tracker over and over; it is killed at an arbitrary moment. The
    # file must then hold one complete save (old or new), never a torn one.
    path = tmp_path / "big.npz"
    script = textwrap.dedent(
        f"""
        import sys, torch
        from curvkern import CurvatureScorer, CurvatureTracker, CurvatureScores
        n = 400_000
        tracker = CurvatureTracker(CurvatureScorer(lambda x: x), n, {str(path)!r})
        epoch = 0
        while True:
            scores = CurvatureScores.empty(1e-3, "fd", size=n)
            scores.curvature.fill_(float(epoch))
            tracker.record(epoch, scores)
            print(epoch, flush=True)
            epoch += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let a few saves complete
            assert proc.stdout.readline(), "the saving process died"
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    tracker = CurvatureTracker(CurvatureScorer(lambda x: x), 400_000, path)
    assert len(tracker.epochs) >= 3
    history = tracker.history
    assert torch.equal(history[:, 0], torch.arange(len(tracker.epochs), dtype=history.dtype))


# --- score_checkpoints ------------------------------------------------------------------------


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
        model, files, _loader(data), n_probes=2, progress=False, path=tmp_path / "series.npz"
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
        model, {9: tmp_path / "wrapped.pt"}, _loader(data), n_probes=2, progress=False
    )
    torch.testing.assert_close(wrapped.history[0], tracker.history[2])

    # resuming from the tracker's file skips the epochs already scored
    calls = []

    class CountingLoader:
        dataset = data

        def __iter__(self):
            calls.append(1)
            return iter(_loader(data))

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
        score_checkpoints(smooth_classifier(), [bad], _loader(data), progress=False)
    plain = tmp_path / "plain.pt"
    torch.save([1, 2], plain)
    with pytest.raises(ValueError, match="expected a state_dict"):
        score_checkpoints(smooth_classifier(), [plain], _loader(data), progress=False)


def test_checkpoint_epochs_from_names():
    from curvkern.dataset import _checkpoint_epochs

    assert _checkpoint_epochs(["a/run3_ep10.pt", "a/run3_ep2.pt"]) == [
        (2, "a/run3_ep2.pt"),
        (10, "a/run3_ep10.pt"),
    ]
    assert _checkpoint_epochs(["last.pt", "best.pt"]) == [(0, "last.pt"), (1, "best.pt")]
    assert _checkpoint_epochs({3: "x.pt", 1: "y.pt"}) == [(1, "y.pt"), (3, "x.pt")]


def test_saved_file_permissions_follow_the_umask(data, tmp_path):
    old = os.umask(0o022)
    try:
        tracker = CurvatureTracker(
            CurvatureScorer(smooth_classifier(), n_probes=1), N, tmp_path / "t.npz"
        )
        tracker.score_epoch(_loader(data), 0, progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "t.npz").stat().st_mode & 0o777 == 0o644
