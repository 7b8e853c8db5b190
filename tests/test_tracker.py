"""CurvatureTracker (means, baselines, keep_history, files, crash safety) and score_checkpoints."""

import math
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from curvkern import (
    CurvatureScorer,
    CurvatureScores,
    CurvatureTracker,
)
from curvkern.io import epoch_file_name, epochs_folder
from curvkern.scores import SCORE_FIELDS

from .conftest import N, indexed_loader, labelled_batch, smooth_classifier

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
        per_epoch[epoch] = tracker.score_epoch(indexed_loader(data), epoch, progress=False)
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
    again = tracker.score_epoch(indexed_loader(data), 2, progress=False)
    assert tracker.epochs == [0, 2, 4]
    torch.testing.assert_close(tracker.history[1], again.curvature)

    # a new tracker on the file resumes with the same history
    resumed = CurvatureTracker(CurvatureScorer(model, n_probes=3), N, tmp_path / "curv.npz")
    assert resumed.epochs == [0, 2, 4]
    for name in SCORE_FIELDS:
        torch.testing.assert_close(resumed.field_history(name), tracker.field_history(name))
    # the files are plain arrays: an index and one file per epoch, loaded without pickle
    with np.load(tmp_path / "curv.npz", allow_pickle=False) as f:
        assert f["epochs"].tolist() == [0, 2, 4]
    for epoch in (0, 2, 4):
        with np.load(epochs_folder(tmp_path / "curv.npz") / epoch_file_name(epoch)) as f:
            assert set(SCORE_FIELDS) <= set(f.files) and f["curvature"].shape == (N,)


def test_tracker_mean_ignores_unscored_epochs_per_sample(data):
    scorer = CurvatureScorer(smooth_classifier(), n_probes=2)
    tracker = CurvatureTracker(scorer, N)
    full = tracker.score_epoch(indexed_loader(data), 0, progress=False)
    with pytest.warns(UserWarning, match="without a curvature"):
        tracker.score_epoch(indexed_loader(Subset(data, [1, 2])), 1, progress=False)
    # samples scored only at epoch 0 keep their epoch-0 curvature as their mean
    torch.testing.assert_close(tracker.mean[5:], full.curvature[5:])
    assert tracker.history.shape == (2, N) and torch.isnan(tracker.history[1, 5:]).all()
    tracker.baselines()  # computing statistics leaves the kept (float64) epochs as they were
    assert torch.isnan(tracker.history[1, 5:]).all()


def test_tracker_refuses_other_settings(data, tmp_path):
    path = tmp_path / "t.npz"
    CurvatureTracker(CurvatureScorer(smooth_classifier(), n_probes=2), N, path).score_epoch(
        indexed_loader(data), 0, progress=False
    )
    with pytest.raises(ValueError, match="n_probes: file 2, scorer 3"):
        CurvatureTracker(CurvatureScorer(smooth_classifier(), n_probes=3), N, path)
    with pytest.raises(ValueError, match="holds 23 samples, this tracker has num_samples = 24"):
        CurvatureTracker(CurvatureScorer(smooth_classifier(), n_probes=2), N + 1, path)
    with pytest.raises(ValueError, match="scores must have num_samples = 23 rows"):
        CurvatureTracker(CurvatureScorer(smooth_classifier()), N).record(
            0, CurvatureScorer(smooth_classifier()).score(*labelled_batch(3))
        )


def _synthetic(n, epoch, n_probes=10, dtype=torch.float32, seed=0):
    """Scores of n samples as a scorer with n_probes would give them, values from (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    scores = CurvatureScores.empty(1e-3, "fd", dtype=dtype, size=n)
    for name in SCORE_FIELDS:
        getattr(scores, name).copy_(torch.rand(n, generator=gen, dtype=dtype))
    scores.correct.copy_((scores.correct > 0.4).to(dtype))
    scores.n_probes.fill_(n_probes)
    return scores


def _plain_scorer(**kw):
    return CurvatureScorer(lambda x: x, **kw)


# keep_history=True writes the epoch's file (call 0), then the index (call 1); False one file.
@pytest.mark.parametrize("keep_history, failing_call", [(True, 0), (True, 1), (False, 0)])
def test_failed_save_keeps_the_previous_state(tmp_path, monkeypatch, keep_history, failing_call):
    path = tmp_path / "t.npz"
    tracker = CurvatureTracker(_plain_scorer(), N, path, keep_history=keep_history)
    tracker.record(0, _synthetic(N, 0))
    tracker.record(1, _synthetic(N, 1))
    before = CurvatureTracker.load(path)
    calls = []
    real_savez = np.savez

    def failing_savez(file, **arrays):  # writes part of a file, then the disk fills up
        calls.append(1)
        if len(calls) - 1 < failing_call:
            return real_savez(file, **arrays)
        file.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="No space left"):
        tracker.record(2, _synthetic(N, 2))
    monkeypatch.undo()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # temporaries removed
    if keep_history:
        assert not [f for f in os.listdir(epochs_folder(path)) if f.endswith(".tmp")]
    after = CurvatureTracker(_plain_scorer(), N, path, keep_history=keep_history)
    assert after.epochs == before.epochs == [0, 1]
    torch.testing.assert_close(after.mean, before.mean, rtol=0, atol=0)
    # the tracker in memory still has epoch 2 and saves it with its next epoch
    tracker.record(3, _synthetic(N, 3))
    assert CurvatureTracker.load(path).epochs == [0, 1, 2, 3]


_KILLED_SCRIPT = """
import sys, torch
from curvkern import CurvatureScorer, CurvatureTracker, CurvatureScores
n = 400_000
tracker = CurvatureTracker(CurvatureScorer(lambda x: x), n, sys.argv[1],
                           keep_history=sys.argv[2] == "1")
