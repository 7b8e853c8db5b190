"""Data-set scale: IndexedDataset (samples with their ids) and score_dataset (one row per id)."""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from .diagnostics import PassWarnings, _outside_caller_level
from .distributed import all_gather_rows, is_distributed, is_main_process, widest_dtype
from .scores import SCORE_FIELDS, CurvatureScores, qualified_name

__all__ = ["IndexedDataset", "score_dataset", "scorer_setting"]


class IndexedDataset(Dataset):
    """A map-style dataset whose items are (x, y, id) or (x, y, id, model_inputs).

    The id of item i is its index in the outermost data set that is not a Subset: for
    ``IndexedDataset(Subset(ds, idx))`` item i has id ``idx[i]`` (nested Subsets compose), so
    scores land in the rows of ``ds`` and a sample gets the same probes whichever subset it is
    scored through. ``num_samples`` is then ``len(ds)``.

    Args:
        dataset: a map-style dataset of (x, y) items, or (x, y, model_inputs) items whose third
            element is a dict of the model's extra keyword inputs for that sample.
        through_subsets: False gives ids 0 .. len(dataset)-1 (positions in ``dataset`` itself)
            even when it is a Subset.

    Attributes:
        num_samples: the number of ids (len of the data set the ids index).
    """

    def __init__(self, dataset: Dataset, *, through_subsets: bool = True) -> None:
        self.dataset = dataset
        self._ids: Tensor | None = None  # (len(dataset),) int64, or None for positions
        root = dataset
        while through_subsets and isinstance(root, Subset):
            parent = len(root.dataset)
            step = torch.as_tensor(np.asarray(root.indices), dtype=torch.int64).reshape(-1)
            step = torch.where(step < 0, step + parent, step)  # Subset allows negative indices
            self._ids = step if self._ids is None else step[self._ids]
            root = root.dataset
        self.num_samples = len(root)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if (
            not isinstance(item, (tuple, list))
            or len(item) not in (2, 3)
            or (len(item) == 3 and not isinstance(item[2], Mapping))
        ):
            raise TypeError(
                "IndexedDataset expects (x, y) or (x, y, model_inputs: dict) items, got "
                + type(item).__name__
                + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            )
        sample_id = index if self._ids is None else int(self._ids[index])
        return (item[0], item[1], sample_id, *item[2:])


def scorer_setting(scorer: Any, name: str) -> Any:
    """A setting (h, n_probes, method, seed, ...) of a scorer, or of the scorer it wraps.

    Scorers that wrap a CurvatureScorer (e.g. a token scorer) hold the settings on the wrapped
    one, under ``.scorer``. None when neither has it.
    """
    for obj in (scorer, getattr(scorer, "scorer", None)):
        if obj is not None and hasattr(obj, name):
            return getattr(obj, name)
    return None


def _model_device(model) -> torch.device | None:
    if isinstance(model, nn.Module):
        tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
        if tensor is not None:
            return tensor.device
    return None


def _num_samples_of(dataset) -> int | None:
    """N for a loader's data set: its ids' range for IndexedDataset, through Subsets of one."""
    while isinstance(dataset, Subset) and not isinstance(dataset, IndexedDataset):
        if not isinstance(dataset.dataset, (Subset, IndexedDataset)):
            break
        dataset = dataset.dataset  # Subset(IndexedDataset(ds)) yields ds's ids
    if isinstance(dataset, IndexedDataset):
        return dataset.num_samples
    try:
        return len(dataset)
    except TypeError:  # an iterable-style dataset without a length
        return None


def _progress_bar(total: int | None, enabled: bool, description: str):
    from tqdm.auto import tqdm

    show = enabled and is_main_process() and sys.stderr.isatty()
    return tqdm(total=total, unit="sample", unit_scale=True, desc=description, disable=not show)


def _split_batch(batch) -> tuple[Tensor, Tensor, Tensor, dict]:
    if (
        isinstance(batch, (tuple, list))
        and len(batch) in (3, 4)
        and (len(batch) == 3 or isinstance(batch[3], Mapping))
    ):
        x, y, ids = batch[:3]
        return x, y, torch.as_tensor(ids), dict(batch[3]) if len(batch) == 4 else {}
    raise TypeError(
        "score_dataset's loader must yield (x, y, ids) or (x, y, ids, model_inputs: dict) "
        f"batches, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "; wrap a dataset of (x, y) items in curvkern.IndexedDataset"
    )


# Two rows of one id count as one sample scored twice when these agree: the values computed
# directly from the model's output and gradient at x. (Curvature itself is a difference of
# gradients, where the rounding of a batch-dependent matmul is amplified by about 1/h.)
_DUPLICATE_COLUMNS = ("loss", "grad_norm", "margin", "p_label", "correct", "el2n")


# A fixed quasi-random weight per element (frac(i * golden ratio) + 1/2, in [1/2, 3/2)): two
# rows of one shape get the same weighted sum only if they are equal, up to rounding, or differ
# along a direction orthogonal to the weights (probability 0 for any natural perturbation).
_GOLDEN = 0.6180339887498949
_FINGERPRINT_COLUMNS = 6  # per tensor (x, y): weighted sum, weighted sum of |values|, row size


