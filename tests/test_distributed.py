"""score_dataset and CurvatureTracker under torch.distributed: two gloo processes on the CPU."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from curvkern import CurvatureScorer, CurvatureTracker, IndexedDataset, score_dataset

from .conftest import labelled_batch, smooth_classifier

N = 29  # odd: DistributedSampler pads one rank with a duplicate
WORLD = 2


def _dataset():
    return IndexedDataset(TensorDataset(*labelled_batch(N, seed=5)))


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        data = _dataset()
        sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(data, batch_size=4, sampler=sampler)
        ddp = DistributedDataParallel(smooth_classifier())
        scorer = CurvatureScorer(ddp, n_probes=3)  # scores ddp.module
        result = score_dataset(scorer, loader, progress=False)
        # the DDP model still trains after scoring (its reducer was never armed by scoring)
        for _ in range(2):
            x, y, _ = next(iter(loader))
            ddp.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
        tracker = CurvatureTracker(scorer, N, f"{out_dir}/tracker.npz")
        tracker.score_epoch(loader, 0, progress=False)
        dist.barrier()  # rank 0 has saved
        torch.save(
            {"scores": result.to_dict(), "mean": tracker.mean, "scored": len(sampler)},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    data = _dataset()
    single = score_dataset(
        CurvatureScorer(smooth_classifier(), n_probes=3),
        DataLoader(data, batch_size=8),
        progress=False,
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert sum(r["scored"] for r in results) == N + 1  # one padding duplicate
    for r in results:  # every rank has every sample, equal to single-process scoring
        for field, value in single.to_dict().items():
            torch.testing.assert_close(r["scores"][field], value, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(r["mean"], single.curvature, rtol=1e-8, atol=1e-12)
    saved = CurvatureTracker(
        CurvatureScorer(smooth_classifier(), n_probes=3), N, tmp_path / "tracker.npz"
    )
    assert saved.epochs == [0]
    torch.testing.assert_close(saved.mean, single.curvature, rtol=1e-8, atol=1e-12)
