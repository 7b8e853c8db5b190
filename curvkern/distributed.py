"""torch.distributed helpers: every rank's score rows, gathered on every rank by sample id."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "is_main_process", "all_gather_rows", "widest_dtype"]


def is_distributed() -> bool:
    """Whether a torch.distributed process group is initialized in this process."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and shows progress."""
    return not is_distributed() or dist.get_rank() == 0


def _collective_device() -> torch.device:
    """Where the process group's tensors must be: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's rows, on every rank: ids (R,) int64 and values (R, F) float64, on the CPU.

    Without a process group, returns its inputs. Ranks may hold different numbers of rows:
    counts are gathered first and rows padded to the largest. NCCL gathers CUDA tensors (on the
    current device), gloo CPU tensors.

    Args:
        ids: (r,) int64 sample ids of this rank's rows.
        values: (r, F) float64 rows (see CurvatureScores.to_rows), F equal on every rank.
    Returns:
        (ids (R,), values (R, F)) with R the sum of every rank's r, rank 0's rows first.
    """
    if not is_distributed():
        return ids, values
    device = _collective_device()
    world = dist.get_world_size()
    count = torch.tensor([ids.numel()], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    rows = max(counts)
    padded_ids = torch.full((rows,), -1, dtype=torch.int64, device=device)
    padded_ids[: ids.numel()] = ids.to(device)
    padded_values = torch.zeros((rows, values.shape[1]), dtype=torch.float64, device=device)
    padded_values[: ids.numel()] = values.to(device)
    all_ids = [torch.empty_like(padded_ids) for _ in range(world)]
    all_values = [torch.empty_like(padded_values) for _ in range(world)]
    dist.all_gather(all_ids, padded_ids)
    dist.all_gather(all_values, padded_values)
    return (
        torch.cat([t[:c] for t, c in zip(all_ids, counts, strict=True)]).cpu(),
        torch.cat([t[:c] for t, c in zip(all_values, counts, strict=True)]).cpu(),
    )


def widest_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 if any rank's scores are float64, else float32 (``dtype`` without a group)."""
    if not is_distributed():
        return dtype
    wide = torch.tensor([int(dtype == torch.float64)], device=_collective_device())
    dist.all_reduce(wide, op=dist.ReduceOp.MAX)
    return torch.float64 if int(wide) else torch.float32
