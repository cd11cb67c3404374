"""A data set read from a spec, and the few operations the command line needs on it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset

from wrapcal.datasets.pixels import Normaliser

__all__ = ["InputsOnly", "Loaded", "concat_inputs"]


@dataclass
class Loaded:
    """A data set read from a spec.

    Attributes:
        data: ``(X, y)`` tensors, a bare ``X`` or a ``Dataset`` (items ``(x, y)``/``x``).
        n: Number of images.
        shape: ``(C, H, W)`` of one image as the model gets it.
        labels: Every label when known without decoding images (``None`` otherwise).
        class_names: The class names in label order, when the source says them.
        kind: ``digits``, ``noise``, ``npz``, ``idx``, ``folder`` or ``hf``.
        normalise: The normalisation applied.
    """

    data: Any
    n: int
    shape: tuple[int, int, int]
    labels: torch.Tensor | None
    class_names: list[str] | None
    kind: str
    normalise: Normaliser

    @property
    def num_classes(self) -> int | None:
        """The number of classes the source declares, else the largest label + 1."""
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is not None and len(self.labels):
            return int(self.labels.max()) + 1
        return None

    def relabel(self, mapping: Sequence[int]) -> Loaded:
        """The same set with label ``i`` renumbered ``mapping[i]``."""
        table = torch.as_tensor(list(mapping), dtype=torch.long)
        labels = None if self.labels is None else table[self.labels]
        if isinstance(self.data, tuple):
            data: Any = (self.data[0], table[self.data[1]])
        else:
            data = _Relabelled(self.data, table)
        return replace(self, data=data, labels=labels, class_names=None)


class _Relabelled(Dataset):
    def __init__(self, dataset: Dataset, table: torch.Tensor) -> None:
        self.dataset, self.table = dataset, table

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.dataset[i]
        return x, int(self.table[int(y)])


class InputsOnly(Dataset):
    """Items ``(x, y)`` -> ``x``: labelled data used as unlabelled."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.dataset[i]
        return item[0] if isinstance(item, (tuple, list)) else item


def concat_inputs(parts: Sequence[Loaded]) -> Any:
    """Several unlabelled sets as one: tensors concatenated, else a ``ConcatDataset``."""
    if all(isinstance(p.data, torch.Tensor) for p in parts):
        return torch.cat([p.data for p in parts])
    return ConcatDataset(
        [InputsOnly(p.data) if isinstance(p.data, Dataset) else p.data for p in parts]
    )
