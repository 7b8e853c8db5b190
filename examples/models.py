"""The examples' network: a ReLU MLP, its training recipe per data set, one epoch of training,
and the command-line flags that change the recipe."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

import torch
from data import batches
from torch import nn

from curvkern import CurvatureScorer, CurvatureTracker


def mlp(in_features: int, num_classes: int, hidden: int = 256) -> nn.Module:
    """A ReLU MLP on flattened images, wide enough to memorize noisy labels."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def cnn(
    num_classes: int, image_size: int, channels: tuple[int, int] = (16, 32), hidden: int = 128
) -> nn.Module:
    """A small ReLU CNN on (N, 1, S, S) images: two blocks of a 3x3 convolution, ReLU and 2x2
    max pooling, then a hidden fully connected layer (S must be divisible by 4)."""
    if image_size % 4:
        raise ValueError(f"image_size must be divisible by 4 (two 2x2 poolings), got {image_size}")
    flat = channels[1] * (image_size // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(1, channels[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
    )  # fmt: skip


class BatchedMLP(nn.Module):
    """K independent copies of :func:`mlp` applied at once: (K, B, in) -> (K, B, classes).

    Layer l of network k has weight ``weights[l][k]`` (in, out) and bias ``biases[l][k]``
    (1, out), initialized as nn.Linear does (uniform in +-1/sqrt(in)) from ``generators[k]``,
    layer by layer: the weights of every network, then their biases. K entries of one
    generator draw the stacked weights as one (K, in, out) draw would.
    """

    def __init__(
        self, in_features: int, num_classes: int, hidden: int, generators: list[torch.Generator]
    ) -> None:
        super().__init__()
        sizes = (in_features, hidden, hidden, num_classes)
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1 / math.sqrt(fan_in)
            w = [
                torch.empty(fan_in, fan_out).uniform_(-bound, bound, generator=g)
                for g in generators
            ]
            b = [torch.empty(1, fan_out).uniform_(-bound, bound, generator=g) for g in generators]
            self.weights.append(nn.Parameter(torch.stack(w)))  # (K, in, out)
            self.biases.append(nn.Parameter(torch.stack(b)))  # (K, 1, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (K, B, in) -> logits (K, B, classes)."""
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if layer < last:
                x = x.relu()
        return x

    def network(self, k: int) -> nn.Module:
        """Network k as an :func:`mlp` with the same weights."""
        _, in_features, hidden = self.weights[0].shape
        model = mlp(in_features, self.weights[-1].shape[2], hidden)
        linears = [m for m in model if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for linear, w, b in zip(linears, self.weights, self.biases, strict=True):
                linear.weight.copy_(w[k].T)
                linear.bias.copy_(b[k, 0])
        return model

    def train_epoch(
        self, optimizer, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int,
        schedule=None,
    ) -> None:  # fmt: skip
        """One epoch of all K networks at once: ``order`` (K, size) holds each network's sample
        indices into x (N, in) and y (N,) in its epoch order; each network gets the gradient of
        its own batch-mean loss. ``schedule`` (if any) steps once per batch."""
        for index in order.split(batch_size, dim=1):  # (K, b)
            logits = self(x[index])  # (K, b, C)
            # summed over networks: each gets the gradient of its own batch-mean loss
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1), y[index].flatten(), reduction="sum"
            ) / index.shape[1]  # fmt: skip
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()


@dataclass(frozen=True)
class Recipe:
    """Adam at a constant learning rate, then a linear decay to 0 over the last ``decay`` of the
    steps (at a constant rate the accuracy on memorized noisy labels keeps swinging by a percent
    from epoch to epoch; the decay settles it). The per-data-set values (RECIPES) make the
    training accuracy on labels with 10% flipped end near 100%."""

    hidden: int  # width of both hidden layers
    epochs: int
    lr: float
    batch_size: int
    decay: float
    subset: int | None  # images used, drawn at random; None: all


RECIPES = {
    "digits": Recipe(hidden=256, epochs=50, lr=3e-3, batch_size=64, decay=0.2, subset=None),
    "fashion-mnist": Recipe(
        hidden=512, epochs=60, lr=1e-3, batch_size=128, decay=0.25, subset=10_000
    ),
    "mnist-5k": Recipe(hidden=512, epochs=60, lr=1e-3, batch_size=128, decay=0.25, subset=None),
}


