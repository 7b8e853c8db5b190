"""Per-sample losses for the scorer, and the output selection they share.

A scorer's ``loss_fn(output, y)`` returns one loss per row of the model's output, shape (B,).
Models return their logits in many forms (a tensor, a tuple whose first element is the logits,
a dict with ``"logits"``, a Hugging Face ``ModelOutput`` with ``.logits``); :func:`logits_of`
finds them, so the default loss works on all of these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["logits_of", "cross_entropy", "classification_stats", "sequence_cross_entropy"]


def logits_of(output) -> Tensor:
    """The logits tensor inside a model's output.

    Args:
        output: a tensor; a tuple or list (its first element); a mapping with key ``"logits"``;
            or an object with a ``.logits`` attribute (Hugging Face model outputs).
    Returns:
        The logits tensor, as the model returned it (e.g. (B, C) or (B, T, C)).
    Raises:
        TypeError: for any other output, naming its type and the accepted forms.
    """
    if isinstance(output, Tensor):
        return output
    # Hugging Face ModelOutput is both a mapping and an object with attributes; either path
    # gives the same tensor. The attribute comes first because a ModelOutput drops None entries
    # from its mapping view but not from its attributes.
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            return output["logits"]
        raise TypeError(
            f"the model returned a mapping without a 'logits' tensor (keys: {list(output)}); "
            f"pass a loss_fn(output, y) that picks the tensor to score"
        )
    if isinstance(output, tuple | list):
        if output and isinstance(output[0], Tensor):
            return output[0]
        first = type(output[0]).__name__ if output else "nothing"
        raise TypeError(
            f"the model returned a {type(output).__name__} whose first element is {first}, "
            f"not a logits tensor; pass a loss_fn(output, y) that picks the tensor to score"
        )
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}: expected a "
        f"tensor, a tuple/list (first element), a mapping with 'logits' or an object with a "
        f".logits attribute; pass a loss_fn(output, y) that returns per-sample losses (B,)"
    )


def cross_entropy(output, y: Tensor) -> Tensor:
    """Per-sample cross entropy of a classifier's output: the scorer's default loss.

    Args:
        output: the model's output, any form :func:`logits_of` accepts, holding (B, C) logits
            (or (B, C, d1, ...) with y (B, d1, ...), as ``F.cross_entropy`` takes them; the
            per-sample loss is then the mean over the extra dimensions).
        y: (B,) integer class labels (or (B, C) class probabilities, as ``F.cross_entropy``
            takes them).
    Returns:
        (B,) losses, cross entropy with reduction "none" (mean over any extra dimensions).
    """
    loss = F.cross_entropy(logits_of(output), y, reduction="none")
    return loss.flatten(1).mean(1) if loss.dim() > 1 else loss


def classification_stats(output, y: Tensor) -> Tensor:
    """Margin, label probability, correctness and EL2N of each sample, from one output.

    Args:
        output: the model's output at the unperturbed inputs (any form :func:`logits_of` takes).
        y: the targets of the batch, (B,).
    Returns:
        (B, 4) float64 tensor (the transposed view of a contiguous (4, B) one), columns
        (margin, p_label, correct, el2n) as in :class:`curvkern.CurvatureScores`; all NaN
        unless the logits have shape (B, C), C >= 2, and y holds (B,) integer labels, and NaN
        in the rows whose label is outside [0, C) (e.g. an ignore index).
    """
    try:
        logits = logits_of(output)
    except TypeError:
        logits = None
    batch = y.shape[0] if isinstance(y, Tensor) and y.dim() else 0
    device = y.device if isinstance(y, Tensor) else None
    if (
        logits is None
        or logits.dim() != 2
        or logits.shape[0] != batch
        or logits.shape[1] < 2
        or not isinstance(y, Tensor)
        or y.dim() != 1
        or y.is_floating_point()
        or y.is_complex()
        or y.dtype == torch.bool
    ):
        return torch.full((batch, 4), math.nan, dtype=torch.float64, device=device)
    classes = logits.shape[1]
    # Classes along dim 0, (C, B): the reductions over classes then run across contiguous rows
    # of B, which for few classes is several times faster than along rows of C (a float64
    # softmax of (256, 10): 6 us against 40 us over dim 1). One copy makes it and converts.
    logits = logits.detach().t().to(torch.float64, memory_format=torch.contiguous_format)
    # Every label in [0, C) (the common case) is seen from the smallest and largest alone.
    valid = None
    if batch:
        low, high = y.aminmax()
        if not (0 <= int(low) and int(high) < classes):
            valid = (y >= 0) & (y < classes)
            y = torch.where(valid, y, 0)
    label = y.long().unsqueeze(0)  # (1, B)
    own = logits.gather(0, label)  # (1, B)
    others = logits.scatter(0, label, -math.inf).amax(0, keepdim=True)
    prob = torch.softmax(logits, dim=0)
    p_label = prob.gather(0, label)  # (1, B)
    # max's index is argmax's (the first largest), in a seventh of argmax's time over dim 0;
    # likewise the square root of the sum of squares for vector_norm.
    correct = (logits.max(0, keepdim=True).indices == label).double()
    # prob minus the one-hot label, written as one scatter (the same values as subtracting
    # one_hot, in a fraction of the small operations: this runs on every scored batch).
    diff = prob.scatter(0, label, p_label - 1.0)
    el2n = diff.mul_(diff).sum(0, keepdim=True).sqrt_()
    # (4, B) built row by row (one contiguous copy each), returned as its (B, 4) transpose.
    stats = torch.cat([own - others, p_label, correct, el2n]).t()
    if valid is None:
        return stats
    return stats.masked_fill(~valid.unsqueeze(1), math.nan)


def sequence_cross_entropy(
    output, labels: Tensor, ignore_index: int = -100, shift: bool = True
) -> Tensor:
    """Per-sequence mean token cross entropy: the loss of a language or token model, per sample.

    Each sequence's loss is the mean over its own non-ignored targets, so it does not depend on
    the other rows of the batch or on how much padding the batch adds (padding carries the
    label ``ignore_index``).

    Args:
        output: the model's output, any form :func:`logits_of` accepts, holding (B, T, V) logits.
        labels: (B, T) integer targets; ``ignore_index`` marks positions without a target
            (padding, prompt tokens).
        ignore_index: the label of positions that do not count.
        shift: True for causal language models, whose labels are the input ids: the logits at
            position t predict the label at t + 1 (as Hugging Face's causal LMs do). False when
            position t's logits predict labels[:, t] (token classification).
    Returns:
        (B,) losses; NaN for a sequence without any target.
    """
    logits = logits_of(output)
    if logits.dim() != 3:
        raise ValueError(
            f"sequence_cross_entropy needs logits of shape (B, T, V), got {tuple(logits.shape)}"
        )
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor of shape (B, T), got {got}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have shape (B, T) = {tuple(logits.shape[:2])} to match the logits "
            f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    # (B, V, T') against (B, T'): cross_entropy's layout for a sequence of targets.
    tokens = F.cross_entropy(
        logits.transpose(1, 2), labels.long(), ignore_index=ignore_index, reduction="none"
    )
    count = (labels != ignore_index).sum(1)
    mean = tokens.sum(1) / count.clamp(min=1).to(tokens.dtype)
    return torch.where(count > 0, mean, torch.full_like(mean, math.nan))
