"""Hugging Face Trainer callback: epoch-averaged curvature of a Trainer's training samples.

    from curvkern.integrations.huggingface import CurvatureCallback
    callback = CurvatureCallback(train_set, batch_size=32, path="curvature.npz")
    trainer = transformers.Trainer(model, args, train_dataset=train_set, callbacks=[callback])
    trainer.train()
    callback.tracker.mean

The Trainer shuffles, shards and drops the columns its model does not take; the callback
scores its own sequential loader over the data set it is given, so ids are that data set's
indices. Items are dicts as the Trainer takes them: ``input_ids`` (with ``attention_mask``)
for token models, scored in embedding space by :class:`curvkern.text.TokenScorer`, or
``pixel_values`` for image models, scored by :class:`curvkern.CurvatureScorer` with
``input_key="pixel_values"``; the target is ``labels`` (or ``label``); every other tensor column
(e.g. ``token_type_ids``) is passed to the model. An encoder-decoder model (``config.
is_encoder_decoder``: T5, BART, Marian, Pegasus, ...) is scored at its encoder's token
embeddings, its decoder fed the labels shifted right as in training. With ``bf16=True`` or
``fp16=True`` the model's float32 forward is scored, not accelerate's autocast wrapper of it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..losses import sequence_cross_entropy
from ..scorer import CurvatureScorer
from ..text import TokenScorer
from ._scoring import ScoringCallback

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "curvkern.integrations.huggingface needs transformers: pip install 'curvkern[text]'"
    ) from error

__all__ = ["CurvatureCallback"]

_LABEL_KEYS = ("labels", "label")
_INPUT_KEYS = ("input_ids", "pixel_values")
# Value of padded positions per column; padding is masked out of the probes and the loss.
_PAD = {"labels": -100, "label": -100}


def _as_tensor(value) -> Tensor:
    return value if isinstance(value, Tensor) else torch.as_tensor(value)


def _stack(key: str, values: Sequence) -> Tensor:
    """One column of a batch; token sequences of different lengths are right-padded."""
    try:
        rows = [_as_tensor(v) for v in values]
    except (TypeError, ValueError, RuntimeError) as error:
        example = next((v for v in values if isinstance(v, (str, bytes))), values[0])
        raise TypeError(
            f"column {key!r} holds {type(example).__name__} values (e.g. {example!r:.40}), "
            "not numbers; the callback passes every column but the input and the labels to the "
            f"model as tensors, so give it the data set without that column (with datasets: "
            f"dataset.remove_columns([{key!r}]))"
        ) from error
    if all(r.shape == rows[0].shape for r in rows):
        return torch.stack(rows)
    if any(r.dim() != rows[0].dim() or r.shape[1:] != rows[0].shape[1:] for r in rows):
        raise ValueError(
            f"column {key!r} has items of shapes that differ beyond their length: "
            f"{sorted({tuple(r.shape) for r in rows})}"
        )
    length = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), _PAD.get(key, 0))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def collate(items: Sequence[tuple]) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """IndexedDataset items (dict, ..., id) of Trainer-style dicts -> (x, y, ids, model_inputs).

    x is ``input_ids`` or ``pixel_values``, y the labels, model_inputs every other column
    (``attention_mask`` made from the lengths when sequences of different lengths have none).
    """
    dicts = [item[0] for item in items]
    first = dicts[0]
    if not isinstance(first, Mapping):
        raise TypeError(
            "the Hugging Face CurvatureCallback takes a data set of dict items (input_ids, "
            f"attention_mask, labels or pixel_values, labels), got {type(first).__name__} items"
        )
    key = next((k for k in _INPUT_KEYS if k in first), None)
    label = next((k for k in _LABEL_KEYS if k in first), None)
    if key is None or label is None:
        raise KeyError(
            f"items need one of {_INPUT_KEYS} and one of {_LABEL_KEYS}; got keys {sorted(first)}"
        )
    columns = {k: _stack(k, [d[k] for d in dicts]) for k in first if k != "label"}
    if label == "label":
        columns["labels"] = _stack("labels", [d["label"] for d in dicts])
    if key == "input_ids" and "attention_mask" not in columns:
        lengths = torch.tensor([len(d["input_ids"]) for d in dicts])
        positions = torch.arange(columns["input_ids"].shape[1])
        columns["attention_mask"] = (positions < lengths[:, None]).long()
    x, y = columns.pop(key), columns.pop("labels")
    ids = torch.as_tensor([item[-1] for item in items], dtype=torch.int64)
    return x, y, ids, columns


@contextlib.contextmanager
def _float32_forward(model) -> Iterator[None]:
    """The model's own forward while inside, without the Trainer's mixed precision.

    With ``bf16=True`` or ``fp16=True`` accelerate replaces ``model.forward`` by an autocast
    wrapper (an instance attribute) and keeps the forward it replaced as
    ``model._original_forward``. Scored through the wrapper, the curvature is that of a
    bf16 function (measured: 7% off for a BERT, 5.6x for a ViT, median); scored through the
    kept forward, it is the float32 model's, as for a model trained in float32. The wrapper is
    put back on the way out, so training goes on in mixed precision.
    """
    wrapped = model.__dict__.get("forward")
    original = model.__dict__.get("_original_forward")
    if wrapped is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


class _Seq2SeqScorer:
    """Scores an encoder-decoder model (T5, BART, Marian, Pegasus, ...) at its encoder's input
    embeddings, its decoder fed the labels shifted right as in training (teacher forcing):
    ``decoder_input_ids`` made by the model's own ``prepare_decoder_input_ids_from_labels``
    unless the items carry them."""

    def __init__(self, model, scorer: TokenScorer) -> None:
        self.model = model
        self.scorer = scorer  # its settings are read through here (curvkern.scorer_setting)

    def score(self, x: Tensor, y: Tensor, ids: Tensor | None = None, **model_inputs):
        if "decoder_input_ids" not in model_inputs:
            model_inputs["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(
                labels=y
            )
        return self.scorer.score(x, y, ids, **model_inputs)


class _DictItems(Dataset):
    """Dict items as (item, 0) pairs, which IndexedDataset takes; collate unpacks them."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index], 0


