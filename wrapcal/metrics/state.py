"""Metric state that adds up over batches and processes: the base of the torchmetrics-style
classes (``update`` / ``compute`` / ``reset``) and the float64 accumulation they share."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from wrapcal import distributed

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch.distributed import ProcessGroup

__all__ = ["SummableMetric", "acc_dtype", "row_chunks", "scatter_sum"]

# Elements per [rows, K] temporary (masks, Brier's scatter copy): ~16 MB of float32.
_CHUNK_ELEMENTS = 1 << 22


def acc_dtype(device: torch.device) -> torch.dtype:
    """The dtype sums are accumulated in: float64, except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def row_chunks(
    n_rows: int, n_cols: int, budget: int = _CHUNK_ELEMENTS
) -> Iterator[tuple[int, int]]:
    """Yields ``(lo, hi)`` row ranges whose ``[rows, n_cols]`` blocks hold ~``budget`` items."""
    step = max(1, budget // max(n_cols, 1))
    for lo in range(0, n_rows, step):
        yield lo, min(lo + step, n_rows)


def scatter_sum(index: Tensor, values: Tensor | float, size: int) -> Tensor:
    """``out[j] = sum of values[index == j]``, accumulated in float64.

    ``index_add_`` rather than ``bincount``: under ``torch.use_deterministic_algorithms``
    it is deterministic on CUDA, where a weighted ``bincount`` raises.
    """
    acc = acc_dtype(index.device)
    out = torch.zeros(size, dtype=acc, device=index.device)
    if not isinstance(values, Tensor):
        values = torch.full(index.shape, values, dtype=acc, device=index.device)
    return out.index_add_(0, index, values.to(acc))


class SummableMetric:
    """Base of the torchmetrics-style classes: ``update``, ``compute``, ``reset``.

    State is a dict of tensors that add up across batches and processes
    (``state_tensors()``), plus per-sample tensors kept as lists, one entry per batch
    (``sample_tensors()`` concatenates them). ``sync()`` combines the state of all
    processes under ``torch.distributed`` with the collectives of
    :mod:`wrapcal.distributed` (each starts with its failure-status exchange):
    :func:`~wrapcal.distributed.all_reduce` of the sums and the padded
    :func:`~wrapcal.distributed.gather_rows` of the per-sample tensors.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forgets every batch seen so far."""
        self._sums: dict[str, Tensor] = {}
        self._samples: dict[str, list[Tensor]] = {}

    def _add_sums(self, **sums: Tensor) -> None:
        for name, value in sums.items():
            if name in self._sums:
                self._sums[name] += value
            else:
                self._sums[name] = value

    def _add_samples(self, **tensors: Tensor) -> None:
        for name, value in tensors.items():
            self._samples.setdefault(name, []).append(value.detach())

    def _require_state(self) -> dict[str, Tensor]:
        if not self._sums and not self._samples:
            raise RuntimeError(f"{type(self).__name__} has no data — call update() first")
        return self._sums

    def state_tensors(self) -> dict[str, Tensor]:
        """The live summable state: ``all_reduce`` these in place to combine processes."""
        return self._sums

    def sample_tensors(self) -> dict[str, Tensor]:
        """The per-sample state, each list concatenated (and kept as one tensor)."""
        for name, parts in self._samples.items():
            if len(parts) > 1:
                self._samples[name] = [torch.cat(parts)]
        return {name: parts[0] for name, parts in self._samples.items()}

    def sync(self, group: ProcessGroup | None = None) -> SummableMetric:
        """Combines the state of all processes in place; a no-op without torch.distributed
        (or with one rank).

        Every rank must call it once, after at least one ``update``, before ``compute``.
        The ranks may hold different numbers of samples.

        Args:
            group: The process group to combine over (the default one by default).

        Raises:
            DistributedError: Another rank failed inside ``wrapcal.distributed.agree``
                before reaching this point; its message is passed on.
        """
        if not distributed.active(group):
            return self
        for value in self._sums.values():  # in place: state_tensors() stays live
            value.copy_(distributed.all_reduce(value, "sum", group=group))
        for name, value in self.sample_tensors().items():
            gathered = distributed.gather_rows(value, group=group)
            assert gathered is not None  # only a None tensor gathers to None
            self._samples[name] = [gathered]
        return self
