"""The feature store protocol: where the backbone pass keeps and finds features.

:func:`wrapcal.features.memory_store.cached_features` asks a store for the features of a
backbone on a data set, and gives it what a backbone pass computed. Two stores implement
the protocol: :class:`~wrapcal.features.memory_store.FeatureCache` (memory, bounded,
shared in the process; :data:`~wrapcal.features.memory_store.CACHE`) and
:class:`~wrapcal.features.disk_store.DiskCache` (files in a directory, for data sets
larger than memory, reused across runs). Both key entries by the backbone's fingerprint
and the data's (:mod:`wrapcal.features.fingerprint`); a hit's labels are checked against
the data's own (:func:`~wrapcal.features.memory_store.cached_features`), and an entry that
disagrees is dropped (:meth:`FeatureStore.forget`).

A pass writes its rows into a :class:`~wrapcal.features.extract.FeatureSink` that the
store hands out (:meth:`FeatureStore.new_sink`): a list in memory, a file on disk. When the pass
completes, :meth:`FeatureStore.store` keeps it; when it fails,
:meth:`FeatureStore.discard` cleans up.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias

import torch

from wrapcal.features.extract import FeatureSet, FeatureSink

__all__ = ["CacheOption", "FeatureSink", "FeatureStore"]


class FeatureStore(Protocol):
    """A store of backbone features keyed by ``(model_key, data_key)``.

    Attributes:
        enabled: Whether lookups and stores happen at all.
        hits: Lookups answered from the store.
        misses: Backbone passes made because nothing matched.
    """

    enabled: bool
    hits: int
    misses: int

    def lookup(
        self, model_key: str, data_key: str, name: str, data: Any, device: torch.device
    ) -> FeatureSet | None:
        """The stored features of this backbone and data, on ``device``, or ``None``.

        Args:
            model_key: The backbone's fingerprint.
            data_key: The data's fingerprint.
            name: The data set's name, for the :class:`FeatureSet`.
            data: The data itself, kept in the :class:`FeatureSet`.
            device: Where the features go.
        """
        ...

    def candidates(self, model_key: str, probe: str) -> list[str]:
        """Data keys of entries of this backbone whose first batch hashed to ``probe``
        (streamed data is fingerprinted only when some entry may match)."""
        ...

    def forget(self, model_key: str, data_key: str) -> None:
        """Drop the entry of this backbone and data, if there is one (it failed a check
        the store could not make itself: its labels disagree with the data's)."""
        ...

    def new_sink(self, model_key: str) -> FeatureSink:
        """Where the next backbone pass of this backbone writes its rows."""
        ...

    def store(
        self,
        model_key: str,
        data_key: str,
        feature_set: FeatureSet,
        probe: str | None,
        sink: FeatureSink,
    ) -> FeatureSet:
        """Keep a completed pass (written into ``sink``) as the entry of this backbone
        and data; return the feature set to use."""
        ...

    def discard(self, sink: FeatureSink) -> None:
        """Clean up after a pass into ``sink`` that failed."""
        ...


#: What ``fit`` and ``evaluate`` take as ``cache``: a store, ``True`` or ``None`` for the
#: process-wide memory store, ``False`` for none (the backbone always runs).
CacheOption: TypeAlias = FeatureStore | bool | None
