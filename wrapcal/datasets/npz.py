"""Images and labels from NumPy ``.npz`` archives (read with ``allow_pickle=False``).

Which arrays are the images and the labels: explicit keys; else, for a ``split``
(``test``), ``test_images`` / ``test_x`` / ``x_test`` and ``test_labels`` / ``test_y``
/ ``y_test``; else a conventional name (``images``, ``x``, ``data``... and ``labels``,
``y``, ``targets``...) or the only array with 3 or 4 dimensions. :func:`find_npz_keys`
makes that choice and, when it cannot, raises :class:`NpzKeyError` with the keys found
and the names accepted, so each caller (Python, the CLI) can say how to fix it in its
own terms.

Example:
    >>> from wrapcal.datasets import load_npz_images
    >>> from wrapcal.files.cifar_resnets import CIFAR_MEAN, CIFAR_STD
    >>> x, y = load_npz_images("cifar10_jpeg.npz", split="test",
    ...                        mean=CIFAR_MEAN, std=CIFAR_STD)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wrapcal.datasets.pixels import normalise, to_nchw, to_unit_float

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "NpzKeyError",
    "NpzKeys",
    "find_npz_keys",
    "load_npz_images",
    "npz_class_names",
    "npz_shapes",
    "split_image_keys",
    "split_label_keys",
]

PathLike = str | os.PathLike

#: Conventional names of the images and labels arrays, in the order they are tried.
IMAGE_KEYS = ("images", "image", "x", "X", "data", "inputs")
LABEL_KEYS = ("labels", "label", "y", "Y", "targets", "target")


def split_image_keys(split: str) -> tuple[str, ...]:
    """The names tried for the images of ``split``: ``test_images``, ``test_x``, ``x_test``."""
    return (f"{split}_images", f"{split}_x", f"x_{split}")


def split_label_keys(split: str) -> tuple[str, ...]:
    """The names tried for the labels of ``split``: ``test_labels``, ``test_y``, ``y_test``."""
    return (f"{split}_labels", f"{split}_y", f"y_{split}")


class NpzKeyError(ValueError):
    """The images (or the labels asked for) cannot be found in an archive.

    Attributes:
        keys: The keys the archive holds.
        missing: What was not found: ``"images"`` or ``"labels"``.
        wanted: The names that were tried, in order.
        candidates: Arrays that could be the images (3 or 4 dimensions).
        splits: The splits present (prefixes of ``*_images`` keys).
    """

    def __init__(
        self,
        message: str,
        keys: Sequence[str],
        missing: str,
        wanted: Sequence[str],
        candidates: Sequence[str] = (),
        splits: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.keys, self.missing, self.wanted = list(keys), missing, list(wanted)
        self.candidates, self.splits = list(candidates), list(splits)


@dataclass(frozen=True)
class NpzKeys:
    """The arrays chosen: ``images`` and ``labels`` (``None``: the archive has none)."""

    images: str
    labels: str | None


def _splits(keys: Sequence[str]) -> list[str]:
    found = []
    for key in keys:
        for suffix in ("_images", "_x"):
            if key.endswith(suffix) and key[: -len(suffix)]:
                found.append(key[: -len(suffix)])
        if key.startswith("x_") and key[2:]:
            found.append(key[2:])
    return list(dict.fromkeys(found))


def _labels_beside(images_key: str) -> list[str]:
    """The labels' names that go with an images key: ``test_images`` -> ``test_labels``,
    ``test_x`` -> ``test_y``, ``x_test`` -> ``y_test``."""
    stem = images_key.removesuffix("images").removesuffix("_")
    found = [f"{stem}_labels", f"{stem}_y"] if stem and stem != images_key else []
    if images_key.endswith("_x"):
        found.append(images_key[:-2] + "_y")
    if images_key.startswith("x_"):
        found.append("y_" + images_key[2:])
    return found


def find_npz_keys(
    shapes: Mapping[str, tuple[int, ...]],
    images_key: str | None = None,
    labels_key: str | None = None,
    split: str | None = None,
) -> NpzKeys:
    """Choose the images and labels arrays of an archive.

    Args:
        shapes: Every key of the archive with its array's shape.
        images_key: The images array, if the caller names it.
        labels_key: The labels array, if the caller names it (then it must exist).
        split: Prefix or suffix of the keys (``test`` for ``test_images``, ``x_test``).

    Raises:
        NpzKeyError: No images array, or the named labels array is missing.
    """
    keys = list(shapes)
    splits = _splits(keys)
    if images_key is None:
        if split is not None:
            wanted = list(split_image_keys(split))
            images_key = next((k for k in wanted if k in keys), None)
        else:
            wanted = list(IMAGE_KEYS)
            shaped = [k for k in keys if len(shapes[k]) in (3, 4)]
            named = [k for k in IMAGE_KEYS if k in keys]
            images_key = named[0] if named else (shaped[0] if len(shaped) == 1 else None)
        if images_key is None:
            shaped = [k for k in keys if len(shapes[k]) in (3, 4)]
            raise NpzKeyError(
                f"no images array among keys [{', '.join(keys) or 'none'}]; tried "
                f"{', '.join(wanted)}",
                keys,
                "images",
                wanted,
                shaped,
                splits,
            )
    elif images_key not in keys:
        raise NpzKeyError(
            f"no array {images_key!r} among keys [{', '.join(keys) or 'none'}]",
            keys,
            "images",
            [images_key],
            [k for k in keys if len(shapes[k]) in (3, 4)],
            splits,
        )
    if labels_key is not None:
        if labels_key not in keys:
            raise NpzKeyError(
                f"no array {labels_key!r} among keys [{', '.join(keys) or 'none'}]",
                keys,
                "labels",
                [labels_key],
                splits=splits,
            )
        return NpzKeys(images_key, labels_key)
    if split is not None:
        guesses = list(split_label_keys(split))
    else:
        guesses = [*_labels_beside(images_key), *LABEL_KEYS]
    found = next((k for k in guesses if k in keys and len(shapes[k]) == 1), None)
    return NpzKeys(images_key, found)


def npz_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """Every array's shape in an archive, from the headers alone (no data is read).

    Raises:
        ValueError: If the file is not a readable ``.npz`` archive.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            shapes = {}
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, _ = read(f)
                shapes[info.filename.removesuffix(".npy")] = tuple(shape)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise ValueError(f"{os.fspath(path)}: not a readable .npz archive ({err})") from err
    return shapes


