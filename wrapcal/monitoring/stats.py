"""The statistics of a window, each a short formula (docs/monitoring.md states them).

* **Estimated accuracy** (NannyML's CBPE for multiclass accuracy): the mean over the
  window's rows of the calibrated probability of the predicted class, ``mean(c_i)``.
  If the probabilities are calibrated, each prediction is right with probability ``c_i``
  independently, so the window's realised accuracy has mean ``mean(c_i)`` and variance
  ``sum(c_i (1 - c_i)) / n^2`` (a Poisson-binomial count): the interval is
  ``mean(c_i) +- z sqrt(sum(c_i (1 - c_i))) / n``, clipped to [0, 1].
* **OOD rate**: the share of flagged inputs; whether it is above the rate expected on
  in-distribution data is a one-sided exact binomial test.
* **Drift** of a score: the two-sample Kolmogorov-Smirnov test of the window's values
  against the reference's (two-sided, asymptotic p-value: scipy's
  ``ks_2samp(method="asymp")``); PSI over the reference's deciles is reported beside
  it, descriptive only.
* **ECE** (with labels): top-label, 15 equal-width bins over (0, 1], weighted by bin
  mass, as :func:`wrapcal.metrics.ece`, from the confidences and hits alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from wrapcal.metrics.calibration import DEFAULT_BINS, bin_index

__all__ = [
    "PSI_BINS",
    "PSI_FLOOR",
    "binomial_pvalue",
    "ece_from_confidence",
    "estimate_accuracy",
    "ks_test",
    "psi",
    "quantile_points",
]

#: Bins of PSI: the reference's deciles.
PSI_BINS = 10
#: The smallest share a PSI bin counts with (an empty bin would give an infinite PSI).
PSI_FLOOR = 1e-4


def estimate_accuracy(confidence: torch.Tensor, level: float = 0.95) -> tuple[float, float, float]:
    """CBPE's accuracy estimate of a window and its interval at ``level``.

    Args:
        confidence: ``[n]`` calibrated probability of each row's predicted class.
        level: Coverage of the interval.

    Returns:
        ``(estimate, low, high)``.
    """
    c = confidence.detach().to("cpu", torch.float64)
    n = c.numel()
    estimate = float(c.mean())
    z = float(stats.norm.ppf(0.5 + level / 2))
    half = z * math.sqrt(float((c * (1 - c)).sum())) / n
    return estimate, max(0.0, estimate - half), min(1.0, estimate + half)


def binomial_pvalue(flagged: int, n: int, expected: float) -> float:
    """One-sided exact binomial test: the chance of ``flagged`` or more of ``n`` inputs
    flagged if each is flagged with probability ``expected``."""
    if n == 0:
        return 1.0
    return float(stats.binomtest(int(flagged), int(n), float(expected), "greater").pvalue)


def quantile_points(values: torch.Tensor, max_points: int) -> list[float]:
    """A sorted summary of a reference score: all its values when there are at most
    ``max_points``, else ``max_points`` evenly spaced order statistics."""
    v = np.sort(values.detach().to("cpu", torch.float64).numpy())
    if v.size > max_points:
        v = v[np.round(np.linspace(0, v.size - 1, max_points)).astype(np.int64)]
    return [float(x) for x in v]


def ks_test(window: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test, two-sided, asymptotic p-value.

    The statistic is ``max |F_window - F_reference|`` over every value of both; the
    p-value is the Kolmogorov distribution's tail at it for ``n m / (n + m)`` samples
    (scipy's ``ks_2samp(method="asymp")``, computed here without its per-call overhead,
    which the monitor would pay for every score of every window).
    """
    w, r = np.sort(window), np.sort(reference)
    both = np.concatenate([w, r])
    gap = np.searchsorted(w, both, side="right") / w.size
    gap -= np.searchsorted(r, both, side="right") / r.size
    d = float(np.abs(gap).max())
    en = w.size * r.size / (w.size + r.size)
    return d, float(np.clip(stats.kstwo.sf(d, np.round(en)), 0.0, 1.0))


def psi(window: np.ndarray, reference: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index over the reference's quantile bins:
    ``sum((w - r) * ln(w / r))`` with ``w``, ``r`` the shares of each bin (at least
    :data:`PSI_FLOOR`). Ties in the reference can merge bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=edges.size + 1)
    w = np.bincount(np.searchsorted(edges, window, side="right"), minlength=edges.size + 1)
    r = np.maximum(r / max(reference.size, 1), PSI_FLOOR)
    w = np.maximum(w / max(window.size, 1), PSI_FLOOR)
    return float(np.sum((w - r) * np.log(w / r)))


def ece_from_confidence(
    confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = DEFAULT_BINS
) -> float:
    """Top-label ECE from each row's confidence and hit, the binning of
    :func:`wrapcal.metrics.ece` (bins ``(i/n, (i+1)/n]``)."""
    c = confidence.detach().to("cpu", torch.float64)
    hit = correct.detach().to("cpu", torch.float64)
    bins = bin_index(c, n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, c)
    hit_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, hit)
    return float((conf_sum - hit_sum).abs().sum() / max(c.numel(), 1))
