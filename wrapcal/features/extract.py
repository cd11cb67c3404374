"""Cached backbone features: what ``fit`` hands to every plugin.

``extract`` runs the backbone once over a data set (eval mode, no gradients) and keeps
the features ``[N, D]`` with the labels; ``FitData`` holds one such set per ``fit``
argument that some plugin reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from wrapcal import distributed
from wrapcal.data import iter_batches, num_samples
from wrapcal.errors import DataError
from wrapcal.features.fingerprint import StreamHash
from wrapcal.plugin.torch_helpers import check_features, in_mode
from wrapcal.plugin.validation import check_labels

if TYPE_CHECKING:
    from wrapcal.features.disk_arrays import DiskFeatures

__all__ = ["FeatureSet", "FeatureSink", "FitData", "MemorySink", "all_finite", "extract"]


@dataclass
class FeatureSet:
    """The backbone's features of one data set.

    Attributes:
        name: Which data set (``"train"``, ``"calibration"``, ``"unlabeled"``...).
        features: ``[N, D]`` features on the model's device (a :class:`DiskFeatures`
            view, read a chunk at a time, for a set cached on disk).
        labels: ``[N]`` class indices, or ``None`` for unlabelled data.
        data: The data as the user gave it, for plugins that stream batches through
            the whole network (``None`` when fitted from features).
        input_shape: The shape of one input (``None`` when fitted from features).
        rows_per_rank: Under ``torch.distributed``, when the set is kept sharded: how
            many rows each rank holds (``features`` are this rank's, in rank order).
            ``None`` when ``features`` hold the whole set.
    """

    name: str
    features: torch.Tensor | DiskFeatures
    labels: torch.Tensor | None
    data: Any = None
    input_shape: tuple[int, ...] | None = None
    rows_per_rank: tuple[int, ...] | None = None

    def __len__(self) -> int:
        """The rows held here (this rank's shard when :attr:`sharded`)."""
        return self.features.shape[0]

    # --- sharded sets (torch.distributed) ------------------------------------------------
    # Plugins that declare ``tags.fits_from_shards`` may be handed a shard; they combine
    # over the ranks with these, which are identities for a whole set.

    @property
    def sharded(self) -> bool:
        """Whether this is one rank's shard of a set split across the ranks."""
        return self.rows_per_rank is not None

    @property
    def total(self) -> int:
        """Rows of the whole set, over every rank."""
        return len(self) if self.rows_per_rank is None else sum(self.rows_per_rank)

    @property
    def offset(self) -> int:
        """Index in the whole set of this shard's first row (0 for a whole set)."""
        return 0 if self.rows_per_rank is None else sum(self.rows_per_rank[: distributed.rank()])

    def sum_over_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks when the set is sharded, else itself."""
        return distributed.all_reduce(tensor, "sum") if self.sharded else tensor

    def min_over_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise minimum over the ranks when the set is sharded, else itself."""
        return distributed.all_reduce(tensor, "min") if self.sharded else tensor

    def max_over_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over the ranks when the set is sharded, else itself."""
        return distributed.all_reduce(tensor, "max") if self.sharded else tensor

    def cat_over_shards(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``rows`` concatenated in rank order when the set is sharded,
        else ``rows``."""
        if not self.sharded:
            return rows
        gathered = distributed.gather_rows(rows)
        assert gathered is not None
        return gathered

    def batches(self, rows: int = 65536) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(features, labels)`` in chunks of ``rows``, in order: statistics accumulated
        chunk by chunk stay in bounded memory, whatever holds the features (memory or a
        memory-mapped file)."""
        for start in range(0, len(self), rows):
            labels = None if self.labels is None else self.labels[start : start + rows]
            yield self.features[start : start + rows], labels

    def require_labels(self, plugin: str, min_classes: int = 2) -> torch.Tensor:
        """The labels, or a clear error naming the plugin that needs them.

        Args:
            plugin: Who needs them, for the message.
            min_classes: Labelled fits need at least this many distinct classes: a head
                retrained on one class, or a calibrator fitted on it, learns nonsense.
        """
        if self.labels is None:
            raise DataError(
                f"plugin {plugin} needs labels for the {self.name!r} data; pass (X, y) "
                "or a loader that yields (x, y) batches"
            )
        present = self.classes_present()
        if present < min_classes:
            raise DataError(
                f"plugin {plugin}: the {self.name!r} labels hold {present} class"
                f"{'' if present == 1 else 'es'}; it needs at least {min_classes} (a fit on one "
                "class learns nothing about the others): pass data with every class"
            )
        return self.labels

    def classes_present(self) -> int:
        """Distinct labels in the whole set (over every rank's shard when sharded: data
        sorted by class gives shards of one class each); 0 for unlabelled data."""
        if self.labels is None:
            return 0
        if not self.sharded:
            return int(torch.unique(self.labels).numel())
        labels = self.labels.reshape(-1).long().cpu()
        top = torch.tensor([int(labels.max()) if len(labels) else -1], dtype=torch.float64)
        classes = int(self.max_over_shards(top)) + 1
        counts = torch.bincount(labels, minlength=classes)[:classes].to(torch.float64)
        return int((self.sum_over_shards(counts) > 0).sum())


@dataclass
class FitData:
    """What ``WrappedModel.fit`` hands to every plugin.

    Attributes:
        sets: The cached feature sets by name (``train``, ``calibration``,
            ``unlabeled`` and any extra keyword the user passed to ``fit``), for the
            sets some plugin reads.
        options: Fit-wide options: ``batch_size``, ``progress``, ``seed``.
    """

    sets: dict[str, FeatureSet] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def train(self) -> FeatureSet | None:
        return self.sets.get("train")

    @property
    def calibration(self) -> FeatureSet | None:
        return self.sets.get("calibration")

    @property
    def unlabeled(self) -> FeatureSet | None:
        return self.sets.get("unlabeled")

    @property
    def seed(self) -> int:
        """The seed given to ``fit``."""
        return int(self.options.get("seed", 0))

    @property
    def progress(self) -> bool:
        """Whether ``fit`` shows progress bars."""
        return bool(self.options.get("progress", True))

    def require(self, name: str, plugin: str, why: str = "") -> FeatureSet:
        """The named set, or an error that says which ``fit`` argument is missing."""
        found = self.sets.get(name)
        if found is None or found.total == 0:
            given = ", ".join(sorted(self.sets)) or "none"
            raise DataError(
                f"plugin {plugin} needs wrapped.fit({name}=...){': ' + why if why else ''}; "
                f"data given: {given}"
            )
        return found

    def first(self, names: tuple[str, ...], plugin: str, why: str = "") -> FeatureSet:
        """The first of ``names`` that was given (``train``, falling back to
        ``calibration``, say), or an error naming them all."""
        for name in names:
            found = self.sets.get(name)
            if found is not None and found.total:
                return found
        wanted = " or ".join(f"{n}=..." for n in names)
        given = ", ".join(sorted(self.sets)) or "none"
        raise DataError(
            f"plugin {plugin} needs wrapped.fit({wanted}){': ' + why if why else ''}; "
            f"data given: {given}"
        )


def all_finite(values: torch.Tensor, rows: int = 65536) -> bool:
    """Whether every value is finite, checked in chunks of rows (no N x D temporary)."""
    return all(
        bool(torch.isfinite(values[i : i + rows]).all()) for i in range(0, len(values), rows)
    )


class FeatureSink(Protocol):
    """Where one backbone pass (:func:`extract`) writes its features, batch by batch: a
    list in memory (:class:`MemorySink`), a file (the disk store's), handed out by a
    :class:`~wrapcal.features.store.FeatureStore`."""

    def append(self, features: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Add one batch's features ``[B, D]`` (and labels ``[B]``)."""
        ...

    def finish(self) -> torch.Tensor | DiskFeatures:
        """Every row written, as the :class:`FeatureSet` will hold them."""
        ...


class MemorySink:
    """Collects a data set's features in memory (the default of :func:`extract`): a
    :class:`FeatureSink`."""

    def __init__(self) -> None:
        self.features: list[torch.Tensor] = []

    def append(self, features: torch.Tensor, labels: torch.Tensor | None) -> None:
        self.features.append(features)

    def finish(self) -> torch.Tensor:
        return torch.cat(self.features)


def extract(
    backbone: nn.Module,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    data: Any,
    name: str,
    *,
    num_features: int,
    num_classes: int,
    batch_size: int = 256,
    progress: bool = True,
    stream: StreamHash | None = None,
    sink: FeatureSink | None = None,
) -> FeatureSet:
    """Run the backbone once over ``data`` (eval mode, no gradients).

    Args:
        backbone: Inputs -> features ``[B, D]``.
        prepare: Checks a batch and moves it to the model's device and dtype.
        data: Anything :func:`wrapcal.data.iter_batches` reads.
        name: The data set's name, for messages and the progress bar.
        num_features: ``D``, checked on every batch.
        num_classes: Labels must lie in ``[0, num_classes)``.
        batch_size: Batch size for data that is not already batched.
        progress: Show a progress bar.
        stream: Hashes every batch as it is read (the feature cache's key for loaders).
        sink: The :class:`FeatureSink` the features go to, batch by batch: memory by
            default, a file for sets larger than memory (the disk store's).

    Raises:
        DataError: Empty data, bad labels, or NaN/inf features.
    """
    sink = MemorySink() if sink is None else sink
    labels: list[torch.Tensor | None] = []
    rows, input_shape = 0, None
    bar = tqdm(total=num_samples(data), desc=f"features: {name}", unit="img", disable=not progress)
    try:
        with in_mode(backbone, False), torch.no_grad():
            for x, y in iter_batches(data, batch_size):
                input_shape = input_shape or tuple(x.shape[1:])
                if stream is not None:
                    stream.update(x, y)
                features = check_features(backbone(prepare(x)), num_features)
                if not all_finite(features):
                    raise DataError(
                        f"the backbone produced NaN or inf features on the {name!r} data; "
                        "check the inputs (NaN pixels?) and the model's weights"
                    )
                sink.append(features, y)
                labels.append(y)
                rows += x.shape[0]
                bar.update(x.shape[0])
    finally:
        bar.close()
    if not rows:
        raise DataError(f"the {name!r} data set is empty")
    stored = sink.finish()
    known = [y for y in labels if y is not None]
    if len(known) < len(labels):
        y_all = None
    else:
        y_all = check_labels(torch.cat(known), rows, num_classes).to(stored.device)
    return FeatureSet(name, stored, y_all, data, input_shape)
