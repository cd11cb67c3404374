"""Percentile bootstrap confidence intervals for ECE and AUROC, vectorised over resamples.

A resample is a row of an index matrix ``[B, N]`` drawn with replacement from a seeded
``torch.Generator`` on the data's device; the metric is computed for a whole chunk of
rows at once (a scatter-add over (resample, bin) slots for ECE, a batched ``searchsorted``
for AUROC). Chunks bound the memory to about ``chunk_elements`` indices whatever N and B.
The interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the B values
(linear interpolation, as ``numpy.percentile``). The same seed and chunk size give the same
interval on the same device type; CPU and CUDA generators draw different streams.

The ``*_resampled`` functions take an index matrix you drew yourself: reuse one matrix for
two models to get a paired comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wrapcal.metrics.calibration import (
    DEFAULT_BINS,
    ArrayLike,
    _bin_index,
    _check_bins,
    _top_label,
    acc_dtype,
    check_probs,
    scatter_sum,
)
from wrapcal.metrics.ood import check_scores

__all__ = ["auroc_bootstrap", "auroc_resampled", "ece_bootstrap", "ece_resampled"]

# Indices per chunk of resamples: 2^22 int64 = 32 MB; with the gathered values, bins and
# slots of the same shape the peak stays near 130 MB whatever N and B.
_CHUNK_ELEMENTS = 1 << 22


def _interval(values: Tensor, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level} — e.g. 0.95")
    alpha = (1 - level) / 2
    qs = torch.tensor([alpha, 1 - alpha], dtype=values.dtype, device=values.device)
    low, high = torch.quantile(values, qs).tolist()
    return low, high


def _resample_chunks(n_resamples: int, per_row: int, chunk_elements: int):
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1; got {n_resamples}")
    step = max(1, chunk_elements // per_row)
    for lo in range(0, n_resamples, step):
        yield min(step, n_resamples - lo)


def _ece_rows(bins: Tensor, gap: Tensor, index: Tensor, n_bins: int) -> Tensor:
    """ECE of each row of ``index`` ``[b, N]`` from per-sample bins and signed gaps."""
    b, n = index.shape
    rows = torch.arange(b, device=index.device)[:, None] * n_bins
    sums = scatter_sum((bins[index] + rows).ravel(), gap[index].ravel(), b * n_bins)
    # ECE = sum_bins |sum of (correct - confidence)| / N, see calibration._ece_from.
    return sums.view(b, n_bins).abs().sum(dim=1) / n


def _ece_inputs(probs: ArrayLike, labels: ArrayLike, n_bins: int) -> tuple[Tensor, Tensor]:
    _check_bins(n_bins)
    probs, labels = check_probs(probs, labels)
    conf, correct = _top_label(probs, labels)
    acc = acc_dtype(conf.device)
    return _bin_index(conf, n_bins), correct.to(acc) - conf.to(acc)


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
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` for the top-label ECE."""
    bins, gap = _ece_inputs(probs, labels, n_bins)
    n = bins.numel()
    gen = torch.Generator(device=bins.device).manual_seed(seed)
    values = []
    for b in _resample_chunks(n_resamples, n, chunk_elements):
        index = torch.randint(n, (b, n), generator=gen, device=bins.device)
        values.append(_ece_rows(bins, gap, index, n_bins))
    return _interval(torch.cat(values), level)


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
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` for AUROC; ID and OOD samples are
    resampled separately, so every resample keeps both set sizes."""
    s_in, s_out = check_scores(scores_in, scores_out)
    n_in, n_out = s_in.numel(), s_out.numel()
    device = s_in.device
    gen = torch.Generator(device=device).manual_seed(seed)
    values = []
    for b in _resample_chunks(n_resamples, n_in + n_out, chunk_elements):
        idx_in = torch.randint(n_in, (b, n_in), generator=gen, device=device)
        idx_out = torch.randint(n_out, (b, n_out), generator=gen, device=device)
        values.append(_auroc_rows(s_in, s_out, idx_in, idx_out))
    return _interval(torch.cat(values), level)
