"""CurvatureTracker.baselines() on edge histories, against values computed by hand.

Definitions (DESIGN section 9), over the epochs where a sample was scored (finite values):
``loss_mean``, ``grad_norm_mean``, ``aum`` (margin), ``confidence`` (p_label), ``el2n`` are
means; ``variability`` the standard deviation of p_label, ddof 0; ``forgetting`` the number of
correct -> incorrect transitions between consecutive scored epochs, +inf when never correct;
NaN for a sample never scored. The histories below are the ones a definition is easiest to get
wrong on: a sample always right (forgetting 0: learned -> learned is not a forgetting event),
always wrong, never scored, scored once, and transitions across an unscored epoch. Every
expectation is plain Python over the listed values; the tracker computes the same sums in
float64, so 1e-12 leaves room for summation order only.
"""

import math
import statistics

import pytest
import torch

from curvkern import CurvatureScorer, CurvatureScores, CurvatureTracker

NAN = math.nan
EXACT = {"rtol": 1e-12, "atol": 1e-12, "equal_nan": True}

# Per sample, whether it was classified correctly at epochs 0..3 (NaN: not scored that epoch).
CORRECT = {
    "always right": [1, 1, 1, 1],
    "always wrong": [0, 0, 0, 0],
    "never scored": [NAN, NAN, NAN, NAN],
    "alternating": [1, 0, 1, 0],
    "learned, unscored, kept": [0, 1, NAN, 1],
    "forgotten across a gap": [1, NAN, 0, NAN],
    "scored once, right": [NAN, NAN, NAN, 1],
    "scored once, wrong": [NAN, 0, NAN, NAN],
    "learned late": [0, 0, 0, 1],
    "forgotten last": [1, 1, 1, 0],
}
FORGETTING = {
    "always right": 0.0,
    "always wrong": math.inf,
    "never scored": NAN,
    "alternating": 2.0,
    "learned, unscored, kept": 0.0,
    "forgotten across a gap": 1.0,
    "scored once, right": 0.0,
    "scored once, wrong": math.inf,
    "learned late": 0.0,
    "forgotten last": 1.0,
}
NAMES = list(CORRECT)
N, EPOCHS = len(NAMES), 4
# The baselines and the score field each averages (variability and forgetting apart).
MEANS = {"loss_mean": "loss", "grad_norm_mean": "grad_norm", "aum": "margin",
         "confidence": "p_label", "el2n": "el2n"}  # fmt: skip


def values(field, sample, epoch):
    """A distinct value per (field, sample, epoch), NaN where the sample was not scored."""
    if math.isnan(CORRECT[NAMES[sample]][epoch]):
        return NAN
    if field == "correct":
        return float(CORRECT[NAMES[sample]][epoch])
    if field == "p_label":  # in (0, 1), different at every epoch so that variability > 0
        return 0.1 + 0.8 * ((7 * sample + 3 * epoch * epoch + 1) % 11) / 10
    offset = {"loss": 0.5, "grad_norm": 2.0, "margin": -1.0, "el2n": 0.25, "curvature": 3.0}
    return offset.get(field, 0.0) + 0.37 * sample - 0.29 * epoch + 0.05 * epoch * sample


def scores_of(epoch, n=N):
    scores = CurvatureScores.empty(1e-3, "fd", dtype=torch.float64, size=n)
    for field in ("curvature", "loss", "grad_norm", "margin", "p_label", "correct", "el2n"):
        column = [values(field, s, epoch) for s in range(n)]
        getattr(scores, field).copy_(torch.tensor(column, dtype=torch.float64))
    scores.n_probes.fill_(10)
    return scores


