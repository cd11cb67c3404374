"""Fingerprints of backbones and data: what the feature cache is keyed by.

A backbone's fingerprint covers its structure (the module tree as ``repr`` shows it),
every parameter and buffer (bytes, dtype, shape) and its device, so changed weights,
a changed architecture or another device never match. It is recomputed only when a
tensor changed since the last time (PyTorch counts in-place changes in
``tensor._version``; a replaced tensor has a new identity or address).

In-memory data (tensors, arrays, ``(X, y)`` pairs) are fingerprinted by their bytes;
streamed data (a ``DataLoader`` or ``Dataset``) by a hash of every batch as it is read,
which the cache compares after reading (see :mod:`wrapcal.features.memory_store`).
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["StreamHash", "backbone_fingerprint", "memory_fingerprint", "tensor_bytes"]

_DIGEST = 16
_known: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes (on the CPU), as a buffer hashlib can read without a copy."""
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def _update(h: Any, tensor: torch.Tensor) -> None:
    h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(tensor_bytes(tensor))


def backbone_fingerprint(backbone: nn.Module) -> str:
    """A digest of the backbone's structure, weights, buffers and device."""
    state = list(backbone.state_dict(keep_vars=True).items())
    signature = tuple((k, id(t), t._version, t.data_ptr(), t.device) for k, t in state)
    known = _known.get(backbone)
    if known is not None and known[0] == signature:
        return known[1]
    h = hashlib.blake2b(digest_size=_DIGEST)
    h.update(repr(backbone).encode())
    for name, tensor in state:
        h.update(f"\0{name}\0{tensor.device.type}\0".encode())
        _update(h, tensor)
    digest = h.hexdigest()
    _known[backbone] = (signature, digest)
    return digest


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return None


def memory_fingerprint(data: Any) -> str | None:
    """A digest of data held in memory (a tensor, an array or an ``(X, y)`` pair), or
    ``None`` for data that is read batch by batch (a loader or a dataset)."""
    pair = isinstance(data, (tuple, list)) and len(data) == 2
    parts: tuple[Any, ...] = tuple(data) if pair else (data,)
    tensors = [_as_tensor(p) for p in parts]
    if any(t is None for t in tensors):
        return None
    h = hashlib.blake2b(digest_size=_DIGEST)
    h.update(f"memory:{len(tensors)}".encode())
    for tensor in tensors:
        _update(h, tensor)
    return h.hexdigest()


class StreamHash:
    """The hash of a stream of ``(x, y)`` batches, built as they are read."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=_DIGEST)
        self._h.update(b"stream")
        self.first: str | None = None

    def update(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Add one batch; the first batch's own digest is kept as ``first``."""
        if self.first is None:
            first = hashlib.blake2b(digest_size=_DIGEST)
            _update(first, x)
            self.first = first.hexdigest()
        _update(self._h, x)
        if y is not None:
            _update(self._h, y)

    def hexdigest(self) -> str:
        return self._h.hexdigest()
