"""Canary exposure: does input curvature find secrets a language model memorized?

A small character-level GPT-2 (transformers, built from a config with random weights: no
download) is trained on short fortunes (Debian's ``fortunes`` package) into which random
canaries "the secret code is xxxxxxxxxx" were inserted, some once, some 4 times, some 16 times.
Held-out canaries of the same form are never trained on. After every few epochs a
curvkern.text.TokenScorer scores a sample of the training text and all canaries, twice: with
probes on the secret's 10 characters only (``probe_mask``; for ordinary text its last 10
characters), and on the whole sequence. Reported by repetition count, for each score:

- found among training text: AUROC of the inserted canaries against ordinary training text
  (flagged = high curvature, high loss, low Min-K% probability), and their median rank;
- members: AUROC of the inserted canaries against held-out ones (memorized = high curvature,
  low loss, high Min-K% probability), the exposure test proper.

    python examples/canary_exposure.py [--quick] [--epochs 12] [--seeds 5]

With --seeds S the run is repeated with seeds --seed .. --seed+S-1 (the texts, the canaries, the
initial weights, the batch order and the probes) and the tables give the mean and standard
deviation over them; scores.csv holds the first seed's scores, seeds.csv every seed's AUROCs
and ranks.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import string
import sys
import time

import numpy as np
import torch
from fortunes import add_run_arguments, load_or_exit, pad_batch, step_scale
from plots import markdown_table, mean_sd, write_csv

from curvkern import CurvatureScores, CurvatureTracker
from curvkern.losses import sequence_cross_entropy
from curvkern.metrics import auroc
from curvkern.text import TokenScorer

CATEGORIES = ["computers", "science", "people", "work", "wisdom", "definitions", "platitudes"]
PREFIX = "the secret code is "
SECRET = 10  # characters of a canary's secret, and of the probe mask
REPEATS = (1, 4, 16)
PAD, BOS, EOS = 0, 1, 2


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few seconds: small corpus and model")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--every", type=int, default=3, help="score after every this many epochs")
    p.add_argument("--texts", type=int, default=500, help="ordinary training sequences")
    p.add_argument("--scored-texts", type=int, default=150, help="of them scored each time")
    p.add_argument("--canaries", type=int, default=6, help="canaries per repetition count")
    p.add_argument("--n-probes", type=int, default=2)
    p.add_argument("--h", type=float, default=1e-3, help="in embedding units (std ~0.02)")
    p.add_argument("--min-k", type=float, default=0.2, help="Min-K%% probability's k")
    add_run_arguments(p, out="outputs/canary_exposure")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.every, args.texts, args.scored_texts, args.canaries = 6, 3, 300, 60, 3
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    return p, args


def build_corpus(texts: list[str], args, seed: int):
    """Training token lists, the scored token lists, their probe masks and roles."""
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + string.digits

    def canary():
        return PREFIX + "".join(rng.choice(alphabet) for _ in range(SECRET))

    texts = list(texts)  # shuffled: the caller's order stays for the next seed
    rng.shuffle(texts)
    ordinary = texts[: args.texts]
    inserted = {r: [canary() for _ in range(args.canaries)] for r in REPEATS}
    held_out = [canary() for _ in range(args.canaries * len(REPEATS))]
    vocab = sorted(set("".join(ordinary)) | set(alphabet) | set(PREFIX))
    code = {c: i + 3 for i, c in enumerate(vocab)}  # 0, 1, 2: PAD, BOS, EOS

    def encode(text):
        return [BOS, *(code[c] for c in text), EOS]

    train = [encode(t) for t in ordinary]
    train += [encode(c) for r, cs in inserted.items() for c in cs for _ in range(r)]
    scored_text = ordinary[: args.scored_texts]
    scored = [encode(t) for t in (*[c for cs in inserted.values() for c in cs], *held_out,
                                  *scored_text)]  # fmt: skip
    # role: repetitions for inserted canaries, 0 for held-out ones, -1 for ordinary text
    role = [r for r in REPEATS for _ in range(args.canaries)]
    role += [0] * len(held_out) + [-1] * len(scored_text)
    return train, scored, torch.tensor(role), len(vocab) + 3


def char_gpt2(vocab_size: int):
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=96, n_embd=48,
        n_layer=2, n_head=4, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def batches(seqs, size, shuffle=None):
    order = list(range(len(seqs)))
    if shuffle is not None:
        shuffle.shuffle(order)
    for s in range(0, len(order), size):
        rows = order[s : s + size]
        ids, mask = pad_batch([seqs[i] for i in rows], PAD)
        yield torch.tensor(rows), ids, mask


def secret_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T): the SECRET characters before each sequence's EOS (a canary's secret)."""
    end = attention_mask.sum(1, keepdim=True) - 1  # position of EOS
    pos = torch.arange(attention_mask.shape[1])
    return ((pos >= end - SECRET) & (pos < end)).long()


