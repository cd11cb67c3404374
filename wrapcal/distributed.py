"""``torch.distributed``: fit and evaluate with every rank on its own shard of the data.

Under ``torchrun --nproc_per_node=N`` (any backend: gloo on CPU, NCCL on GPUs), once
the process group is initialised, ``wrapped.fit`` and ``wrapcal.evaluate`` shard each
data set across the ranks: a tensor, array or ``(X, y)`` pair and a ``Dataset`` are cut
into contiguous blocks (rank ``r`` of ``N`` takes rows ``[r n / N, (r + 1) n / N)``); a
``DataLoader`` whose sampler is a ``DistributedSampler`` is taken as the user's own
sharding. Each rank runs the backbone on its shard only. A fit data set that only
shard-aware plugins read (``tags.fits_from_shards``) stays sharded: those plugins
combine what they need across ranks (statistics summed, a KNN bank kept per rank).
Any other fit set is gathered, in rank order, so every rank fits the same plugins from
the same features; ``evaluate`` gathers the predictions the same way, so every rank
holds the same report (write it from rank 0).

A rank that fails (bad data, a plugin's error) makes every rank fail with its message
at the next synchronisation point, instead of leaving the others waiting in a
collective until the backend's timeout. That holds because every collective made
while a rank may fail (inside :func:`agree`) starts with a status exchange: use the
collectives of this module there (:func:`all_reduce`, :func:`gather_rows`,
:func:`exchange`, :func:`lockstep`), never ``torch.distributed``'s own.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

# Defined with the other errors (the plugin SDK re-exports it without importing this
# module); kept importable from here, where 0.2.0 defined it.
from wrapcal.errors import DistributedError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from wrapcal.plugin.types import PluginTags

__all__ = [
    "DistributedError",
    "active",
    "agree",
    "all_reduce",
    "check_whole",
    "exchange",
    "gather_rows",
    "lockstep",
    "rank",
    "shard",
    "unshard",
    "world",
]

T = TypeVar("T")

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def active(group: ProcessGroup | None = None) -> bool:
    """Whether a process group (``group``, the default one by default) with more than one
    rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 outside a process group)."""
    return dist.get_rank(group) if active(group) else 0


def world(group: ProcessGroup | None = None) -> int:
    """The number of ranks in ``group`` (1 outside a process group)."""
    return dist.get_world_size(group) if active(group) else 1


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


# --- failure-aware synchronisation ------------------------------------------------------


def _reported(error: BaseException) -> bool:
    """Whether every other rank already knows of this error (so no rank waits for news)."""
    return getattr(error, "_wrapcal_reported", False)


def _statuses(
    status: tuple[int, str | None, str | None, Any], group: ProcessGroup | None = None
) -> list[Any]:
    everyone: list[Any] = [None] * world(group)
    dist.all_gather_object(everyone, status, group=group)
    return everyone


def _raise_for_failures(everyone: list[Any]) -> None:
    for r, what, message, _ in everyone:
        if message is not None:
            error = DistributedError(f"rank {r} failed while {what}: {message}")
            error._wrapcal_reported = True  # type: ignore[attr-defined]  # news to no rank
            raise error


def exchange(payload: Any, *, group: ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``payload`` (small, picklable), in rank order.

    Args:
        payload: This rank's part.
        group: The ranks that exchange (the default process group by default).

    Raises:
        DistributedError: Another rank failed inside :func:`agree` before reaching this
            point; its message is passed on.
    """
    if not active(group):
        return [payload]
    everyone = _statuses((rank(group), None, None, payload), group)
    _raise_for_failures(everyone)
    return [p for *_, p in everyone]


def agree(step: Callable[[], T], what: str) -> T:
    """Run ``step`` on every rank; if it fails on any rank, fail on all with the message.

    ``step`` may synchronise with the other ranks, through this module's collectives
    only: each starts with a status exchange, so a rank that failed before reaching it
    is reported there rather than waited for.

    Args:
        step: This rank's work.
        what: What the step does, for the message.

    Raises:
        DistributedError: Another rank's step failed (this rank's own error is raised
            as it is).
    """
    if not active():
        return step()
    try:
        result = step()
    except Exception as err:
        if _reported(err):
            raise  # every rank already knows: nobody waits for this rank's status
        message = "".join(traceback.format_exception_only(err)).strip()
        _statuses((rank(), what, message, None))
        err._wrapcal_reported = True  # type: ignore[attr-defined]
        raise
    _raise_for_failures(_statuses((rank(), None, None, None)))
    return result


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where a tensor must be for the backend (NCCL moves CUDA tensors only)."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce(
    tensor: torch.Tensor, op: str = "sum", *, group: ProcessGroup | None = None
) -> torch.Tensor:
    """``tensor`` combined over every rank of ``group`` (``"sum"``, ``"min"`` or
    ``"max"``), as a new tensor on ``tensor``'s device (the tensor itself outside a
    process group)."""
    if not active(group):
        return tensor
    combined = tensor.detach().to(_comm_device(tensor), copy=True)  # before: it may fail
    exchange(None, group=group)
    dist.all_reduce(combined, op=_REDUCE_OPS[op], group=group)
    return combined.to(tensor.device)


