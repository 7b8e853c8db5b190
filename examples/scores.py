"""The per-sample scores the examples compare, all from one CurvatureTracker run.

Curvature averaged over the scored epochs (the paper's memorization score) and at the last one,
the final loss, and the training-dynamics baselines of ``tracker.baselines()``, all measured in
eval mode at the scored epochs:

  loss_mean       mean loss over epochs (cumulative loss)
  grad_norm_mean  mean input-gradient norm
  aum             area under the margin (Pleiss et al. 2020): mean of logit_y - max other logit
  confidence      mean softmax probability of the label (dataset cartography, Swayamdipta et
                  al. 2020)
  variability     its standard deviation over epochs (dataset cartography)
  forgetting      correct -> incorrect transitions between scored epochs, inf if never correct
                  (Toneva et al. 2019)
  el2n            mean ||softmax - onehot(y)|| (Paul et al. 2021)
"""

from __future__ import annotations

import numpy as np

# Display name, and +1 where a high value flags a sample, -1 where a low one does.
BASELINES = {
    "loss_mean": ("loss, mean over epochs", 1),
    "grad_norm_mean": ("input-gradient norm, mean over epochs", 1),
    "aum": ("AUM: margin, mean over epochs (low first)", -1),
    "confidence": ("confidence: p(label), mean (low first)", -1),
    "variability": ("variability: p(label), std over epochs", 1),
    "forgetting": ("forgetting events", 1),
    "el2n": ("EL2N, mean over epochs", 1),
}


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
        **{key: name for key, (name, _) in BASELINES.items()},
    }
    sign = {key: s for key, (_, s) in BASELINES.items()}
    ranking = {key: sign.get(key, 1) * v for key, v in values.items()}
    return values, ranking, names


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Percentile rank of each value among all: 0 for the lowest, 100 for the highest."""
    from curvkern.metrics import rankdata

    ranks = rankdata(values).numpy()
    return 100 * (ranks - 1) / max(1, len(values) - 1)
