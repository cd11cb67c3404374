"""Logits <-> probabilities, including single-logit binary classifiers.

The probabilities plugins and metrics use are :func:`logits_to_probs` of the final
logits, in the logits' dtype (``OutputContext.probs``); :func:`check_logits` refuses
probabilities passed where logits are expected (a classic silent failure: a softmax
of probabilities is nearly uniform, and a calibrator fitted on it does nothing useful).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wrapcal.errors import DataError

__all__ = [
    "ROW_SUM_TOL",
    "check_logits",
    "combine_members",
    "entropy",
    "logits_to_log_probs",
    "logits_to_probs",
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


def logits_to_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; a single logit is a binary sigmoid -> two columns."""
    if logits.shape[-1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=-1)
    return F.softmax(logits, dim=-1)


def logits_to_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last axis, with the same single-logit rule."""
    if logits.shape[-1] == 1:
        return torch.cat([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=-1)
    return F.log_softmax(logits, dim=-1)


def combine_members(members: torch.Tensor) -> torch.Tensor:
    """Combine member logits ``[M, B, K]`` into one set of logits ``[B, K]``.

    One member is returned as it is, so a wrapped model without sampling plugins gives
    the model's own logits. Several members are averaged in probability space (the
    predictive mean) and returned as log-probabilities, which are valid logits:
    ``softmax(log p) == p``. A single-logit binary model keeps its single logit.
    """
    if members.shape[0] == 1:
        return members[0]
    log_p = logits_to_log_probs(members)
    log_mean = torch.logsumexp(log_p, dim=0) - torch.log(
        torch.tensor(float(members.shape[0]), dtype=log_p.dtype, device=log_p.device)
    )
    if members.shape[-1] == 1:
        # Back to one logit: log(p / (1 - p)).
        return (log_mean[..., 1:] - log_mean[..., :1]).contiguous()
    return log_mean


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim`` (0 log 0 = 0)."""
    return -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(dim)