epoch = 0
while True:
    scores = CurvatureScores.empty(1e-3, "fd", size=n)
    scores.curvature.fill_(float(epoch))
    scores.n_probes.fill_(10)
    tracker.record(epoch, scores)
    print(epoch, flush=True)
    epoch += 1
"""


@pytest.mark.parametrize("keep_history", [True, False])
def test_killed_during_saves_leaves_a_loadable_file(tmp_path, keep_history):
    # A process saves a large tracker over and over; it is killed at an arbitrary moment. The
    # files must then hold one complete save (old or new), never a torn one.
    path = tmp_path / "big.npz"
    args = [sys.executable, "-c", _KILLED_SCRIPT, str(path), str(int(keep_history))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let a few saves complete
            assert proc.stdout.readline(), "the saving process died"
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    tracker = CurvatureTracker(_plain_scorer(), 400_000, path, keep_history=keep_history)
    count = len(tracker.epochs)
    assert count >= 3 and tracker.epochs == list(range(count))
    if keep_history:
        history = tracker.history
        assert torch.equal(history[:, 0], torch.arange(count, dtype=history.dtype))
    # the mean of 0 .. count-1 in every row: no torn or mixed state
    assert torch.equal(tracker.mean, torch.full((400_000,), (count - 1) / 2))


@pytest.mark.parametrize("keep_history", [True, False])
def test_saved_file_permissions_follow_the_umask(data, tmp_path, keep_history):
    old = os.umask(0o022)
    try:
        path = tmp_path / "t.npz"
        tracker = CurvatureTracker(_plain_scorer(), N, path, keep_history=keep_history)
        tracker.record(0, _synthetic(N, 0))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    if keep_history:
        assert (epochs_folder(path) / epoch_file_name(0)).stat().st_mode & 0o777 == 0o644


def test_never_scored_ids_rank_last_and_warn_once_per_count(data):
    tracker = CurvatureTracker(CurvatureScorer(smooth_classifier(), n_probes=2), N)
    part = Subset(data, list(range(6, 16)))  # 10 of the N = 23 ids, as a random_split part
    with pytest.warns(UserWarning, match=f"epoch 0 left 13 of {N} ids without a curvature") as w:
        scores = tracker.score_epoch(indexed_loader(part), 0, progress=False)
    assert sum("without a curvature" in str(m.message) for m in w) == 1
    assert w[0].filename == __file__  # points at the caller's line
    # the same count at the next epochs: no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.score_epoch(indexed_loader(part), 1, progress=False)
        tracker.record(2, scores)
    # torch ranks NaN first: the idiom the docs used to show gave only never-scored ids
    assert set(tracker.mean.topk(5).indices.tolist()) <= set(range(6)) | set(range(16, N))
    top = tracker.top(10)
    assert sorted(top.indices.tolist()) == list(range(6, 16))
    order = torch.argsort(tracker.mean[6:16], descending=True) + 6
    assert top.indices.tolist() == order.tolist()
    torch.testing.assert_close(top.values, tracker.mean[top.indices].double())
    assert tracker.top(3, "loss").indices.tolist() == (
        (torch.argsort(tracker.field_mean("loss")[6:16], descending=True) + 6)[:3].tolist()
    )
    with pytest.raises(ValueError, match=r"k must lie in \[0, 10\]"):
        tracker.top(11)
    # another count is news: warned again; a full epoch is not warned about
    with pytest.warns(UserWarning, match=f"epoch 3 left {N - 2} of {N} ids"):
        tracker.score_epoch(indexed_loader(Subset(data, [1, 2])), 3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.score_epoch(indexed_loader(data), 4, progress=False)
    # drop_last leaves the remainder of the last batch unscored (N = 23, batches of 5)
    dropped = CurvatureTracker(CurvatureScorer(smooth_classifier(), n_probes=2), N)
    with pytest.warns(UserWarning, match=f"epoch 0 left 3 of {N} ids"):
        dropped.score_epoch(indexed_loader(data, drop_last=True), 0, progress=False)
    assert not set(dropped.top(20).indices.tolist()) & {20, 21, 22}


# --- keep_history=False, load --------------------------------------------------------

NAN = math.nan


def test_running_statistics_equal_the_history():
    n, epochs = 50, [0, 1, 3, 4, 7]
    kept = CurvatureTracker(_plain_scorer(), n)
    running = CurvatureTracker(_plain_scorer(), n, keep_history=False)
    for epoch in epochs:
        scores = _synthetic(n, epoch)
        scores.loss[epoch::5] = NAN  # some samples unscored in some epochs
        kept.record(epoch, scores)
        running.record(epoch, scores)
    assert running.epochs == kept.epochs == epochs
    for name in SCORE_FIELDS:
        torch.testing.assert_close(running.field_mean(name), kept.field_mean(name), rtol=0, atol=0)
    for name, value in kept.baselines().items():
        torch.testing.assert_close(running.baselines()[name], value, rtol=0, atol=0)
    # and both equal the plain mean over the history
    torch.testing.assert_close(kept.field_mean("loss"), kept.field_history("loss").nanmean(0))
    with pytest.raises(RuntimeError, match="keep_history=False: it keeps running statistics"):
        _ = running.history
    with pytest.raises(RuntimeError, match="keep_history=False"):
        running.field_history("loss")


def test_running_statistics_take_epochs_in_order_and_replace_the_last(tmp_path):
    n = 30
    path = tmp_path / "r.npz"
    tracker = CurvatureTracker(_plain_scorer(), n, path, keep_history=False)
    tracker.record(0, _synthetic(n, 0))
    tracker.record(2, _synthetic(n, 2, seed=1))  # a first attempt at epoch 2
    tracker.record(2, _synthetic(n, 2))  # recorded again: replaces it
    with pytest.raises(ValueError, match=r"epoch 1 comes before the last recorded epoch 2"):
        tracker.record(1, _synthetic(n, 1))
    with pytest.raises(ValueError, match="only the last one"):
        tracker.score_epoch([], 0)  # refused before any scoring
    tracker.record(5, _synthetic(n, 5))
    clean = CurvatureTracker(_plain_scorer(), n, keep_history=False)
    for epoch in (0, 2, 5):
        clean.record(epoch, _synthetic(n, epoch))
    assert tracker.epochs == clean.epochs == [0, 2, 5]
    for name, value in clean.baselines().items():
        torch.testing.assert_close(tracker.baselines()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(tracker.mean, clean.mean, rtol=0, atol=0)


@pytest.mark.parametrize("keep_history", [True, False])
def test_resume_is_exact(tmp_path, keep_history):
    n, path = 40, tmp_path / "t.npz"
    straight = CurvatureTracker(_plain_scorer(), n, keep_history=keep_history)
    first = CurvatureTracker(_plain_scorer(), n, path, keep_history=keep_history)
    for epoch in range(3):
        straight.record(epoch, _synthetic(n, epoch))
        first.record(epoch, _synthetic(n, epoch))
    resumed = CurvatureTracker(_plain_scorer(), n, path, keep_history=keep_history)
    for epoch in range(3, 6):
        straight.record(epoch, _synthetic(n, epoch))
        resumed.record(epoch, _synthetic(n, epoch))
    if not keep_history:  # the last epoch, as saved, is still replaceable after a resume
        again = CurvatureTracker(_plain_scorer(), n, path, keep_history=False)
        again.record(5, _synthetic(n, 5))
        torch.testing.assert_close(again.mean, straight.mean, rtol=0, atol=0)
    assert resumed.epochs == straight.epochs == list(range(6))
    for name in SCORE_FIELDS:
        torch.testing.assert_close(
            resumed.field_mean(name), straight.field_mean(name), rtol=0, atol=0
        )
    for name, value in straight.baselines().items():
        torch.testing.assert_close(resumed.baselines()[name], value, rtol=0, atol=0)
    other = not keep_history
    with pytest.raises(ValueError, match=f"written with keep_history={keep_history}"):
        CurvatureTracker(_plain_scorer(), n, path, keep_history=other)


def test_record_refuses_scores_of_other_settings():
    tracker = CurvatureTracker(_plain_scorer(n_probes=10, h=1e-3), 5)
    scores = _synthetic(5, 0)
    tracker.record(0, scores)
    with pytest.raises(
        ValueError, match=r"made with h = 0.01, this tracker's scorer has h = 0.001"
    ):
        tracker.record(1, CurvatureScores(**{**scores.__dict__, "h": 1e-2}))
    with pytest.raises(
        ValueError, match=r"method = 'hvp', this tracker's scorer has method = 'fd'"
    ):
        tracker.record(1, CurvatureScores(**{**scores.__dict__, "method": "hvp"}))
    fewer = _synthetic(5, 0, n_probes=4)
    fewer.n_probes[0] = 0  # an unscored sample is fine
    with pytest.raises(ValueError, match=r"n_probes = 4, this tracker's scorer gives 10"):
        tracker.record(1, fewer)
    adaptive = CurvatureTracker(_plain_scorer(n_probes=4, rtol=0.1, max_probes=12), 5)
    fewer.n_probes[1:] = torch.tensor([4, 8, 12, 9])
    adaptive.record(0, fewer)  # rounds of 4 up to 12 (the last round may be cut short)
    fewer.n_probes[1] = 13
    with pytest.raises(ValueError, match=r"n_probes = 13, this tracker's scorer gives 4 to 12"):
        adaptive.record(1, fewer)
    # rows in another order are put in id order; ids that are not 0 .. N-1 are refused
    shuffled = scores[torch.tensor([3, 0, 4, 1, 2])]
    tracker.record(2, shuffled)
    torch.testing.assert_close(tracker.field_history("loss")[-1], scores.loss)
    with pytest.raises(ValueError, match=r"must hold every id 0 .. 4 once"):
        tracker.record(3, scores[torch.tensor([0, 0, 1, 2, 3])])


@pytest.mark.parametrize("keep_history", [True, False])
def test_load_is_read_only(tmp_path, keep_history):
    path = tmp_path / "t.npz"
    tracker = CurvatureTracker(_plain_scorer(n_probes=10), 7, path, keep_history=keep_history)
    for epoch in (1, 3):
        tracker.record(epoch, _synthetic(7, epoch))
    loaded = CurvatureTracker.load(path)
    assert loaded.scorer is None and loaded.keep_history is keep_history
    assert loaded.epochs == [1, 3] and loaded.num_samples == 7
    torch.testing.assert_close(loaded.mean, tracker.mean, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"opened read-only by CurvatureTracker.load"):
        loaded.record(4, _synthetic(7, 4))
    with pytest.raises(RuntimeError, match="read-only"):
        loaded.score_epoch([], 4)
    with pytest.raises(FileNotFoundError, match="no tracker file"):
        CurvatureTracker.load(tmp_path / "missing.npz")
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 partial")
    with pytest.raises(ValueError, match="not a readable curvkern tracker file"):
        CurvatureTracker.load(tmp_path / "torn.npz")


def test_reads_format_1_files(tmp_path):
    # curvkern 0.1 wrote one .npz of (E, N) arrays of seven fields, settings in the metadata
    import json

    path = tmp_path / "v1.npz"
    meta = {
        "format": 1,
        "num_samples": 4,
        "method": "fd",
        "h": 1e-3,
        "n_probes": 10,
        "seed": 0,
        "rtol": None,
    }
    old = [
        "curvature",
        "curvature_stderr",
        "trace",
        "trace_stderr",
        "frobenius_sq",
        "loss",
        "grad_norm",
    ]
    arrays = {name: np.arange(8, dtype=np.float32).reshape(2, 4) + i for i, name in enumerate(old)}
    arrays["epochs"] = np.array([0, 1])
    arrays["metadata"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    tracker = CurvatureTracker(_plain_scorer(), 4, path)
    assert tracker.epochs == [0, 1]
    torch.testing.assert_close(tracker.mean, torch.tensor([2.0, 3.0, 4.0, 5.0]))
    assert torch.isnan(tracker.field_mean("margin")).all()  # a field format 1 did not have
    tracker.record(2, _synthetic(4, 2))  # saved in format 2, with the two old epochs
    assert CurvatureTracker.load(path).epochs == [0, 1, 2]
    with pytest.raises(ValueError, match="written with keep_history=True"):
        CurvatureTracker(_plain_scorer(), 4, path, keep_history=False)


def test_saving_an_epoch_leaves_the_earlier_files_alone(tmp_path):
    path = tmp_path / "t.npz"
    tracker = CurvatureTracker(_plain_scorer(), 1000, path)
    tracker.record(0, _synthetic(1000, 0))
    first = epochs_folder(path) / epoch_file_name(0)
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)
    for epoch in range(1, 4):
        tracker.record(epoch, _synthetic(1000, epoch))
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp  # not rewritten
    sizes = {(epochs_folder(path) / epoch_file_name(e)).stat().st_size for e in range(4)}
    assert len(sizes) == 1  # every epoch's file has one size: O(N), not O(E N)
