"""What every reader checks before it reads: that a file is a regular file (a FIFO, device
or socket named like data would block or never end), that an image is within the pixel
cap (a decompression bomb states a huge size in a tiny file) and decodes, and that a set's
images share one size unless they are resized.

Every failure is a :class:`~wrapcal.errors.DataError` naming the file and the fix.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

from wrapcal.errors import DataError

__all__ = [
    "IMAGE_FORMATS",
    "MAX_IMAGE_PIXELS",
    "ImageHeader",
    "check_regular",
    "common_size",
    "decode_image",
    "open_regular",
    "probe_image",
]

#: The most pixels (width x height) of one image wrapcal decodes: PIL's own default
#: limit, about 0.25 GiB as RGB. A header stating more is refused before decoding.
MAX_IMAGE_PIXELS = 89_478_485

#: The formats images are decoded from. Raster formats only: PIL's other plugins include
#: formats that run external programs (EPS runs Ghostscript) or read other files.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "PPM", "TIFF", "WEBP", "GIF")

_KINDS = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "directory",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def _not_regular(path: str | os.PathLike, mode: int, fix: str) -> DataError:
    return DataError(
        f"{os.fspath(path)} is a {_kind(mode)}, not a regular file, so it cannot hold "
        f"data (reading it could block or never end): {fix}"
    )


def check_regular(path: str | os.PathLike, fix: str = "give a regular file") -> os.stat_result:
    """The file's status, once it is known to be a regular file (links followed).

    Nothing is opened: a FIFO is refused without blocking.

    Args:
        path: The file.
        fix: What the user should do about a special file (ends the message).

    Raises:
        FileNotFoundError: No such file.
        DataError: A FIFO, device, socket or directory; a broken link or link loop.
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        if not os.path.islink(path):
            raise FileNotFoundError(f"{os.fspath(path)}: no such file") from None
        raise DataError(f"{os.fspath(path)} is a broken link: {fix}") from None
    except OSError as err:  # ELOOP: a link that points at itself
        raise DataError(f"{os.fspath(path)} cannot be read ({err.strerror}): {fix}") from None
    if not stat.S_ISREG(status.st_mode):
        raise _not_regular(path, status.st_mode, fix)
    return status


def open_regular(path: str | os.PathLike, fix: str = "give a regular file") -> io.BufferedReader:
    """Open a regular file for reading, never blocking on a FIFO.

    The file is opened non-blocking and checked on the open descriptor, so a file swapped
    for a FIFO after :func:`check_regular` is refused too.

    Raises:
        DataError: Not a regular file, or it cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise DataError(f"{os.fspath(path)} cannot be opened ({err.strerror}): {fix}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode, fix)
    return os.fdopen(fd, "rb")


class ImageHeader:
    """What an image's header says: ``size`` ``(width, height)`` and PIL ``mode``."""

    __slots__ = ("mode", "size")

    def __init__(self, size: tuple[int, int], mode: str) -> None:
        self.size, self.mode = size, mode


_REPLACE = "remove or replace it"
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _open(source: Any, name: str) -> Any:
    """PIL's lazy open (the header only), restricted to :data:`IMAGE_FORMATS` and capped."""
    from PIL import Image

    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with warnings.catch_warnings():
            # Our own cap below refuses what PIL would only warn about.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as err:
        found = _BOMB_PIXELS.search(str(err))
        pixels = f"{found.group(1)} pixels" if found else "its size"
        raise DataError(
            f"{name}: the image states {pixels}, more than the {MAX_IMAGE_PIXELS} pixels "
            f"wrapcal decodes (a decompression bomb, or an image far larger than a model "
            f"takes): {_REPLACE} with a smaller image"
        ) from None
    except Image.UnidentifiedImageError:  # a text file, a PDF, an EPS...
        raise DataError(
            f"{name}: not an image wrapcal reads (its contents are none of "
            f"{', '.join(IMAGE_FORMATS)}); {_REPLACE}"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as err:
        raise DataError(
            f"{name}: not an image wrapcal reads ({', '.join(IMAGE_FORMATS)}): {err}; {_REPLACE}"
        ) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise DataError(
            f"{name}: the image is {width}x{height} ({width * height} pixels), more than the "
            f"{MAX_IMAGE_PIXELS} pixels wrapcal decodes: {_REPLACE} with a smaller image"
        )
    return image


def probe_image(source: Any, name: str) -> ImageHeader:
    """An image's size and mode from its header, nothing decoded.

    Args:
        source: The image's bytes, or a binary file object positioned at its start.
        name: How messages name the image (its path, or its row).

    Raises:
        DataError: Not an image in :data:`IMAGE_FORMATS`, or over :data:`MAX_IMAGE_PIXELS`.
    """
    image = _open(source, name)
    header = ImageHeader(image.size, image.mode)
    image.close()
    return header


def decode_image(source: Any, name: str) -> Any:
    """A decoded PIL image (pixels loaded, the source no longer needed).

    Raises:
        DataError: As :func:`probe_image`, or the pixels do not decode (a truncated or
            corrupt file).
    """
    image = _open(source, name)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as err:
        raise DataError(
            f"{name}: cannot decode the image ({err}): the file is truncated or corrupt; {_REPLACE}"
        ) from None
    return image


def common_size(
    sizes: Sequence[tuple[int, int]], names: Sequence[str], resize_hint: str
) -> tuple[int, int]:
    """The ``(height, width)`` every image shares, when no size to resize to is given.

    Images of different sizes are refused rather than brought to the first one's size:
    one huge image first would make every image (and every batch) that large.

    Args:
        sizes: Each image's ``(width, height)``.
        names: Each image's name, for the message.
        resize_hint: How the user asks for a resize, for the message.

    Raises:
        DataError: The sizes differ; the message names the first image whose size is not
            the most common one.
    """
    counts = Counter(sizes)
    (usual, count), *_ = counts.most_common(1)
    if len(counts) == 1:
        return usual[1], usual[0]
    odd = next(i for i, s in enumerate(sizes) if s != usual)
    width, height = sizes[odd]
    raise DataError(
        f"{names[odd]} is {width}x{height} but most images ({count} of {len(sizes)}) are "
        f"{usual[0]}x{usual[1]}; images of different sizes are read only when resized: "
        f"{resize_hint}, or remove the odd image"
    )
