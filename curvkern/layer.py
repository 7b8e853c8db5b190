"""Curvature at a layer: the probes perturb a module's output inside the model's forward pass.

``CurvatureScorer(model, at=module_or_name)`` scores the curvature of the per-sample loss with
respect to the activation a = (the output of ``at``), the rest of the model running as the model
runs it. The estimators are unchanged: a capture pass at x records a (B, ...) with a forward hook;
the estimators then see a :class:`curvkern.estimators.Batch` whose ``x`` is a and whose model
input x travels as a per-sample input (:data:`MODEL_INPUT`, repeated with the rows like any
other); :class:`LayerObjective` calls the model on those x rows with a forward hook on ``at`` that
gives back the rows of a (perturbed, or the leaf autograd differentiates) in place of the
module's own output.

The activation is the first floating tensor of the module's output (a tensor; a tuple or list; a
mapping or Hugging Face ``ModelOutput``); the rest of the output passes through unchanged. A
module called more than once in one forward (a shared embedding, a block applied twice) is
refused unless ``at_call`` names the call, 0-based.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._model_state import scoring_mode
from .estimators import Batch, Estimator, Objective

__all__ = ["LayerTap", "LayerObjective", "MODEL_INPUT", "resolve_at"]

# The keyword under which the model's own input x rides in a Batch's per-sample inputs when the
# scored tensor is an activation; LayerObjective takes it out again before calling the model.
MODEL_INPUT = "\0curvkern model input"


def resolve_at(model: Callable[..., Any], at: nn.Module | str) -> tuple[nn.Module, str]:
    """The submodule ``at`` names (itself, or its qualified name in ``model``) and that name.

    Raises:
        TypeError: at is neither an nn.Module nor a str, or at is a name and model no module.
        ValueError: no submodule of model has that name, or the module is not part of model.
    """
    if isinstance(at, str):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"at={at!r} names a submodule, which needs model to be an nn.Module, got "
                f"{type(model).__name__}; pass the module itself as at"
            )
        try:
            module = model.get_submodule(at)
        except AttributeError as e:
            names = [n for n, _ in model.named_modules() if n][:8]
            raise ValueError(
                f"at={at!r} is not a submodule of {type(model).__name__} ({e}); qualified "
                f"names look like {names}"
            ) from None
        return module, at
    if not isinstance(at, nn.Module):
        raise TypeError(
            f"at must be a submodule of the model or its qualified name (str), got "
            f"{type(at).__name__}"
        )
    if not isinstance(model, nn.Module):
        return at, type(at).__name__
    for name, module in model.named_modules():
        if module is at:
            return at, name or "(the model itself)"
    raise ValueError(
        f"at must be a submodule of the model: the {type(at).__name__} given is not among "
        f"{type(model).__name__}'s modules (model.named_modules()); pass one of its own "
        f"modules, e.g. model.get_submodule('<name>')"
    )


def _first_floating(output: Any) -> tuple[Any, Tensor] | None:
    """(key or index, tensor) of the first floating tensor of a module's output, or None."""
    if isinstance(output, Tensor):
        return (None, output) if output.is_floating_point() else None
    if isinstance(output, Mapping):
        items = output.items()
    elif isinstance(output, (tuple, list)):
        items = enumerate(output)
    else:
        return None
    for key, value in items:
        if isinstance(value, Tensor) and value.is_floating_point():
            return key, value
    return None


def _replaced(output: Any, key: Any, value: Tensor) -> Any:
    """The module's output with its activation (at ``key``, None for a bare tensor) replaced."""
    if key is None:
        return value
    if isinstance(output, Mapping):
        new = copy.copy(output)  # a ModelOutput's copy keeps its class and its attributes
        new[key] = value
        return new
    items = list(output)
    items[key] = value
    if isinstance(output, list):
        return items
    if hasattr(output, "_fields"):  # a namedtuple
        return type(output)(*items)
    return type(output)(items)


def _describe(output: Any) -> str:
    if isinstance(output, Tensor):
        return f"a {output.dtype} tensor of shape {tuple(output.shape)}"
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {list(output.keys())}"
    if isinstance(output, (tuple, list)):
        kinds = [
            f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            for v in output
        ]
        return f"a {type(output).__name__} of {kinds}"
    return f"a {type(output).__name__}"


