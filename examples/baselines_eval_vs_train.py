"""How far the tracker's baselines are from the papers' way of measuring them, on one example.

The tracker measures loss and margin at x in eval mode at the end of each scored epoch; the
papers accumulate each sample's loss and margin in its training minibatch, in train mode, while
the weights move. This trains the setup of examples/train_and_track.py (digits, 10% of the
labels flipped, a ReLU MLP, Adam, batches of 64, 40 epochs), optionally with dropout, records
both, and prints how much they differ and how well each finds the flipped labels:

    python3 examples/baselines_eval_vs_train.py [--dropout 0.3]
"""

import argparse

import torch
from data import flip_labels, load_digits
from models import mlp
from torch.utils.data import DataLoader, TensorDataset

from curvkern import CurvatureScorer, CurvatureTracker, IndexedDataset
from curvkern.metrics import auroc, spearman


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dropout", type=float, default=0.0, help="after each hidden layer")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_digits()
    noisy, flipped = flip_labels(data.y, 0.1, data.num_classes, seed=0)
    n = len(noisy)
    train_set = IndexedDataset(TensorDataset(data.x, noisy))
    model = mlp(data.x[0].numel(), data.num_classes)
    if args.dropout:
        model.insert(3, torch.nn.Dropout(args.dropout))
        model.insert(6, torch.nn.Dropout(args.dropout))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tracker = CurvatureTracker(CurvatureScorer(model, n_probes=4), n, keep_history=False)
    loss_sum, margin_sum = torch.zeros(n), torch.zeros(n)  # the papers' way, in training
    for epoch in range(args.epochs):
        model.train()
        for x, y, ids in DataLoader(train_set, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
            loss.mean().backward()
            optimizer.step()
            with torch.no_grad():
                other = logits.scatter(1, y[:, None], -torch.inf).amax(1)
                loss_sum[ids] += loss
                margin_sum[ids] += logits.gather(1, y[:, None])[:, 0] - other
        tracker.score_epoch(DataLoader(train_set, batch_size=512), epoch, progress=False)
    ours = tracker.baselines()
    for name, theirs, sign in (("loss_mean", loss_sum, 1), ("aum", margin_sum, -1)):
        theirs = theirs / args.epochs
        rel = ((ours[name] - theirs).abs() / theirs.abs().clamp(min=1e-12)).median()
        print(
            f"dropout {args.dropout}, {name}: eval mode at epoch ends against train-mode "
            f"minibatches: median |relative difference| {rel:.2f}, Spearman "
            f"{spearman(ours[name], theirs):.3f}; AUROC for the flipped labels "
            f"{auroc(sign * ours[name], flipped):.3f} against {auroc(sign * theirs, flipped):.3f}"
        )


if __name__ == "__main__":
    main()
