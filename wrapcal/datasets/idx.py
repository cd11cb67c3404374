"""The IDX format of MNIST and its relatives, gzip-compressed or raw.

- ``load_idx``: any IDX file as a numpy array.
- ``load_idx_images``: images ``[N, H, W]`` (``t10k-images-idx3-ubyte.gz``).
- ``load_idx_labels``: labels ``[N]`` (``t10k-labels-idx1-ubyte.gz``).
- ``labels_file_for``: the labels file beside an images file, when there is one.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np

__all__ = [
    "is_idx_name",
    "labels_file_for",
    "labels_name",
    "load_idx",
    "load_idx_images",
    "load_idx_labels",
]

PathLike = str | os.PathLike

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAME = re.compile(r"(idx\d|ubyte)", re.IGNORECASE)


def is_idx_name(path: PathLike) -> bool:
    """Whether a file name says IDX (``...-idx3-ubyte``, ``.idx1``...)."""
    return _IDX_NAME.search(Path(path).name) is not None


def load_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw.

    Args:
        path: The file; gzip is detected from its first bytes, not its name.

    Returns:
        The array, in native byte order, with the shape the header states.

    Raises:
        ValueError: If the magic number is wrong, or the file is truncated or corrupt.
    """
    name = os.fspath(path)
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    try:
        if compressed:
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (EOFError, OSError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(
            f"{name}: corrupt or truncated gzip stream ({e}); re-download the file"
        ) from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{name}: not an IDX file (magic number {data[:4].hex() or 'missing'}; "
            "expected 0000 followed by a type byte in 08/09/0b/0c/0d/0e and the rank)"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated IDX header ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{name}: IDX header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(data)} bytes: the file is truncated or corrupt; re-download it"
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def load_idx_images(path: PathLike) -> np.ndarray:
    """Read IDX images (e.g. ``t10k-images-idx3-ubyte.gz``).

    Args:
        path: The IDX file, gzip-compressed or raw.

    Returns:
        The images, [N, H, W] (uint8 for MNIST).

    Raises:
        ValueError: If the file is not a valid 3-dimensional IDX file.
    """
    array = load_idx(path)
    if array.ndim != 3:
        raise ValueError(
            f"{os.fspath(path)}: expected IDX images of rank 3 (N, H, W), got shape "
            f"{array.shape}; is this a labels file?"
        )
    return array


def load_idx_labels(path: PathLike) -> np.ndarray:
    """Read IDX labels (e.g. ``t10k-labels-idx1-ubyte.gz``).

    Args:
        path: The IDX file, gzip-compressed or raw.

    Returns:
        The labels, int64 [N].

    Raises:
        ValueError: If the file is not a valid 1-dimensional integer IDX file.
    """
    array = load_idx(path)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(
            f"{os.fspath(path)}: expected IDX labels (rank 1, integer), got shape "
            f"{array.shape} and dtype {array.dtype}; is this an images file?"
        )
    return array.astype(np.int64)


def labels_name(images: PathLike) -> str:
    """The name MNIST gives the labels of an images file
    (``t10k-images-idx3-ubyte.gz`` -> ``t10k-labels-idx1-ubyte.gz``)."""
    name = re.sub("images", "labels", Path(images).name, count=1, flags=re.IGNORECASE)
    return re.sub("idx3", "idx1", name, count=1, flags=re.IGNORECASE)


def labels_file_for(images: PathLike) -> Path | None:
    """The labels file beside an images file (:func:`labels_name`), if it exists."""
    path = Path(images)
    candidate = path.with_name(labels_name(path))
    return candidate if candidate != path and candidate.is_file() else None
