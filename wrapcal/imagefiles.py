"""Read image data sets from local files: NumPy ``.npz`` archives and IDX (MNIST) files.

Nothing here downloads anything; every function takes a path you already have.

- ``load_npz_images``: an images array (uint8 or float, NHWC, NCHW or grey NHW) and
  its labels from an ``.npz`` file, as a float32 NCHW tensor in [0, 1], optionally
  normalised.
- ``load_idx``, ``load_idx_images``, ``load_idx_labels``: the IDX format of MNIST and
  its relatives, gzip-compressed or raw.
- ``to_rgb32``: grey images to 3-channel ``size`` x ``size`` tensors (for instance MNIST
  as a far-OOD set for a CIFAR model).

Example:
    >>> from wrapcal.imagefiles import load_npz_images
    >>> from wrapcal.models import CIFAR_MEAN, CIFAR_STD
    >>> x, y = load_npz_images("cifar10_jpeg.npz", split="test",
    ...                        mean=CIFAR_MEAN, std=CIFAR_STD)  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["load_idx", "load_idx_images", "load_idx_labels", "load_npz_images", "to_rgb32"]

PathLike = str | os.PathLike

_IMAGE_KEYS = ("images", "image", "x", "X", "data", "inputs")
_LABEL_KEYS = ("labels", "label", "y", "Y", "targets", "target")
# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _normalise(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None):
    if mean is None and std is None:
        return x
    if mean is None or std is None:
        raise ValueError("pass both mean and std, or neither")
    c = x.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(
            f"mean and std need one value per channel ({c}), got {len(mean)} and {len(std)}"
        )
    m = torch.as_tensor(mean, dtype=x.dtype).view(1, c, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(1, c, 1, 1)
    return (x - m) / s


def _to_unit_float(a: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    """Integer images (0..255) -> float32 / 255; float images are kept as they are."""
    t = torch.as_tensor(a)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{what}: images must be integer (0..255) or float, got {t.dtype}")
    if not t.is_floating_point():
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > 255):
            raise ValueError(
                f"{what}: integer images must lie in 0..255, got range "
                f"{int(t.min())}..{int(t.max())}; rescale them or pass floats in [0, 1]"
            )
        return t.to(torch.float32) / 255.0
    t = t.to(torch.float32)
    if t.numel() and float(t.min()) >= 0 and float(t.max()) > 1.0 + 1e-3:
        raise ValueError(
            f"{what}: float images must lie in [0, 1] but reach {float(t.max()):.4g}; "
            "they look like 0..255 values: divide by 255 or store them as uint8"
        )
    return t


def _to_nchw(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.ndim == 3:  # grey [N, H, W]
        return t.unsqueeze(1)
    if t.ndim != 4:
        raise ValueError(
            f"{what}: images need 3 (N, H, W) or 4 (NHWC / NCHW) dimensions, "
            f"got shape {tuple(t.shape)}"
        )
    if t.shape[1] in (1, 3, 4):
        return t
    if t.shape[-1] in (1, 3, 4):
        return t.permute(0, 3, 1, 2)
    raise ValueError(
        f"{what}: cannot tell the channel axis of shape {tuple(t.shape)}: "
        "expected 1, 3 or 4 channels on axis 1 (NCHW) or axis 3 (NHWC)"
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

    The archive is read with ``allow_pickle=False``. Keys are chosen in this order:
    explicit ``images_key``/``labels_key``; ``{split}_images``/``{split}_labels`` when
    ``split`` is given (e.g. ``split="test"``); otherwise a conventional name
    (``images``, ``x``, ``data``, ... and ``labels``, ``y``, ``targets``, ...), or the only
    array with 3 or 4 dimensions. Labels are optional unless a key is asked for.

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
        ValueError: If a key is missing (the message lists the keys present), the
            images have an unusable shape or range, or labels do not match the images.
    """
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.files)
        where = f"{os.fspath(path)!s} (keys: {', '.join(keys) or 'none'})"
        explicit_labels = labels_key is not None
        if split is not None:
            images_key = images_key or f"{split}_images"
            if labels_key is None and f"{split}_labels" in keys:
                labels_key = f"{split}_labels"
        if images_key is None:
            named = [k for k in _IMAGE_KEYS if k in keys]
            shaped = [k for k in keys if archive[k].ndim in (3, 4)]
            if named:
                images_key = named[0]
            elif len(shaped) == 1:
                images_key = shaped[0]
            else:
                hint = f"; candidates: {', '.join(shaped)}" if shaped else ""
                raise ValueError(
                    f"cannot tell which array holds the images in {where}{hint}: "
                    "pass images_key=... or split=..."
                )
        if images_key not in keys:
            splits = [k.removesuffix("_images") for k in keys if k.endswith("_images")]
            hint = f" (splits present: {', '.join(splits)})" if split and splits else ""
            raise ValueError(
                f"no array {images_key!r} in {where}: pass images_key=... or split=... "
                f"naming one of the keys present{hint}"
            )
        if labels_key is None and split is None:
            stem = images_key.removesuffix("images").removesuffix("_")
            guesses = [f"{stem}_labels", f"{stem}_y"] if stem else []
            labels_key = next((k for k in [*guesses, *_LABEL_KEYS] if k in keys), None)
        elif labels_key is not None and labels_key not in keys:
            raise ValueError(
                f"no array {labels_key!r} in {where}: pass labels_key=... naming one of "
                "the keys present"
            )
        what = f"{os.fspath(path)!s}[{images_key!r}]"
        images = _to_nchw(_to_unit_float(archive[images_key], what), what).contiguous()
        labels = None
        if labels_key is not None:
            raw = archive[labels_key]
            if raw.ndim != 1 or raw.dtype.kind not in "iu":
                if explicit_labels:
                    raise ValueError(
                        f"{os.fspath(path)!s}[{labels_key!r}]: labels must be a 1-D integer "
                        f"array, got shape {raw.shape} and dtype {raw.dtype}"
                    )
            else:
                labels = torch.as_tensor(raw.astype(np.int64))
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{what}: {len(images)} images but {len(labels)} labels in {labels_key!r}")
    return _normalise(images, mean, std), labels


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


def to_rgb32(
    images: np.ndarray | torch.Tensor,
    size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Turn grey images into 3-channel ``size`` x ``size`` tensors.

    Resizes with bilinear interpolation (antialiased), replicates the grey channel to
    RGB and normalises. Typical use: MNIST as a far-OOD set for a CIFAR model,
    ``to_rgb32(load_idx_images(path), mean=CIFAR_MEAN, std=CIFAR_STD)``.

    Args:
        images: uint8 (0..255) or float ([0, 1]) images, [N, H, W] or [N, 1, H, W]
            (3-channel [N, 3, H, W] is only resized).
        size: Output height and width.
        mean: Per-channel mean (3 values) to subtract; ``None`` for no normalisation.
        std: Per-channel standard deviation (with ``mean``).

    Returns:
        float32 [N, 3, size, size].

    Raises:
        ValueError: If the shape or value range is not one of the above.
    """
    x = _to_unit_float(images, "to_rgb32")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"to_rgb32: expected [N, H, W], [N, 1, H, W] or [N, 3, H, W], "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    x = x.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    return _normalise(x, mean, std)