def expected(epochs):
    """The baselines of samples 0..N-1 over ``epochs``, by hand."""
    out = {name: [] for name in (*MEANS, "variability", "forgetting")}
    for s in range(N):
        for baseline, field in MEANS.items():
            finite = [values(field, s, e) for e in epochs if not math.isnan(values(field, s, e))]
            out[baseline].append(statistics.fmean(finite) if finite else NAN)
        p = [values("p_label", s, e) for e in epochs if not math.isnan(values("p_label", s, e))]
        out["variability"].append(statistics.pstdev(p) if p else NAN)
        correct = [values("correct", s, e) for e in epochs]
        correct = [c for c in correct if not math.isnan(c)]
        if not correct:
            forgetting = NAN
        elif 1.0 not in correct:
            forgetting = math.inf
        else:
            forgetting = sum(a == 1 and b == 0 for a, b in zip(correct, correct[1:], strict=False))
        out["forgetting"].append(float(forgetting))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def check(got, want):
    assert set(got) == set(want)
    for name in want:
        for s in range(N):
            torch.testing.assert_close(got[name][s], want[name][s], **EXACT,
                                       msg=f"{name} of the sample {NAMES[s]!r}")  # fmt: skip


def tracker(keep_history, path=None):
    return CurvatureTracker(CurvatureScorer(lambda x: x), N, path, keep_history=keep_history)


def test_the_hand_forgetting_follows_the_definition():
    """The listed forgetting counts are those of the definition (a check on this file)."""
    torch.testing.assert_close(
        expected(range(EPOCHS))["forgetting"],
        torch.tensor([FORGETTING[n] for n in NAMES], dtype=torch.float64),
        equal_nan=True,
    )


@pytest.mark.parametrize("keep_history", [True, False])
def test_edge_histories(keep_history, tmp_path):
    t = tracker(keep_history, tmp_path / "t.npz")
    for epoch in range(EPOCHS):
        t.record(epoch, scores_of(epoch))
    want = expected(range(EPOCHS))
    check(t.baselines(), want)
    check(CurvatureTracker.load(tmp_path / "t.npz").baselines(), want)


@pytest.mark.parametrize("keep_history", [True, False])
@pytest.mark.parametrize("epoch", range(EPOCHS))
def test_one_epoch(keep_history, epoch):
    """One scored epoch: means are that epoch's values, variability 0, forgetting 0 or inf."""
    t = tracker(keep_history)
    t.record(epoch, scores_of(epoch))
    want = expected([epoch])
    check(t.baselines(), want)
    scored = torch.isfinite(want["confidence"])
    assert bool((want["variability"][scored] == 0).all())
    assert set(want["forgetting"][scored].tolist()) <= {0.0, math.inf}


@pytest.mark.parametrize("keep_history", [True, False])
def test_no_epoch_gives_nan(keep_history):
    got = tracker(keep_history).baselines()
    assert set(got) == set(expected([]))
    for name, v in got.items():
        assert v.shape == (N,) and bool(torch.isnan(v).all()), name


@pytest.mark.parametrize("keep_history", [True, False])
def test_replacing_the_last_epoch_replaces_its_transitions(keep_history):
    """Recording the last epoch again counts its values once, the new ones."""
    t = tracker(keep_history)
    for epoch in range(EPOCHS - 1):
        t.record(epoch, scores_of(epoch))
    t.record(EPOCHS - 1, scores_of(0))  # first recorded with other values ...
    t.record(EPOCHS - 1, scores_of(EPOCHS - 1))  # ... then replaced
    check(t.baselines(), expected(range(EPOCHS)))


def test_epochs_recorded_out_of_order_count_in_epoch_order():
    """With keep_history=True epochs may come in any order; transitions follow epoch order."""
    t = tracker(True)
    for epoch in (2, 0, 3, 1):
        t.record(epoch, scores_of(epoch))
    check(t.baselines(), expected(range(EPOCHS)))


@pytest.mark.parametrize("keep_history", [True, False])
def test_unscored_epochs_between_scored_ones(keep_history):
    """Epochs need not be consecutive integers: 0, 5, 6, 20 are consecutive scored epochs."""
    t = tracker(keep_history)
    for e, epoch in enumerate((0, 5, 6, 20)):
        t.record(epoch, scores_of(e))
    check(t.baselines(), expected(range(EPOCHS)))
