"""Data in, tensors out: loaders, datasets and ``(X, y)`` pairs; the embedded default.

Everything that takes data accepts:

* a ``torch.utils.data.DataLoader`` yielding ``(x, y)`` pairs or bare ``x`` batches,
* a ``torch.utils.data.Dataset`` whose items are ``(x, y)`` or ``x``,
* an ``(X, y)`` pair of tensors or numpy arrays, or a bare ``X`` (unlabelled data).

Inputs must already be what the model takes (float tensors, normalised as the model
expects); labels are integer class indices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wrapcal.errors import DataError

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


def check_labels(y: torch.Tensor, n: int, num_classes: int | None = None) -> torch.Tensor:
    """Labels must be integer class indices ``[N]`` within ``[0, num_classes)``."""
    if y.ndim != 1:
        raise DataError(
            f"labels have shape {tuple(y.shape)}; expected class indices of shape [{n}] "
            "(not one-hot)"
        )
    if torch.is_floating_point(y) or y.dtype == torch.bool:
        raise DataError(f"labels have dtype {y.dtype}; expected integer class indices")
    if y.shape[0] != n:
        raise DataError(f"{n} inputs but {y.shape[0]} labels; give one label per input")
    if y.numel() and (int(y.min()) < 0 or (num_classes and int(y.max()) >= num_classes)):
        bound = f"[0, {num_classes})" if num_classes else "[0, K)"
        raise DataError(
            f"labels must be in {bound}; got min {int(y.min())}, max {int(y.max())}. "
            "Map them to class indices of the model's outputs"
        )
    return y.long()


def _split_item(item: Any) -> Batch:
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return _as_tensor(item[0], "inputs"), _as_tensor(item[1], "labels")
        if len(item) == 1:
            return _as_tensor(item[0], "inputs"), None
        raise DataError(f"batches must be (x, y) or x; got a sequence of {len(item)} items")
    if isinstance(item, dict):
        keys = set(item)
        x_key = next((k for k in ("image", "images", "input", "inputs", "x") if k in keys), None)
        y_key = next((k for k in ("label", "labels", "target", "targets", "y") if k in keys), None)
        if x_key is None:
            raise DataError(f"cannot find the inputs in a batch dict with keys {sorted(keys)}")
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
        check_labels(y_all, x_all.shape[0])
        for start in range(0, x_all.shape[0], batch_size):
            yield x_all[start : start + batch_size], y_all[start : start + batch_size]
        return
    if isinstance(data, (torch.Tensor, np.ndarray)):
        x_all = check_inputs(_as_tensor(data, "X"))
        for start in range(0, x_all.shape[0], batch_size):
            yield x_all[start : start + batch_size], None
        return
    if isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        yield from iter_batches(loader, batch_size)
        return
    raise DataError(
        f"cannot read data of type {type(data).__name__}; pass a DataLoader, a Dataset, an "
        "(X, y) pair of tensors or arrays, or a bare X for unlabelled data"
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


# --- the embedded default ---------------------------------------------------------------

#: Mean and standard deviation used to normalise the digits images.
DIGITS_MEAN, DIGITS_STD = 0.2, 0.3


@dataclass
class DigitsData:
    """scikit-learn's bundled digits as 3x32x32 float tensors, split once and for all.

    Attributes:
        train: ``(X, y)`` to train or retrain on (1000 images).
        calibration: ``(X, y)`` for post-hoc calibration (397 images).
        test: ``(X, y)`` for evaluation (400 images).
        classes: The class names, ``"0"`` to ``"9"``.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    calibration: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    classes: list[str]


def digits_to_images(pixels: np.ndarray, size: int = 32) -> torch.Tensor:
    """8x8 digits with values 0..16 -> normalised ``[N, 3, size, size]`` float32."""
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - DIGITS_MEAN) / DIGITS_STD).expand(-1, 3, -1, -1).contiguous()


def digits(seed: int = 0, size: int = 32) -> DigitsData:
    """Load the digits data set bundled with scikit-learn (no download).

    The split is stratified and fixed by ``seed``: 1000 train, 397 calibration and 400
    test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = digits_to_images(bunch.data, size)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    idx = np.arange(len(labels))
    train_idx, rest = train_test_split(
        idx, train_size=1000, stratify=bunch.target, random_state=seed
    )
    cal_idx, test_idx = train_test_split(
        rest, test_size=400, stratify=bunch.target[rest], random_state=seed
    )

    def take(ix: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(np.sort(ix))
        return images[t], labels[t]

    return DigitsData(take(train_idx), take(cal_idx), take(test_idx), [str(i) for i in range(10)])