def _python_hint(err: NpzKeyError, path: PathLike, split: str | None) -> str:
    where = f"{os.fspath(path)} (keys: {', '.join(err.keys) or 'none'})"
    if err.missing == "labels":
        return (
            f"no array {err.wanted[0]!r} in {where}: pass labels_key=... naming one of the "
            "keys present"
        )
    if len(err.wanted) == 1 or split is not None:
        others = [repr(w) for w in err.wanted[1:]]
        nor = f" (nor {', '.join(others)})" if others else ""
        splits = f" (splits present: {', '.join(err.splits)})" if err.splits else ""
        return (
            f"no array {err.wanted[0]!r}{nor} in {where}: pass images_key=... or split=... "
            f"naming one of the keys present{splits}"
        )
    hint = f"; candidates: {', '.join(err.candidates)}" if err.candidates else ""
    return (
        f"cannot tell which array holds the images in {where} (tried "
        f"{', '.join(err.wanted)}){hint}: pass images_key=... or split=..."
    )


def load_npz_images(
    path: PathLike,
    images_key: str | None = None,
    labels_key: str | None = None,
    *,
    split: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load images (and labels) from a NumPy ``.npz`` archive.

    The archive is read with ``allow_pickle=False``. Keys are chosen by
    :func:`find_npz_keys` (see the module docstring). Labels are optional unless a key
    is asked for.

    Args:
        path: The ``.npz`` file.
        images_key: Name of the images array.
        labels_key: Name of the labels array.
        split: Prefix of the keys, as in ``test_images``/``test_labels``.
        mean: Per-channel mean to subtract after scaling to [0, 1].
        std: Per-channel standard deviation to divide by (with ``mean``).

    Returns:
        ``(images, labels)``: float32 [N, C, H, W] (uint8 scaled by 1/255, floats taken
        to be in [0, 1] already, then normalised when ``mean``/``std`` are given) and
        int64 [N] labels, or ``None`` when the archive has no labels.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If a key is missing (the message lists the keys present and the
            names tried), the images have an unusable shape or range, or labels do not
            match the images.
    """
    with np.load(path, allow_pickle=False) as archive:
        shapes = npz_shapes(path)
        try:
            chosen = find_npz_keys(shapes, images_key, labels_key, split)
        except NpzKeyError as err:
            raise ValueError(_python_hint(err, path, split)) from None
        what = f"{os.fspath(path)!s}[{chosen.images!r}]"
        images = to_nchw(to_unit_float(archive[chosen.images], what), what).contiguous()
        labels = None
        if chosen.labels is not None:
            raw = archive[chosen.labels]
            if raw.ndim != 1 or raw.dtype.kind not in "iu":
                if labels_key is not None:
                    raise ValueError(
                        f"{os.fspath(path)!s}[{chosen.labels!r}]: labels must be a 1-D "
                        f"integer array, got shape {raw.shape} and dtype {raw.dtype}"
                    )
            else:
                labels = torch.as_tensor(raw.astype(np.int64))
    if labels is not None and len(labels) != len(images):
        raise ValueError(
            f"{what}: {len(images)} images but {len(labels)} labels in {chosen.labels!r}"
        )
    return normalise(images, mean, std), labels


def npz_class_names(path: PathLike) -> list[str] | None:
    """The ``classes`` array of an archive (class names in label order), if it has one."""
    with np.load(path, allow_pickle=False) as archive:
        if "classes" not in archive.files:
            return None
        names = archive["classes"]
    if names.ndim != 1:
        return None
    return [str(n) for n in names.tolist()]
