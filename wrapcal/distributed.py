"""``torch.distributed``: fit and evaluate with every rank on its own shard of the data.

Under ``torchrun --nproc_per_node=N`` (any backend: gloo on CPU, NCCL on GPUs), once
the process group is initialised, ``wrapped.fit`` and ``wrapcal.evaluate`` shard each
data set across the ranks: a tensor, array or ``(X, y)`` pair and a ``Dataset`` are cut
into contiguous blocks (rank ``r`` of ``N`` takes rows ``[r n / N, (r + 1) n / N)``); a
``DataLoader`` whose sampler is a ``DistributedSampler`` is taken as the user's own
sharding. Each rank runs the backbone on its shard only. What the plugins fit from is
then gathered, in rank order, so every rank fits the same plugins from the same
features and ends with the same model; ``evaluate`` gathers the predictions the same
way, so every rank holds the same report (write it from rank 0).

A rank that fails (bad data, a plugin's error) makes every rank fail with its message
at the next synchronisation point, instead of leaving the others waiting in a
collective until the backend's timeout.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from wrapcal.errors import WrapcalError

__all__ = ["DistributedError", "active", "agree", "gather_rows", "rank", "shard", "world"]

T = TypeVar("T")


class DistributedError(WrapcalError, RuntimeError):
    """Another rank failed; the message says which and why."""


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if active() else 0


def world() -> int:
    """The number of ranks (1 outside a process group)."""
    return dist.get_world_size() if active() else 1


def _block(n: int) -> tuple[int, int]:
    return rank() * n // world(), (rank() + 1) * n // world()


def shard(data: Any) -> Any:
    """This rank's part of ``data`` (the data itself outside a process group)."""
    if not active() or data is None:
        return data
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, DistributedSampler):
            return data  # the user's own sharding
        start, stop = _block(len(data.dataset))  # type: ignore[arg-type]
        subset = Subset(data.dataset, range(start, stop))
        return DataLoader(
            subset,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
        )
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
        start, stop = _block(len(data[0]))
        return (data[0][start:stop], data[1][start:stop])
    if isinstance(data, (torch.Tensor, np.ndarray)):
        start, stop = _block(len(data))
        return data[start:stop]
    if isinstance(data, Dataset):
        start, stop = _block(len(data))  # type: ignore[arg-type]
        return Subset(data, range(start, stop))
    return data


def agree(step: Callable[[], T], what: str) -> T:
    """Run ``step`` on every rank; if it fails on any rank, fail on all with the message.

    Args:
        step: This rank's work (no collective calls inside it).
        what: What the step does, for the message.

    Raises:
        DistributedError: Another rank's step failed (this rank's own error is raised
            as it is).
    """
    if not active():
        return step()
    result: Any = None
    error: BaseException | None = None
    try:
        result = step()
    except Exception as err:  # reported to the other ranks, then raised here
        error = err
    status = (
        rank(),
        None if error is None else "".join(traceback.format_exception_only(error)).strip(),
    )
    everyone: list[Any] = [None] * world()
    dist.all_gather_object(everyone, status)
    if error is not None:
        raise error
    failed = [(r, message) for r, message in everyone if message is not None]
    if failed:
        r, message = failed[0]
        raise DistributedError(f"rank {r} failed while {what}: {message}")
    return result


def gather_rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Every rank's rows of ``tensor``, concatenated in rank order, on every rank.

    The ranks may hold different numbers of rows; ``None`` (unlabelled) on any rank gives
    ``None``.
    """
    if not active():
        return tensor
    present = [None] * world()
    dist.all_gather_object(present, tensor is not None)
    if not all(present):
        return None
    assert tensor is not None
    device = tensor.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    rows = torch.tensor([tensor.shape[0]], device=device)
    sizes = [torch.zeros_like(rows) for _ in range(world())]
    dist.all_gather(sizes, rows)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    whole = torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])
    return whole.to(tensor.device)
