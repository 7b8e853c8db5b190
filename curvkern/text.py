"""TokenScorer: input curvature of token models, measured in token-embedding space.

Token ids are integers, so a language model's loss has no derivative in its input. It has one in
the embeddings the model looks up for them: :class:`TokenScorer` scores the loss as a function of
the output of the model's own input embedding module (``model.get_input_embeddings()``, the
Hugging Face convention) as the model itself calls it on ``input_ids``
(``CurvatureScorer(model, at=embedding)``, see :mod:`curvkern.layer`), so whatever the model does
after the lookup (a scale on the ``input_ids`` path, as Marian and Pegasus have) is the model's
own. It perturbs only the tokens that count: padding never, and with ``probe_mask`` only the
tokens asked for (e.g. a canary or a response, not its prompt).

transformers is not imported here: any module with ``get_input_embeddings()`` and a forward that
takes ``input_ids`` and ``attention_mask`` works.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .estimators import ESTIMATORS, no_double_backward
from .layer import Call
from .scorer import CurvatureScorer
from .scores import CurvatureScores

__all__ = ["TokenScorer"]


def _left_aligned(mask: Tensor) -> Tensor | None:
    """For each row whose 1s form one block that does not start at 0, its block's start.

    Args:
        mask: (B, T) bool attention mask.
    Returns:
        (B,) int64 shifts (0 for rows to keep), or None when no row needs moving (right padding
        or no padding), or when some row has holes (a 0 between two 1s: not padding, so its
        layout is the caller's).
    """
    length = mask.sum(1)  # (B,)
    first = torch.where(mask.any(1), mask.int().argmax(1), torch.zeros_like(length))
    positions = torch.arange(mask.shape[1], device=mask.device)
    block = (positions >= first[:, None]) & (positions < (first + length)[:, None])
    if not bool((block == mask).all()) or not bool((first > 0).any()):
        return None
    return first


def _roll_rows(t: Tensor, shift: Tensor) -> Tensor:
    """Row b of ``t`` (B, T, ...) moved left by shift[b] positions (cyclically) along dim 1."""
    positions = torch.arange(t.shape[1], device=t.device)
    index = (positions[None, :] + shift[:, None]) % t.shape[1]  # (B, T)
    index = index.view(*index.shape, *([1] * (t.dim() - 2))).expand_as(t)
    return t.gather(1, index)


# Keyword inputs of an encoder-decoder model that belong to the decoder: never moved with the
# encoder's padding.
_DECODER_INPUTS = ("decoder_", "labels")


def _input_embedding(model: nn.Module, encoder_decoder: bool) -> nn.Module:
    """The module that embeds input_ids: an encoder-decoder's encoder's input embedding (in
    recent transformers a module of its own, tied to ``model.get_input_embeddings()``'s
    weights, which the model itself then never calls), else ``model.get_input_embeddings()``."""
    get_encoder = getattr(model, "get_encoder", None)
    if encoder_decoder and callable(get_encoder):
        get = getattr(get_encoder(), "get_input_embeddings", None)
        if callable(get) and isinstance(get(), nn.Module):
            return get()
    return model.get_input_embeddings()


def _call_on_input_ids(calls: list[Call], input_ids: Tensor) -> int:
    """Which call of the input embedding TokenScorer scores: the only one, or the first whose
    input is ``input_ids`` (the encoder's, where an encoder-decoder calls one shared embedding
    on its decoder's ids too; checked, not assumed to be the first)."""
    if len(calls) == 1:
        return 0
    for k, call in enumerate(calls):
        for arg in (*call.args, *call.kwargs.values()):
            if isinstance(arg, Tensor) and arg.shape == input_ids.shape:
                if torch.equal(arg, input_ids):
                    return k
                break
    raise RuntimeError(
        f"the model's input embedding (get_input_embeddings()) is called {len(calls)} time(s) "
        f"in its forward pass, never on input_ids (of shape {tuple(input_ids.shape)}); "
        f"TokenScorer scores at the embeddings of input_ids. For another layout, use "
        f"CurvatureScorer(model, at=..., at_call=...)"
    )


class TokenScorer:
    """Curvature of a token model's per-sequence loss with respect to its input embeddings.

    ``score(input_ids, y)`` calls ``model(input_ids=..., attention_mask=..., **model_inputs)``
    and scores ``loss_fn(output, y)`` as a function of e (B, T, E), the output of the model's
    input embedding module (``model.get_input_embeddings()``; an encoder-decoder's encoder's)
    where the model calls it on ``input_ids``, as :class:`curvkern.CurvatureScorer` does at any
    layer (``at``):
    ``curvature`` = mean_k ||m * (g(e + h m*r_k) - g(e))|| / h, where g is the gradient in e and
    the 0/1 token mask m (attention_mask times ``probe_mask``) keeps padding (and whatever
    ``probe_mask`` leaves out) unperturbed and uncounted. What the model does after the lookup
    (Marian and Pegasus scale the embeddings on the input_ids path) is part of the function.

    Decoder-only, encoder-only and encoder-decoder models: an encoder-decoder's encoder tokens
    are scored (where encoder and decoder share the embedding module, its call on input_ids),
    its decoder inputs and labels are passed as they are.

    A sequence's scores do not depend on its padding: padded tokens are never perturbed nor
    counted, probes are indexed from the sequence's first token, and a left-padded batch is moved
    to the right before the model sees it (its per-token inputs with it, and its labels for a
    model without a separate decoder), since a model's position embeddings count from the first
    position of the row. The per-token map of ``per_position=True`` is given back in the
    caller's layout.

    ``method="hvp"`` works through torch's scaled_dot_product_attention (the scorer runs it on
    its math kernel: the fused kernels have no double backward). Attention implementations
    outside it (e.g. flash_attention_2) fail with a message that names the fix:
    ``attn_implementation="eager"``, or ``method="fd"``.

    Models that do not take ``input_ids``/``attention_mask`` (no Hugging Face convention):
    use ``CurvatureScorer(model, at=<the embedding module>)`` directly.

    Args:
        model: a module with ``get_input_embeddings()`` (the module that maps (B, T) ids to
            (B, T, E) vectors, called by the model's forward) and a forward taking
            ``input_ids`` and ``attention_mask``: any Hugging Face model (BERT-like
            classifiers, GPT-2-like causal LMs, T5/BART-like encoder-decoders, ...).
        loss_fn: ``loss_fn(output, y)`` -> (B,) per-sequence losses. Default: cross entropy of
            the output's logits (a sequence classifier). For a causal LM pass
            :func:`curvkern.losses.sequence_cross_entropy` with y = the labels (the input ids,
            -100 at padding).
        **scorer_kwargs: h, n_probes, seed, method, max_batch, backend, rtol, max_probes,
            precision of :class:`curvkern.CurvatureScorer`. h is in the units of the embedding
            module's output: see docs/guide.md on choosing it relative to the scale of its
            entries.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[object, Tensor], Tensor] | None = None,
        **scorer_kwargs,
    ) -> None:
        get = getattr(model, "get_input_embeddings", None)
        if not callable(get):
            raise TypeError(
                f"model must have get_input_embeddings() (the Hugging Face convention), and "
                f"{type(model).__name__} has none; for other models, use "
                f"CurvatureScorer(model, at=<its embedding module>)"
            )
        for key in ("input_key", "at", "at_call"):
            if key in scorer_kwargs:
                raise TypeError(
                    f"TokenScorer passes the tokens as input_ids and scores at the model's input "
                    f"embedding; {key} is not an option (use CurvatureScorer(model, at=...) for "
                    f"another layer)"
                )
        self.model = model
        config = getattr(model, "config", None)
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.embedding = _input_embedding(model, self.encoder_decoder)
        self.scorer = CurvatureScorer(
            model, loss_fn, input_key="input_ids", at=self.embedding, **scorer_kwargs
        )
        # Its call on input_ids (a model may call a shared embedding on other ids too).
        self.scorer._layer.choose = _call_on_input_ids

    def __repr__(self) -> str:
        return f"TokenScorer({type(self.model).__name__}, {self.scorer!r})"

    # The scorer's settings, for code (trackers, files) that reads them off any scorer.
    @property
    def h(self) -> float:
        return self.scorer.h

    @property
    def n_probes(self) -> int:
        return self.scorer.n_probes

    @property
    def seed(self) -> int:
        return self.scorer.seed

    @property
    def method(self) -> str:
        return self.scorer.method

    @property
    def precision(self) -> str:
        return self.scorer.precision

    def embed(self, input_ids: Tensor) -> Tensor:
        """The model's input embeddings of ``input_ids`` (B, T) -> (B, T, E), detached."""
        with torch.no_grad():
            return self.embedding(input_ids).detach()

    def score(
        self,
        input_ids: Tensor,
        y: Tensor,
        ids: Tensor | Sequence[int] | None = None,
        *,
        attention_mask: Tensor | None = None,
        probe_mask: Tensor | None = None,
        per_position: bool = False,
        **model_inputs,
    ) -> CurvatureScores:
        """Scores one batch of token sequences.

        Args:
            input_ids: (B, T) integer token ids (an encoder-decoder's encoder input).
            y: the targets ``loss_fn`` takes: (B,) class labels for a sequence classifier,
                (B, T') labels for :func:`curvkern.losses.sequence_cross_entropy` (-100 at
                padding and at tokens that must not count; an encoder-decoder's decoder
                labels).
            ids: (B,) sample ids fixing each sequence's probes (None: 0 .. B-1).
            attention_mask: (B, T) 1 for real tokens, 0 for padding; None: all real.
            probe_mask: (B, T) bool or 0/1: the tokens to perturb and count (e.g. the response
                but not its prompt); combined with attention_mask.
            per_position: also return ``curvature_map`` (B, T), each token's share
                mean_k ||dg_k[t]|| / h (0 at tokens masked out).
            **model_inputs: further keyword inputs of the model (e.g. token_type_ids,
                decoder_input_ids); tensors whose first dimension is B are per-sequence
                (repeated with the probes), and those of shape (B, T, ...) are per-token (moved
                with a left-padded row, except an encoder-decoder's decoder_* and labels).
        Returns:
            CurvatureScores with (B,) fields (and ``curvature_map`` (B, T) with per_position).
        """
        input_ids, mask = self._check(input_ids, attention_mask, probe_mask)
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.bool()
        self._check_padding_labels(y, real, model_inputs)

        shift = _left_aligned(real) if batch and length else None
        if shift is not None:

            def per_token(t):
                is_token = isinstance(t, Tensor) and t.dim() >= 2 and t.shape[:2] == (batch, length)
                return _roll_rows(t, shift) if is_token else t

            input_ids, attention_mask, mask = map(per_token, (input_ids, attention_mask, mask))
            if not self.encoder_decoder:
                y = per_token(y)
            model_inputs = {
                k: v if self._decoder_side(k) else per_token(v) for k, v in model_inputs.items()
            }

        try:
            # hvp: the scorer runs torch's fused attention on its math kernel (double backward).
            scores = self.scorer.score(
                input_ids, y, ids, probe_mask=mask, per_position=per_position,
                attention_mask=attention_mask, **model_inputs,
            )  # fmt: skip
        except RuntimeError as error:
            # An op without a second derivative, e.g. a fused attention kernel's backward (flash
            # attention, memory-efficient attention, flex attention).
            if ESTIMATORS[self.method].needs_double_backward and no_double_backward(error):
                raise RuntimeError(
                    f"method='hvp' needs the second derivative of every op of the model, and "
                    f"one has none ({error}). Attention kernels outside torch's "
                    f"scaled_dot_product_attention (flash_attention_2, flex_attention) are the "
                    f"usual cause: load the model with attn_implementation='eager' (or call "
                    f"model.set_attn_implementation('eager')), or score with method='fd'."
                ) from error
            raise
        if shift is not None and scores.curvature_map is not None:
            # Back to the caller's layout: position t of the moved row is t + shift there.
            scores.curvature_map = _roll_rows(scores.curvature_map, -shift)
        return scores

    def _decoder_side(self, key: str) -> bool:
        """Whether model input ``key`` is an encoder-decoder's decoder input (not moved)."""
        return self.encoder_decoder and key.startswith(_DECODER_INPUTS)

    # ------------------------------------------------------------------------------------------
    # Checks

    @staticmethod
    def _check(
        input_ids: Tensor, attention_mask: Tensor | None, probe_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """input_ids and the (B, T) float mask of the tokens to perturb."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
            raise ValueError(f"input_ids must be a (B, T) tensor of token ids, got {got}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(
                f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; to score "
                f"embeddings you computed yourself, use CurvatureScorer(model, "
                f"input_key='inputs_embeds')"
            )
        mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        for name, given in (("attention_mask", attention_mask), ("probe_mask", probe_mask)):
            if given is None:
                continue
            if not isinstance(given, Tensor) or given.shape != input_ids.shape:
                got = tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__
                raise ValueError(
                    f"{name} must have the shape of input_ids, (B, T) = "
                    f"{tuple(input_ids.shape)}, got {got}"
                )
            if not bool(((given == 0) | (given == 1)).all()):
                raise ValueError(f"{name} must hold 0/1 (or bool) values, one per token")
            mask &= given.to(mask.device).bool()
        return input_ids, mask

    def _check_padding_labels(self, y, real: Tensor, model_inputs: dict) -> None:
        """Token labels at padding must not count: a loss over them depends on the padding.

        Labels aligned with input_ids (a model without a separate decoder) are checked against
        attention_mask; an encoder-decoder's decoder labels against decoder_attention_mask,
        where given (the encoder's padding does not reach them).
        """
        if self.encoder_decoder:
            real = model_inputs.get("decoder_attention_mask")
            if not isinstance(real, Tensor):
                return
            real, name = real.bool(), "decoder_attention_mask"
        else:
            name = "attention_mask"
        if not isinstance(y, Tensor) or y.shape != real.shape or y.is_floating_point():
            return
        if bool((y[~real.to(y.device)] != -100).any()):
            warnings.warn(
                f"y has token labels other than -100 at padding positions ({name} 0): "
                f"a loss that counts them makes a sequence's score depend on its padding. Set "
                f"labels[{name} == 0] = -100 (the ignore index of "
                f"curvkern.losses.sequence_cross_entropy).",
                stacklevel=3,
            )
