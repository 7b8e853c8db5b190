"""CurvatureTracker at ImageNet size (synthetic scores): keep_history=False stays O(N) per epoch.

N = 1,281,167 samples (ImageNet-1k's training set), 60 epochs, every epoch recorded and saved.
The run happens in a child process, so that its peak memory (ru_maxrss) is its own.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

IMAGENET = 1_281_167
EPOCHS = 60

_SCRIPT = r"""
import json, os, resource, sys, time
import torch
from curvkern import CurvatureScorer, CurvatureScores, CurvatureTracker
from curvkern.scores import SCORE_FIELDS

n, epochs, path, keep = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
scores = CurvatureScores.empty(1e-3, "fd", size=n)
gen = torch.Generator().manual_seed(0)
for name in SCORE_FIELDS:
    getattr(scores, name).copy_(torch.rand(n, generator=gen))
scores.correct.copy_((scores.correct > 0.3).float())
scores.n_probes.fill_(10)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux: KiB)
before = peak()
tracker = CurvatureTracker(CurvatureScorer(lambda x: x), n, path, keep_history=keep)
folder = path + ".epochs"  # keep_history=True: one file per epoch there
seconds, sizes, peaks, on_disk = [], [], [], []
for epoch in range(epochs):
    for name in SCORE_FIELDS:  # new values each epoch, in place (no allocation of our own)
        getattr(scores, name).add_(0.01)
    scores.correct.neg_().add_(1)  # flips every epoch: the forgetting counters move
    start = time.perf_counter()
    tracker.record(epoch, scores)  # folds the previous epoch in and saves
    seconds.append(time.perf_counter() - start)
    sizes.append(os.path.getsize(path))
    files = [os.path.join(folder, f) for f in os.listdir(folder)] if keep else []
    on_disk.append(sizes[-1] + sum(os.path.getsize(f) for f in files))
    peaks.append(peak())
state = 0 if keep else sum(t.numel() * t.element_size() for t in tracker._folded.arrays().values())
last = len(SCORE_FIELDS) * n * 4  # one epoch's scores, float32
start = time.perf_counter()
resumed = CurvatureTracker(CurvatureScorer(lambda x: x), n, path, keep_history=keep)
load_seconds = time.perf_counter() - start
exact = bool(torch.equal(resumed.mean, tracker.mean)) and resumed.epochs == tracker.epochs
json.dump(dict(seconds=seconds, sizes=sizes, on_disk=on_disk, peaks=peaks, before=before,
               state=state, last=last, load_seconds=load_seconds, exact=exact), sys.stdout)
"""


def run_scale(folder, n=IMAGENET, epochs=EPOCHS, keep_history=False) -> dict:
    """Records ``epochs`` synthetic epochs of n samples into a tracker saved in ``folder``.

    Returns:
        seconds (per record, fold and save), sizes (bytes of the file at path), on_disk (bytes
        of the file and of the epoch files), peaks (ru_maxrss in bytes after each epoch),
        before (the peak before the tracker), state (bytes of the running state), last (bytes
        of one epoch's scores), load_seconds (resuming), exact (resumed means equal).
    """
    path = Path(folder) / f"imagenet_{int(keep_history)}.npz"
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(n), str(epochs), str(path), str(int(keep_history))],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.slow
def test_imagenet_size_running_statistics(tmp_path):
    r = run_scale(tmp_path)
    sizes, seconds, peaks = r["sizes"], r["seconds"], r["peaks"]
    # The file: the running state and the last epoch, a fixed size; only the list of epoch
    # numbers grows, by exactly one int64 per epoch.
    assert [s - sizes[0] for s in sizes] == [8 * e for e in range(EPOCHS)]
    assert sizes[0] >= r["state"] + r["last"]  # it holds the whole state, uncompressed
    # Time per saved epoch is flat: the median of the last ten saves within 3x of the median
    # of ten early ones (epochs 1-10; epoch 0 folds nothing), slack for a loaded machine. Work
    # growing with the epochs, as rewriting an (E, N) history, would make it about 10x.
    early, late = sorted(seconds[1:11])[5], sorted(seconds[-10:])[5]
    assert late < 3 * early, (early, late)
    # Memory is bounded. Whatever the tracker kept per epoch would add at least one epoch's
    # scores (11 fields x N float32, 56 MB) to the peak per epoch; from the middle of the run
    # to its end (30 epochs) the peak must grow by less than one such epoch. And in all the
    # tracker needs less than three times its state plus one epoch's scores (the state, the
    # float64 temporaries of folding one field, the write buffers).
    assert peaks[-1] - peaks[EPOCHS // 2] < r["last"], (peaks[EPOCHS // 2], peaks[-1])
    assert peaks[-1] - r["before"] < 3 * (r["state"] + r["last"]), r
    assert r["exact"]  # a tracker resumed from the last save has the same means


if __name__ == "__main__":  # the figures of docs/guide.md: python3 -m tests.test_tracker_scale
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else EPOCHS
    for keep in (False, True):
        with tempfile.TemporaryDirectory(dir=".") as folder:
            r = run_scale(folder, epochs=epochs, keep_history=keep)
        s, mib = r["seconds"], 2**20
        print(
            f"keep_history={keep}: N = {IMAGENET:,}, {epochs} epochs; seconds per record (fold "
            f"and save), median of epochs 1-10: {sorted(s[1:11])[5]:.2f}, of the last 10: "
            f"{sorted(s[-10:])[5]:.2f}; on disk after epoch 1: {r['on_disk'][0] / mib:.0f} MiB, "
            f"after epoch {epochs}: {r['on_disk'][-1] / mib:.0f} MiB; peak memory above the "
            f"process before the tracker: {(r['peaks'][0] - r['before']) / mib:.0f} MiB after "
            f"epoch 1, {(r['peaks'][-1] - r['before']) / mib:.0f} MiB after epoch {epochs}; "
            f"resume {r['load_seconds']:.2f} s"
        )
