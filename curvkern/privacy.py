"""Membership inference with shadow models: curvature, loss and LiRA's confidence as signals.

A membership-inference audit asks, for each sample of a data set, whether a target model
trained on it. The standard way (LiRA: Carlini et al., "Membership Inference Attacks From
First Principles", IEEE S&P 2022) trains M shadow models, each on a random half of the data,
computes a per-sample signal with every shadow model, and fits for each sample a Gaussian to
the signal of the models that trained on it ("in") and one to the models that did not
("out"). The target model's signal is then scored by its likelihood under the two.
"Curvature Clues" (Ravikumar, Soufleri & Roy, NeurIPS 2024) shows that the input-loss
curvature, estimated from loss values only, is such a signal, and a strong one.

This module holds:
  - ``likelihood_ratio`` (online and offline LiRA, fixed variance, several queries per
    sample) and ``nll_ratio`` (the Curvature Clues "NLL" attack);
  - the signals, for one model at a time: ``curvature_signal`` (``method="zo"``: forward
    passes only), ``loss_signal``, ``confidence_signal`` (LiRA's logit-scaled confidence, from
    ``logit_confidence``), and ``shadow_signals`` to stack them over M models and A queries;
  - exports to the layouts the two common toolkits read: ``export_lira`` (LiRA's reference
    code) and ``privacy_meter_arrays`` (ML Privacy Meter).

Array layouts (those of LiRA's reference code, research/mi_lira_2021 in tensorflow/privacy):
  - shadow_scores: (M, N) or (M, N, A): model m's signal of sample n under query a (a query
    is an input transformation such as the identity or a horizontal flip);
  - shadow_keep: (M, N) bool: sample n was in model m's training set;
  - target_scores: (N,) or (N, A): the audited model's signal.
Every score returned is (N,), float64, higher = more likely a member.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ._model_state import scoring_mode
from .diagnostics import PassWarnings
from .losses import cross_entropy, logits_of
from .scorer import CurvatureScorer

__all__ = [
    "likelihood_ratio",
    "nll_ratio",
    "logit_confidence",
    "confidence_signal",
    "loss_signal",
    "curvature_signal",
    "shadow_signals",
    "export_lira",
    "privacy_meter_arrays",
]

# LiRA's reference code adds 1e-30 to every standard deviation; a sample whose shadow scores
# are all equal gets this one (with a warning).
MIN_STD = 1e-30
# Curvature Clues takes log(score + 1e-22) of its curvature score (its `log_err`).
LOG_FLOOR = 1e-22
CENTERS = ("median", "mean")
ALTERNATIVES = ("greater", "less", "two-sided")


# ----------------------------------------------------------------------------------------------
# Checks


def _as_array(values, name: str, dtype=np.float64) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    try:
        return np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a tensor or array of numbers, got {type(values)}") from e


def _check_target_pair(target_scores, target_keep) -> None:
    if (target_scores is None) != (target_keep is None):
        raise ValueError("target_scores and target_keep go together: give both or neither")


def _check_finite(a: np.ndarray, name: str, layout: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN or infinite values (the first at {layout} = "
            f"{first}); a Gaussian fit cannot use them. A NaN curvature or loss comes from a "
            f"non-finite loss: rescore those samples, or leave them out of the audit (select "
            f"the samples whose scores are finite in every model before calling)."
        )


def _as_membership(keep: np.ndarray, name: str, meaning: str) -> np.ndarray:
    """A boolean membership array from a boolean or 0/1 one; anything else is refused."""
    if keep.dtype == np.bool_:
        return keep
    if keep.dtype.kind not in "biuf" or not np.isin(keep, (0, 1)).all():
        raise ValueError(f"{name} must be boolean or 0/1 ({meaning})")
    return keep.astype(bool)


def _check_inputs(
    shadow_scores, shadow_keep, target_scores
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M, N, A) float64 shadow scores, (M, N) bool keep, (N, A) float64 target scores."""
    s = _as_array(shadow_scores, "shadow_scores")
    if s.ndim not in (2, 3):
        raise ValueError(
            f"shadow_scores must have shape (M, N) or (M, N, A) (shadow models, samples, "
            f"queries), got {s.shape}"
        )
    m, n = s.shape[:2]
    keep_raw = _as_array(shadow_keep, "shadow_keep", dtype=None)
    if keep_raw.shape != (m, n):
        raise ValueError(
            f"shadow_keep must have shape (M, N) = {(m, n)} like shadow_scores' first two "
            f"dimensions, got {keep_raw.shape}"
        )
    keep_raw = _as_membership(keep_raw, "shadow_keep", "sample n in model m's training set")
    t = _as_array(target_scores, "target_scores")
    expected = (n,) if s.ndim == 2 else (n, s.shape[2])
    if t.shape != expected:
        raise ValueError(
            f"target_scores must have shape {expected} (one score per sample"
            f"{'' if s.ndim == 2 else ' and query'}, as shadow_scores {s.shape}), got {t.shape}"
        )
    if s.ndim == 2:
        s, t = s[:, :, None], t[:, None]
    _check_finite(s, "shadow_scores", "(model, sample, query)")
    _check_finite(t, "target_scores", "(sample, query)")
    return s, keep_raw, t


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Gaussian fits


