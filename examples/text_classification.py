"""Mislabeled text: curvature of a transformer classifier's loss in token-embedding space.

A small word-level BERT classifier (transformers, built from a config with random weights: no
download) learns which category of Debian's ``fortunes`` a quotation comes from, with 10% of the
labels flipped to another category. A curvkern.text.TokenScorer scores every training text after
every other epoch (probes on the real tokens only; the padding is masked), and the flipped labels
are ranked by the epoch-averaged curvature, the last epoch's curvature, the final loss and the
loss averaged over the same epochs (AUROC), as the image examples do.

    python examples/text_classification.py [--quick] [--flip 0.1] [--epochs 30] [--seeds 5]

With --seeds S the run is repeated with seeds --seed .. --seed+S-1 (the texts drawn, the flipped
labels, the initial weights, the batch order and the probes) and the table gives the mean and
standard deviation over them; scores.csv holds the first seed's scores, seeds.csv every seed's
AUROCs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter

import torch
from fortunes import add_run_arguments, load_or_exit, pad_batch, step_scale
from plots import markdown_table, mean_sd, write_csv
from scores import compared

from curvkern import CurvatureScores, CurvatureTracker
from curvkern.metrics import auroc, topk
from curvkern.text import TokenScorer

CATEGORIES = ["computers", "definitions", "zippy", "love"]
PAD, CLS, SEP, UNK = 0, 1, 2, 3


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few seconds: fewer texts and epochs")
    p.add_argument("--per-class", type=int, default=120, help="fortunes per category")
    p.add_argument("--flip", type=float, default=0.1, help="fraction of labels flipped")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--every", type=int, default=2, help="score after every this many epochs")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--n-probes", type=int, default=4)
    p.add_argument("--h", type=float, default=1e-3, help="in embedding units (std ~0.02)")
    add_run_arguments(p, out="outputs/text_classification")
    args = p.parse_args(argv)
    if args.quick:
        args.per_class, args.epochs, args.every = 40, 12, 3
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    return p, args


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+|[^\sa-z0-9']", text.lower())


def encode(texts: list[str]) -> list[list[int]]:
    """[CLS] words [SEP], words numbered by frequency (UNK for none: the vocabulary is complete)."""
    counts = Counter(w for t in texts for w in words(t))
    code = {w: i + 4 for i, (w, _) in enumerate(counts.most_common())}
    return [[CLS, *(code.get(w, UNK) for w in words(t)), SEP] for t in texts], len(code) + 4


def tiny_bert(vocab_size: int, num_labels: int):
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
        pad_token_id=PAD, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def batches(seqs, labels, size, gen=None):
    order = torch.randperm(len(seqs), generator=gen) if gen is not None else torch.arange(len(seqs))
    for rows in order.split(size):
        input_ids, attention_mask = pad_batch([seqs[i] for i in rows], PAD)
        yield rows, input_ids, attention_mask, labels[rows]


# The four scores docs/results.md's table compares (all high-first), from the shared list.
COLUMNS = ("curvature_mean", "curvature_last", "loss_final", "loss_mean")


def run(data: dict[str, list[str]], args: argparse.Namespace, seed: int) -> dict:
    """One seed: draws the texts and flipped labels, trains and tracks. Returns the texts,
    labels, flipped mask, score columns, AUROCs and training accuracy."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    texts, truth = [], []
    for c, name in enumerate(CATEGORIES):
        pick = torch.randperm(len(data[name]), generator=gen)[: args.per_class].tolist()
        texts += [data[name][i] for i in pick]
        truth += [c] * len(pick)
    truth = torch.tensor(truth)
    n, k = len(texts), len(CATEGORIES)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=gen)[: round(args.flip * n)]] = True
    shift = torch.randint(1, k, (n,), generator=gen)
    noisy = torch.where(flipped, (truth + shift) % k, truth)
    seqs, vocab_size = encode(texts)

    model = tiny_bert(vocab_size, k)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    tracker = CurvatureTracker(TokenScorer(model, h=args.h, n_probes=args.n_probes,
                                           seed=seed), n)  # fmt: skip
    for epoch in range(1, args.epochs + 1):
        model.train()
        for _, input_ids, attention_mask, y in batches(seqs, noisy, 16, gen):
            loss = model(input_ids, attention_mask=attention_mask, labels=y).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % args.every == 0 or epoch == args.epochs:
            parts = [
                tracker.scorer.score(input_ids, y, rows, attention_mask=attention_mask)
                for rows, input_ids, attention_mask, y in batches(seqs, noisy, 128)
            ]
            tracker.record(epoch, CurvatureScores.cat(parts))
        print(f"seed {seed}, epoch {epoch}: training loss {loss.item():.3f}", file=sys.stderr)

    model.eval()
    fitted = torch.zeros(n)  # 1 where the trained model predicts the given label
    with torch.no_grad():
        for rows, input_ids, attention_mask, y in batches(seqs, noisy, 256):
            logits = model(input_ids, attention_mask=attention_mask).logits
            fitted[rows] = (logits.argmax(1) == y).float()
    values, _, names = compared(tracker)
    columns = {key: values[key] for key in COLUMNS}
    top = int(flipped.sum())
    print(f"seed {seed}: {n} fortunes ({vocab_size} word types), {top} labels flipped; training "
          f"accuracy on the given labels {fitted.mean():.1%}, on the flipped ones "
          f"{fitted[flipped].mean():.1%}; {step_scale(model, args.h)}; "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    return {
        "texts": texts, "truth": truth, "noisy": noisy, "flipped": flipped, "columns": columns,
        "names": names, "vocab_size": vocab_size, "scored": len(tracker.epochs),
        "auroc": {key: auroc(torch.from_numpy(v), flipped) for key, v in columns.items()},
        "top": {key: int(flipped[topk(v, top).indices].sum())
                for key, v in columns.items()},
    }  # fmt: skip


def main(argv=None) -> dict[str, float]:
    """Runs the example; returns each score's AUROC, the mean over seeds."""
    parser, args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_or_exit(parser, CATEGORIES, args.data_dir, max_chars=120)
    seeds = range(args.seed, args.seed + args.seeds)
    runs = [run(data, args, seed) for seed in seeds]
    first = runs[0]
    n, top = len(first["texts"]), int(first["flipped"].sum())
    spread = f"mean ± sd over {len(runs)} seeds" if len(runs) > 1 else f"seed {args.seed}"
    print(f"\n{n} fortunes from {', '.join(CATEGORIES)} ({args.per_class} each, at most 120 "
          f"characters), {top} labels flipped; {args.epochs} epochs, scored "
          f"{first['scored']} times ({args.n_probes} probes, h = {args.h}); "
          f"{spread}\n")  # fmt: skip
    rows = [[first["names"][key], mean_sd([r["auroc"][key] for r in runs]),
             mean_sd([r["top"][key] for r in runs], digits=1 if len(runs) > 1 else 0)]
            for key in COLUMNS]  # fmt: skip
    print(markdown_table(["score", "AUROC", f"flipped among the top {top}"], rows))
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "scores.csv"), {
        "category": [CATEGORIES[c] for c in first["truth"]],
        "given": [CATEGORIES[c] for c in first["noisy"]],
        "flipped": first["flipped"].int().numpy(), **first["columns"], "text": first["texts"],
    })  # fmt: skip
    write_csv(os.path.join(args.out, "seeds.csv"), {
        "seed": [s for s in seeds for _ in COLUMNS], "score": [k for _ in seeds for k in COLUMNS],
        "auroc": [r["auroc"][k] for r in runs for k in COLUMNS],
        "flipped_in_top": [r["top"][k] for r in runs for k in COLUMNS],
    })  # fmt: skip
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return {key: sum(r["auroc"][key] for r in runs) / len(runs) for key in COLUMNS}


if __name__ == "__main__":
    main()
