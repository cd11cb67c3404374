"""Production traffic as a stream of windows, each a stream of batches.

Traffic is read one batch at a time and never held whole: a window's batches are pulled
from the source while the monitor summarises them, and the next window starts only
when the previous one is done. Two forms:

* a sequence (or any iterable, a generator included) of windows, each anything
  :func:`wrapcal.data.iter_batches` reads (a DataLoader, a Dataset, an ``(X, y)`` pair,
  a bare ``X``) or a :class:`Window` that adds a name and a timestamp;
* one data stream (a DataLoader, a Dataset, ``(X, y)``, ``X``) with ``window_size=N``:
  cut into consecutive windows of ``N`` inputs (the last one may be shorter).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wrapcal.data import Batch, iter_batches

__all__ = ["Window", "WindowInfo", "iter_windows"]


@dataclass
class Window:
    """One window of traffic, with what identifies it in the report.

    Attributes:
        data: The window's inputs, anything :func:`wrapcal.data.iter_batches` reads;
            labelled data gives realised accuracy and ECE beside the estimate.
        name: Shown in the report (default ``"window <i>"``).
        timestamp: When the window was served (any text, e.g. ISO 8601), shown and
            saved as given.
    """

    data: Any
    name: str | None = None
    timestamp: str | None = None


@dataclass
class WindowInfo:
    """Where a window sits in the stream: its index, name and timestamp."""

    index: int
    name: str
    timestamp: str | None


def _is_one_stream(traffic: Any) -> bool:
    """Whether ``traffic`` is one data set rather than a sequence of windows."""
    if isinstance(traffic, (torch.Tensor, np.ndarray, DataLoader, Dataset)):
        return True
    if isinstance(traffic, tuple) and len(traffic) == 2:
        # (X, y): labels are one value per input; two batches of inputs are two windows.
        x, y = traffic
        arrays = all(isinstance(part, (torch.Tensor, np.ndarray)) for part in traffic)
        return arrays and y.ndim == 1 and x.ndim > 1
    return False


def _labels(
    names: Sequence[str] | None, timestamps: Sequence[Any] | None, index: int
) -> tuple[str | None, str | None]:
    name = None if names is None or index >= len(names) else str(names[index])
    stamp = None if timestamps is None or index >= len(timestamps) else timestamps[index]
    return name, None if stamp is None else str(stamp)


def _cut(source: Iterator[Batch], size: int) -> Iterator[Iterator[Batch]]:
    """``source``'s batches regrouped into runs of ``size`` inputs; each run is an
    iterator that must be consumed before the next is asked for (the monitor does)."""
    pending: list[Batch] = []

    def refill() -> bool:
        if pending:
            return True
        for batch in source:
            if batch[0].shape[0]:
                pending.append(batch)
                return True
        return False

    def run() -> Iterator[Batch]:
        left = size
        while left and refill():
            x, y = pending.pop()
            if x.shape[0] > left:
                # Split at the window's edge; the rest opens the next window.
                pending.append((x[left:], None if y is None else y[left:]))
                x, y = x[:left], None if y is None else y[:left]
            left -= x.shape[0]
            yield x, y

    while refill():
        yield run()


def iter_windows(
    traffic: Any,
    *,
    window_size: int | None = None,
    names: Sequence[str] | None = None,
    timestamps: Sequence[Any] | None = None,
    batch_size: int = 256,
) -> Iterator[tuple[WindowInfo, Iterator[Batch]]]:
    """The windows of ``traffic``, lazily: ``(info, batches)`` pairs.

    Args:
        traffic: See the module docstring.
        window_size: Cut one data stream into windows of this many inputs; ``None``:
            ``traffic`` is already a sequence of windows.
        names: A name per window (else the :class:`Window`'s, else ``window <i>``).
        timestamps: A timestamp per window (else the :class:`Window`'s, else none).
        batch_size: Inputs per batch for data that is not already batched.

    Raises:
        ValueError: One data stream without ``window_size``, a ``window_size`` below 1,
            or traffic that is not iterable.
    """
    if window_size is not None:
        if isinstance(window_size, bool) or int(window_size) != window_size or window_size < 1:
            raise ValueError(f"window_size must be a positive integer; got {window_size!r}")
        source = traffic.data if isinstance(traffic, Window) else traffic
        for index, batches in enumerate(_cut(iter_batches(source, batch_size), window_size)):
            name, stamp = _labels(names, timestamps, index)
            yield WindowInfo(index, name or f"window {index}", stamp), batches
        return
    if _is_one_stream(traffic):
        raise ValueError(
            f"traffic is one data set ({type(traffic).__name__}); cut it into windows with "
            "window_size=N, or pass a list of windows (one data set each)"
        )
    if not isinstance(traffic, Iterable) or isinstance(traffic, (str, bytes, dict)):
        raise ValueError(
            f"traffic must be a list (or iterable) of windows, got {type(traffic).__name__}; "
            "pass [window_0, window_1, ...] or one data set with window_size=N"
        )
    for index, item in enumerate(traffic):
        name, stamp = _labels(names, timestamps, index)
        data = item
        if isinstance(item, Window):
            data, name, stamp = item.data, name or item.name, stamp or item.timestamp
        yield WindowInfo(index, name or f"window {index}", stamp), iter_batches(data, batch_size)
