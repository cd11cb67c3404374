"""The feature cache: one backbone pass per data set, shared by every plugin."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from wrapcal.errors import DataError


@dataclass
class FeatureSet:
    """The backbone's features of one data set.

    Attributes:
        name: Which data set (``"train"``, ``"calibration"``, ``"unlabeled"``...).
        features: ``[N, D]`` features on the model's device.
        labels: ``[N]`` class indices, or ``None`` for unlabelled data.
        data: The data as the user gave it, for plugins that must stream batches
            through the whole network.
    """

    name: str
    features: torch.Tensor
    labels: torch.Tensor | None
    data: Any = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def require_labels(self, plugin: str) -> torch.Tensor:
        """The labels, or a clear error naming the plugin that needs them."""
        if self.labels is None:
            raise DataError(
                f"plugin {plugin} needs labels for the {self.name!r} data; pass (X, y) "
                "or a loader that yields (x, y) batches"
            )
        return self.labels


@dataclass
class FitData:
    """What ``WrappedModel.fit`` hands to every plugin.

    Attributes:
        sets: The cached feature sets by name (``train``, ``calibration``,
            ``unlabeled`` and any extra keyword the user passed to ``fit``).
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

    def require(self, name: str, plugin: str, why: str = "") -> FeatureSet:
        """The named set, or an error that says which ``fit`` argument is missing."""
        found = self.sets.get(name)
        if found is None or len(found) == 0:
            given = ", ".join(sorted(self.sets)) or "none"
            raise DataError(
                f"plugin {plugin} needs wrapped.fit({name}=...){': ' + why if why else ''}; "
                f"data given: {given}"
            )
        return found
