"""The embedded default data set: scikit-learn's bundled digits, no download."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DigitsData", "digits", "digits_to_images"]

DIGITS_MEAN = 0.2
"""Mean of the embedded digits' pixels in [0, 1]; digits_to_images normalises with it."""
DIGITS_STD = 0.3
"""Standard deviation of the embedded digits' pixels in [0, 1]."""


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
