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
import torch

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


def compared(tracker, baselines: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """The scores of one run: (values, ranking, names), each a dict by CSV column name.

    values: (N,) arrays as measured; ranking: the same, negated where a low value flags a sample,
    so that high ranks first for every score; names: what the tables call them.
    """
    epochs = len(tracker.epochs)
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


class OutputHistory:
    """The model's margin, p(label), correctness and EL2N at every scored epoch, and the
    baselines computed from them as ``tracker.baselines()`` defines them; for a curvkern whose
    tracker does not compute them yet."""

    def __init__(self) -> None:
        self.fields: dict[str, list[torch.Tensor]] = {
            "margin": [], "p_label": [], "correct": [], "el2n": []
        }  # fmt: skip

    @torch.no_grad()
    def record(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Appends this epoch's (N,) fields of ``model`` (in eval mode) on (x, y)."""
        model.eval()
        logits = torch.cat([model(part) for part in x.split(4096)])
        p = logits.softmax(1)
        label_logit = logits.gather(1, y[:, None])[:, 0]
        others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        self.fields["margin"].append(label_logit - others)
        self.fields["p_label"].append(p.gather(1, y[:, None])[:, 0])
        self.fields["correct"].append((logits.argmax(1) == y).float())
        onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
        self.fields["el2n"].append((p - onehot).norm(dim=1))

    def baselines(self, tracker) -> dict[str, torch.Tensor]:
        """The dict of (N,) tensors of tracker.baselines(), from the recorded epochs."""
        margin, p_label, correct, el2n = (torch.stack(v) for v in self.fields.values())
        forgets = ((correct[:-1] == 1) & (correct[1:] == 0)).sum(0).float()
        forgets[correct.sum(0) == 0] = float("inf")
        return {
            "loss_mean": tracker.field_mean("loss"),
            "grad_norm_mean": tracker.field_mean("grad_norm"),
            "aum": margin.mean(0),
            "confidence": p_label.mean(0),
            "variability": p_label.std(0, correction=0),
            "forgetting": forgets,
            "el2n": el2n.mean(0),
        }


def baselines_of(tracker, outputs: OutputHistory) -> dict[str, torch.Tensor]:
    """``tracker.baselines()`` where this curvkern has it, else computed from ``outputs``."""
    if hasattr(tracker, "baselines"):
        return tracker.baselines()
    return outputs.baselines(tracker)


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Percentile rank of each value among all: 0 for the lowest, 100 for the highest."""
    from curvkern.metrics import rankdata

    ranks = rankdata(values).numpy()
    return 100 * (ranks - 1) / max(1, len(values) - 1)
