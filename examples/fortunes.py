"""Real English text that installs offline: Debian's ``fortunes`` package, and token batches.

The package installs category files (computers, science, politics, ...) under
/usr/share/games/fortunes: quotations and jokes separated by lines holding a single "%".
"""

from __future__ import annotations

import argparse
import os
import re

import torch

FORTUNE_DIR = "/usr/share/games/fortunes"  # where `apt-get install fortunes` puts them
INSTALL = "sudo apt-get install fortunes"


class DataUnavailable(RuntimeError):
    """The fortune files are not on this machine; the message says how to get them."""


def add_run_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The text examples' shared flags: --seed, --seeds, --threads, --data-dir and --out."""
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default: 0)")
    parser.add_argument(
        "--seeds", type=int, default=1, metavar="S",
        help="runs with seeds --seed .. --seed+S-1; the results are mean ± sd (default: 1)",
    )  # fmt: skip
    # One thread: these models are too small to gain from a second, and on a busy machine the
    # threads' waits for each other cost far more (measured on 2 shared cores: 0.03 s per
    # training step with one thread, 1.7 s with two).
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--data-dir", default=FORTUNE_DIR)
    parser.add_argument("--out", default=out)


def load_fortunes(
    categories: list[str], folder: str = FORTUNE_DIR, max_chars: int | None = None
) -> dict[str, list[str]]:
    """The fortunes of each category, whitespace collapsed to single spaces, in file order.

    Args:
        categories: category file names (e.g. "computers").
        folder: the folder of the category files.
        max_chars: keep fortunes of at most this many characters (None: all).
    Raises:
        DataUnavailable: a category file is missing; the message says how to install them.
    """
    out = {}
    for name in categories:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataUnavailable(
                f"the fortune file {name!r} is not in {folder}: Debian's fortunes package is "
                f"not installed. Install it with `{INSTALL}` (Debian/Ubuntu), or pass "
                f"--data-dir a folder holding the category files."
            )
        with open(path, encoding="utf-8", errors="replace") as f:
            items = re.split(r"^%$", f.read(), flags=re.MULTILINE)
        texts = [" ".join(t.split()) for t in items]
        out[name] = [t for t in texts if t and (max_chars is None or len(t) <= max_chars)]
    return out


def load_or_exit(parser: argparse.ArgumentParser, categories, folder, max_chars=None):
    """load_fortunes, or exit with status 2 and the install command (no traceback)."""
    try:
        return load_fortunes(categories, folder, max_chars)
    except DataUnavailable as error:
        parser.exit(2, f"{parser.prog}: {error}\n")


def pad_batch(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T): token lists padded on the right with ``pad``."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    return ids, mask


def step_scale(model: torch.nn.Module, h: float) -> str:
    """The step h against the scale of the model's token embeddings, for the examples' logs:
    "embedding entries' std 0.115 (h / std = 0.009)" (docs/guide.md, "Choosing h": take h / std
    in 1e-3 .. 5e-2)."""
    sigma = model.get_input_embeddings().weight.std().item()
    return f"embedding entries' std {sigma:.3f} (h / std = {h / sigma:.3f})"