def score_all(scorer, seqs, probe: bool) -> CurvatureScores:
    """Every scored sequence, ids = positions in ``seqs``; probes on the secret or everywhere."""
    parts = []
    for ids, input_ids, attention_mask in batches(seqs, 64):
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        mask = secret_mask(attention_mask) if probe else None
        parts.append(scorer.score(input_ids, labels, ids, attention_mask=attention_mask,
                                  probe_mask=mask))  # fmt: skip
    return CurvatureScores.cat(parts)


@torch.no_grad()
def token_scores(model, seqs, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-K% probability (Shi et al. 2024: the mean of a sequence's lowest k% token
    log-probabilities) and the mean loss of its last SECRET characters (a canary's secret)."""
    min_k, secret = torch.empty(len(seqs)), torch.empty(len(seqs))
    for ids, input_ids, attention_mask in batches(seqs, 256):
        logp = model(input_ids, attention_mask=attention_mask).logits.log_softmax(-1)
        token = logp[:, :-1].gather(2, input_ids[:, 1:, None]).squeeze(2)  # (B, T-1)
        for b, row in enumerate(ids.tolist()):
            lp = token[b, : int(attention_mask[b].sum()) - 1]  # log p of each next token
            secret[row] = -lp[-SECRET - 1 : -1].mean()  # the secret, not the EOS after it
            lp = lp.sort().values
            min_k[row] = lp[: max(1, int(np.ceil(k * len(lp))))].mean()
    return min_k, secret


def run(texts: list[str], args: argparse.Namespace, seed: int) -> dict:
    """One seed: builds the corpus, trains and tracks. Returns per score (by name) the AUROCs
    "found" (canaries against training text) and "members" (against held-out canaries) and the
    median ranks, per repetition count, and the scores themselves."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    train, scored, role, vocab_size = build_corpus(texts, args, seed)
    model = char_gpt2(vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    # curvkern: one scorer, two trackers (probes on the secret / on the whole sequence)
    scorer = TokenScorer(model, sequence_cross_entropy, h=args.h, n_probes=args.n_probes,
                         seed=seed)  # fmt: skip
    trackers = {probe: CurvatureTracker(scorer, len(scored)) for probe in (True, False)}
    shuffle = random.Random(seed)
    train_time = score_time = 0.0
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        for _, input_ids, attention_mask in batches(train, 32, shuffle):
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        t1 = time.perf_counter()
        if epoch % args.every == 0 or epoch == args.epochs:
            for probe, tracker in trackers.items():
                tracker.record(epoch, score_all(scorer, scored, probe))
        train_time += t1 - t0
        score_time += time.perf_counter() - t1
        print(f"seed {seed}, epoch {epoch}: training loss {loss.item():.3f}", file=sys.stderr)

    model.eval()
    min_k, secret_loss = token_scores(model, scored, args.min_k)
    signals = {  # name -> (score, higher means "memorized")
        "curvature on the secret, mean over epochs": trackers[True].mean,
        "curvature, whole sequence, mean over epochs": trackers[False].mean,
        "curvature on the secret, last epoch": trackers[True].history[-1],
        "curvature, whole sequence, last epoch": trackers[False].history[-1],
        "loss, final (low = memorized)": -trackers[False].field_history("loss")[-1],
        "loss, mean over epochs (low = memorized)": -trackers[False].field_mean("loss"),
        "loss on the secret, final (low = memorized)": -secret_loss,
        f"Min-K% probability, k = {args.min_k:.0%}": min_k,
    }
    text, held = role == -1, role == 0
    found, members, ranks = {}, {}, {}
    for name, s in signals.items():
        s = s.double()
        # Among training text, canaries are flagged by the opposite of "memorized" for loss and
        # Min-K% (random strings are hard to predict) but by high curvature.
        flag = s if name.startswith("curvature") else -s
        found[name], members[name], ranks[name] = {}, {}, {}
        for r in REPEATS:
            canary = role == r
            found[name][r] = auroc(flag[canary | text], canary[canary | text])
            members[name][r] = auroc(s[canary | held], canary[canary | held])
            ranks[name][r] = float(
                np.median([1 + int((flag[text] > v).sum()) for v in flag[canary]])
            )
    print(f"seed {seed}: {len(train)} training sequences, final training loss {loss.item():.3f}; "
          f"{step_scale(model, args.h)}; {time.perf_counter() - start:.0f} s: training "
          f"{train_time:.0f} s, scoring {score_time:.0f} s")  # fmt: skip
    return {
        "found": found, "members": members, "ranks": ranks, "role": role, "signals": signals,
        "train": len(train), "scored": len(trackers[True].epochs),
    }  # fmt: skip


def main(argv=None) -> dict[str, dict[str, dict[int, float]]]:
    """Runs the example; returns "found" and "members" AUROCs per score and repetition count,
    the means over seeds."""
    parser, args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    texts = [t for ts in load_or_exit(parser, CATEGORIES, args.data_dir, 80).values() for t in ts]
    seeds = range(args.seed, args.seed + args.seeds)
    runs = [run(texts, args, seed) for seed in seeds]
    first = runs[0]
    names = list(first["signals"])

    def cells(kind, name, digits=3):
        return [mean_sd([r[kind][name][rep] for r in runs], digits) for rep in REPEATS]

    rows_found, rows_members = [], []
    for name in names:
        flag_name = name.replace("(low = memorized)", "(high first)") if "loss" in name else name
        if "Min-K%" in name:
            flag_name += " (low first)"
        digits = 1 if len(runs) > 1 else 0
        rows_found.append([flag_name, *cells("found", name), *cells("ranks", name, digits)])
        rows_members.append([name, *cells("members", name)])

    role = first["role"]
    text, held = role == -1, role == 0
    spread = f"mean ± sd over {len(runs)} seeds" if len(runs) > 1 else f"seed {args.seed}"
    print(f"\n{first['train']} training sequences ({args.texts} fortunes, {args.canaries} "
          f"canaries each repeated {', '.join(map(str, REPEATS))} times), {args.epochs} epochs, "
          f"scored {first['scored']} times ({args.n_probes} probes, h = {args.h}); "
          f"{spread}\n")  # fmt: skip
    print(f"Canaries among {int(text.sum())} ordinary training sequences: AUROC and median rank "
          f"(1 = top)")  # fmt: skip
    print(markdown_table(["score", *(f"AUROC, {r}x" for r in REPEATS),
                          *(f"rank, {r}x" for r in REPEATS)], rows_found))  # fmt: skip
    print(
        f"\nInserted canaries against {int(held.sum())} held-out canaries (members vs not): AUROC"
    )
    print(markdown_table(["score", *(f"{r}x" for r in REPEATS)], rows_members))
    os.makedirs(args.out, exist_ok=True)
    columns = {"role": role.numpy()}
    columns.update({re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"): s.double().numpy()
                    for name, s in first["signals"].items()})  # fmt: skip
    write_csv(os.path.join(args.out, "scores.csv"), columns)
    per_seed = [(seed, name, rep, r) for seed, r in zip(seeds, runs, strict=True)
                for name in names for rep in REPEATS]  # fmt: skip
    write_csv(os.path.join(args.out, "seeds.csv"), {
        "seed": [p[0] for p in per_seed], "score": [p[1] for p in per_seed],
        "repeats": [p[2] for p in per_seed],
        "auroc_found": [p[3]["found"][p[1]][p[2]] for p in per_seed],
        "median_rank": [p[3]["ranks"][p[1]][p[2]] for p in per_seed],
        "auroc_members": [p[3]["members"][p[1]][p[2]] for p in per_seed],
    })  # fmt: skip
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return {
        kind: {name: {rep: float(np.mean([r[kind][name][rep] for r in runs])) for rep in REPEATS}
               for name in names}
        for kind in ("found", "members")
    }  # fmt: skip


if __name__ == "__main__":
    main()
