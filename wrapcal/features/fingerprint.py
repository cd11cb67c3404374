"""Fingerprints of backbones and data: what the feature cache is keyed by.

A backbone's fingerprint covers what determines its features:

- its structure (the module tree as ``repr`` shows it);
- every parameter and buffer, persistent or not (bytes, dtype, shape) and its device;
- its code: for every submodule, the class's qualified name and the source of its
  ``forward`` (:func:`inspect.getsource`; where the source is unavailable, the code
  object's bytecode, constants and names), and a ``forward`` set on the instance;
- what the user adds: any submodule with a method ``wrapcal_fingerprint()`` has what it
  returns (a ``str`` or ``bytes``) hashed in too. Define it where the features depend
  on something the above misses: a helper function ``forward`` calls, a global setting,
  a hook, a file read at run time. Change what it returns and the cache runs the
  backbone again::

      class Net(nn.Module):
          def wrapcal_fingerprint(self) -> str:
              return f"preprocess v3, {self.mode}"

So changed weights, a changed architecture, a changed ``forward`` or another device
never match. Forward hooks are not covered (their identity changes every run); cover
them with ``wrapcal_fingerprint``. The digest is recomputed only when a tensor or the
code changed since the last time (PyTorch counts in-place changes in
``tensor._version``; a replaced tensor has a new identity or address; a replaced class
or ``forward`` a new identity); ``wrapcal_fingerprint`` is called every time.

In-memory data (tensors, arrays, ``(X, y)`` pairs) are fingerprinted by their bytes;
streamed data (a ``DataLoader`` or ``Dataset``) by a hash of every batch as it is read,
which the cache compares after reading (see :mod:`wrapcal.features.memory_store`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
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
# The digest of a function's code, by the function (sources are read once per function).
_code_digests: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes (on the CPU), as a buffer hashlib can read without a copy."""
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    if flat.numel() == 0:
        return memoryview(b"")
    # .data: the array's own memoryview (numpy's stubs type the buffer protocol for 3.12+ only).
    return flat.view(torch.uint8).numpy().data


def _update(h: Any, tensor: torch.Tensor) -> None:
    h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(tensor_bytes(tensor))


def _code_object_bytes(code: Any) -> bytes:
    """Bytecode, constants (nested code objects recursively) and names of ``code``."""
    parts = [code.co_code, repr(code.co_names).encode(), repr(code.co_varnames).encode()]
    for const in code.co_consts:
        is_code = hasattr(const, "co_code")
        parts.append(_code_object_bytes(const) if is_code else repr(const).encode())
    return b"\0".join(parts)


def _function_code(function: Any) -> bytes:
    """What identifies a ``forward``'s code: its source, or else its code object."""
    target = getattr(function, "__func__", function)  # a bound method: its function
    try:
        cached = _code_digests.get(target)
    except TypeError:  # not weak-referenceable: computed every time
        cached = None
    if cached is not None:
        return cached
    try:
        text = inspect.getsource(target).encode()
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        # No code object either (a compiled or scripted callable): its type's name, not
        # its repr, which may hold an address that changes every run.
        kind = f"{type(target).__module__}.{type(target).__qualname__}".encode()
        text = _code_object_bytes(code) if code is not None else kind
    name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
    digest = hashlib.blake2b(name.encode() + b"\0" + text, digest_size=_DIGEST).digest()
    with contextlib.suppress(TypeError):  # not weak-referenceable: not kept
        _code_digests[target] = digest
    return digest


def _code_signature(backbone: nn.Module) -> tuple[Any, ...]:
    """Cheap identities of every submodule's class and ``forward``: what, if unchanged,
    lets the code digest be reused."""
    return tuple(
        (type(m), id(type(m).forward), id(vars(m).get("forward"))) for m in backbone.modules()
    )


def _hash_code(h: Any, backbone: nn.Module) -> None:
    for name, module in backbone.named_modules():
        cls = type(module)
        h.update(f"\0module {name}\0{cls.__module__}.{cls.__qualname__}\0".encode())
        h.update(_function_code(cls.forward))
        own = vars(module).get("forward")
        if own is not None:  # forward replaced on the instance
            h.update(b"\0instance forward\0" + _function_code(own))


def _hash_extra(h: Any, backbone: nn.Module) -> None:
    """What the user's ``wrapcal_fingerprint()`` methods return (see the module doc)."""
    for name, module in backbone.named_modules():
        extra = getattr(module, "wrapcal_fingerprint", None)
        if not callable(extra):
            continue
        value = extra()
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, bytes):
            raise TypeError(
                f"{type(module).__qualname__}.wrapcal_fingerprint() (module {name or 'root'!r}) "
                f"must return str or bytes; it returned {type(value).__name__}: return a "
                "string that changes whenever the features would"
            )
        h.update(f"\0extra {name}\0".encode() + value)


def _tensors(backbone: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The state dict's tensors and the buffers it leaves out (``persistent=False``)."""
    state = list(backbone.state_dict(keep_vars=True).items())
    named = {k for k, _ in state}
    extra = [
        (f"buffer:{k}", b) for k, b in backbone.named_buffers() if k not in named and b is not None
    ]
    return [(k, t) for k, t in state + extra if isinstance(t, torch.Tensor)]


def backbone_fingerprint(backbone: nn.Module) -> str:
    """A digest of the backbone's structure, weights, buffers, code and device, and of
    what its modules' ``wrapcal_fingerprint()`` return (see the module doc)."""
    state = _tensors(backbone)
    signature = (
        tuple((k, id(t), t._version, t.data_ptr(), t.device) for k, t in state),
        _code_signature(backbone),
    )
    extra = hashlib.blake2b(digest_size=_DIGEST)
    _hash_extra(extra, backbone)
    known = _known.get(backbone)
    if known is None or known[0] != signature:
        h = hashlib.blake2b(digest_size=_DIGEST)
        h.update(repr(backbone).encode())
        for name, tensor in state:
            h.update(f"\0{name}\0{tensor.device.type}\0".encode())
            _update(h, tensor)
        _hash_code(h, backbone)
        known = (signature, h.hexdigest())
        _known[backbone] = known
    combined = hashlib.blake2b(digest_size=_DIGEST)
    combined.update(known[1].encode() + extra.digest())
    return combined.hexdigest()


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
    tensors = []
    for part in parts:
        tensor = _as_tensor(part)
        if tensor is None:
            return None
        tensors.append(tensor)
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
