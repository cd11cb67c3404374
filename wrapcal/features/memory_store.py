"""The shared feature cache: the backbone runs about once per data set, for everything.

Every wrapped variant of one backbone, and ``wrapcal.evaluate`` over several of them,
ask this cache for the features of a data set; it keys them by the backbone's
fingerprint (structure, weights, device) and the data's, so the first call runs the
backbone and the others reuse its features. Variants whose plugins change the backbone
(``label_smoothing(scope="all")``) have other weights, hence their own entries.

It never serves stale features: changed weights, buffers or code (a class's ``forward``)
change the backbone's fingerprint (:mod:`wrapcal.features.fingerprint`, which a module
can extend with ``wrapcal_fingerprint()``), and data are fingerprinted by content.
In-memory data (tensors, arrays, ``(X, y)`` pairs) are hashed directly. A
``DataLoader`` or ``Dataset`` is read batch by batch: its first batch finds candidate
entries, and a candidate is used only after the whole stream, read again without the
backbone, hashed the same (a shuffling loader never matches).

The labels are always the user's. The data's fingerprint covers them, so a sound entry
holds the same labels; still, on every hit the entry's labels are compared with those the
data passed now yields (read with the inputs, without the backbone: slices of an
``(X, y)`` pair, the stream's digest pass for a loader), and an entry that disagrees (a
disk entry edited along with its digests, say) is dropped with a warning and the
backbone runs again. Comparing, rather than never storing labels, keeps a disagreement
loud: it means the store cannot be trusted, not just its labels.

The cache holds at most ``max_bytes`` of features (least recently used evicted first;
default 2 GiB or ``$WRAPCAL_FEATURE_CACHE_BYTES``). Turn it off with
``wrapcal.features.memory_store.CACHE.enabled = False``, ``$WRAPCAL_FEATURE_CACHE=0``, or
``cache=False`` in ``fit`` and ``evaluate``.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wrapcal.data import iter_batches
from wrapcal.features.extract import FeatureSet, FeatureSink, MemorySink, extract
from wrapcal.features.fingerprint import StreamHash, backbone_fingerprint, memory_fingerprint
from wrapcal.features.store import CacheOption, FeatureStore

__all__ = ["CACHE", "FeatureCache", "cached_features"]


def _env_bytes() -> int:
    try:
        return int(os.environ.get("WRAPCAL_FEATURE_CACHE_BYTES", 2 << 30))
    except ValueError:
        return 2 << 30


@dataclass
class _Entry:
    features: torch.Tensor
    labels: torch.Tensor | None
    input_shape: tuple[int, ...] | None
    probe: str | None  # the first batch's digest, for streamed data

    @property
    def nbytes(self) -> int:
        size = self.features.numel() * self.features.element_size()
        if self.labels is not None:
            size += self.labels.numel() * self.labels.element_size()
        return size


class FeatureCache:
    """A bounded, least-recently-used store of backbone features in memory: a
    :class:`~wrapcal.features.store.FeatureStore`.

    Attributes:
        max_bytes: The most feature bytes kept (an entry larger than this is not kept).
        enabled: Whether lookups and stores happen at all.
        hits: Lookups answered from the cache.
        misses: Backbone passes made because nothing matched.
    """

    def __init__(self, max_bytes: int | None = None, enabled: bool | None = None) -> None:
        self.max_bytes = _env_bytes() if max_bytes is None else int(max_bytes)
        if enabled is None:
            enabled = os.environ.get("WRAPCAL_FEATURE_CACHE", "1").strip() not in ("0", "")
        self.enabled = enabled
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of features held now."""
        return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        """Forget every entry (the counters too)."""
        self._entries.clear()
        self.hits = self.misses = 0

    def _get(self, key: tuple[str, str]) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def _put(self, key: tuple[str, str], entry: _Entry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    # --- the FeatureStore protocol (shared with features.disk_store.DiskCache) -------------

    def lookup(
        self, model_key: str, data_key: str, name: str, data: Any, device: torch.device
    ) -> FeatureSet | None:
        """The cached features of this backbone and data, or ``None``."""
        entry = self._get((model_key, data_key))
        if entry is None:
            return None
        labels = None if entry.labels is None else entry.labels.to(device)
        return FeatureSet(name, entry.features.to(device), labels, data, entry.input_shape)

    def candidates(self, model_key: str, probe: str) -> list[str]:
        """Data keys of entries of this backbone whose first batch is ``probe``."""
        return [k[1] for k, e in self._entries.items() if k[0] == model_key and e.probe == probe]

    def forget(self, model_key: str, data_key: str) -> None:
        """Drop the entry of this backbone and data, if there is one."""
        self._entries.pop((model_key, data_key), None)

    def new_sink(self, model_key: str) -> MemorySink:
        """Where a pass's features go: memory."""
        return MemorySink()

    def store(
        self,
        model_key: str,
        data_key: str,
        feature_set: FeatureSet,
        probe: str | None,
        sink: FeatureSink,
    ) -> FeatureSet:
        """Keep a computed feature set (if it fits the budget); return it."""
        if not isinstance(feature_set.features, torch.Tensor):  # a MemorySink's: in memory
            raise TypeError("the memory store keeps features in memory only (a torch.Tensor)")
        entry = _Entry(feature_set.features, feature_set.labels, feature_set.input_shape, probe)
        self._put((model_key, data_key), entry)
        return feature_set

    def discard(self, sink: FeatureSink) -> None:
        """Nothing to clean up for a failed pass in memory."""


#: The process-wide cache that ``fit`` and ``evaluate`` share.
CACHE = FeatureCache()


def _first_batch_digest(data: Any, batch_size: int) -> str | None:
    stream = StreamHash()
    for x, y in iter_batches(data, batch_size):
        stream.update(x, y)
        break
    return stream.first


def _stream_digest(data: Any, batch_size: int) -> tuple[str, torch.Tensor | None]:
    """The stream's digest, and its labels (``None`` if a batch has none)."""
    stream = StreamHash()
    labels: list[torch.Tensor | None] = []
    for x, y in iter_batches(data, batch_size):
        stream.update(x, y)
        labels.append(y)
    return stream.hexdigest(), _joined(labels)


def _joined(labels: list[torch.Tensor | None]) -> torch.Tensor | None:
    if not labels or any(y is None for y in labels):
        return None
    return torch.cat([torch.as_tensor(y).reshape(-1).to("cpu", torch.int64) for y in labels])


def _labels_of(data: Any, batch_size: int) -> torch.Tensor | None:
    """The labels of data held in memory (slices: no copy of the inputs)."""
    return _joined([y for _, y in iter_batches(data, batch_size)])


def _labels_agree(cached: torch.Tensor | None, own: torch.Tensor | None) -> bool:
    if cached is None or own is None:
        return cached is None and own is None
    return cached.shape == own.shape and torch.equal(cached.to("cpu", torch.int64), own)


def cached_features(
    backbone: nn.Module,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    data: Any,
    name: str,
    *,
    num_features: int,
    num_classes: int,
    batch_size: int = 256,
    progress: bool = True,
    cache: CacheOption = None,
) -> tuple[FeatureSet, bool]:
    """The backbone's features of ``data``, from the cache when it holds them.

    Args:
        backbone: Inputs -> features ``[B, D]``.
        prepare: Checks a batch and moves it to the model's device and dtype.
        data: Anything :func:`wrapcal.data.iter_batches` reads.
        name: The data set's name, for messages and the progress bar.
        num_features: ``D``, checked on every batch.
        num_classes: Labels must lie in ``[0, num_classes)``.
        batch_size: Batch size for data that is not already batched.
        progress: Show a progress bar.
        cache: The :class:`~wrapcal.features.store.FeatureStore`: ``None`` or ``True``
            for :data:`CACHE` (memory), a :class:`~wrapcal.features.disk_store.DiskCache`
            for a directory, ``False`` for none.

    Returns:
        The :class:`~wrapcal.features.extract.FeatureSet` and whether the backbone ran.
    """
    device = next((t.device for t in backbone.state_dict().values()), torch.device("cpu"))

    def compute(stream: StreamHash | None = None, sink: FeatureSink | None = None) -> FeatureSet:
        return extract(
            backbone,
            prepare,
            data,
            name,
            num_features=num_features,
            num_classes=num_classes,
            batch_size=batch_size,
            progress=progress,
            stream=stream,
            sink=sink,
        )

    if cache is False:
        return compute(), True
    store: FeatureStore = CACHE if cache is None or cache is True else cache
    if not store.enabled:
        return compute(), True
    model_key = backbone_fingerprint(backbone)
    data_key = memory_fingerprint(data)
    probe = None
    own_labels: torch.Tensor | None = None
    if data_key is None:
        probe = _first_batch_digest(data, batch_size)
        if probe is not None and store.candidates(model_key, probe):
            # Reading only, no backbone: the key, and the labels to check a hit against.
            data_key, own_labels = _stream_digest(data, batch_size)
    if data_key is not None:
        found = store.lookup(model_key, data_key, name, data, device)
        if found is not None:
            if probe is None:  # in memory: its labels are slices away
                own_labels = _labels_of(data, batch_size)
            if _labels_agree(found.labels, own_labels):
                store.hits += 1
                return found, False
            warnings.warn(
                f"the feature cache's entry for the {name!r} data holds labels other than "
                "the data's (edited?): dropped, the backbone runs again; clear the cache "
                "if this repeats",
                RuntimeWarning,
                stacklevel=2,
            )
            forget = getattr(store, "forget", None)  # a store written before forget()
            if forget is not None:
                forget(model_key, data_key)
    stream = StreamHash() if data_key is None else None
    sink = store.new_sink(model_key)
    try:
        computed = compute(stream, sink)
    except BaseException:
        store.discard(sink)
        raise
    store.misses += 1
    if data_key is not None:
        key = data_key
    else:
        assert stream is not None  # made above for data without a key
        key = stream.hexdigest()
    return store.store(
        model_key, key, computed, probe or (stream.first if stream else None), sink
    ), True
