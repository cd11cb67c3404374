"""Images and labels from NumPy ``.npz`` archives (read with ``allow_pickle=False``).

Each array's ``.npy`` header is checked against the bytes its member holds before
anything is allocated: a header claiming 10^12 images in a member of 30, or a zip
directory claiming more than its compressed bytes can inflate to, is refused, as are
object arrays (readable only by unpickling).

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

import math
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wrapcal.datasets.pixels import normalise, to_nchw, to_unit_float
from wrapcal.datasets.safety import check_regular, open_regular
from wrapcal.errors import DataError

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


# Deflate's largest expansion is about 1032:1 (258 bytes from each 2-bit code); a member
# said to inflate to more than this from its compressed size is lying.
_DEFLATE_RATIO = 1032
_RESAVE = "re-save it with numpy.savez or numpy.savez_compressed"


@dataclass(frozen=True)
class _Member:
    """One array of an archive, from its ``.npy`` header."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype


def _check_sizes(info: zipfile.ZipInfo, archive_size: int, name: str) -> None:
    """The zip directory's sizes of a member, against what the archive can hold."""
    member = f"{name}: member {info.filename}"
    if info.header_offset + info.compress_size > archive_size:
        raise DataError(
            f"{member} says it holds {info.compress_size} bytes but the archive is "
            f"{archive_size} bytes: the file is truncated or corrupt; {_RESAVE}"
        )
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise DataError(
                f"{member} is stored uncompressed but its sizes disagree ({info.file_size} "
                f"and {info.compress_size} bytes): the archive is corrupt; {_RESAVE}"
            )
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > _DEFLATE_RATIO * info.compress_size + 1024:
            raise DataError(
                f"{member} says it will inflate to {info.file_size} bytes from "
                f"{info.compress_size}, more than deflate can produce: the archive is "
                f"corrupt or hostile; {_RESAVE}"
            )
    else:
        raise DataError(
            f"{member} is compressed with zip method {info.compress_type}, which numpy "
            f"never writes: {_RESAVE}"
        )


def _members(path: PathLike) -> dict[str, _Member]:
    """Every ``.npy`` member's header, checked against the bytes the member holds.

    Raises:
        DataError: Not a regular file, a zip directory or ``.npy`` header that claims more
            bytes than are present, or an object array (readable only by unpickling).
        ValueError: Not a readable ``.npz`` archive.
    """
    name = os.fspath(path)
    archive_size = check_regular(path, "give an .npz archive written by numpy.savez").st_size
    members = {}
    try:
        with open_regular(path) as f, zipfile.ZipFile(f) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                _check_sizes(info, archive_size, name)
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(member)
                    header = member.tell()
                key = info.filename.removesuffix(".npy")
                if dtype.hasobject:  # refused if read (_read_arrays); its size is a pickle's
                    members[key] = _Member(info, tuple(int(d) for d in shape), dtype)
                    continue
                # Python integers: a product of header dimensions cannot wrap around.
                claimed = header + math.prod(int(d) for d in shape) * dtype.itemsize
                if claimed != info.file_size:
                    raise DataError(
                        f"{name}: member {info.filename}'s header claims shape {tuple(shape)} "
                        f"of {dtype} ({claimed} bytes) but holds {info.file_size} bytes: the "
                        f"archive is truncated, corrupt or hostile; {_RESAVE}"
                    )
                members[key] = _Member(info, tuple(int(d) for d in shape), dtype)
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as err:
        raise ValueError(f"{name}: not a readable .npz archive ({err})") from err
    return members


def _read_arrays(path: PathLike, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an archive, each allocated only once its header has been
    checked against the bytes present (numpy allocates what a header says first)."""
    members = _members(path)
    name = os.fspath(path)
    arrays = {}
    with open_regular(path) as f, zipfile.ZipFile(f) as archive:
        for key in keys:
            if members[key].dtype.hasobject:
                raise DataError(
                    f"{name}[{key!r}] is an object array (dtype {members[key].dtype}), "
                    "readable only by unpickling it, which runs code from the file: wrapcal "
                    "reads numeric arrays only; save the images as uint8 or float and the "
                    "names as strings"
                )
            with archive.open(members[key].info) as member:
                try:
                    arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
                except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as err:
                    raise DataError(
                        f"{name}[{key!r}]: cannot be read ({err}): the archive is truncated "
                        f"or corrupt; {_RESAVE}"
                    ) from None
    return arrays


def npz_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """Every array's shape in an archive, from the headers alone (no data is read).

    Each header is checked against the bytes its member holds (see :func:`load_npz_images`).

    Raises:
        ValueError: If the file is not a readable ``.npz`` archive, or a header claims
            more than its member holds (a :class:`~wrapcal.errors.DataError`).
    """
    return {key: member.shape for key, member in _members(path).items()}


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
    shapes = npz_shapes(path)
    try:
        chosen = find_npz_keys(shapes, images_key, labels_key, split)
    except NpzKeyError as err:
        raise ValueError(_python_hint(err, path, split)) from None
    what = f"{os.fspath(path)!s}[{chosen.images!r}]"
    wanted = [chosen.images] + ([chosen.labels] if chosen.labels is not None else [])
    arrays = _read_arrays(path, wanted)
    images = to_nchw(to_unit_float(arrays.pop(chosen.images), what), what).contiguous()
    labels = None
    if chosen.labels is not None:
        raw = arrays[chosen.labels]
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
    if "classes" not in npz_shapes(path):
        return None
    names = _read_arrays(path, ["classes"])["classes"]
    if names.ndim != 1:
        return None
    return [str(n) for n in names.tolist()]
