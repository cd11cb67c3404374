"""Data in, tensors out: loaders, datasets and ``(X, y)`` pairs.

Everything that takes data accepts:

* a ``torch.utils.data.DataLoader`` yielding ``(x, y)`` pairs or bare ``x`` batches,
* a ``torch.utils.data.Dataset`` whose items are ``(x, y)``, ``x`` or a dict with the
  inputs under ``image``/``pixel_values``/... and the labels under ``label``/...,
* a Hugging Face ``datasets.Dataset`` whose transform gives such items
  (``ds.with_transform(fn)``: PIL images -> normalised tensors),
* an ``(X, y)`` pair of tensors or numpy arrays, or a bare ``X`` (unlabelled data).

Inputs must already be what the model takes (float tensors, normalised as the model
expects, channels first); labels are integer class indices. Images as they come from
PIL and most loaders (``uint8``, channels last ``[N, H, W, C]``) are refused with an
error that names the fix (:func:`check_inputs`, :func:`layout_problem`). Readers of
image files and the embedded digits live in :mod:`wrapcal.datasets`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, TypeAlias, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from wrapcal.errors import DataError
from wrapcal.plugin.validation import check_labels

Batch = tuple[torch.Tensor, "torch.Tensor | None"]


class MapStyleData(Protocol):
    """A map-style data set read by index: a Hugging Face ``datasets.Dataset`` (with a
    transform), or anything else with ``len`` and integer indexing."""

    def __len__(self) -> int: ...

    # Any: an item is whatever the data set holds (a pair, a tensor, a dict of fields).
    def __getitem__(self, index: int, /) -> Any: ...


#: A tensor or an array: one batch of inputs, a set of features, labels.
ArrayLike: TypeAlias = torch.Tensor | np.ndarray
#: Everything :func:`iter_batches` reads: a loader, a data set, an ``(X, y)`` pair of
#: tensors or arrays, or a bare ``X`` (unlabelled).
DataSource: TypeAlias = (
    DataLoader[Any] | Dataset[Any] | MapStyleData | ArrayLike | tuple[ArrayLike, ArrayLike]
)


class HasModules(Protocol):
    """A model whose layers can be listed: an ``nn.Module``, or a wrapped model as the
    fit loop sees it (:class:`wrapcal.model.fitting.Fittable`)."""

    def modules(self) -> Iterator[nn.Module]: ...


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise DataError(
        f"{what} must be a torch.Tensor or numpy array, got {type(value).__name__}; pass "
        "a DataLoader, a Dataset, or an (X, y) pair of tensors or arrays"
    )


def model_channels(model: HasModules) -> int | None:
    """The number of channels a model takes in dim 1, when it can be told: what a
    :class:`~wrapcal.WrappedModel` knows of its inputs (``input_shape``, from ``fit`` or
    its adapter), else the ``in_channels`` of its first 2-D convolution (a ViT's patch
    embedding is one)."""
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, tuple) and len(shape) == 3:
        return int(shape[0])
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else int(conv.in_channels)


def _may_be_channels_last(x: torch.Tensor) -> bool:
    """Images ``[N, H, W, C]`` with one or three channels, not also ``[N, C, H, W]``: the
    cheap test that comes before asking the model what it takes."""
    return x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] != x.shape[-1]


def _channels_last(x: torch.Tensor, model: HasModules | None) -> int | None:
    """The model's channels when ``x`` is that many channels last and not first:
    then the model cannot take ``x`` as it is, and the permute is the fix."""
    if model is None or not _may_be_channels_last(x):
        return None
    channels = model_channels(model)
    return channels if channels == x.shape[-1] else None


_PERMUTE = "pass x.permute(0, 3, 1, 2) (a numpy array: x.transpose(0, 3, 1, 2))"


def _shape(x: torch.Tensor) -> str:
    """``(N, 32, 32, 3)``: the shape of every batch of a set, whatever this one's size."""
    return f"(N, {', '.join(map(str, x.shape[1:]))})"