def _fingerprint(x, y, batch: int) -> Tensor:
    """(B, 6) float64 on the CPU: per row of x and of y, a weighted sum of its values (weights
    of _GOLDEN), the weighted sum of their magnitudes (its rounding scale) and its size; NaN
    where the tensor has no row per sample. Costs one pass over x, on x's device."""
    out = torch.full((batch, _FINGERPRINT_COLUMNS), math.nan, dtype=torch.float64)
    for k, t in enumerate((x, y)):
        if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != batch or t.is_complex():
            continue
        rows = t.detach().reshape(batch, -1).to(torch.float64)
        size = rows.shape[1]
        w = torch.arange(size, device=rows.device, dtype=torch.float64)
        w = w.mul_(_GOLDEN).frac_().add_(0.5)
        out[:, 3 * k] = (rows @ w).cpu()
        out[:, 3 * k + 1] = (rows.abs() @ w).cpu()
        out[:, 3 * k + 2] = size
    return out


def _different_inputs(a: Tensor, b: Tensor) -> Tensor:
    """(R,) bool: rows of _fingerprint that cannot come from one sample: x (or y) of one size
    whose weighted sums differ by more than their rounding (a sum of ``size`` products in
    float64 is off by at most size * eps * the sum of magnitudes). Rows of another size (e.g.
    token sequences padded to other lengths in other batches) are not compared."""
    eps = torch.finfo(torch.float64).eps
    differ = torch.zeros(a.shape[0], dtype=torch.bool)
    for k in range(2):
        fa, fb = a[:, 3 * k], b[:, 3 * k]
        scale = torch.maximum(a[:, 3 * k + 1], b[:, 3 * k + 1])
        size = a[:, 3 * k + 2]
        comparable = (size == b[:, 3 * k + 2]) & fa.isfinite() & fb.isfinite()
        differ |= comparable & ((fa - fb).abs() > 2 * size * eps * scale)
    return differ


def _check_duplicate_ids(
    ids: Tensor,
    values: Tensor,
    dtype: torch.dtype,
    inputs: Tensor | None = None,
    num_samples: int | None = None,
    padding: int = 0,
) -> None:
    """Refuses one id arriving with two different rows (two samples sharing an id).

    A DistributedSampler's padding repeats samples: same id, same values (up to the rounding of
    a batch-dependent matmul), which is harmless. Two different samples under one id (e.g. a
    ConcatDataset of IndexedDatasets, each counting from 0) would silently overwrite each other.
    Rows agree when every column of _DUPLICATE_COLUMNS differs by at most
    1000 eps (|a| + |b| + the column's largest |value|): rounding noise of a model pass is a few
    eps times the magnitudes involved, while different samples differ by O(1) in at least one.
    A near copy of a sample can agree with it to that tolerance, so ``inputs`` (the rows'
    _fingerprint of x and y) must agree too. Repeated ids while some of the ``num_samples`` ids
    never arrived (beyond ``padding`` repeats, a DistributedSampler's) are warned about: the
    rows left NaN are likely the other part's samples.
    """
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    repeat = sorted_ids[1:] == sorted_ids[:-1]
    if not bool(repeat.any()):
        return
    columns = [SCORE_FIELDS.index(c) for c in _DUPLICATE_COLUMNS]
    a = values[order[:-1][repeat]][:, columns]
    b = values[order[1:][repeat]][:, columns]
    scale = torch.nan_to_num(values[:, columns].abs(), nan=0.0, posinf=0.0).amax(dim=0)
    tol = 1e3 * torch.finfo(dtype).eps * (a.abs() + b.abs() + scale)
    same = (a == b) | ((a - b).abs() <= tol) | (a.isnan() & b.isnan())
    bad = ~same.all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        col = int((~same[row]).nonzero()[0])
        raise ValueError(
            f"id {int(sorted_ids[1:][repeat][row])} arrived twice with different scores "
            f"({_DUPLICATE_COLUMNS[col]} {float(a[row, col]):.6g} and {float(b[row, col]):.6g}), "
            f"{int(bad.sum())} ids in all: two samples share an id. A ConcatDataset of "
            "IndexedDatasets numbers each part from 0; index the concatenation instead: "
            "IndexedDataset(ConcatDataset([a, b]))."
        )
    if inputs is not None:
        differ = _different_inputs(inputs[order[:-1][repeat]], inputs[order[1:][repeat]])
        if bool(differ.any()):
            row = int(differ.nonzero()[0])
            raise ValueError(
                f"id {int(sorted_ids[1:][repeat][row])} arrived twice with different inputs "
                f"(x or y differ), {int(differ.sum())} ids in all: two samples share an id, "
                "e.g. a ConcatDataset of IndexedDatasets, which numbers each part from 0; "
                "index the concatenation instead: IndexedDataset(ConcatDataset([a, b]))."
            )
    repeats = int(repeat.sum())
    unseen = 0 if num_samples is None else num_samples - int(torch.unique(ids).numel())
    if repeats > padding and unseen > 0:
        warnings.warn(
            f"{repeats} rows repeated an id already scored while {unseen} of the "
            f"{num_samples} ids never arrived (left NaN): if the repeats are other samples "
            "sharing ids (a ConcatDataset of IndexedDatasets numbers each part from 0; a copy "
            "of a part has the same scores), index the concatenation instead, "
            "IndexedDataset(ConcatDataset([a, b])); a sampler that draws with replacement "
            "repeats ids by design.",
            UserWarning,
            stacklevel=_outside_caller_level(),
        )


