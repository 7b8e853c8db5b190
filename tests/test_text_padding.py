"""TokenScorer on the padding layouts tokenizers produce: padded to the longest sequence.

A tokenizer called with ``padding=True`` pads to the longest sequence of the batch, so one row
(or more) has no padding at all while the others are padded on the tokenizer's side (right for
BERT, left for decoder-only models set up for generation). A sequence's scores must not depend
on that padding (DESIGN section 8): each sequence scored alone, with no padding, must give the
numbers it gets in the padded batch. Both are float64 computations of the same quantities with
the same probes (ids fix them, and probes are indexed from a sequence's first token), differing
only in summation order, so they agree to ~1e-12 relative and 1e-9 leaves room for that alone.
GPT-2's learned position embeddings make a left-padded row that is not moved to start at
position 0 score a different function, which these tests catch.
"""

import pytest
import torch

import curvkern
from curvkern.losses import sequence_cross_entropy
from curvkern.text import TokenScorer

from .test_text import EXACT, H, bert, gpt2, pad, sequences

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

FIELDS = ("curvature", "curvature_stderr", "trace", "frobenius_sq", "loss", "grad_norm")


def labels_of(kind, input_ids, attention_mask, rows):
    if kind == "gpt2":
        return input_ids.masked_fill(attention_mask == 0, -100)
    return torch.tensor([2, 0, 1, 1])[rows]


def check_alone_equals_batch(kind, side, lengths, backend):
    model = bert() if kind == "bert" else gpt2()
    loss_fn = None if kind == "bert" else sequence_cross_entropy
    scorer = TokenScorer(model, loss_fn, h=H, n_probes=3, backend=backend)
    seqs = sequences(lengths, seed=len(lengths))
    ids = torch.tensor([5, 2, 8, 0])[: len(seqs)]
    input_ids, attention_mask = pad(seqs, side)
    rows = slice(0, len(seqs))
    batch = scorer.score(input_ids, labels_of(kind, input_ids, attention_mask, rows), ids,
                         attention_mask=attention_mask, per_position=True)  # fmt: skip
    for b, s in enumerate(seqs):
        one = s.unsqueeze(0)
        alone = scorer.score(one, labels_of(kind, one, torch.ones_like(one), [b]),
                             ids[b : b + 1], per_position=True)  # fmt: skip
        for field in FIELDS:
            got, want = getattr(batch, field)[b], getattr(alone, field)[0]
            torch.testing.assert_close(got, want, **EXACT, msg=f"{field} of sequence {b} ({side})")
        real = attention_mask[b].bool()
        torch.testing.assert_close(batch.curvature_map[b, real], alone.curvature_map[0], **EXACT)
        assert bool((batch.curvature_map[b, ~real] == 0).all()), f"map at padding of row {b}"


# The longest sequence first, last and in the middle: the unpadded row's position must not matter.
LAYOUTS = [[7, 3, 5], [4, 6, 7], [3, 7, 2, 5]]


@pytest.mark.parametrize("lengths", LAYOUTS, ids=lambda x: "-".join(map(str, x)))
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_padded_to_the_longest_equals_each_sequence_alone(kind, side, lengths):
    check_alone_equals_batch(kind, side, lengths, "torch")


@pytest.mark.skipif(not curvkern.has_kernels(), reason="curvkern's compiled ops are not built")
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_to_the_longest_with_the_compiled_ops(side):
    check_alone_equals_batch("gpt2", side, [6, 2, 4], "kernels")


def test_two_unpadded_rows_among_left_padded_ones():
    check_alone_equals_batch("gpt2", "left", [5, 2, 5, 3], "torch")


def test_no_row_padded_is_scored_as_given():
    check_alone_equals_batch("gpt2", "left", [4, 4], "torch")
