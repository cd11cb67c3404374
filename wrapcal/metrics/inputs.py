"""What the metrics take: probabilities ``[N, K]`` with integer labels, checked, or logits
turned into probabilities."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from wrapcal.metrics.state import acc_dtype
from wrapcal.plugin.validation import as_logits, as_tensor, check_labels, check_logits

__all__ = ["ArrayLike", "check_probs", "softmax_probs"]

ArrayLike = Tensor | np.ndarray
# Row sums drift from 1 by rounding (~1e-6 in float32); logits never pass.
_ROW_SUM_TOL = 1e-3


def softmax_probs(logits: ArrayLike) -> Tensor:
    """Turns logits ``[N, K]`` into probabilities with a numerically stable softmax.

    Args:
        logits: Unnormalised class scores, a tensor or numpy array.

    Returns:
        Probabilities of the same shape (float32 for integer or half inputs).

    Raises:
        DataError: NaN/inf values, or values that are probabilities already (a softmax of
            probabilities is nearly uniform: every metric would be wrong); the checks and
            messages of :mod:`wrapcal.plugin.validation`.
    """
    return torch.softmax(check_logits(as_logits(logits)), dim=-1)


def check_probs(probs: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    """Validates and converts ``probs [N, K]`` and integer ``labels [N]``.

    Args:
        probs: Class probabilities, rows summing to 1.
        labels: True class indices in ``[0, K)``, on any device (moved to ``probs``'):
            integers, booleans or whole-number floats, as
            :func:`wrapcal.plugin.validation.check_labels` takes them.

    Returns:
        ``(probs, labels)`` as tensors on ``probs``' device: probs floating point (half
        upcast to float32), labels int64.

    Raises:
        ValueError: naming the problem and the fix, when shapes, dtypes or values are wrong
            (a :class:`~wrapcal.DataError`, which is a ``ValueError``, for the labels).
    """
    probs = as_tensor(probs, "probs")
    if probs.ndim != 2:
        raise ValueError(
            f"probs must be 2-D [N, K]; got shape {tuple(probs.shape)} — pass one row of "
            "class probabilities per sample"
        )
    n, k = probs.shape
    if n == 0 or k == 0:
        raise ValueError(f"probs is empty (shape {(n, k)}) — metrics need N > 0 and K > 0")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be floating point; got {probs.dtype} — pass probabilities")
    if probs.dtype in (torch.float16, torch.bfloat16):
        probs = probs.float()
    # The labels' rules and messages are those of every entry point that takes labels.
    labels = check_labels(labels, n, k, rows="rows of probs", device=probs.device)
    # One stacked reduction, so the probabilities cost one device sync rather than three,
    # and no [N, K] temporary: a row sum is finite exactly when the row is.
    acc = acc_dtype(probs.device)
    row_sums = probs.sum(dim=1).to(acc)
    stats = torch.stack(
        [row_sums.isfinite().all().to(acc), probs.amin().to(acc), (row_sums - 1).abs().amax()]
    ).tolist()
    is_finite, p_min, row_dev = stats
    if not is_finite:
        raise ValueError("probs contains NaN or inf — check the model output before the metric")
    if p_min < 0 or row_dev > _ROW_SUM_TOL:
        raise ValueError(
            f"probs must be non-negative with rows summing to 1; got min {p_min:.4g} and row "
            f"sums off by up to {row_dev:.4g} — are these logits? use softmax_probs(logits)"
        )
    return probs, labels