def _fit(
    s: np.ndarray, member: np.ndarray, side: str, *, fix_variance: bool, center: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample location and scale of the scores where ``member`` (M, N) is True.

    Location: the median (LiRA's reference code) or the mean (Curvature Clues) over those
    models; scale: their standard deviation (ddof 0, as np.std), or with ``fix_variance`` the
    square root of the pooled within-sample variance (every sample's squared deviations from its
    own mean, over all samples), one per query.

    Returns:
        loc (N, A) and scale (N, A).
    """
    count = member.sum(0)  # (N,)
    need = 1 if fix_variance else 2
    short = np.flatnonzero(count < need)
    if short.size:
        what = "no" if need == 1 else "fewer than 2"
        where = "trained on them" if side == "in" else "held them out"
        advice = (
            "Train more shadow models, each on a random half of the data, so that every sample "
            "is in about half of them and out of the others"
        )
        if side == "in":
            advice += "; or use online=False (it fits the out models only)"
        if need == 2:
            advice += "; or pass fix_variance=True (one variance for all samples)"
        raise ValueError(
            f"{short.size} of {member.shape[1]} samples (the first: sample {int(short[0])}) have "
            f"{what} shadow models that {where}, so their {side!r} Gaussian cannot be "
            f"fitted. {advice}; or leave those samples out."
        )
    masked = np.where(member[:, :, None], s, np.nan)  # (M, N, A)
    mean = np.nanmean(masked, axis=0)
    loc = np.nanmedian(masked, axis=0) if center == "median" else mean
    sq = np.nansum((masked - mean) ** 2, axis=0)  # (N, A)
    if fix_variance:
        scale = np.broadcast_to(np.sqrt(sq.sum(0) / count.sum()), loc.shape).copy()
    else:
        scale = np.sqrt(sq / count[:, None])
    flat = scale <= 0
    if flat.any():
        warnings.warn(
            f"{int(flat.any(1).sum())} samples have the same {side!r} score in every shadow "
            f"model (standard deviation 0); LiRA's floor of {MIN_STD} stands in for it, so their "
            f"ratio is extreme. More shadow models, a finer signal, or fix_variance=True avoid it.",
            stacklevel=3,
        )
        scale = np.maximum(scale, MIN_STD)
    return loc, scale


def _norm_logpdf(x: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z = (x - loc) / scale
    return -0.5 * z * z - np.log(scale) - 0.5 * math.log(2 * math.pi)


def _log_ndtr(z: np.ndarray) -> np.ndarray:
    """log Phi(z), accurate in both tails (torch.special.log_ndtr in float64)."""
    return torch.special.log_ndtr(torch.from_numpy(np.ascontiguousarray(z))).numpy()


def likelihood_ratio(
    shadow_scores,
    shadow_keep,
    target_scores,
    *,
    online: bool = True,
    fix_variance: bool = False,
    alternative: str = "greater",
    center: str = "median",
) -> Tensor:
    """LiRA's per-sample likelihood-ratio test of membership, for any signal.

    For every sample n and query a, Gaussians are fitted to the shadow scores of the models that
    trained on n ("in") and of those that did not ("out"): location the median over those
    models (LiRA's reference code; ``center="mean"`` for the mean, as Curvature Clues), scale
    their standard deviation (ddof 0, as ``np.std``). Then:

    - ``online=True``: the log-likelihood ratio
      log N(t; mu_in, sd_in) - log N(t; mu_out, sd_out) of the target's score t, averaged over
      the queries (LiRA's code averages the per-query log ratios; the sum, a diagonal-Gaussian
      log ratio, ranks the same).
    - ``online=False``: the out models only (LiRA's offline attack), a one-sided test:
      -log P[Z >= t] with Z ~ N(mu_out, sd_out) for ``alternative="greater"`` (members score
      higher, as LiRA's confidence), -log P[Z <= t] for ``"less"`` (members score lower, as the
      loss or the curvature), averaged over the queries (Fisher's combination of the one-sided
      p-values, up to a factor 2A). The paper's Lambda = 1 - P[Z > t] ranks the samples the
      same for one query but saturates at 1 in floating point exactly where low false-positive
      rates are decided; -log P does not. ``"two-sided"`` is -log N(t; mu_out, sd_out), which is
      what LiRA's plot.py computes for its offline curves.
    - ``fix_variance=True``: one standard deviation for all samples (per query, and per side
      online): the root of the pooled within-sample variance. With few shadow models this is
      steadier than a per-sample estimate. (LiRA's plot.py instead takes ``np.std`` of all the
      in scores pooled, which also counts the spread between the samples' locations, for both
      sides online, and of all the out scores offline.)

    Samples need at least 2 in and 2 out models online (1 each with ``fix_variance``); offline,
    out models only. With shadow models on random halves, M = 16 gives every sample about 8 of
    each. LiRA's code truncates every sample to the smallest in/out count; here each sample
    uses all of its models. Curvature Clues' "Curv ZO LR" (its notebooks'
    ``get_likelihood_ratio``) differs in form: it divides the in and out densities summed over
    queries, and gives its Gaussians the sample variance as their standard deviation; this
    function is LiRA's form, with the log curvature (``curvature_signal``) as the signal.

    Args:
        shadow_scores: (M, N) or (M, N, A) signals of M shadow models for N samples (A queries).
        shadow_keep: (M, N) bool: whether shadow model m trained on sample n.
        target_scores: (N,), or (N, A) with 3-D shadow_scores: the audited model's signal.
        online: fit in and out Gaussians (True) or out only (False).
        fix_variance: one variance for all samples instead of one per sample.
        alternative: offline only: "greater", "less" or "two-sided" (see above).
        center: "median" (LiRA's code) or "mean" (Curvature Clues).
    Returns:
        (N,) float64 tensor, higher = more likely a member.
    Raises:
        ValueError: shapes that do not match, NaN or infinite scores, samples without the
            in/out models their fit needs.
    """
    _check_choice("alternative", alternative, ALTERNATIVES)
    _check_choice("center", center, CENTERS)
    s, keep, t = _check_inputs(shadow_scores, shadow_keep, target_scores)
    if s.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    loc_out, sd_out = _fit(s, ~keep, "out", fix_variance=fix_variance, center=center)
    if online:
        loc_in, sd_in = _fit(s, keep, "in", fix_variance=fix_variance, center=center)
        per_query = _norm_logpdf(t, loc_in, sd_in) - _norm_logpdf(t, loc_out, sd_out)
    else:
        if alternative != "two-sided":
            _check_direction(s, keep, loc_out, alternative, center)
        z = (t - loc_out) / sd_out
        if alternative == "greater":
            per_query = -_log_ndtr(-z)  # -log P[Z >= t]
        elif alternative == "less":
            per_query = -_log_ndtr(z)  # -log P[Z <= t]
        else:
            per_query = -_norm_logpdf(t, loc_out, sd_out)
    return torch.from_numpy(per_query.mean(1))


def _check_direction(s, keep, loc_out, alternative: str, center: str) -> None:
    """Warns when the in models' scores lie on the other side of the out ones than assumed."""
    count = keep.sum(0)
    has_in = count > 0
    if not has_in.any():
        return  # truly offline: nothing to check against
    masked = np.where(keep[:, has_in, None], s[:, has_in], np.nan)
    loc_in = np.nanmedian(masked, 0) if center == "median" else np.nanmean(masked, 0)
    above = loc_in > loc_out[has_in]  # (N', A)
    wrong = (~above if alternative == "greater" else above).mean()
    # A sign test: on a signal that carries no membership, about half the samples point either
    # way; warn only when the wrong side wins by more than 3 standard errors.
    if (wrong - 0.5) * math.sqrt(above.size) > 1.5:
        other = "less" if alternative == "greater" else "greater"
        side = "lower" if alternative == "greater" else "higher"
        warnings.warn(
            f"alternative={alternative!r} assumes members score "
            f"{'higher' if alternative == 'greater' else 'lower'}, but for {wrong:.0%} of the "
            f"samples with in models the in scores' {center} is {side} than the out scores': "
            f"this signal looks like one where alternative={other!r} applies (the loss and the "
            f"curvature are lower on members, LiRA's confidence higher).",
            stacklevel=3,
        )


def nll_ratio(shadow_scores, shadow_keep, target_scores, *, center: str = "mean") -> Tensor:
    """The "NLL" attack of Curvature Clues: in and out locations, the in variance for both.

    Score of sample n: the mean over queries of
    log N(t; mu_in, sd_in) - log N(t; mu_out, sd_in)
    = ((t - mu_out)^2 - (t - mu_in)^2) / (2 sd_in^2),
    i.e. ``likelihood_ratio`` with the out Gaussian's spread replaced by the in one's. This is
    ``get_nll_ratio`` of the paper's notebooks (conditonal_mia_aug_*.ipynb in the authors'
    Curvature-Clues repository), which reports it as "Curv ZO NLL" with the log curvature as the
    signal (``curvature_signal``); they sum over queries (same ranking as the mean) and take the
    mean as location (the default here). One difference, deliberate: the notebooks pass the
    sample variance where their Gaussian takes the standard deviation, i.e. they divide by
    2 var^2 where a Gaussian divides by 2 var; here sd_in^2 = var, a proper Gaussian. The two
    rank samples differently whenever the in variances differ between samples.

    Args:
        shadow_scores: (M, N) or (M, N, A), as in ``likelihood_ratio``.
        shadow_keep: (M, N) bool.
        target_scores: (N,) or (N, A).
        center: "mean" (the notebooks) or "median".
    Returns:
        (N,) float64 tensor, higher = more likely a member.
    """
    _check_choice("center", center, CENTERS)
    s, keep, t = _check_inputs(shadow_scores, shadow_keep, target_scores)
    if s.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    loc_in, sd_in = _fit(s, keep, "in", fix_variance=False, center=center)
    loc_out, _ = _fit(s, ~keep, "out", fix_variance=True, center=center)  # location only
    per_query = ((t - loc_out) ** 2 - (t - loc_in) ** 2) / (2 * sd_in**2)
    return torch.from_numpy(per_query.mean(1))


# ----------------------------------------------------------------------------------------------
# Signals


def logit_confidence(logits: Tensor, y: Tensor) -> Tensor:
    """LiRA's logit-scaled confidence log(p_y / (1 - p_y)), exactly and stably from logits.

    With p = softmax(z), log p_y - log(1 - p_y) = z_y - logsumexp_{j != y} z_j, computed here in
    float64 from the logits: no probability is formed, so nothing saturates (LiRA's score.py
    computes log(p_y + 1e-45) - log(sum_{j != y} p_j + 1e-45) in float64 from max-shifted
    logits, the same value until the probabilities underflow).

    Args:
        logits: (B, C) or (B, A, C) logits (A queries).
        y: (B,) integer labels.
    Returns:
        (B,) or (B, A) float64 tensor.
    """
    if not isinstance(logits, Tensor) or logits.dim() not in (2, 3):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a (B, C) or (B, A, C) tensor, got {shape}")
    if not isinstance(y, Tensor) or y.shape != logits.shape[:1] or y.is_floating_point():
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be a ({logits.shape[0]},) integer tensor of labels, got {shape}")
    if logits.shape[-1] < 2:
        raise ValueError(f"logits need at least 2 classes, got {logits.shape[-1]}")
    z = logits.detach().double()
    index = y.to(z.device).long().view(-1, *([1] * (z.dim() - 1)))
    index = index.expand(*z.shape[:-1], 1)
    z_y = z.gather(-1, index).squeeze(-1)
    others = z.scatter(-1, index, -math.inf)
    return z_y - torch.logsumexp(others, dim=-1)


def _batches(x: Tensor, batch_size: int):
    for start in range(0, x.shape[0], batch_size):
        yield slice(start, start + batch_size)


@torch.no_grad()
def _outputs(model, x: Tensor, batch_size: int) -> Tensor:
    """The model's logits on x, in passes of ``batch_size``: from any output the scorer's
    default loss takes (a tensor, a tuple's first element, a mapping's or object's logits)."""
    with scoring_mode(model):
        return torch.cat([logits_of(model(x[part])) for part in _batches(x, batch_size)])


def confidence_signal(model, x: Tensor, y: Tensor, *, batch_size: int = 1024) -> Tensor:
    """LiRA's signal for one model: ``logit_confidence`` of its logits, in eval mode.

    Args:
        model: maps a (B, ...) batch to (B, C) logits; scored in eval mode, left as found.
        x: (N, ...) inputs; y: (N,) labels.
        batch_size: samples per forward pass.
    Returns:
        (N,) float64 tensor, higher on members.
    """
    return logit_confidence(_outputs(model, x, batch_size), y).cpu()


def loss_signal(
    model,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    batch_size: int = 1024,
) -> Tensor:
    """The per-sample loss of one model (Yeom et al.'s signal), in eval mode.

    Args:
        model: maps a (B, ...) batch to an output ``loss_fn`` takes.
        x: (N, ...) inputs; y: (N, ...) targets.
        loss_fn: per-sample losses (B,); default cross entropy.
        batch_size: samples per forward pass.
    Returns:
        (N,) float64 tensor, lower on members.
    """
    fn = loss_fn or cross_entropy  # per-sample, on the logits of any output form
    with torch.no_grad(), scoring_mode(model):
        parts = [fn(model(x[p]), y[p]).double() for p in _batches(x, batch_size)]
    return torch.cat(parts).cpu()


def curvature_signal(
    model,
    x: Tensor,
    y: Tensor,
    ids=None,
    *,
    h: float = 1e-3,
    n_probes: int = 10,
    seed: int = 0,
    log: bool = True,
    loss_fn=None,
    batch_size: int = 1024,
    **scorer_kwargs,
) -> Tensor:
    """The zeroth-order input-loss curvature of one model: forward passes only (black box).

    Scores with ``CurvatureScorer(method="zo")``: per probe pair (r, s),
    |L(x+hr+hs) - L(x-hr+hs) - L(x+hr-hs) + L(x-hr-hs)| / (4 h^2), averaged over ``n_probes``
    pairs, estimates E|r^T H s| (H the input Hessian of the loss). Curvature Clues (its
    precompute_*_scores.py, ``get_curvature_for_batch_zo_v2``) divides the same four-point
    difference by 4h and perturbs by h (r + 1e-7), so its score is h times curvkern's (up to the
    1e-7 offset), with 10 probe pairs and h = 1e-3. Its attacks use log(score + 1e-22).

    The probes are a pure function of (seed, id, probe index): give the same ``ids`` (dataset
    indices) and seed for every shadow model and the target, so that all of them are measured
    along the same directions.

    In float32, the loss differences (about 4 h^2 times the curvature) drown in the rounding of
    the losses: with h = 1e-3 (the paper's choice) the float32 curvature of a small MLP trained
    on digits was off by 100% at the median sample (examples/membership_inference.py). Score a
    float64 copy of the model with float64 inputs where affordable, or raise h (1e-2).

    Args:
        model: maps a (B, ...) float batch to an output ``loss_fn`` takes.
        x: (N, ...) inputs; y: (N, ...) targets.
        ids: (N,) sample ids (default 0..N-1).
        h, n_probes, seed: as ``CurvatureScorer``.
        log: True: log(h * curvature + 1e-22), the paper's signal (its score and floor); False:
            curvkern's curvature itself.
        loss_fn: per-sample losses (default cross entropy).
        batch_size: samples per call of the scorer.
        **scorer_kwargs: further ``CurvatureScorer`` arguments (max_batch, backend).
    Returns:
        (N,) float64 tensor, lower on members.
    """
    scorer = CurvatureScorer(
        model, loss_fn, h=h, n_probes=n_probes, seed=seed, method="zo", **scorer_kwargs
    )
    if ids is None:
        ids = torch.arange(x.shape[0], device=x.device)
    ids = torch.as_tensor(ids, device=x.device)
    parts = []
    with PassWarnings() as caught:  # one warning per kind for the N samples, not per batch
        for p in _batches(x, batch_size):
            with caught.batch(x[p].shape[0]):
                parts.append(scorer.score(x[p], y[p], ids[p]).curvature.double().cpu())
    curvature = torch.cat(parts)
    return torch.log(h * curvature + LOG_FLOOR) if log else curvature


def shadow_signals(
    models: Sequence, queries: Tensor | Sequence[Tensor], y: Tensor, signal: Callable, **kwargs
) -> Tensor:
    """One signal of M models on N samples under A queries, in LiRA's (M, N[, A]) layout.

    Args:
        models: M models (shadow models; or ``[target]`` and take row 0).
        queries: (N, ...) inputs, or a sequence of A such tensors (e.g. the images and their
            horizontal flips), each sample at the same row in all of them.
        y: (N,) labels.
        signal: ``curvature_signal``, ``loss_signal``, ``confidence_signal`` or any function
            ``signal(model, x, y, **kwargs) -> (N,)``.
        **kwargs: passed to ``signal`` (for the curvature keep ids and seed fixed).
    Returns:
        (M, N) float64 tensor for one query tensor, (M, N, A) for a sequence.
    """
    single = isinstance(queries, Tensor)
    xs = [queries] if single else list(queries)
    if not xs or any(not isinstance(q, Tensor) or q.shape[0] != y.shape[0] for q in xs):
        raise ValueError(
            f"queries must be an (N, ...) tensor or a non-empty sequence of them with N = "
            f"{y.shape[0]} rows (as y)"
        )
    out = torch.stack(
        [torch.stack([signal(m, q, y, **kwargs).double() for q in xs], dim=-1) for m in models]
    )
    return out[..., 0] if single else out


# ----------------------------------------------------------------------------------------------
# Exports


def _scores_3d(shadow_scores, shadow_keep) -> tuple[np.ndarray, np.ndarray]:
    s, keep, _ = _check_inputs(
        shadow_scores,
        shadow_keep,
        np.zeros(np.shape(shadow_scores)[1:]),
    )
    return s, keep


def export_lira(
    folder: str | os.PathLike, shadow_scores, shadow_keep, target_scores=None, target_keep=None
) -> list[str]:
    """Writes shadow and target models' scores in the folder layout LiRA's reference code reads.

    LiRA's plot.py (``load_data``, research/mi_lira_2021 in tensorflow/privacy) walks ``folder``
    with ``os.walk`` and, for every subfolder whose name starts with "experiment", loads
    ``keep.npy`` ((N,) bool) and the last file (sorted by name) of ``scores/`` ((N, A) float,
    A queries); it stacks them into scores (M, N, A) and keep (M, N) in the order it met them,
    and ``do_plot`` attacks the last ``ntest`` = 1 of that stack with the others as shadows.
    That order is not the order of the names: ``os.walk`` lists a folder's subfolders in the
    file system's order, so a model written last among siblings is not read last (ext4 orders
    them by a hash of the name, seeded per file system: on one, of the folders of models 0-19,
    model 13's was read last).

    So the target goes one level down, where the walk's order is defined: ``os.walk`` runs
    top-down, and ``load_data`` takes every "experiment" folder of a level before the walk
    descends. This writes each shadow model m to ``folder/experiment-<m>_<M>/`` and each target
    t to ``folder/target/experiment-target-<t>/`` (each with ``keep.npy`` and
    ``scores/0000000000.npy``; 2-D scores become A = 1), so plot.py reads every shadow model
    before the targets and attacks the target. With T targets, call its ``do_plot`` with
    ``ntest=T``. Without a target, plot.py would attack whichever shadow model it read last.

    The order of the shadow models among themselves stays the file system's. It matters to
    plot.py only through its truncation: it keeps, for every sample, as many in (and out)
    models as the sample with the fewest has, the first ones read. Give every sample the same
    number of in models (as LiRA's train.py does: each sample in exactly half the models) and
    the order does not change plot.py's result; ``likelihood_ratio`` uses all models.

    Sign: LiRA's likelihood tests do not depend on which side members are on, but its "global
    threshold" baseline flags high scores; export the negated loss or log curvature for it.

    Args:
        folder: created if missing; it must not already hold "experiment" folders or a
            "target" folder (plot.py would read them too).
        shadow_scores: (M, N) or (M, N, A) finite scores.
        shadow_keep: (M, N) bool.
        target_scores: optional target scores, (N,) or (N, A) for one target (then
            ``target_keep`` is (N,)), or (T, N) or (T, N, A) for T targets (``target_keep``
            (T, N)); the per-model shape must be shadow_scores'.
        target_keep: the target's membership, (N,) or (T, N) bool; with target_scores only.
    Returns:
        The paths of the M shadow experiment folders, then those of the T target folders.
    """
    s, keep = _scores_3d(shadow_scores, shadow_keep)
    _check_target_pair(target_scores, target_keep)
    targets: list[tuple[np.ndarray, np.ndarray]] = []
    if target_scores is not None:
        t = _as_array(target_scores, "target_scores")
        t_keep = _as_array(target_keep, "target_keep", dtype=None)
        if t_keep.ndim == 1:
            t, t_keep = t[None], t_keep[None]
        per_model = np.shape(shadow_scores)[1:]
        if (
            t_keep.ndim != 2
            or t_keep.shape[1] != s.shape[1]
            or t.shape != t_keep.shape[:1] + per_model
        ):
            raise ValueError(
                f"target_scores and target_keep must be {per_model} and ({s.shape[1]},) for one "
                f"target, or (T, *{per_model}) and (T, {s.shape[1]}) for T targets, like "
                f"shadow_scores {np.shape(shadow_scores)}; got {np.shape(target_scores)} and "
                f"{np.shape(target_keep)}"
            )
        t_keep = _as_membership(t_keep, "target_keep", "sample n in the target's training set")
        t = t.reshape(t.shape[:2] + (-1,))
        _check_finite(t, "target_scores", "(target, sample, query)")
        targets = list(zip(t, t_keep, strict=True))
    root = os.fspath(folder)
    if os.path.isdir(root):
        stale = sorted(e for e in os.listdir(root) if e.startswith("experiment") or e == "target")
        if stale:
            raise ValueError(
                f"folder {root!r} already holds {stale[:3]}{' ...' if len(stale) > 3 else ''}: "
                f"LiRA's plot.py would read them with the new models; export into an empty folder"
            )

    def write(path: str, scores: np.ndarray, kept: np.ndarray) -> str:
        os.makedirs(os.path.join(path, "scores"), exist_ok=True)
        np.save(os.path.join(path, "keep.npy"), kept)
        np.save(os.path.join(path, "scores", "0000000000.npy"), scores)
        return path

    paths = [
        write(os.path.join(root, f"experiment-{m}_{s.shape[0]}"), s[m], keep[m])
        for m in range(s.shape[0])
    ]
    paths += [
        write(os.path.join(root, "target", f"experiment-target-{i}"), scores, kept)
        for i, (scores, kept) in enumerate(targets)
    ]
    return paths


def privacy_meter_arrays(
    shadow_scores, shadow_keep, target_scores=None, target_keep=None
) -> tuple[np.ndarray, np.ndarray]:
    """Signals and memberships in ML Privacy Meter's layout: samples by models.

    ML Privacy Meter (privacytrustlab/ml_privacy_meter: ``MIA.run_mia(all_signals,
    all_memberships, target_model_idx, reference_model_indices, logger, args,
    population_signals)`` in modules/mia/attack.py) takes ``all_signals`` and
    ``all_memberships`` of shape (num_samples, num_models): the transpose of LiRA's layout.
    With a target, it is the last column here (target_model_idx = M). The attack run_mia runs,
    RMIA, reads the signal as the softmax probability of the true label (it divides and
    averages probabilities), and also needs ``population_signals`` (num_population, num_models)
    of non-member samples: pass ``torch.softmax(logits, -1)[range(N), y]`` as the scores, and
    build the population matrix with this function too (its keep all False). For other signals
    (curvature, loss, LiRA's confidence) run_mia asks for attack scores of one's own; the
    matrices still serve such analyses. Pass RMIA's ``offline_a`` explicitly: left to tune it,
    ML Privacy Meter's ``tune_offline_a`` attacks the target's "paired" model, index M + 1 for
    an even target index M, which does not exist here, and fails with an IndexError whenever
    the number of reference models M is even.

    Args:
        shadow_scores: (M, N) finite scores (one query; average or pick queries first).
        shadow_keep: (M, N) bool.
        target_scores: optional (N,) target scores; target_keep: its (N,) membership.
    Returns:
        signals (N, M or M+1) float64 and memberships (N, M or M+1) bool.
    """
    if np.ndim(shadow_scores) != 2:
        raise ValueError(
            f"ML Privacy Meter holds one value per (sample, model): shadow_scores must be (M, N), "
            f"got shape {np.shape(shadow_scores)}; pick one query (scores[..., 0]) or average them"
        )
    s, keep = _scores_3d(shadow_scores, shadow_keep)
    signals, members = s[:, :, 0].T, keep.T
    _check_target_pair(target_scores, target_keep)
    if target_scores is not None:
        t = _as_array(target_scores, "target_scores")
        t_keep = _as_array(target_keep, "target_keep", dtype=None)
        if t.shape != (s.shape[1],):
            raise ValueError(f"target_scores must have shape (N,) = ({s.shape[1]},), got {t.shape}")
        _, t_keep, t = _check_inputs(t[None], t_keep[None], t)
        signals = np.concatenate([signals, t], axis=1)
        members = np.concatenate([members, t_keep.T], axis=1)
    return signals, members
