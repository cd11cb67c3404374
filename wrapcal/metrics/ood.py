"""Out-of-distribution detection metrics and baseline scores.

Conventions (peers differ, so they are stated everywhere):

* Scores are "higher = more OOD".
* In-distribution (ID) is the POSITIVE class. A detector *accepts* a sample as ID when its
  score is ``<= threshold``.
* AUROC is the probability that a random ID sample scores lower than a random OOD sample,
  ties counting 1/2; it equals ``sklearn.metrics.roc_auc_score(is_id, -score)``.
* AUPR-In is the average precision with ID positive, ranked by ``-score``
  (``average_precision_score(is_id, -score)``); AUPR-Out takes OOD positive, ranked by
  ``score``. Tied scores form one threshold, as in scikit-learn.
* FPR@95TPR is the share of OOD samples accepted when 95% of ID samples are accepted.

All functions sort once and work on the scores' device; results are Python floats.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from wrapcal.metrics.state import SummableMetric, acc_dtype
from wrapcal.plugin.validation import as_logits, check_logits, check_values

ArrayLike = Tensor | np.ndarray

__all__ = [
    "OODMetrics",
    "acceptance_rank",
    "acceptance_threshold",
    "aupr_in",
    "aupr_out",
    "auroc",
    "baseline_scores",
    "check_scores",
    "fpr_at_tpr",
    "ood_metrics",
    "roc_curve",
]


def _as_scores(scores: ArrayLike, name: str, device: torch.device | None = None) -> Tensor:
    """1-D, non-empty, finite scores (the checks and messages of
    :func:`wrapcal.plugin.validation.check_values`), integers as the accumulation dtype."""
    scores = check_values(scores, name, device=device)
    if not scores.is_floating_point():
        scores = scores.to(acc_dtype(scores.device))
    return scores


def check_scores(scores_in: ArrayLike, scores_out: ArrayLike) -> tuple[Tensor, Tensor]:
    """Validates ID and OOD scores: 1-D, non-empty, finite; returns them as tensors of
    one floating dtype on ``scores_in``'s device."""
    s_in = _as_scores(scores_in, "scores_in")
    s_out = _as_scores(scores_out, "scores_out", device=s_in.device)
    dtype = torch.promote_types(s_in.dtype, s_out.dtype)
    return s_in.to(dtype), s_out.to(dtype)


def auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """P(ID score < OOD score) + P(tie) / 2: the Mann-Whitney statistic, exact."""
    s_in, s_out = check_scores(scores_in, scores_out)
    sorted_in = torch.sort(s_in).values
    # For each OOD score: ID scores strictly below it, and at or below it.
    below = torch.searchsorted(sorted_in, s_out, side="left").sum()
    at_or_below = torch.searchsorted(sorted_in, s_out, side="right").sum()
    return float((below + at_or_below).item() / (2 * s_in.numel() * s_out.numel()))


def _average_precision(pos: Tensor, neg: Tensor) -> float:
    """Average precision with ``pos`` the positives, higher value = ranked first.

    Tied values form one threshold; AP = sum over thresholds of
    (recall step) x precision, exactly as scikit-learn's ``average_precision_score``.
    """
    acc = acc_dtype(pos.device)
    values = torch.cat([pos, neg])
    is_pos = torch.cat([torch.ones_like(pos, dtype=acc), torch.zeros_like(neg, dtype=acc)])
    order = torch.sort(values, descending=True, stable=True).indices
    _, counts = torch.unique_consecutive(values[order], return_counts=True)
    last = counts.cumsum(0) - 1  # the last position of each tie group is its threshold
    tp = is_pos[order].cumsum(0)[last]
    predicted = (last + 1).to(acc)
    recall_step = torch.diff(tp, prepend=tp.new_zeros(1)) / pos.numel()
    return float((recall_step * (tp / predicted)).sum())


