"""The per-sample scores the examples compare, all from one CurvatureTracker run.

Curvature averaged over the scored epochs (the paper's memorization score) and at the last one,
the final loss, and the training-dynamics baselines of ``tracker.baselines()`` (loss, input
gradient norm, AUM, confidence, variability, forgetting, EL2N; their names, papers and which
end flags a sample are in curvkern.baselines.BASELINES), all measured in eval mode at the
scored epochs.
"""

from __future__ import annotations

import numpy as np

from curvkern.baselines import BASELINES


def compared(tracker) -> tuple[dict, dict, dict]:
    """The scores of one run of ``tracker``: (values, ranking, names), each a dict by CSV column
    name.

    values: (N,) arrays as measured; ranking: the same, negated where a low value flags a sample,
    so that high ranks first for every score; names: what the tables call them.
    """
    epochs = len(tracker.epochs)
    baselines = tracker.baselines()
    values = {
        "curvature_mean": tracker.mean.numpy(),
        "curvature_last": tracker.history[-1].numpy(),
        "loss_final": tracker.field_history("loss")[-1].numpy(),
        **{key: baselines[key].numpy() for key in BASELINES},
    }
    names = {
        "curvature_mean": f"curvature, mean over {epochs} epochs",
        "curvature_last": "curvature, last epoch",
        "loss_final": "loss, final",
        **{key: baseline.title for key, baseline in BASELINES.items()},
    }
    sign = {key: baseline.direction for key, baseline in BASELINES.items()}
    ranking = {key: sign.get(key, 1) * v for key, v in values.items()}
    return values, ranking, names


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Percentile rank of each value among all: 0 for the lowest, 100 for the highest."""
    from curvkern.metrics import rankdata

    ranks = rankdata(values).numpy()
    return 100 * (ranks - 1) / max(1, len(values) - 1)
