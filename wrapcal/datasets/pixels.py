"""Pixel arrays to model inputs: value ranges, layouts, channels, sizes and normalisation.

Images come in as uint8 (0..255) or float ([0, 1]) arrays in NCHW, NHWC or grey NHW
layout; they leave as float32 ``[N, C, H, W]`` tensors in [0, 1], normalised when a
mean and standard deviation are given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normaliser",
    "match_channels",
    "match_images",
    "normalise",
    "resize_images",
    "to_nchw",
    "to_rgb32",
    "to_unit_float",
]

#: The ImageNet statistics that timm, torchvision and ``wrapcal.files.cifar_resnets`` expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(
    x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
) -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``[N, C, H, W]``; unchanged when both are None."""
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


def to_unit_float(a: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
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


def to_nchw(t: torch.Tensor, what: str) -> torch.Tensor:
    """``[N, H, W]`` (grey), NCHW or NHWC (1, 3 or 4 channels) -> NCHW."""
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


@dataclass
class Normaliser:
    """Pixel values in [0, 1] -> what the model takes: ``(x - mean) / std`` per channel.

    One value stands for every channel. Works on one image ``[C, H, W]`` or a batch.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(
                f"mean and std need the same number of values, got {len(self.mean)} and "
                f"{len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-3]
        mean, std = self.mean, self.std
        if len(mean) == 1:
            mean, std = mean * c, std * c
        if len(mean) != c:
            raise ValueError(
                f"mean/std have {len(mean)} values but the images have {c} channel(s): "
                f"convert the images to {len(mean)} channels or give one mean/std value per "
                "channel"
            )
        shape = (c, 1, 1)
        m = torch.tensor(mean, dtype=x.dtype).view(shape)
        s = torch.tensor(std, dtype=x.dtype).view(shape)
        return (x - m) / s


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``[N, C, H, W]`` in [0, 1] to ``channels``: grey replicated, RGB(A) averaged to grey,
    RGBA to RGB by dropping alpha."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1:
        return x[:, :3].mean(dim=1, keepdim=True)
    if c == 4 and channels == 3:
        return x[:, :3]
    raise ValueError(f"cannot turn {c}-channel images into {channels}-channel ones")


def resize_images(x: torch.Tensor, size: tuple[int, int] | int | None) -> torch.Tensor:
    """Bilinear (antialiased) resize of ``[N, C, H, W]`` to ``size`` (unchanged if None)."""
    if size is None:
        return x
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)


def match_images(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Images in [0, 1] to a reference's channels and size (grey <-> RGB, bilinear)."""
    c, h, w = shape
    x = resize_images(match_channels(x, c), (h, w))
    return x.clamp(0, 1).contiguous()


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
    x = to_unit_float(images, "to_rgb32")
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
    return normalise(x, mean, std)
