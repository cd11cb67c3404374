"""OOD sets for the shared CIFAR-10 ResNet-20, made from what is at hand.

Every set is a float tensor of normalised images ``[N, 3, 32, 32]`` (the ResNet-20's
mean and std), built from pixels in ``[0, 1]`` with a fixed seed, so two benchmarks that
name a set measure the same images. Grouped as OpenOOD groups its sets (Zhang et al.
2023, "OpenOOD v1.5"):

* ``near`` - natural-image content that is not a CIFAR-10 class, or CIFAR-10 content no
  longer one object: ``photos`` (random square crops, 48 to 160 px, of the two photos
  scikit-learn bundles, a Chinese temple and a flower, resized to 32 px), ``tiles`` (an
  8 px photo patch repeated: a texture), ``jigsaw`` (CIFAR-10 test images cut into 4 x 4
  tiles put back in a random order) and ``mixup`` (the mean of two test images of
  different classes).
* ``far`` - no natural image at all: ``mnist`` (the MNIST test digits), ``digits``
  (scikit-learn's 8 x 8 digits, upsampled), ``gaussian`` and ``uniform`` noise, and
  ``pixels`` (the pixels of each test image in a random order: CIFAR's colour
  histogram, no shapes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, load_sample_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from shared_data import CIFAR_MEAN, CIFAR_STD, cifar10, mnist_ood

__all__ = ["GROUPS", "id_pixels", "normalised", "ood_sets"]

GROUPS = {
    "near": ("photos", "tiles", "jigsaw", "mixup"),
    "far": ("mnist", "digits", "gaussian", "uniform", "pixels"),
}

_MEAN = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels ``[N, 3, 32, 32]`` in ``[0, 1]`` -> the ResNet-20's inputs."""
    return ((pixels.clamp(0, 1) - _MEAN) / _STD).float()


def id_pixels(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 JPEG images of a split as pixels in ``[0, 1]``, with their labels."""
    images, labels = cifar10(split)
    return images * _STD + _MEAN, labels


def _photos() -> list[torch.Tensor]:
    """scikit-learn's two bundled photos as ``[3, H, W]`` pixels in ``[0, 1]``."""
    return [
        torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255
        for p in load_sample_images().images
    ]


def _photo_crops(n: int, g: np.random.Generator) -> torch.Tensor:
    photos = _photos()
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(g.integers(48, 161))
        top = int(g.integers(0, photo.shape[1] - side + 1))
        left = int(g.integers(0, photo.shape[2] - side + 1))
        crop = photo[None, :, top : top + side, left : left + side]
        out.append(F.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True))
    return torch.cat(out)


def _tiles(n: int, g: np.random.Generator) -> torch.Tensor:
    photos = _photos()
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top = int(g.integers(0, photo.shape[1] - 8))
        left = int(g.integers(0, photo.shape[2] - 8))
        out.append(photo[:, top : top + 8, left : left + 8].repeat(1, 4, 4)[None])
    return torch.cat(out)


def _jigsaw(pixels: torch.Tensor, g: np.random.Generator) -> torch.Tensor:
    n = len(pixels)
    tiles = pixels.unfold(2, 8, 8).unfold(3, 8, 8).reshape(n, 3, 16, 8, 8)
    order = torch.from_numpy(np.stack([g.permutation(16) for _ in range(n)]))
    tiles = tiles[torch.arange(n)[:, None], :, order].permute(0, 2, 1, 3, 4)
    return tiles.reshape(n, 3, 4, 4, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(n, 3, 32, 32)


def _mixup(
    pixels: torch.Tensor, labels: torch.Tensor, n: int, g: np.random.Generator
) -> torch.Tensor:
    a = torch.from_numpy(g.integers(0, len(labels), 4 * n))
    b = torch.from_numpy(g.integers(0, len(labels), 4 * n))
    keep = (labels[a] != labels[b]).nonzero().squeeze(1)[:n]
    return 0.5 * (pixels[a[keep]] + pixels[b[keep]])


def ood_sets(
    n: int = 2000, seed: int = 0, source: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Every OOD set of :data:`GROUPS`, ``n`` normalised images each.

    Args:
        n: Images per set.
        seed: Seed of the random crops, orders and noise.
        source: CIFAR-10 pixels ``[M, 3, 32, 32]`` the jigsaw, mixup and shuffled-pixel
            sets are made of (default: the JPEG test set's first ``n``; pass images the
            detectors were not fitted on).
    """
    g = np.random.default_rng(seed)
    test, labels = id_pixels("test")
    source = test[:n] if source is None else source[:n]
    digits = torch.from_numpy(load_digits().images[:n] / 16.0).float()[:, None]
    digits = F.interpolate(digits, size=(32, 32), mode="bilinear", antialias=True).expand(
        -1, 3, -1, -1
    )
    flat = source.reshape(len(source), 3, -1)
    order = torch.from_numpy(np.stack([g.permutation(1024) for _ in range(len(source))]))
    pixels = flat.gather(2, order[:, None, :].expand(-1, 3, -1)).reshape(source.shape)
    noise = torch.from_numpy(g.standard_normal((n, 3, 32, 32))).float()
    sets = {
        "photos": _photo_crops(n, g),
        "tiles": _tiles(n, g),
        "jigsaw": _jigsaw(source, g),
        "mixup": _mixup(test, labels, n, g),
        "mnist": None,
        "digits": digits,
        "gaussian": 0.5 + 0.25 * noise,
        "uniform": torch.from_numpy(g.random((n, 3, 32, 32))).float(),
        "pixels": pixels,
    }
    out = {name: normalised(x) for name, x in sets.items() if x is not None}
    out["mnist"] = mnist_ood(n)
    return {name: out[name] for group in GROUPS.values() for name in group}
