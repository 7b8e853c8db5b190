"""CurvatureScores: the per-sample result of a scorer."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CurvatureScores", "SCORE_FIELDS", "CLASSIFICATION_FIELDS", "qualified_name"]

# The fields computed from the model's output at x when it is (B, C) logits with integer labels
# (NaN otherwise): the training-dynamics baselines curvature is compared with.
CLASSIFICATION_FIELDS = ("margin", "p_label", "correct", "el2n")


@dataclasses.dataclass
class CurvatureScores:
    """Per-sample curvature scores of a batch or a data set; every tensor field has shape (B,).

    Attributes:
        curvature: mean_k ||H r_k|| (fd: ||dg_k|| / h; zo: mean_k |r_k^T H s_k|), the
            memorization score of Garg, Ravikumar & Roy (2024) up to the constant h / B.
        curvature_stderr: standard error of ``curvature`` over the probes (0 with one probe).
        trace: Hutchinson estimate of tr(H), mean_k r_k . H r_k.
        trace_stderr: its standard error over the probes.
        frobenius_sq: estimate of ||H||_F^2 = tr(H^2), mean_k ||H r_k||^2.
        loss: per-sample loss L(x, y).
        grad_norm: ||grad_x L(x, y)|| (NaN for method "zo", which takes no gradient).
        margin: logit_y - max_{j != y} logit_j at x (area under the margin, per epoch).
        p_label: softmax probability of the label y at x.
        correct: 1.0 if the argmax of the logits at x is y, else 0.0.
        el2n: ||softmax(logits) - onehot(y)||_2 at x (the EL2N score).
            These four come from the unperturbed pass (no extra model pass), and are NaN unless
            the output is (B, C) logits (as :func:`curvkern.losses.logits_of` finds them) and y
            holds (B,) integer labels.
        ids: (B,) int64 sample ids.
        n_probes: (B,) int64 number of probes each sample got.
        h: the finite-difference step the scores were computed with.
        method: "fd", "hvp" or "zo".
        curvature_map: (B, T) per-position curvature mean_k ||dg_k[t]|| / h when scored with
            ``per_position=True`` (masked-out positions 0); None otherwise. Not a (B,) field, so
            not in :meth:`to_dict`; it follows the rows in indexing, ``to`` and ``cat``.
        loss_fn: the qualified name of the loss function the scores were made with (see
            :func:`qualified_name`), so that a tracker can refuse scores of another loss; None
            for scores built by hand.
    """

    curvature: Tensor
    curvature_stderr: Tensor
    trace: Tensor
    trace_stderr: Tensor
    frobenius_sq: Tensor
    loss: Tensor
    grad_norm: Tensor
    margin: Tensor
    p_label: Tensor
    correct: Tensor
    el2n: Tensor
    ids: Tensor
    n_probes: Tensor
    h: float
    method: str
    curvature_map: Tensor | None = None
    loss_fn: str | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to_dict(self) -> dict[str, Tensor]:
        """The per-sample tensors by name: the float fields, ``ids`` and ``n_probes``."""
        out = {name: getattr(self, name) for name in SCORE_FIELDS}
        out["ids"] = self.ids
        out["n_probes"] = self.n_probes
        return out

    def paper_score(self, batch_size: int | Tensor) -> Tensor:
        """The score of the published code: h / B * curvature.

        The published implementation differentiates the batch-mean loss and does not divide by
        h, so its score of a sample scored in a batch of B samples is h / B times ``curvature``
        (up to its probe offset of 1e-7).

        Args:
            batch_size: B, an int, or a (B,) tensor of the size of the batch each sample was in.
        """
        if isinstance(batch_size, Tensor):
            batch_size = batch_size.to(self.curvature)
        elif batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        return self.h / batch_size * self.curvature

    def to(self, device: torch.device | str) -> CurvatureScores:
        """A copy with every tensor on ``device``."""
        cmap = None if self.curvature_map is None else self.curvature_map.to(device)
        return dataclasses.replace(
            self,
            **{name: t.to(device) for name, t in self.to_dict().items()},
            curvature_map=cmap,
        )

    def __getitem__(self, index) -> CurvatureScores:
        """The rows ``index`` (a slice, an index tensor or a boolean mask)."""
        cmap = None if self.curvature_map is None else self.curvature_map[index]
        return dataclasses.replace(
            self, **{name: t[index] for name, t in self.to_dict().items()}, curvature_map=cmap
        )

    @classmethod
    def empty(
        cls,
        h: float,
        method: str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        size: int = 0,
        loss_fn: str | None = None,
    ) -> CurvatureScores:
        """``size`` rows of NaN scores, ids 0 .. size-1 and no probes."""
        nan = torch.full((size,), math.nan, dtype=dtype, device=device)
        return cls(
            **{name: nan.clone() for name in SCORE_FIELDS},
            ids=torch.arange(size, device=device),
            n_probes=torch.zeros(size, dtype=torch.int64, device=device),
            h=h,
            method=method,
            loss_fn=loss_fn,
        )

    def to_rows(self) -> tuple[Tensor, Tensor]:
        """The rows that a gather across processes carries: ids and every per-sample number.

        Returns:
            ids (B,) int64 and values (B, F + 1) float64 on the CPU: the columns are
            SCORE_FIELDS in order, then n_probes (exact in float64 below 2**53).
        """
        columns = [getattr(self, name).double() for name in SCORE_FIELDS]
        columns.append(self.n_probes.double())
        return self.ids.cpu(), torch.stack(columns, dim=1).cpu()

    @classmethod
    def from_rows(
        cls,
        ids: Tensor,
        values: Tensor,
        *,
        size: int,
        h: float,
        method: str,
        dtype: torch.dtype = torch.float32,
        loss_fn: str | None = None,
    ) -> CurvatureScores:
        """Scores of ids 0 .. size-1 from rows made by :meth:`to_rows` (the inverse).

        Args:
            ids: (R,) int64 ids in [0, size); an id given twice keeps its last row.
            values: (R, F + 1) float64 rows, columns as to_rows writes them.
            size: N, the number of rows of the result.
            h, method: the scorer's step and method.
            dtype: the float fields' dtype.
            loss_fn: the qualified name of the loss function (CurvatureScores.loss_fn).
        Returns:
            CurvatureScores of ``size`` rows on the CPU; NaN and n_probes 0 for ids not in ids.
        """
        if values.shape != (ids.shape[0], len(SCORE_FIELDS) + 1):
            raise ValueError(
                f"values must have shape (R, {len(SCORE_FIELDS) + 1}) with R = {ids.shape[0]} "
                f"(SCORE_FIELDS then n_probes), got {tuple(values.shape)}"
            )
        result = cls.empty(h, method, dtype=dtype, size=size, loss_fn=loss_fn)
        for i, name in enumerate(SCORE_FIELDS):
            getattr(result, name)[ids] = values[:, i].to(dtype)
        result.n_probes[ids] = values[:, -1].long()
        return result

    @classmethod
    def cat(cls, parts: Sequence[CurvatureScores]) -> CurvatureScores:
        """The rows of ``parts`` one after the other (all from the same h, method and loss_fn).

        Curvature maps (all parts have one, or none has) of different lengths T are padded on
        the right with NaN to the longest: those positions do not exist in the shorter parts.
        """
        if not parts:
            raise ValueError("CurvatureScores.cat needs at least one part")
        first = parts[0]
        for p in parts[1:]:
            if p.h != first.h or p.method != first.method:
                raise ValueError(
                    "cannot concatenate scores of different h or method: "
                    f"(h={first.h}, {first.method}) and (h={p.h}, {p.method})"
                )
            if p.loss_fn != first.loss_fn:
                raise ValueError(
                    "cannot concatenate scores of different loss functions: "
                    f"{first.loss_fn!r} and {p.loss_fn!r}"
                )
        tensors = {
            name: torch.cat([getattr(p, name) for p in parts])
            for name in (*SCORE_FIELDS, "ids", "n_probes")
        }
        return cls(
            **tensors,
            h=first.h,
            method=first.method,
            curvature_map=_cat_maps(parts),
            loss_fn=first.loss_fn,
        )


# The (B,) float fields: the fields declared as Tensor, other than ids and n_probes. Derived from
# the declaration above, so that a new field reaches the gather, the tracker and its file.
SCORE_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(CurvatureScores)
    if f.type == "Tensor" and f.name not in ("ids", "n_probes")
)


def qualified_name(fn) -> str:
    """How a tracker file names the loss function: ``module.qualname`` of a function or bound
    method; a functools.partial as its function with its arguments; a callable object (e.g.
    nn.CrossEntropyLoss(label_smoothing=0.1)) as its class with its settings (plain attributes,
    and a short hash of each tensor it holds), so that the same loss with other arguments has
    another name. Two lambdas of one module share a name: a tracker cannot tell them apart."""
    if isinstance(fn, functools.partial):
        arguments = [_setting_text(a) for a in fn.args]
        arguments += [f"{k}={_setting_text(v)}" for k, v in sorted(fn.keywords.items())]
        return f"{qualified_name(fn.func)}({', '.join(arguments)})"
    if hasattr(fn, "__qualname__"):  # a function, a class, a bound method
        return f"{getattr(fn, '__module__', None) or '?'}.{fn.__qualname__}"
    kind = type(fn)
    name = f"{getattr(kind, '__module__', None) or '?'}.{kind.__qualname__}"
    settings = {
        k: v
        for k, v in getattr(fn, "__dict__", {}).items()
        if not k.startswith("_") and k != "training" and not callable(v)
    }
    if isinstance(fn, torch.nn.Module):
        settings.update(fn.named_buffers(recurse=False))
        settings.update(fn.named_parameters(recurse=False))
    if not settings:
        return name
    return f"{name}({', '.join(f'{k}={_setting_text(v)}' for k, v in sorted(settings.items()))})"


def _setting_text(value) -> str:
    """A loss setting as text: tensors by shape, dtype and a hash of their values."""
    if isinstance(value, Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        digest = hashlib.sha256(data).hexdigest()[:12]
        return f"tensor({tuple(value.shape)}, {value.dtype}, sha256:{digest})"
    if callable(value):
        return qualified_name(value)
    return repr(value)


def _cat_maps(parts: Sequence[CurvatureScores]) -> Tensor | None:
    """The parts' (B_i, T_i) curvature maps stacked into (sum B_i, max T_i), or None if none."""
    maps = [p.curvature_map for p in parts]
    if all(m is None for m in maps):
        return None
    if any(m is None for m in maps):
        raise ValueError(
            "cannot concatenate scores with and without curvature_map; score every part with "
            "the same per_position setting"
        )
    width = max(m.shape[1] for m in maps)
    return torch.cat([F.pad(m, (0, width - m.shape[1]), value=math.nan) for m in maps])
