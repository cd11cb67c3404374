"""Checks on logits and labels: one set of rules and messages for numpy and torch inputs.

Every entry point that takes logits or labels (``wrapped.fit``, the calibrators'
``fit_logits``, ``fit_temperature``, ``conformal_sets``, ``fit_abstention``, the
metrics) runs these, so a problem reads the same wherever it is found: NaN or inf
logits, probabilities passed where logits are expected (a softmax of probabilities is
nearly uniform, and a calibrator fitted on it does nothing useful), labels of the wrong
shape, dtype or range.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from wrapcal.errors import DataError

__all__ = [
    "ROW_SUM_TOL",
    "as_logits",
    "check_labels",
    "check_logits",
    "looks_like_probabilities",
]

#: Rows of probabilities sum to 1 within this, even clipped ones (``clip(p, 1e-3, 1)``
#: over 10 classes moves a sum by up to 0.01); real logits practically never lie all in
#: [0, 1] with rows summing to 1.
ROW_SUM_TOL = 2e-2


def looks_like_probabilities(values: torch.Tensor) -> bool:
    """Whether ``[N, K]`` values (``K >= 2``) are probabilities: every value in [0, 1] and
    every row summing to 1 within :data:`ROW_SUM_TOL`."""
    if values.ndim != 2 or values.shape[-1] < 2 or values.numel() == 0:
        return False
    if not values.is_floating_point():
        return False
    lowest, highest = float(values.min()), float(values.max())
    if lowest < 0.0 or highest > 1.0:
        return False
    sums = values.sum(dim=-1, dtype=torch.float64)
    return bool(((sums - 1).abs() <= ROW_SUM_TOL).all())


def check_logits(logits: torch.Tensor, what: str = "logits") -> torch.Tensor:
    """``logits`` if they are finite logits ``[N, K]``; else a :class:`DataError` that says
    what is wrong (NaN/inf, probabilities) and how to fix it."""
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).reshape(len(logits), -1).any(-1).nonzero()
        raise DataError(
            f"{what} hold NaN or inf values ({len(bad)} rows, the first is row "
            f"{int(bad[0])}); check the model's inputs (NaN pixels?) and its precision"
        )
    if looks_like_probabilities(logits):
        raise DataError(
            f"these {what} look like probabilities: every value is in [0, 1] and every row "
            "sums to 1. Pass the model's logits (its output before softmax), or "
            "log-probabilities (torch.log(probs)), which are valid logits; for a model "
            "that ends in softmax, wrap it so the split takes the layer before"
        )
    return logits


def check_labels(y: torch.Tensor, n: int, num_classes: int | None = None) -> torch.Tensor:
    """Labels must be integer class indices ``[N]`` within ``[0, num_classes)``."""
    if y.ndim != 1:
        raise DataError(
            f"labels have shape {tuple(y.shape)}; expected class indices of shape [{n}] "
            "(not one-hot)"
        )
    if torch.is_floating_point(y) or y.dtype == torch.bool:
        raise DataError(f"labels have dtype {y.dtype}; expected integer class indices")
    if y.shape[0] != n:
        raise DataError(f"{n} inputs but {y.shape[0]} labels; give one label per input")
    if y.numel() and (int(y.min()) < 0 or (num_classes and int(y.max()) >= num_classes)):
        bound = f"[0, {num_classes})" if num_classes else "[0, K)"
        raise DataError(
            f"labels must be in {bound}; got min {int(y.min())}, max {int(y.max())}. "
            "Map them to class indices of the model's outputs"
        )
    return y.long()


def as_logits(logits: Any) -> torch.Tensor:
    """``logits`` as a floating tensor (numpy and lists become CPU tensors; integers and
    half precision become float32), or a :class:`DataError` for a bad shape or dtype."""
    if isinstance(logits, torch.Tensor):
        z = logits.detach()
    else:
        array = np.asarray(logits)
        if array.dtype == object or array.dtype.kind not in "biuf":
            raise DataError(f"logits have dtype {array.dtype}; expected real numbers")
        z = torch.from_numpy(np.ascontiguousarray(array))
    if z.dtype == torch.bool or z.is_complex():
        raise DataError(f"logits have dtype {z.dtype}; expected real numbers (the model's output)")
    if not z.is_floating_point() or z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    if z.ndim not in (1, 2) or z.shape[0] == 0 or (z.ndim == 2 and z.shape[1] == 0):
        raise DataError(
            f"logits have shape {tuple(z.shape)}; expected [N, K] (N samples, K classes) or "
            "[N] for a single-logit binary classifier. Several members [M, N, K]? Combine "
            "them first (wrapcal.plugin.probs.combine_members)"
        )
    return z