def _dtype_message(x: torch.Tensor, channels: int | None) -> str:
    shape = _shape(x)
    if x.dtype == torch.uint8:
        text = (
            f"inputs have dtype torch.uint8: images of shape {shape} with pixels 0..255? "
            "The model takes float tensors: divide by 255 and normalise as the model "
            "expects, x.float() / 255 then (x - mean) / std"
        )
    else:
        text = (
            f"inputs have dtype {x.dtype}; the model takes float tensors. Convert and "
            "normalise them as the model expects, e.g. images.float() / 255 then "
            "(x - mean) / std"
        )
    if channels is not None:
        text += f"; they are also channels last and the model takes [N, {channels}, H, W]: "
        text += _PERMUTE.removeprefix("pass ")
    elif _may_be_channels_last(x) and x.shape[1] not in (1, 3, 4):
        # The model is not known here: a hint, on a batch refused anyway.
        text += f"; if they are images [N, H, W, C], also permute them: {_PERMUTE}"
    return text


def check_inputs(x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
    """Refuse inputs the model cannot take as they are, naming the fix.

    Args:
        x: A batch.
        model: The model that takes it, when known: images channels last ``[N, H, W, C]``
            with the one or three channels that the model takes in dim 1 are then
            refused (an input the model takes is never refused: the model is asked only
            when dim 1 is not the channels).

    Raises:
        DataError: Integer inputs (``uint8`` images: divide by 255 and normalise), no
            batch dimension, or images channels last (pass ``x.permute(0, 3, 1, 2)``).
    """
    channels = _channels_last(x, model)
    if not torch.is_floating_point(x):
        raise DataError(_dtype_message(x, channels))
    if x.ndim < 2:
        raise DataError(
            f"inputs have shape {tuple(x.shape)}; expected a batch [N, ...] with N first"
        )
    if channels is not None:
        raise DataError(_layout_message(x, channels))
    return x


def _layout_message(x: torch.Tensor, channels: int) -> str:
    return (
        f"got images of shape {_shape(x)}: channels last? The model takes "
        f"[N, {channels}, H, W] (channels first): {_PERMUTE}"
    )


def first_inputs(data: Any) -> torch.Tensor | None:
    """The first inputs of a data set as they reach the model (unchecked), to say what is
    wrong with them; ``None`` when they cannot be read."""
    try:
        if isinstance(data, (torch.Tensor, np.ndarray)):
            return _as_tensor(data[:2], "X")
        if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
            return _as_tensor(data[0][:2], "X")
        if isinstance(data, DataLoader):
            return _split_item(next(iter(data)))[0]
        if isinstance(data, Dataset) or _is_map_style(data):
            return _split_item(_collate([data[0]]))[0]
    except Exception:  # a diagnosis must not hide the error being diagnosed
        return None
    return None


def layout_problem(data: Any, model: HasModules) -> str | None:
    """What is wrong with a data set's images for ``model`` when they are ``uint8`` or
    channels last (the message of :func:`check_inputs`), else ``None``: for turning a
    failure deep in the network into wrapcal's error."""
    x = first_inputs(data)
    if x is None:
        return None
    channels = _channels_last(x, model)
    if not torch.is_floating_point(x):
        return _dtype_message(x, channels)
    return None if channels is None else _layout_message(x, channels)


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


def iter_batches(data: DataSource, batch_size: int = 256) -> Iterator[Batch]:
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
        # DataLoader reads any map-style set (len and integer indexing), typed or not.
        dataset = cast("Dataset[Any]", data)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate)
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
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    unlabelled = 0
    for x, y in iter_batches(data, batch_size):
        xs.append(x)
        if y is None:
            unlabelled += 1
        else:
            ys.append(y)
    if not xs:
        raise DataError("the data set is empty")
    if unlabelled and ys:
        raise DataError("some batches have labels and some do not")
    return torch.cat(xs), (torch.cat(ys) if ys else None)