@dataclasses.dataclass
class Call:
    """One call of the tapped module in a forward: its inputs and its output."""

    args: tuple
    kwargs: dict
    output: Any


class LayerTap:
    """The module ``at`` of ``model``: records its calls in a forward, or replaces the
    activation of one of them.

    Args:
        model: the scored model.
        at: a submodule of model, or its qualified name.
        at_call: which call of the module in one forward (0-based), or None for a module
            called exactly once.
    """

    def __init__(self, model: Callable[..., Any], at: nn.Module | str, at_call: int | None):
        if at_call is not None and (
            isinstance(at_call, bool) or not isinstance(at_call, int) or at_call < 0
        ):
            raise ValueError(f"at_call must be a call index >= 0 or None, got {at_call!r}")
        self.module, self.name = resolve_at(model, at)
        self.at_call = at_call
        # Which call a forward's activation is taken from, if the caller chooses it from the
        # calls a capture pass saw (curvkern.text: the call on input_ids); else at_call's.
        self.choose: Callable[[list[Call], Tensor], int] | None = None
        self.index = 0 if at_call is None else at_call
        self.perturbed = "its output"  # which entry of the output is perturbed (capture sets it)

    def where(self) -> str:
        call = "" if self.at_call is None else f", call {self.at_call}"
        return f"at={self.name!r} ({type(self.module).__name__}{call})"

    @contextlib.contextmanager
    def _hook(self, hook: Callable) -> Iterator[None]:
        handle = self.module.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def capture(self, run: Callable[[], Any], x: Tensor) -> Tensor:
        """Runs one forward (``run()``) on the model input x (B, ...), records every call of the
        module, picks the call scored (at_call, or the only one) and returns its activation
        (B, ...), detached.

        Raises:
            RuntimeError: the module was never called, was called more than once without
                at_call, or fewer than at_call + 1 times.
            TypeError: the call's output holds no floating tensor (e.g. integer ids).
            ValueError: the activation has no (B, ...) rows of the batch.
        """
        calls: list[Call] = []

        def record(module, args, kwargs, output):
            # The activation copied now: the model may modify its output in place afterwards
            # (a ResNet's `out += identity`).
            found = _first_floating(output)
            if found is not None:
                output = _replaced(output, found[0], found[1].detach().clone())
            calls.append(Call(args, kwargs, output))

        with self._hook(record), torch.no_grad():
            run()
        if not calls:
            raise RuntimeError(
                f"{self.where()} was never called in the model's forward pass, so there is no "
                f"activation to perturb: pass a module the forward uses (with these inputs)"
            )
        if self.choose is not None:
            self.index = self.choose(calls, x)
        elif self.at_call is None:
            if len(calls) > 1:
                raise RuntimeError(
                    f"{self.where()} is called {len(calls)} times in one forward pass (a shared "
                    f"module, e.g. an embedding used by encoder and decoder); say which call's "
                    f"output to perturb with at_call=k, 0 <= k < {len(calls)} (0: the first)"
                )
            self.index = 0
        elif self.at_call >= len(calls):
            raise RuntimeError(
                f"at_call={self.at_call}, but {self.where()} is called {len(calls)} time(s) in "
                f"one forward pass: at_call must be below {len(calls)}"
            )
        else:
            self.index = self.at_call
        output = calls[self.index].output
        found = _first_floating(output)
        if found is None:
            raise TypeError(
                f"the output of {self.where()} has no floating-point tensor to perturb (it "
                f"returned {_describe(output)}); curvature needs a continuous activation: pick "
                f"the module whose output is floating (e.g. the embedding rather than a "
                f"module that returns token ids)"
            )
        a = found[1]
        # What is perturbed, for errors: which entry of a tuple or mapping output.
        self.perturbed = (
            "its output" if found[0] is None else f"entry {found[0]!r} of {_describe(output)}"
        )
        if a.dim() < 1 or a.shape[0] != x.shape[0]:
            raise ValueError(
                f"the activation of {self.where()} has shape {tuple(a.shape)}, whose first "
                f"dimension is not the batch's B = {x.shape[0]}: the probes perturb one row "
                f"per sample; pick a module whose output is (B, ...)"
            )
        return a.detach()

    @contextlib.contextmanager
    def replacing(self, rows: Tensor) -> Iterator[None]:
        """Within, the module's output at call ``index`` of the forward is given as ``rows``
        (R, ...) (the rest of a tuple or mapping output passes through)."""
        count = [0]

        def replace(module, args, kwargs, output):
            k = count[0]
            count[0] += 1
            if k != self.index:
                return None
            found = _first_floating(output)
            if found is None or found[1].shape != rows.shape:
                got = _describe(output)
                raise RuntimeError(
                    f"the activation of {self.where()} changed between passes: expected a "
                    f"floating tensor of shape {tuple(rows.shape)}, the module returned {got}"
                )
            # A copy, not the rows themselves: a model that modifies the output in place (a
            # ResNet's `out += identity`) must not write into the leaf autograd differentiates.
            return _replaced(output, found[0], rows.clone())

        with self._hook(replace):
            yield
        if count[0] <= self.index:
            raise RuntimeError(
                f"{self.where()} was called {count[0]} time(s) in a scoring pass, fewer than in "
                f"the capture pass: its output at call {self.index} could not be replaced"
            )


