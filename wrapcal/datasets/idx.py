"""The IDX format of MNIST and its relatives, gzip-compressed or raw.

- ``load_idx``: any IDX file as a numpy array.
- ``load_idx_images``: images ``[N, H, W]`` (``t10k-images-idx3-ubyte.gz``).
- ``load_idx_labels``: labels ``[N]`` (``t10k-labels-idx1-ubyte.gz``).
- ``labels_file_for``: the labels file beside an images file, when there is one.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from wrapcal.datasets.safety import check_regular, open_regular
from wrapcal.errors import DataError

__all__ = [
    "MAX_GZIP_RATIO",
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
_FIX = "the file is truncated or corrupt; re-download it"

#: The most a gzip-compressed IDX file may inflate to, as a multiple of its size. Real
#: image sets compress 2 to 10 times (MNIST about 5); deflate can reach about 1000.
MAX_GZIP_RATIO = 256


def is_idx_name(path: PathLike) -> bool:
    """Whether a file name says IDX (``...-idx3-ubyte``, ``.idx1``...)."""
    return _IDX_NAME.search(Path(path).name) is not None


def _read_exact(stream: io.BufferedIOBase, size: int, name: str, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise DataError(f"{name}: truncated IDX {what} ({len(data)} of {size} bytes); {_FIX}")
    return data


def _header(stream: io.BufferedIOBase, name: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """The dtype, shape and byte length of an IDX header, read from its first bytes."""
    magic = stream.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise DataError(
            f"{name}: not an IDX file (magic number {magic.hex() or 'missing'}; "
            "expected 0000 followed by a type byte in 08/09/0b/0c/0d/0e and the rank)"
        )
    ndim = magic[3]
    dims = _read_exact(stream, 4 * ndim, name, "header")
    shape = tuple(int(d) for d in struct.unpack(f">{ndim}I", dims))
    return np.dtype(_IDX_DTYPES[magic[2]]), shape, 4 + 4 * ndim


def load_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw.

    The header is read first and the size it states checked against the bytes present
    before anything is allocated: for a raw file, the file's size; for a gzip file, at
    most :data:`MAX_GZIP_RATIO` times its compressed size (real images compress 2 to 10
    times), and the stream is inflated only as far as the header says (a 1.5 MB gzip
    inflating to 1.5 GiB is refused, not inflated).

    Args:
        path: The file; gzip is detected from its first bytes, not its name.

    Returns:
        The array, in native byte order, with the shape the header states.

    Raises:
        DataError: (a ``ValueError``) If the magic number is wrong, the file is not a
            regular file, or it is truncated, corrupt or larger than its header says.
    """
    name = os.fspath(path)
    size = check_regular(path, "give an IDX file").st_size
    with open_regular(path) as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        try:
            dtype, shape, header = _header(stream, name)
            # Python integers: 255 dimensions of 2^32 - 1 cannot wrap around.
            claimed = math.prod(shape) * dtype.itemsize
            says = f"IDX header says shape {shape} ({header + claimed} bytes)"
            if not compressed and header + claimed != size:
                raise DataError(f"{name}: {says} but the file holds {size} bytes; {_FIX}")
            if compressed and claimed > MAX_GZIP_RATIO * size + 2**20:
                raise DataError(
                    f"{name}: {says} but the gzip file is {size} bytes: real images do not "
                    f"inflate more than {MAX_GZIP_RATIO} times, so the file is corrupt or "
                    "hostile; re-download it (if it is right, gunzip it and read the raw "
                    "file)"
                )
            data = bytearray(claimed)
            view, got = memoryview(data), 0
            while got < claimed:  # inflated in the stream's own chunks, into place
                n = stream.readinto(view[got:])
                if not n:
                    break
                got += n
            if got != claimed:
                raise DataError(f"{name}: {says} but the file holds {header + got}; {_FIX}")
            if compressed and stream.read(1):
                raise DataError(f"{name}: {says} but the file holds more data; {_FIX}")
        except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise DataError(
                f"{name}: corrupt or truncated gzip stream ({e}); re-download the file"
            ) from None
    array = np.frombuffer(data, dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


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
