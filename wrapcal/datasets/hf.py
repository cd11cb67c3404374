"""Hugging Face ``datasets`` image data: saved directories and in-memory datasets.

``datasets`` is optional: it is imported only when such data is read. A data set saved
with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` is read with
``datasets.load_from_disk`` (local files only, nothing is downloaded). The image
column is the first ``datasets.Image`` feature (else a column named ``image``,
``img``...), the label column the first ``ClassLabel`` feature (whose names are the
class names, in label order) or a column named ``label``, ``labels``...
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["HFImages", "find_columns", "is_saved_hf_dataset", "load_hf_directory"]

_IMAGE_NAMES = ("image", "img", "images", "pixel_values", "picture")
_LABEL_NAMES = ("label", "labels", "fine_label", "target", "targets", "y")


def is_saved_hf_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``save_to_disk``."""
    p = Path(path)
    return p.is_dir() and (
        (p / "dataset_dict.json").is_file()
        or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())
    )


def find_columns(dataset: Any) -> tuple[str, str | None, list[str] | None]:
    """The image column, the label column (or ``None``) and the class names (or
    ``None``) of a Hugging Face ``Dataset``.

    Raises:
        ValueError: No image column; the message lists the columns.
    """
    import datasets

    features = dataset.features
    columns = list(features)
    image = next((c for c in columns if isinstance(features[c], datasets.Image)), None)
    image = image or next((c for c in _IMAGE_NAMES if c in columns), None)
    if image is None:
        raise ValueError(
            f"no image column among {', '.join(columns)}: expected a datasets.Image feature "
            f"or a column named {', '.join(_IMAGE_NAMES)}"
        )
    label = next((c for c in columns if isinstance(features[c], datasets.ClassLabel)), None)
    label = label or next((c for c in _LABEL_NAMES if c in columns), None)
    names = None
    if label is not None and isinstance(features[label], datasets.ClassLabel):
        names = list(features[label].names)
    return image, label, names


class HFImages(Dataset):
    """A Hugging Face ``Dataset`` of images as a torch ``Dataset`` of ``(x, label)``
    (or ``x`` when ``label_column`` is ``None``).

    Args:
        dataset: The Hugging Face ``Dataset``.
        transform: One decoded image (PIL) -> a ``[C, H, W]`` tensor.
        image_column: The image column.
        label_column: The label column (integer class indices), or ``None``.
        class_names: The class names in label order, when known.
    """

    def __init__(
        self,
        dataset: Any,
        transform: Callable[[Any], torch.Tensor],
        image_column: str,
        label_column: str | None,
        class_names: list[str] | None = None,
    ) -> None:
        self.dataset, self.transform = dataset, transform
        self.image_column, self.label_column = image_column, label_column
        self.classes = class_names
        self._labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def targets(self) -> list[int] | None:
        """Every label, read from the label column alone (no image is decoded)."""
        if self.label_column is None:
            return None
        if self._labels is None:
            self._labels = [int(v) for v in self.dataset[self.label_column]]
        return self._labels

    def __getitem__(self, i: int) -> Any:
        row = self.dataset[int(i)]
        x = self.transform(row[self.image_column])
        if self.label_column is None:
            return x
        return x, int(row[self.label_column])


def load_hf_directory(path: str | os.PathLike, split: str | None, strict: bool = True) -> Any:
    """The ``Dataset`` saved at ``path``; for a ``DatasetDict``, its ``split`` (or, unless
    ``strict``, its only split when it has no ``split``).

    Raises:
        ValueError: ``datasets`` is not installed, or the split is missing (the message
            lists the splits).
    """
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{os.fspath(path)} is a Hugging Face dataset directory: install the "
            "'datasets' package to read it (pip install datasets)"
        ) from None
    loaded = datasets.load_from_disk(os.fspath(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded and not strict and len(loaded) == 1:
            return next(iter(loaded.values()))
        if split not in loaded:
            raise ValueError(
                f"{os.fspath(path)} has no split {split!r}; it has {', '.join(loaded)}"
            )
        loaded = loaded[split]
    return loaded
