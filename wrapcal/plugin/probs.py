"""Logits <-> probabilities, including single-logit binary classifiers.

The probabilities plugins and metrics use are :func:`logits_to_probs` of the final
logits, in the logits' dtype (``OutputContext.probs``); the checks on logits (NaN, inf,
probabilities passed as logits) are :mod:`wrapcal.plugin.validation`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wrapcal.plugin.validation import ROW_SUM_TOL, check_logits, looks_like_probabilities

__all__ = [
    "ROW_SUM_TOL",
    "check_logits",
    "combine_members",
    "entropy",
    "logits_to_log_probs",
    "logits_to_probs",
    "looks_like_probabilities",
]


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