class LayerObjective(Objective):
    """The model and per-sample loss as functions of the activation at a tapped module.

    ``output(ap, batch, copies)``: the model called on the copies of its own input x (the
    batch's :data:`MODEL_INPUT` rows), with the tapped call's activation given as ap.
    """

    def __init__(
        self, model: Callable, loss_fn: Callable, input_key: str | None, tap: LayerTap
    ) -> None:
        super().__init__(model, loss_fn, input_key)
        self.tap = tap

    def output(self, xp: Tensor, batch: Batch, copies: int):
        keywords = dict(batch.keywords(copies))
        x = keywords.pop(
            MODEL_INPUT
        ).clone()  # a model that writes into x must not reach the caller's
        with self.tap.replacing(xp):
            if self.input_key is None:
                return self.model(x, **keywords)
            return self.model(**{self.input_key: x}, **keywords)


def capture_activation(
    tap: LayerTap,
    model: Callable,
    input_key: str | None,
    estimator: Estimator,
    x: Any,
    model_inputs: dict[str, Any],
    h: float,
) -> tuple[Tensor, dict[str, Any]]:
    """The activation a (B, ...) the model computes at the tapped module on input x, and the
    model inputs with x added as a per-sample input (:data:`MODEL_INPUT`).

    The capture pass runs as the scoring passes do (eval mode, the estimator's numerical
    context), so a is the activation those passes perturb.

    Raises:
        TypeError: x is not a (B, ...) tensor, or the activation is not float32/float64 for a
            method that takes differences.
        ValueError: the activation has non-finite values.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a (B, ...) tensor of the model's input, got {got}")
    if MODEL_INPUT in model_inputs:
        raise ValueError("model_inputs holds the scorer's own key for the model input")

    def run():  # on a copy of x: a model that writes into its input must not change the caller's
        if input_key is None:
            return model(x.clone(), **model_inputs)
        return model(**{input_key: x.clone()}, **model_inputs)

    with contextlib.ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(estimator.context(x.device.type))
        stack.enter_context(scoring_mode(model))
        a = tap.capture(run, x)
    if estimator.takes_differences and a.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"method={estimator.name!r} needs a float32 or float64 activation, and the one of "
            f"{tap.where()} is {a.dtype}: its differences (about h = {h} times smaller than "
            f"the gradients) are rounding noise there. Score a float32 copy of the model "
            f"(copy.deepcopy(model).float()), or use method='hvp'."
        )
    finite = torch.isfinite(a).flatten(1).all(dim=1) if a.dim() > 1 else torch.isfinite(a)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"the activation of {tap.where()} has non-finite values (NaN or inf) in sample "
            f"{first}; curvature is only defined at finite activations"
        )
    return a, {**model_inputs, MODEL_INPUT: x}