def adam(model: nn.Module, recipe: Recipe, num_samples: int, **options):
    """Adam (with ``options``, e.g. fused=True) and the recipe's learning-rate schedule for
    ``model`` trained on ``num_samples`` samples; step the schedule once per batch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, **options)
    steps = recipe.epochs * math.ceil(num_samples / recipe.batch_size)
    start = round((1 - recipe.decay) * steps)
    if start >= steps:  # no decay: a constant rate (the schedule steps once past the last batch)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 if step < start else (steps - step) / (steps - start)
    )
    return optimizer, schedule


def train_epoch(model, optimizer, schedule, x, y, batch_size: int, gen: torch.Generator) -> None:
    """One epoch of mini-batch training on (x, y), in an order drawn from ``gen``."""
    model.train()
    for index in torch.randperm(len(x), generator=gen).split(batch_size):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
        schedule.step()
    model.eval()


def train_and_track(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, recipe: Recipe, seed: int,
    track_every: int, **scorer_kwargs,
) -> CurvatureTracker:  # fmt: skip
    """The examples' training loop: an MLP trained with ``recipe`` on (x, y) (seed: initial
    weights, batch order and probes), its curvature scored by a CurvatureTracker after every
    ``track_every``-th epoch and the last. ``scorer_kwargs``: CurvatureScorer's (h, n_probes).

    Returns:
        the tracker; ``tracker.scorer.model`` is the trained network.
    """
    torch.manual_seed(seed)
    model = mlp(x[0].numel(), num_classes, recipe.hidden)
    optimizer, schedule = adam(model, recipe, len(x))
    order = torch.Generator().manual_seed(seed)
    tracker = CurvatureTracker(CurvatureScorer(model, seed=seed, **scorer_kwargs), len(x))
    for epoch in range(1, recipe.epochs + 1):
        train_epoch(model, optimizer, schedule, x, y, recipe.batch_size, order)
        if epoch % track_every == 0 or epoch == recipe.epochs:
            tracker.score_epoch(batches(x, y), epoch, progress=False)
    return tracker


def train(model: nn.Module, x, y, recipe: Recipe, seed: int) -> nn.Module:
    """The whole recipe on (x, y), without scoring (cleanlab's folds, timing comparisons)."""
    optimizer, schedule = adam(model, recipe, len(x))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(recipe.epochs):
        train_epoch(model, optimizer, schedule, x, y, recipe.batch_size, gen)
    return model


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe's flags, --probes, --track-every, --seed and --seeds."""
    group = parser.add_argument_group("training and curvature tracking")
    for flag, kind, text in (
        ("--epochs", int, "training epochs"),
        ("--hidden", int, "width of the MLP's two hidden layers"),
        ("--lr", float, "Adam's learning rate"),
        ("--batch-size", int, "training batch size"),
    ):
        field = flag[2:].replace("-", "_")
        defaults = ", ".join(f"{getattr(r, field):g} for {name}" for name, r in RECIPES.items())
        group.add_argument(flag, type=kind, help=f"{text} (default: {defaults})")
    group.add_argument(
        "--probes", type=int, default=10, help="curvature probes per image (default: 10)"
    )
    group.add_argument(
        "--track-every", type=int, default=1, metavar="K",
        help="score every K-th epoch (and the last) rather than every epoch (default: 1)",
    )  # fmt: skip
    group.add_argument("--seed", type=int, default=0, help="the first seed (default: 0)")
    group.add_argument(
        "--seeds", type=int, default=1, metavar="S",
        help="runs with seeds --seed .. --seed+S-1 (the subset, the flipped labels, the "
        "network's initial weights, batch order and probes); tables give the mean and the "
        "standard deviation over them, pictures show the first (default: 1)",
    )  # fmt: skip


def recipe_for(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str, **overrides
) -> Recipe:
    """The data set's recipe, then ``overrides`` (e.g. a --quick run's), then explicit flags.

    Exits with a usage error where a shared flag or one of ``names`` is given and not positive.
    """
    shared = ("track_every", "probes", "subset", "epochs", "hidden", "lr", "batch_size", "seeds")
    for name in (*shared, *names):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    flags = {
        name: getattr(args, name)
        for name in ("hidden", "epochs", "lr", "batch_size", "subset")
        if getattr(args, name) is not None
    }
    return dataclasses.replace(RECIPES[args.dataset], **{**overrides, **flags})


def describe(recipe: Recipe, in_features: int, num_classes: int) -> str:
    """The network and its training in a few words, e.g. for a run's first line."""
    return (
        f"MLP {in_features}-{recipe.hidden}-{recipe.hidden}-{num_classes}, {recipe.epochs} "
        f"epochs of Adam (lr {recipe.lr:g}, batch {recipe.batch_size})"
    )