def aupr_in(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """Area under the precision-recall curve with ID positive (ranked by ``-score``)."""
    s_in, s_out = check_scores(scores_in, scores_out)
    return _average_precision(-s_in, -s_out)


def aupr_out(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """Area under the precision-recall curve with OOD positive (ranked by ``score``)."""
    s_in, s_out = check_scores(scores_in, scores_out)
    return _average_precision(s_out, s_in)


def acceptance_rank(n: int, tpr: float = 0.95) -> int:
    """``k = ceil(tpr * n)``: the rank (1-based) of the smallest in-distribution score
    that accepts ``tpr`` of ``n`` samples (rounded first: 0.95 * 100 is 95, not 96)."""
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1]; got {tpr} — e.g. 0.95 to accept 95%")
    return max(1, math.ceil(round(tpr * n, 9)))


def acceptance_threshold(scores_in: ArrayLike, tpr: float = 0.95) -> float:
    """The score threshold that accepts ``tpr`` of in-distribution samples: the
    ``ceil(tpr * N)``-th smallest score. Inputs with ``score <= threshold`` are accepted
    (treated as in-distribution); the same threshold :func:`fpr_at_tpr` uses."""
    s_in = _as_scores(scores_in, "scores_in")
    k = acceptance_rank(s_in.numel(), tpr)
    return float(torch.kthvalue(s_in.double(), k).values)


def fpr_at_tpr(scores_in: ArrayLike, scores_out: ArrayLike, tpr: float = 0.95) -> float:
    """Share of OOD samples accepted (score <= threshold) at a threshold accepting ``tpr``
    of the ID samples.

    The threshold is the smallest score value such that at least ``tpr`` of the ID scores
    are ``<= threshold`` (the ``ceil(tpr * N_in)``-th smallest ID score); OOD samples tied
    with it are accepted. This is scikit-learn's ``roc_curve(is_id, -score)`` FPR at the
    first point whose TPR reaches ``tpr``.
    """
    s_in, s_out = check_scores(scores_in, scores_out)
    threshold = torch.kthvalue(s_in, acceptance_rank(s_in.numel(), tpr)).values
    return float((s_out <= threshold).sum().item() / s_out.numel())


def roc_curve(scores_in: ArrayLike, scores_out: ArrayLike) -> tuple[Tensor, Tensor, Tensor]:
    """ROC curve with ID positive, accepting ``score <= threshold``.

    Returns:
        ``(fpr, tpr, thresholds)``, float64, starting at (0, 0) with threshold ``-inf`` and
        then one point per distinct score value, increasing.
    """
    s_in, s_out = check_scores(scores_in, scores_out)
    acc = acc_dtype(s_in.device)
    values = torch.cat([s_in, s_out])
    is_in = torch.cat([torch.ones_like(s_in, dtype=acc), torch.zeros_like(s_out, dtype=acc)])
    order = torch.sort(values, stable=True).indices
    thresholds, counts = torch.unique_consecutive(values[order], return_counts=True)
    last = counts.cumsum(0) - 1
    tp = is_in[order].cumsum(0)[last]
    fp = (last + 1).to(acc) - tp
    zero = tp.new_zeros(1)
    return (
        torch.cat([zero, fp / s_out.numel()]),
        torch.cat([zero, tp / s_in.numel()]),
        torch.cat([zero - math.inf, thresholds.to(acc)]),
    )


def ood_metrics(scores_in: ArrayLike, scores_out: ArrayLike) -> dict[str, float]:
    """``auroc``, ``aupr_in``, ``aupr_out`` and ``fpr95`` (FPR at 95% TPR) in one dict."""
    s_in, s_out = check_scores(scores_in, scores_out)
    return {
        "auroc": auroc(s_in, s_out),
        "aupr_in": aupr_in(s_in, s_out),
        "aupr_out": aupr_out(s_in, s_out),
        "fpr95": fpr_at_tpr(s_in, s_out, 0.95),
    }


def baseline_scores(logits: ArrayLike) -> dict[str, Tensor]:
    """OOD scores a bare classifier already gives, each "higher = more OOD".

    Args:
        logits: ``[N, K]`` logits.

    Returns:
        ``msp`` (1 - maximum softmax probability; Hendrycks & Gimpel 2017), ``max_logit``
        (minus the largest logit), ``entropy`` (of the softmax, nats) and ``energy``
        (``-logsumexp(logits)``, temperature 1; Liu et al. 2020), each ``[N]``.

    Raises:
        DataError: NaN/inf values, or probabilities where logits are expected.
    """
    logits = as_logits(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [N, K]; got shape {tuple(logits.shape)}")
    check_logits(logits)
    log_p = torch.log_softmax(logits, dim=1)
    return {
        "msp": 1 - log_p.amax(dim=1).exp(),
        "max_logit": -logits.amax(dim=1),
        # xlogy-style: p * log p is 0 where p underflows to 0 (log_p finite, p = 0).
        "entropy": -(log_p.exp() * log_p).sum(dim=1),
        "energy": -torch.logsumexp(logits, dim=1),
    }


class OODMetrics(SummableMetric):
    """OOD metrics accumulated over batches of scores (see :func:`ood_metrics`).

    State: the ID and OOD scores seen so far (lists of tensors). There is nothing to sum:
    AUROC and AUPR need every score.

    Distributed evaluation:
        The scores have a different length on each rank, so gather them with padding::

            metric.sync()  # all_gather of scores_in and scores_out; call on every rank
            result = metric.compute()
    """

    def update(self, scores: ArrayLike, is_ood: bool | ArrayLike) -> None:
        """Adds scores ``[B]``; ``is_ood`` is one bool for the batch or a ``[B]`` mask."""
        scores = _as_scores(scores, "scores")
        mask = torch.as_tensor(is_ood, device=scores.device)
        if mask.dtype != torch.bool:
            raise ValueError(f"is_ood must be a bool or a bool mask; got {mask.dtype}")
        mask = mask.expand_as(scores) if mask.ndim == 0 else mask
        if mask.shape != scores.shape:
            raise ValueError(
                f"is_ood must be a bool or a mask shaped like scores {tuple(scores.shape)}; "
                f"got {tuple(mask.shape)}"
            )
        # Both lists grow on every update, so every rank has both for sync().
        self._add_samples(scores_in=scores[~mask], scores_out=scores[mask])

    def compute(self) -> dict[str, float]:
        """``ood_metrics`` of everything seen since the last ``reset``."""
        self._require_state()
        samples = self.sample_tensors()
        return ood_metrics(samples["scores_in"], samples["scores_out"])
