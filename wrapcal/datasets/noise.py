"""Seeded noise images: the simplest far-OOD sets."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

__all__ = ["NOISE_KINDS", "NoiseImages"]

NOISE_KINDS = ("gaussian", "uniform")


class NoiseImages(Dataset):
    """Seeded noise images, drawn in chunks so a large set never sits in memory at once.

    ``gaussian``: every pixel N(0.5, 1) clipped to [0, 1]; ``uniform``: every pixel
    U[0, 1] (Hendrycks et al. 2019, Outlier Exposure); then ``normalise`` (pixels in
    [0, 1] -> model inputs). Item ``i`` is the same whatever order the items are read
    in: chunk ``j`` is drawn from its own generator seeded ``seed * 1_000_003 + j``.

    Args:
        kind: ``"gaussian"`` or ``"uniform"``.
        n: Number of images.
        shape: Shape of one image, ``(C, H, W)``.
        normalise: Pixels in [0, 1] ``[B, C, H, W]`` -> model inputs (e.g. a
            :class:`~wrapcal.datasets.Normaliser`); ``None`` keeps the pixels.
        seed: Seed of the draws.
        chunk: Images drawn at once.
    """

    def __init__(
        self,
        kind: str,
        n: int,
        shape: tuple[int, ...],
        normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
        chunk: int = 256,
    ) -> None:
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise {kind!r}; use one of {', '.join(NOISE_KINDS)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"noise images: n must be a positive int, got {n!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"noise images: chunk must be a positive int, got {chunk!r}")
        self.kind, self.n, self.shape = kind, n, tuple(shape)
        self.normalise, self.seed, self.chunk = normalise, seed, chunk
        self._cached: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.n

    def block(self, index: int) -> torch.Tensor:
        """Chunk ``index`` (``chunk`` images, fewer at the end), drawn from its own seed."""
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        rows = min(self.chunk, self.n - index * self.chunk)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.kind == "gaussian":
            x = (0.5 + torch.randn((rows, *self.shape), generator=gen)).clamp(0, 1)
        else:
            x = torch.rand((rows, *self.shape), generator=gen)
        if self.normalise is not None:
            x = self.normalise(x)
        self._cached = (index, x)
        return x

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.block(i // self.chunk)[i % self.chunk]
