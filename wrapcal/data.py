"""Data in, tensors out: loaders, datasets and ``(X, y)`` pairs.

Everything that takes data accepts:

* a ``torch.utils.data.DataLoader`` yielding ``(x, y)`` pairs or bare ``x`` batches,
* a ``torch.utils.data.Dataset`` whose items are ``(x, y)``, ``x`` or a dict with the
  inputs under ``image``/``pixel_values``/... and the labels under ``label``/...,
* a Hugging Face ``datasets.Dataset`` whose transform gives such items
  (``ds.with_transform(fn)``: PIL images -> normalised tensors),
* an ``(X, y)`` pair of tensors or numpy arrays, or a bare ``X`` (unlabelled data).

Inputs must already be what the model takes (float tensors, normalised as the model
expects); labels are integer class indices. Readers of image files and the embedded
digits live in :mod:`wrapcal.datasets`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from wrapcal.errors import DataError
from wrapcal.plugin.validation import check_labels

Batch = tuple[torch.Tensor, "torch.Tensor | None"]


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise DataError(
        f"{what} must be a torch.Tensor or numpy array, got {type(value).__name__}; pass "
        "a DataLoader, a Dataset, or an (X, y) pair of tensors or arrays"
    )


def check_inputs(x: torch.Tensor) -> torch.Tensor:
    """Refuse inputs the model cannot take as they are (integer images, say)."""
    if not torch.is_floating_point(x):
        raise DataError(
            f"inputs have dtype {x.dtype}; the model takes float tensors. Convert and "
            "normalise them as the model expects, e.g. images.float() / 255 then "
            "(x - mean) / std"
        )
    if x.ndim < 2:
        raise DataError(
            f"inputs have shape {tuple(x.shape)}; expected a batch [N, ...] with N first"
        )
    return x


# Column names of the inputs and labels in dict items (Hugging Face rows, say).
_X_KEYS = ("image", "images", "img", "pixel_values", "input", "inputs", "x")
_Y_KEYS = ("label", "labels", "target", "targets", "y")


def _dict_keys(item: dict) -> tuple[Any, Any]:
    keys = set(item)
    x_key = next((k for k in _X_KEYS if k in keys), None)
    y_key = next((k for k in _Y_KEYS if k in keys), None)
    if x_key is None:
        raise DataError(
            f"cannot find the inputs in a dict with keys {sorted(keys, key=str)}; name them "
            f"one of {', '.join(_X_KEYS)}"
        )
    return x_key, y_key


def _row_tensor(value: Any, column: Any) -> torch.Tensor:
    if hasattr(value, "convert") and hasattr(value, "mode") and hasattr(value, "size"):
        raise DataError(
            f"column {column!r} holds PIL images; give the data set a transform that turns "
            "each into a normalised tensor, e.g. hf_dataset.with_transform(fn) or a "
            "torchvision transform"
        )
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def _collate(rows: list[Any]) -> Any:
    """Rows -> a batch. Dict rows (a Hugging Face dataset's) keep only the inputs and the
    labels, so other columns (file names, captions) never reach the collation."""
    if not rows or not isinstance(rows[0], dict):
        return default_collate(rows)
    x_key, y_key = _dict_keys(rows[0])
    x = torch.stack([_row_tensor(row[x_key], x_key) for row in rows])
    if y_key is None:
        return (x,)
    return x, torch.as_tensor([int(row[y_key]) for row in rows])


def _is_map_style(data: Any) -> bool:
    """A Hugging Face ``datasets.Dataset``: a Dataset in all but name (``len`` and
    integer indexing), recognised without importing ``datasets``."""
    return (
        type(data).__module__.split(".")[0] == "datasets"
        and hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and hasattr(data, "column_names")
    )


def _split_item(item: Any) -> Batch:
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return _as_tensor(item[0], "inputs"), _as_tensor(item[1], "labels")
        if len(item) == 1:
            return _as_tensor(item[0], "inputs"), None
        raise DataError(f"batches must be (x, y) or x; got a sequence of {len(item)} items")
    if isinstance(item, dict):
        x_key, y_key = _dict_keys(item)
        return _as_tensor(item[x_key], "inputs"), (
            _as_tensor(item[y_key], "labels") if y_key else None
        )
    return _as_tensor(item, "inputs"), None


def iter_batches(data: Any, batch_size: int = 256) -> Iterator[Batch]:
    """Yield ``(x, y)`` batches (``y`` is ``None`` for unlabelled data) from any input."""
    if data is None:
        raise DataError("no data given")
    if isinstance(data, DataLoader):
        for item in data:
            x, y = _split_item(item)
            yield check_inputs(x), y
        return
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
        x_all, y_all = _as_tensor(data[0], "X"), _as_tensor(data[1], "y")
        check_inputs(x_all)
        y_all = check_labels(y_all, x_all.shape[0])
        for start in range(0, x_all.shape[0], batch_size):
            yield x_all[start : start + batch_size], y_all[start : start + batch_size]
        return
    if isinstance(data, (torch.Tensor, np.ndarray)):
        x_all = check_inputs(_as_tensor(data, "X"))
        for start in range(0, x_all.shape[0], batch_size):
            yield x_all[start : start + batch_size], None
        return
    if isinstance(data, Dataset) or _is_map_style(data):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=_collate)
        yield from iter_batches(loader, batch_size)
        return
    raise DataError(
        f"cannot read data of type {type(data).__name__}; pass a DataLoader, a Dataset (or a "
        "Hugging Face dataset with a transform), an (X, y) pair of tensors or arrays, or a "
        "bare X for unlabelled data"
    )


def num_samples(data: Any) -> int | None:
    """The number of samples, when it is known without reading the data."""
    if isinstance(data, DataLoader):
        try:
            return len(data.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return len(data[0])
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return len(data)
    try:
        return len(data)
    except TypeError:
        return None


def to_tensors(data: Any, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read all of ``data`` into one ``(X, y)`` pair (``y`` is ``None`` if unlabelled)."""
    xs, ys = [], []
    for x, y in iter_batches(data, batch_size):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise DataError("the data set is empty")
    labelled = [y is not None for y in ys]
    if any(labelled) and not all(labelled):
        raise DataError("some batches have labels and some do not")
    return torch.cat(xs), (torch.cat(ys) if all(labelled) else None)
