"""Bootstrap confidence intervals for ECE and AUROC, vectorised over resamples.

A resample is a row of an index matrix ``[B, N]`` drawn with replacement from a seeded
``torch.Generator`` on the data's device, by the bootstrap the plugins use too
(:func:`wrapcal.plugin.bootstrap.resample_indices`); the metric is computed for a whole
chunk of rows at once (a scatter-add over (resample, bin) slots for ECE, a batched
``searchsorted`` for AUROC). Chunks bound the memory to about ``chunk_elements`` indices
whatever N and B.
With ``q_lo`` and ``q_hi`` the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
B values (linear interpolation, as ``numpy.percentile``) and ``t`` the estimate on the data:

- ``method="percentile"`` gives ``(q_lo, q_hi)``: the spread of the estimator itself.
- ``method="basic"`` (reverse percentile) gives ``(2t - q_hi, 2t - q_lo)``, clipped to
  [0, 1]. It reads the bootstrap as the distribution of the estimator's *error* and so
  corrects its bias. The binned ECE is biased upwards — noise in a bin's accuracy only
  ever adds to ``|accuracy - confidence|`` — and resampling adds more noise, so for a
  well-calibrated model the percentile interval sits above the true calibration error:
  at N = 400 and a true ECE of 2% it covered it in none of 200 simulated test sets, the
  basic interval in 94% (``tests/metrics/test_metrics_calibration.py`` measures both). That is
  why ECE defaults to ``"basic"``, as in Kumar et al.'s (2019) ``calibration`` library.
  AUROC is close to unbiased and keeps ``"percentile"``.

Neither interval need contain the estimate. The same seed and chunk size give the same
interval on the same device type; CPU and CUDA generators draw different streams.

The ``*_resampled`` functions take an index matrix you drew yourself: reuse one matrix for
two models to get a paired comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wrapcal.metrics.calibration import DEFAULT_BINS, bin_index, check_bins, top_label
from wrapcal.metrics.inputs import ArrayLike, check_probs
from wrapcal.metrics.ood import check_scores
from wrapcal.metrics.state import acc_dtype, scatter_sum
from wrapcal.plugin.bootstrap import CHUNK_ELEMENTS, percentile_interval, resample_indices

__all__ = ["auroc_bootstrap", "auroc_resampled", "ece_bootstrap", "ece_resampled"]

# Indices per chunk of resamples: 2^22 int64 = 32 MB; with the gathered values, bins and
# slots of the same shape the peak stays near 130 MB whatever N and B.
_CHUNK_ELEMENTS = CHUNK_ELEMENTS


METHODS = ("basic", "percentile")


def _check_interval_args(level: float, method: str) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level} — e.g. 0.95")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")


def _interval(values: Tensor, estimate: float, level: float, method: str) -> tuple[float, float]:
    q_low, q_high = percentile_interval(values, level)
    if method == "percentile":
        return q_low, q_high
    # Both metrics live in [0, 1]; the reflection can step outside it.
    return max(0.0, 2 * estimate - q_high), min(1.0, 2 * estimate - q_low)


def _ece_rows(bins: Tensor, gap: Tensor, index: Tensor, n_bins: int) -> Tensor:
    """ECE of each row of ``index`` ``[b, N]`` from per-sample bins and signed gaps."""
    b, n = index.shape
    rows = torch.arange(b, device=index.device)[:, None] * n_bins
    sums = scatter_sum((bins[index] + rows).ravel(), gap[index].ravel(), b * n_bins)
    # ECE = sum_bins |sum of (correct - confidence)| / N, see calibration._ece_from.
    return sums.view(b, n_bins).abs().sum(dim=1) / n


def _ece_inputs(probs: ArrayLike, labels: ArrayLike, n_bins: int) -> tuple[Tensor, Tensor]:
    check_bins(n_bins)
    probs, labels = check_probs(probs, labels)
    conf, correct = top_label(probs, labels)
    acc = acc_dtype(conf.device)
    return bin_index(conf, n_bins), correct.to(acc) - conf.to(acc)


def ece_resampled(
    probs: ArrayLike, labels: ArrayLike, index: ArrayLike, n_bins: int = DEFAULT_BINS
) -> Tensor:
    """ECE of each resample: row ``b`` of ``index`` ``[B, N']`` picks the samples.

    Returns:
        ``[B]`` float64 tensor; row ``b`` equals ``ece(probs[index[b]], labels[index[b]])``.
    """
    bins, gap = _ece_inputs(probs, labels, n_bins)
    index = torch.as_tensor(index, device=bins.device).long()
    return _ece_rows(bins, gap, index, n_bins)


def ece_bootstrap(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    n_bins: int = DEFAULT_BINS,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "basic",
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> tuple[float, float]:
    """Bootstrap interval ``(low, high)`` for the top-label ECE.

    Args:
        probs: ``[N, K]`` probabilities.
        labels: ``[N]`` class indices.
        n_bins: Equal-width confidence bins, as in ``ece``.
        n_resamples: Bootstrap resamples B.
        seed: Seed of the resamples' generator.
        level: Coverage of the interval.
        method: ``"basic"`` (default; bias-corrected, see the module docstring) or
            ``"percentile"``.
        chunk_elements: Indices drawn per chunk of resamples (bounds the memory).
    """
    _check_interval_args(level, method)
    bins, gap = _ece_inputs(probs, labels, n_bins)
    n = bins.numel()
    estimate = _ece_rows(bins, gap, torch.arange(n, device=bins.device)[None], n_bins).item()
    values = [
        _ece_rows(bins, gap, index, n_bins)
        for (index,) in resample_indices((n,), n_resamples, seed, bins.device, chunk_elements)
    ]
    return _interval(torch.cat(values), estimate, level, method)


def _auroc_rows(s_in: Tensor, s_out: Tensor, idx_in: Tensor, idx_out: Tensor) -> Tensor:
    sorted_in = torch.sort(s_in[idx_in], dim=1).values
    out = s_out[idx_out]
    # Mann-Whitney per row: ID scores below each OOD score, ties counting 1/2.
    below = torch.searchsorted(sorted_in, out, side="left").sum(dim=1)
    at_or_below = torch.searchsorted(sorted_in, out, side="right").sum(dim=1)
    pairs = 2 * idx_in.shape[1] * idx_out.shape[1]
    return (below + at_or_below).to(acc_dtype(s_in.device)) / pairs


def auroc_resampled(
    scores_in: ArrayLike, scores_out: ArrayLike, index_in: ArrayLike, index_out: ArrayLike
) -> Tensor:
    """AUROC of each resample: rows of ``index_in`` ``[B, N_in']`` and ``index_out``
    ``[B, N_out']`` pick the ID and OOD samples. Returns a ``[B]`` float64 tensor."""
    s_in, s_out = check_scores(scores_in, scores_out)
    idx_in = torch.as_tensor(index_in, device=s_in.device).long()
    idx_out = torch.as_tensor(index_out, device=s_in.device).long()
    if idx_in.ndim != 2 or idx_out.ndim != 2 or idx_in.shape[0] != idx_out.shape[0]:
        raise ValueError(
            f"index_in and index_out must be [B, N] with the same B; got "
            f"{tuple(idx_in.shape)} and {tuple(idx_out.shape)}"
        )
    return _auroc_rows(s_in, s_out, idx_in, idx_out)


def auroc_bootstrap(
    scores_in: ArrayLike,
    scores_out: ArrayLike,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> tuple[float, float]:
    """Bootstrap interval ``(low, high)`` for AUROC; ID and OOD samples are resampled
    separately, so every resample keeps both set sizes.

    Args:
        scores_in: In-distribution scores (higher = more OOD).
        scores_out: OOD scores.
        n_resamples: Bootstrap resamples B.
        seed: Seed of the resamples' generator.
        level: Coverage of the interval.
        method: ``"percentile"`` (default) or ``"basic"``, see the module docstring.
        chunk_elements: Indices drawn per chunk of resamples (bounds the memory).
    """
    _check_interval_args(level, method)
    s_in, s_out = check_scores(scores_in, scores_out)
    n_in, n_out = s_in.numel(), s_out.numel()
    device = s_in.device
    whole_in = torch.arange(n_in, device=device)[None]
    estimate = _auroc_rows(s_in, s_out, whole_in, torch.arange(n_out, device=device)[None])
    values = [
        _auroc_rows(s_in, s_out, idx_in, idx_out)
        for idx_in, idx_out in resample_indices(
            (n_in, n_out), n_resamples, seed, device, chunk_elements
        )
    ]
    return _interval(torch.cat(values), estimate.item(), level, method)