def score_dataset(
    scorer,
    loader: Iterable,
    num_samples: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> CurvatureScores:
    """Scores every sample a loader yields, into one row per id 0 .. N-1.

    Under torch.distributed (gloo or NCCL), each rank scores what its loader gives it (e.g.
    through a DistributedSampler) and every rank returns the full result. A sample's scores
    depend only on its id, so the padding duplicates of a DistributedSampler are harmless; one
    id arriving with different scores (two samples sharing an id) is an error.

    Args:
        scorer: a CurvatureScorer, or any object with its ``score(x, y, ids, **model_inputs)``
            (e.g. curvkern.text.TokenScorer).
        loader: iterable of (x, y, ids) or (x, y, ids, model_inputs) batches, e.g. a DataLoader
            over IndexedDataset(dataset); model_inputs is a dict of extra keyword inputs
            (tensors whose first dimension is the batch are per-sample).
        num_samples: N; default: the number of ids of the loader's IndexedDataset (through
            Subsets of it), else len(loader.dataset) when it has one, else the largest id seen
            + 1 (across ranks).
        progress: show a progress bar (samples/s) when stderr is a terminal.
        device: where to score; default: the device of the scorer's model (its first parameter
            or buffer), else where the batches are.
    Returns:
        CurvatureScores of N rows on the CPU, ids 0 .. N-1; NaN scores and n_probes 0 for ids
        never seen. Only the (B,) fields are gathered: curvature_map is None.
    Raises:
        ValueError: an id outside [0, N), or one id with two different rows.
    """
    if num_samples is None and hasattr(loader, "dataset"):
        num_samples = _num_samples_of(loader.dataset)
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0
    ):
        raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
    if device is not None:
        device = torch.device(device)
    else:
        device = _model_device(scorer_setting(scorer, "model"))
    sampler = getattr(loader, "sampler", None)
    total = len(sampler) if sampler is not None and hasattr(sampler, "__len__") else num_samples

    parts: list[CurvatureScores] = []
    fingerprints: list[Tensor] = []  # (B, 6) per batch: what tells near copies apart
    with _progress_bar(total, progress, "curvature") as bar, PassWarnings() as caught:
        for batch in loader:
            x, y, ids, inputs = _split_batch(batch)
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                inputs = {
                    k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                    for k, v in inputs.items()
                }
            with caught.batch(len(ids)):
                parts.append(scorer.score(x, y, ids, **inputs).to("cpu"))
            fingerprints.append(_fingerprint(x, y, len(ids)))
            bar.update(len(ids))

    if parts:
        local = CurvatureScores.cat(parts)
        ids, values = local.to_rows()
        dtype, h, method, loss_fn = local.curvature.dtype, local.h, local.method, local.loss_fn
    else:
        ids = torch.empty(0, dtype=torch.int64)
        values = torch.empty(0, len(SCORE_FIELDS) + 1, dtype=torch.float64)
        dtype = torch.float32
        h, method = scorer_setting(scorer, "h"), scorer_setting(scorer, "method")
        loss_fn = scorer_setting(scorer, "loss_fn")
        loss_fn = None if loss_fn is None else qualified_name(loss_fn)
    columns = values.shape[1]
    fingerprint = torch.cat(
        [torch.empty(0, _FINGERPRINT_COLUMNS, dtype=torch.float64), *fingerprints]
    )
    ids, values = all_gather_rows(ids, torch.cat([values, fingerprint], dim=1))
    values, fingerprint = values[:, :columns], values[:, columns:]
    dtype = widest_dtype(dtype)  # ranks agree on the dtype: the widest of theirs

    if num_samples is None:
        num_samples = int(ids.max()) + 1 if ids.numel() else 0
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_samples):
        bad = ids[(ids < 0) | (ids >= num_samples)][0]
        raise ValueError(
            f"ids must lie in [0, num_samples = {num_samples}), got id {int(bad)}. "
            "IndexedDataset(Subset(ds, idx)) yields ds's indices: num_samples is len(ds)."
        )
    world = dist.get_world_size() if is_distributed() else 1
    _check_duplicate_ids(ids, values, dtype, fingerprint, num_samples, padding=world - 1)
    return CurvatureScores.from_rows(
        ids, values, size=num_samples, h=h, method=method, dtype=dtype, loss_fn=loss_fn
    )
