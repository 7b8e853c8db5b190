"""How large a finite-difference step h for token embeddings? fd against exact hvp, by h / std.

Builds a small BERT classifier and a small GPT-2 (transformers, random weights: no download),
and scores 8 random sequences of 12 tokens with curvkern.text.TokenScorer: exactly with
method="hvp" (float64), and by finite differences with h a fraction of the standard deviation
of the embedding entries, in float64 and in a float32 copy. Prints the median relative
difference of the fd curvature from the exact one for each h / std: the O(h) term grows with
h / std, float32 rounding with std / h. To check your own model, swap it in.

    python examples/embedding_step.py [--quick]
"""

from __future__ import annotations

import argparse
import copy

import torch
from plots import markdown_table

from curvkern.losses import sequence_cross_entropy
from curvkern.text import TokenScorer

FRACTIONS = (1e-4, 1e-3, 1e-2, 5e-2, 0.2, 1.0)


def models():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3, pad_token_id=0,
    ))  # fmt: skip
    torch.manual_seed(1)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1,
        eos_token_id=1, pad_token_id=0,
    ))  # fmt: skip
    return {"BERT": (bert, None), "GPT-2": (gpt2, sequence_cross_entropy)}


def main(argv=None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two steps, two probes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fractions = (1e-3, 1.0) if args.quick else FRACTIONS
    n_probes = 2 if args.quick else 8
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(1, 40, (8, 12), generator=gen)
    rows, errors = [], {}
    for name, (model, loss_fn) in models().items():
        model = model.double().eval()
        y = torch.randint(0, 3, (8,), generator=gen) if loss_fn is None else input_ids
        std = model.get_input_embeddings().weight.std().item()
        exact = TokenScorer(model, loss_fn, method="hvp", n_probes=n_probes).score(input_ids, y)
        for dtype in (torch.float64, torch.float32):
            copy_ = copy.deepcopy(model).to(dtype)
            err = []
            for fraction in fractions:
                fd = TokenScorer(copy_, loss_fn, h=fraction * std, n_probes=n_probes)
                c = fd.score(input_ids, y).curvature.double()
                err.append(((c - exact.curvature) / exact.curvature).abs().median().item())
            label = f"{name}, {str(dtype).removeprefix('torch.')}"
            errors[label] = err
            rows.append([label, *(f"{e:.1e}" for e in err)])
        print(f"{name}: embedding entries' std {std:.4f}")
    print(markdown_table(["h / std", *(f"{f:g}" for f in fractions)], rows))
    return errors


if __name__ == "__main__":
    main()
