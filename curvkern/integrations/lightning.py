"""Lightning callback: epoch-averaged curvature of a LightningModule's training samples.

from curvkern.integrations.lightning import CurvatureCallback
callback = CurvatureCallback(train_set, batch_size=256, path="curvature.npz")
trainer = lightning.Trainer(max_epochs=40, callbacks=[callback])
trainer.fit(module, train_loader)
callback.tracker.mean                     # (N,) epoch-averaged curvature
callback.tracker.baselines()["aum"]       # the training-dynamics baselines
"""

from __future__ import annotations

from ..scorer import CurvatureScorer
from ._scoring import ScoringCallback

try:
    from lightning.pytorch import Callback
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "curvkern.integrations.lightning needs Lightning: pip install 'curvkern[lightning]'"
    ) from error

__all__ = ["CurvatureCallback"]


class CurvatureCallback(ScoringCallback, Callback):
    """Scores ``dataset`` with a CurvatureScorer at the end of training epochs.

    The module is scored as ``module(x)`` with the loss of ``scorer_kwargs`` (default: cross
    entropy), in eval mode, and left as it was found (training flags, parameters, gradients,
    buffers). Scoring uses its own sequential loader over ``dataset``, so the ids are the data
    set's indices (``tracker`` rows) whatever the training loader's order.

    Args:
        dataset: map-style data set of (x, y) items (or (x, y, model_inputs dict)), usually the
            training set without augmentation.
        batch_size: samples per scoring batch.
        path: tracker file, saved after every scored epoch and resumed from if it exists.
        every_n_epochs: score after every n-th epoch (0-based epochs n-1, 2n-1, ...).
        keep_history: keep every epoch's scores (True) or only running statistics (False).
        **scorer_kwargs: arguments of :class:`curvkern.CurvatureScorer` (loss_fn, h, n_probes,
            seed, method, max_batch, input_key, ...).

    Attributes:
        tracker: the :class:`curvkern.CurvatureTracker`, made at the first scored epoch (None
            before); its epochs are Lightning's 0-based ``current_epoch``.
    """

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if trainer.sanity_checking or not self._scoring.due(epoch):
            return
        self._scoring.score(lambda: CurvatureScorer(pl_module, **self.scorer_kwargs), epoch)
