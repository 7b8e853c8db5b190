"""The training-dynamics baselines: each defined once (curvkern.baselines), computed by the
tracker from its running statistics, shown by the report and the examples."""

import math
import statistics

import numpy as np
import pytest
import torch

from curvkern import CurvatureScores, CurvatureTracker
from curvkern.baselines import BASELINES
from curvkern.scores import SCORE_FIELDS

from .test_tracker import _plain_scorer

NAN = math.nan
# Three samples over four epochs; sample 2 is not scored at epoch 2 (NaN in every field).
HAND = {
    "p_label": [[0.9, 0.8, 0.6, 0.7], [0.2, 0.1, 0.3, 0.2], [0.6, 0.7, NAN, 0.4]],
    "correct": [[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, NAN, 0]],
    "margin": [[2.0, 1.5, -0.5, 0.5], [-1.0, -2.0, -0.5, -1.5], [0.5, 1.0, NAN, -0.25]],
    "loss": [[0.1, 0.2, 0.5, 0.35], [1.6, 2.3, 1.2, 1.6], [0.5, 0.36, NAN, 0.9]],
    "grad_norm": [[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5], [2.0, 4.0, NAN, 9.0]],
    "el2n": [[0.1, 0.3, 0.6, 0.4], [1.1, 1.2, 1.0, 1.1], [0.5, 0.4, NAN, 0.8]],
}


def _hand_scores(epoch):
    scores = CurvatureScores.empty(1e-3, "fd", dtype=torch.float64, size=3)
    for name, rows in HAND.items():
        getattr(scores, name).copy_(torch.tensor([r[epoch] for r in rows], dtype=torch.float64))
    scores.curvature.copy_(scores.loss * 10)
    scores.n_probes.fill_(10)
    return scores


def _mean(values):
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite)


@pytest.mark.parametrize("keep_history", [True, False])
def test_baselines_against_hand_computed_values(tmp_path, keep_history):
    tracker = CurvatureTracker(_plain_scorer(), 3, tmp_path / "t.npz", keep_history=keep_history)
    for epoch in range(4):
        tracker.record(epoch, _hand_scores(epoch))
    p = HAND["p_label"]
    expected = {
        "loss_mean": [_mean(r) for r in HAND["loss"]],
        "grad_norm_mean": [2.5, 0.5, 5.0],
        "aum": [0.875, -1.25, 1.25 / 3],
        "confidence": [0.75, 0.2, 1.7 / 3],
        "variability": [
            statistics.pstdev(p[0]),
            statistics.pstdev(p[1]),
            statistics.pstdev([0.6, 0.7, 0.4]),
        ],
        # sample 0: 1 1 0 1 forgets once; sample 1 is never correct; sample 2: 1 1 (unscored)
        # 0 forgets once, between the consecutive epochs at which it was scored
        "forgetting": [1.0, math.inf, 1.0],
        "el2n": [0.35, 1.1, 1.7 / 3],
    }
    for source in (tracker, CurvatureTracker.load(tmp_path / "t.npz")):
        got = source.baselines()
        assert set(got) == set(expected)
        for name, want in expected.items():
            torch.testing.assert_close(
                got[name],
                torch.tensor(want, dtype=torch.float64),
                rtol=1e-12,
                atol=1e-12,
                msg=name,
            )
        torch.testing.assert_close(
            source.mean,
            torch.tensor([_mean(r) * 10 for r in HAND["loss"]], dtype=torch.float64),
            rtol=1e-12,
            atol=1e-12,
        )


def test_baselines_are_nan_without_classification_outputs():
    tracker = CurvatureTracker(_plain_scorer(), 4, keep_history=False)
    tracker.record(0, CurvatureScores.empty(1e-3, "fd", size=4))  # every field NaN
    assert all(torch.isnan(v).all() for v in tracker.baselines().values())


def test_baselines_are_defined_in_one_table(tmp_path):
    """The tracker returns, and the report and the examples read, the baselines of the table."""
    import importlib.util
    import pathlib

    from curvkern import report

    tracker = CurvatureTracker(_plain_scorer(), 3, tmp_path / "t.npz")
    for epoch in range(2):
        tracker.record(epoch, _hand_scores(epoch))
    assert list(tracker.baselines()) == list(BASELINES)
    assert list(report.load_scores(tmp_path / "t.npz").baselines) == list(BASELINES)
    assert all(b.field in SCORE_FIELDS and b.direction in (1, -1) for b in BASELINES.values())
    path = pathlib.Path(__file__).parents[1] / "examples" / "scores.py"
    spec = importlib.util.spec_from_file_location("example_scores", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    _, ranking, names = example.compared(tracker)
    assert {k: names[k] for k in BASELINES} == {k: b.title for k, b in BASELINES.items()}
    values = tracker.baselines()
    for key, b in BASELINES.items():
        np.testing.assert_array_equal(ranking[key], b.direction * values[key].numpy())
