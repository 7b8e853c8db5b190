"""Several writers of one tracker file: no epoch is lost (history mode merges under a lock, the
streaming mode refuses), a writer killed while holding the lock blocks nobody, and tracker
files of one data set merge (curvkern.merge_trackers, `curvkern merge`)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from curvkern import (
    CurvatureScorer,
    CurvatureScores,
    CurvatureTracker,
    TrackerConflictError,
    io,
    merge_trackers,
)
from curvkern.cli import main
from curvkern.scores import SCORE_FIELDS

ROOT = Path(__file__).resolve().parents[1]
N, PROBES = 12, 2


def _scorer(h=1e-3):
    return CurvatureScorer(nn.Linear(4, 3), n_probes=PROBES, h=h)


def _scores(epoch, n=N, h=1e-3):
    """Distinct numbers per epoch and id, as the default scorer's scores."""
    s = CurvatureScores.empty(h, "fd", size=n, loss_fn="curvkern.losses.cross_entropy")
    for k, name in enumerate(SCORE_FIELDS):
        getattr(s, name).copy_(torch.arange(n) * 0.25 + epoch + 100 * k)
    s.n_probes.fill_(PROBES)
    return s


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# Each writer imports first, then waits for the other at a barrier of files, so that their saves
# overlap however long the imports take.
WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    def barrier(folder, name, writers=2):
        Path(folder, f"ready.{name}.{sys.argv[2]}").touch()
        while len(list(Path(folder).glob(f"ready.{name}.*"))) < writers:
            time.sleep(0.001)

    mode, me, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if mode == "cli":
        from curvkern.cli import main
        for rep, glob in enumerate(sys.argv[4:]):
            barrier(folder, rep)
            status = main(["score", "--model", "user_models:make_model", "--checkpoints", glob,
                           "--data", "data.npz", "--out", f"t{rep}.npz", "--n-probes", "2",
                           "--device", "cpu"])
            assert status == 0, status
    elif mode in ("history", "running"):
        sys.path.insert(0, sys.argv[4])
        from test_writers import _scorer, _scores, N
        from curvkern import CurvatureTracker, TrackerConflictError
        epochs = [int(e) for e in sys.argv[5].split(",")]
        tracker = CurvatureTracker(_scorer(), N, folder / "t.npz",
                                   keep_history=mode == "history")
        barrier(folder, "go")
        saved = []
        try:
            for e in epochs:
                tracker.record(e, _scores(e))
                saved.append(e)
        except TrackerConflictError as error:
            print("conflict:", error)
        print("saved:", ",".join(map(str, saved)))
    elif mode == "hold":
        from curvkern import io
        with io.locked(folder / "t.npz"):
            print("locked", flush=True)
            time.sleep(120)
    """
)


def _start(tmp_path, *args):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


# -- several processes --------------------------------------------------------------------------


def test_two_cli_runs_into_one_file_keep_every_epoch(tmp_path):
    """The measured case: `curvkern score` of epochs 0-3 and of epochs 4-7 into one --out at the
    same moment, three times: every file ends with all eight epochs."""
    (tmp_path / "user_models.py").write_text(
        "from torch import nn\n\n\ndef make_model():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 3))\n"
    )
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(N, 1, 4, 4, generator=gen), torch.randint(0, 3, (N,), generator=gen)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    for part, epochs in (("a", range(4)), ("b", range(4, 8))):
        (tmp_path / part).mkdir()
        for e in epochs:
            torch.manual_seed(e)
            model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 3))
            torch.save(model.state_dict(), tmp_path / part / f"epoch_{e:02d}.pt")
    reps = 3
    procs = [_start(tmp_path, "cli", w, tmp_path, *[f"{w}/*.pt"] * reps) for w in "ab"]
    outs = [_finish(p) for p in procs]
    for rep in range(reps):
        assert CurvatureTracker.load(tmp_path / f"t{rep}.npz").epochs == list(range(8)), outs
    # The last writer to finish saw both runs' epochs.
    assert any("(8 epochs)" in line for out in outs for line in out.splitlines()), outs


def test_two_library_writers_history_mode_keep_every_epoch(tmp_path):
    epochs = {"a": list(range(0, 30, 2)), "b": list(range(1, 30, 2))}
    procs = [
        _start(tmp_path, "history", w, tmp_path, Path(__file__).parent, _csv(e))
        for w, e in epochs.items()
    ]
    for p in procs:
        assert "conflict" not in _finish(p)
    tracker = CurvatureTracker.load(tmp_path / "t.npz")
    assert tracker.epochs == list(range(30))
    for e in (0, 7, 29):  # each epoch's numbers are its own writer's
        torch.testing.assert_close(tracker.history[e], _scores(e).curvature, rtol=0, atol=0)


def test_two_library_writers_streaming_mode_refuse_never_lose(tmp_path):
    """keep_history=False: both writers open the file before either saves; the one that saves
    second finds the file changed and refuses with TrackerConflictError; every epoch a writer
    reported saved is in the file."""
    epochs = {"a": list(range(0, 10)), "b": list(range(10, 20))}
    procs = [
        _start(tmp_path, "running", w, tmp_path, Path(__file__).parent, _csv(e))
        for w, e in epochs.items()
    ]
    outs = [_finish(p) for p in procs]
    conflicts = [o for o in outs if "conflict:" in o]
    assert len(conflicts) == 1, outs
    assert "another writer has saved" in conflicts[0] and "merge_trackers" in conflicts[0]
    stored = CurvatureTracker.load(tmp_path / "t.npz").epochs
    for out in outs:
        line = next(s for s in out.splitlines() if s.startswith("saved:"))
        saved = [int(e) for e in line.removeprefix("saved:").strip().split(",") if e]
        assert set(saved) <= set(stored), (saved, stored)
    assert stored in (epochs["a"], epochs["b"])


def _csv(epochs):
    return ",".join(map(str, epochs))


def test_a_writer_killed_while_holding_the_lock_blocks_nobody(tmp_path, monkeypatch):
    holder = _start(tmp_path, "hold", "a", tmp_path)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # While it lives, nobody else gets in; the error names the holder's pid.
        with pytest.raises(TimeoutError, match=f"pid {holder.pid}"):
            with io.locked(tmp_path / "t.npz", timeout=0.3):
                pass
        tracker = CurvatureTracker(_scorer(), N, tmp_path / "t.npz")
        monkeypatch.setattr(io, "LOCK_TIMEOUT_S", 0.3)
        with pytest.raises(TimeoutError, match="another writer"):
            tracker.record(0, _scores(0))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    start = time.monotonic()
    with io.locked(tmp_path / "t.npz", timeout=5):
        assert time.monotonic() - start < 1
    tracker.record(1, _scores(1))  # epoch 0, refused above, is saved with it
    assert CurvatureTracker.load(tmp_path / "t.npz").epochs == [0, 1]


# -- several trackers in one process (the same logic, deterministic) ---------------------------


def test_history_writers_interleaved_merge(tmp_path):
    path = tmp_path / "t.npz"
    a = CurvatureTracker(_scorer(), N, path)
    b = CurvatureTracker(_scorer(), N, path)
    a.record(0, _scores(0))
    b.record(1, _scores(1))
    a.record(2, _scores(2))
    assert a.epochs == [0, 1, 2]  # a took b's epoch in when it saved
    b.record(3, _scores(3))
    assert CurvatureTracker.load(path).epochs == [0, 1, 2, 3]
    # An epoch another writer recorded again is read again.
    a.record(1, _scores(5))
    b.record(4, _scores(4))
    torch.testing.assert_close(b.history[1], _scores(5).curvature, rtol=0, atol=0)


def test_streaming_writers_interleaved_refuse(tmp_path):
    path = tmp_path / "t.npz"
    a = CurvatureTracker(_scorer(), N, path, keep_history=False)
    b = CurvatureTracker(_scorer(), N, path, keep_history=False)
    a.record(0, _scores(0))
    with pytest.raises(TrackerConflictError, match=r"epoch 5 was not saved.*merge_trackers"):
        b.record(5, _scores(5))
    a.record(1, _scores(1))  # the first writer goes on
    assert CurvatureTracker.load(path).epochs == [0, 1]
    # A tracker opened after a save continues from it.
    c = CurvatureTracker(_scorer(), N, path, keep_history=False)
    c.record(2, _scores(2))
    assert CurvatureTracker.load(path).epochs == [0, 1, 2]


# -- merging files ------------------------------------------------------------------------------


def _file(path, epochs, h=1e-3, **kwargs):
    tracker = CurvatureTracker(_scorer(h), N, path, **kwargs)
    for e in epochs:
        tracker.record(e, _scores(e, h=h))
    return tracker


def test_merge_disjoint_and_overlapping_files(tmp_path):
    _file(tmp_path / "a.npz", [0, 1, 2])
    _file(tmp_path / "b.npz", [2, 3])  # epoch 2 in both, the same scores
    _file(tmp_path / "c.npz", [5])
    whole = _file(tmp_path / "whole.npz", [0, 1, 2, 3, 5])
    files = [tmp_path / f"{p}.npz" for p in "abc"]
    assert merge_trackers(files, tmp_path / "all.npz") == [0, 1, 2, 3, 5]
    merged = CurvatureTracker.load(tmp_path / "all.npz")
    torch.testing.assert_close(merged.history, whole.history, rtol=0, atol=0)
    torch.testing.assert_close(merged.baselines(), whole.baselines(), rtol=0, atol=0)
    # The merged file resumes as if written by one tracker, and a part merges into it.
    _file(tmp_path / "d.npz", [6])
    merge_trackers([tmp_path / "all.npz", tmp_path / "d.npz"], tmp_path / "all.npz")
    resumed = CurvatureTracker(_scorer(), N, tmp_path / "all.npz")
    assert resumed.epochs == [0, 1, 2, 3, 5, 6]


def test_merge_refuses_what_does_not_belong_together(tmp_path):
    _file(tmp_path / "a.npz", [0, 1])
    bad = _file(tmp_path / "b.npz", [])
    s = _scores(1)
    s.curvature[3] += 1.0
    bad.record(1, s)
    with pytest.raises(ValueError, match=r"epoch 1 is in .*a.npz and .*b.npz .*curvature of id 3"):
        merge_trackers([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "all.npz")
    _file(tmp_path / "h.npz", [2], h=2e-3)
    with pytest.raises(ValueError, match=r"other settings \(h: file 0.002, .*a.npz's 0.001\)"):
        merge_trackers([tmp_path / "a.npz", tmp_path / "h.npz"], tmp_path / "all.npz")
    fp = {"num_samples": N, "sample_shape": [4], "dtype": "float32", "labels_sha256": "1"}
    _file(tmp_path / "d1.npz", [2], data_fingerprint={**fp, "x_sha256": "a"})
    _file(tmp_path / "d2.npz", [3], data_fingerprint={**fp, "x_sha256": "b"})
    with pytest.raises(ValueError, match=r"other data .*data.x_sha256"):
        merge_trackers([tmp_path / "d1.npz", tmp_path / "d2.npz"], tmp_path / "all.npz")
    _file(tmp_path / "r.npz", [2], keep_history=False)
    with pytest.raises(ValueError, match="keep_history=False: its running statistics cannot"):
        merge_trackers([tmp_path / "a.npz", tmp_path / "r.npz"], tmp_path / "all.npz")
    _file(tmp_path / "n.npz", [])
    other_n = CurvatureTracker(_scorer(), N + 1, tmp_path / "n.npz")
    other_n.record(4, _scores(4, n=N + 1))
    with pytest.raises(ValueError, match=f"holds {N + 1} samples"):
        merge_trackers([tmp_path / "a.npz", tmp_path / "n.npz"], tmp_path / "all.npz")
    with pytest.raises(ValueError, match="exists and is not one of the files to merge"):
        merge_trackers([tmp_path / "a.npz"], tmp_path / "h.npz")
    assert not (tmp_path / "all.npz").exists()  # nothing was written by a refused merge


def test_merge_command(tmp_path, capsys):
    _file(tmp_path / "a.npz", [0, 1])
    _file(tmp_path / "b.npz", [2, 3])
    out = str(tmp_path / "all.npz")
    assert main(["merge", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", out]) == 0
    assert "merged 2 files into" in capsys.readouterr().out
    assert CurvatureTracker.load(out).epochs == [0, 1, 2, 3]
    _file(tmp_path / "h.npz", [4], h=2e-3)
    assert main(["merge", out, str(tmp_path / "h.npz"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings (h: file 0.002" in err
    assert main(["merge", str(tmp_path / "none.npz"), "--out", out]) == 2
    assert "none.npz does not exist" in capsys.readouterr().err
