"""torch.distributed helpers: every rank's score rows, gathered on every rank by sample id; a
process group from torchrun's environment; ranks that stop together when one fails."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "is_main_process",
    "all_gather_rows",
    "widest_dtype",
    "RankFailed",
    "launched_distributed",
    "init_from_environment",
    "check_ranks",
    "fail_ranks",
]


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
    counts = _gather_flag(ids.numel())  # the collective check_ranks and fail_ranks make
    if min(counts) == _FAILED:  # a rank failed and called fail_ranks (see there)
        _raise_failed(None)
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


# -- a process group from torchrun's environment, and failing together -------------------------

_FAILED = -1  # the count a failing rank contributes to the next one-integer gather


class RankFailed(RuntimeError):
    """Some rank failed: raised on every rank at the same collective, so that all stop.

    Attributes:
        failures: [(rank, one-line message)] of every rank that failed, by rank.
    """

    def __init__(self, failures: list[tuple[int, str]]) -> None:
        self.failures = failures
        super().__init__("; ".join(f"rank {r}: {m}" for r, m in failures))


def launched_distributed() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables:
    WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_environment(device: torch.device) -> torch.device:
    """Joins the process group the launcher's environment describes; returns this rank's device.

    On CUDA the backend is NCCL and LOCAL_RANK picks the GPU (``device`` must name none); on the
    CPU it is gloo. An already initialized group is used as it is.

    Raises:
        ValueError: a CUDA device with an index, or LOCAL_RANK beyond the visible GPUs.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                f"--device: under torchrun give --device cuda, not {device} (LOCAL_RANK picks "
                "each process's GPU; restrict them with CUDA_VISIBLE_DEVICES)"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"--device: LOCAL_RANK {local_rank} but {count} GPUs visible on this node; start "
                "at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not is_distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _gather_flag(value: int) -> list[int]:
    device = _collective_device()
    flag = torch.tensor([value], dtype=torch.int64, device=device)
    flags = [torch.zeros_like(flag) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, flag)
    return [int(f) for f in flags]


def _raise_failed(message: str | None):
    """After a gather in which some rank sent _FAILED: every rank's message, on every rank."""
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    raise RankFailed([(r, m) for r, m in enumerate(messages) if m is not None])


def check_ranks() -> None:
    """A point every rank passes: raises RankFailed on every rank when one has called
    :func:`fail_ranks` instead. No-op without a process group.

    It is the same one-integer all_gather as the row counts of :func:`all_gather_rows`, so a
    failing rank's :func:`fail_ranks` matches whichever of the two its peers reach next.
    """
    if is_distributed() and min(_gather_flag(0)) == _FAILED:
        _raise_failed(None)


def fail_ranks(message: str) -> None:
    """Called by a rank that failed (``message``: one line): joins its peers' next
    :func:`check_ranks` or :func:`all_gather_rows`, so that every rank raises RankFailed there.

    Raises:
        RankFailed: always (without a process group: with this rank's message alone).
    """
    if not is_distributed():
        raise RankFailed([(0, message)])
    _gather_flag(_FAILED)
    _raise_failed(message)