def gather_rows(
    tensor: torch.Tensor | None,
    *,
    sizes: list[int] | None = None,
    group: ProcessGroup | None = None,
) -> torch.Tensor | None:
    """Every rank's rows of ``tensor``, concatenated in rank order, on every rank.

    The ranks may hold different numbers of rows: each pads its rows to the largest
    count for the ``all_gather``, and the padding is cut off again. It starts with the
    status exchange (the row counts travel in it), like every collective here. Boolean
    tensors travel as ``uint8`` (some backends cannot send ``bool``) and come back as
    ``bool``.

    Args:
        tensor: This rank's rows; ``None`` (unlabelled) on any rank gives ``None``.
        sizes: When given, filled with each rank's number of rows.
        group: The ranks that gather (the default process group by default).
    """
    if not active(group):
        if sizes is not None and tensor is not None:
            sizes[:] = [tensor.shape[0]]
        return tensor
    found = exchange(None if tensor is None else int(tensor.shape[0]), group=group)
    if any(n is None for n in found):
        return None
    assert tensor is not None
    if sizes is not None:
        sizes[:] = found
    device = _comm_device(tensor)
    send = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    padded = torch.zeros((max(found), *send.shape[1:]), dtype=send.dtype, device=device)
    padded[: tensor.shape[0]] = send.to(device)
    parts = [torch.empty_like(padded) for _ in range(world(group))]
    exchange(None, group=group)  # every rank allocated: a rank that could not has said so
    dist.all_gather(parts, padded, group=group)
    whole = torch.cat([p[:n] for p, n in zip(parts, found, strict=True)])
    return whole.to(device=tensor.device, dtype=tensor.dtype)


def lockstep(items: Iterable[T]) -> Iterator[T | None]:
    """This rank's ``items`` in rounds that every rank runs together.

    Inference whose plugins search data held by every rank (a sharded KNN bank) makes
    one collective call per batch, so every rank must run the same number of batches.
    Ranks whose items ran out get ``None`` (run a small stand-in batch and drop its
    result) until every rank's items have.
    """
    iterator = iter(items)
    end = object()
    while True:
        item = next(iterator, end)
        if not any(exchange(item is not end)):
            return
        yield None if item is end else item  # type: ignore[misc]


# --- models with sharded plugins ---------------------------------------------------------
# The wrapped model imports this module, so these functions take it through the small
# protocols below (what they read of it) instead of importing its class.


class ShardedPlugin(Protocol):
    """A plugin as :func:`unshard` sees it: ``Plugin.unshard``, declared in
    :class:`wrapcal.plugin.base.Plugin` (a no-op unless the plugin keeps sharded state)."""

    def unshard(self) -> object:
        """Gather every rank's part of the plugin's learned state."""
        ...


class PluginChain(Protocol):
    """The plugins of a model in the order they act: ``(name, plugin, tags)``."""

    @property
    def plugins(self) -> Sequence[tuple[str, ShardedPlugin, PluginTags]]:
        """The plugins, with their names and tags."""
        ...


class ChainedModel(Protocol):
    """What these functions read of a :class:`~wrapcal.WrappedModel`: its plugin chain."""

    def chain(self) -> PluginChain:
        """The model's plugins, in order."""
        ...


M = TypeVar("M", bound=ChainedModel)


def sharded_plugins(wrapped: ChainedModel) -> list[str]:
    """Names of the plugins whose learned state is split across the ranks."""
    return [name for name, _, tags in wrapped.chain().plugins if tags.collective_outputs]


def check_whole(wrapped: ChainedModel, action: str) -> None:
    """Refuse ``action`` (save, export) on a model with sharded plugins, naming the fix.

    Raises:
        DistributedError: A plugin holds only this rank's part of its state.
    """
    names = sharded_plugins(wrapped)
    if names:
        raise DistributedError(
            f"cannot {action} this model: plugin {', '.join(names)} holds only rank "
            f"{rank()}'s part of its state (fitted with shard_bank=True under "
            "torch.distributed); call wrapcal.distributed.unshard(wrapped) on every rank "
            f"first, then {action} from rank 0"
        )


def unshard(wrapped: M) -> M:
    """Gather every rank's part of plugins whose learned state is sharded (a KNN bank
    fitted with ``shard_bank=True``), so each rank holds the whole model: needed before
    ``save`` or ``export``, or inference outside the process group. Call it on every
    rank. Returns ``wrapped``.

    It calls the declared ``Plugin.unshard()`` of every plugin that keeps sharded state
    (its tags' ``collective_outputs``), in the chain's order, so every rank makes the
    same collectives in the same order.
    """
    for _, plugin, tags in wrapped.chain().plugins:
        if tags.collective_outputs:
            plugin.unshard()
    return wrapped