class CurvatureCallback(ScoringCallback, TrainerCallback):
    """Scores ``dataset`` at the end of training epochs of a ``transformers.Trainer``.

    Args:
        dataset: map-style data set of dict items as the Trainer takes them (a ``datasets``
            Dataset with torch format, or a list of dicts).
        batch_size: samples per scoring batch.
        path: tracker file, saved after every scored epoch and resumed from if it exists.
        every_n_epochs: score after every n-th epoch (0-based epochs n-1, 2n-1, ...).
        keep_history: keep every epoch's scores (True) or only running statistics (False).
        **scorer_kwargs: arguments of the scorer (loss_fn, h, n_probes, seed, method, ...).
            A causal LM needs ``loss_fn=curvkern.losses.sequence_cross_entropy``; an
            encoder-decoder model gets ``sequence_cross_entropy`` with ``shift=False`` by
            default (its decoder's logits at t predict labels[t]).

    Attributes:
        tracker: the :class:`curvkern.CurvatureTracker`, made at the first scored epoch; its
            epochs are 0-based (the Trainer's ``state.epoch`` at the epoch's end, minus one).
    """

    _collate_fn = staticmethod(collate)
    _items = staticmethod(_DictItems)

    def _make_scorer(self, model):
        first = self.dataset[0]
        # Items that are not dicts, without an input or labels, or with a column that cannot be
        # a tensor, fail here, named.
        _, y, _, _ = collate([(first, 0, 0)])
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return self._seq2seq_scorer(model, first)
        labels = y[0]
        kwargs = self.scorer_kwargs
        if "input_ids" in first:
            tokens = len(first["input_ids"])
            if labels.dim() >= 1 and labels.shape[0] != tokens:
                raise ValueError(
                    f"item 0 has labels of shape {tuple(labels.shape)} but {tokens} input_ids: "
                    "a class label is one number per item (labels=3, not [3]) and per-token "
                    "labels have one per input token; for an encoder-decoder model (labels "
                    "for the decoder) its config must say is_encoder_decoder=True"
                )
            if labels.dim() >= 1 and "loss_fn" not in kwargs:
                raise ValueError(
                    "the items' labels are per token (a causal or masked LM): pass "
                    "loss_fn=curvkern.losses.sequence_cross_entropy (shift=True for a causal "
                    "LM) to CurvatureCallback; the default loss takes one class label per item"
                )
            return TokenScorer(model, **kwargs)
        if labels.dim() >= 1 and "loss_fn" not in kwargs:
            raise ValueError(
                f"item 0 has labels of shape {tuple(labels.shape)}; the default loss takes "
                "one class label per item (label=3, not [3]): store it as a number, or pass "
                "the loss_fn that takes these labels"
            )
        return CurvatureScorer(model, input_key="pixel_values", **kwargs)

    def _seq2seq_scorer(self, model, first) -> _Seq2SeqScorer:
        name = type(model).__name__
        if "input_ids" not in first:
            raise ValueError(
                f"{name} is an encoder-decoder model: the callback scores it at the encoder's "
                f"token embeddings and needs input_ids items, got keys {sorted(first)}"
            )
        if "decoder_input_ids" not in first and not callable(
            getattr(model, "prepare_decoder_input_ids_from_labels", None)
        ):
            raise ValueError(
                f"{name} is an encoder-decoder model without "
                "prepare_decoder_input_ids_from_labels: give the items a decoder_input_ids "
                "column (the labels shifted right, as in its training)"
            )
        loss_fn = self.scorer_kwargs.get("loss_fn")
        if loss_fn is sequence_cross_entropy:
            raise ValueError(
                f"{name} is an encoder-decoder model, whose decoder logits at position t "
                "predict labels[t]: sequence_cross_entropy's default shift=True would compare "
                "each with the next label; leave loss_fn out (the callback then uses "
                "shift=False) or pass functools.partial(sequence_cross_entropy, shift=False)"
            )
        kwargs = dict(self.scorer_kwargs)
        if loss_fn is None:
            kwargs["loss_fn"] = functools.partial(sequence_cross_entropy, shift=False)
        return _Seq2SeqScorer(model, TokenScorer(model, **kwargs))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = round(state.epoch) - 1
        if model is None or not self._scoring.due(epoch):
            return
        with _float32_forward(model):
            self._scoring.score(lambda: self._make_scorer(model), epoch)
