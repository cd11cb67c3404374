"""The one bootstrap of wrapcal: resamples of rows drawn in chunks, percentile intervals.

The plugins' report rows (:func:`bootstrap_means`) and the metrics' intervals
(:mod:`wrapcal.metrics.bootstrap`, ECE and AUROC) draw their resamples here, so they
share one resampling scheme: index matrices ``[b, n]`` drawn with replacement from a
``torch.Generator`` seeded on the data's device, in chunks of about
:data:`CHUNK_ELEMENTS` indices whatever the number of rows and resamples (memory stays
bounded), and intervals read off the resampled values with
:func:`percentile_interval`. The same seed and chunk size give the same resamples on the
same device type; CPU and CUDA generators draw different streams.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["CHUNK_ELEMENTS", "bootstrap_means", "percentile_interval", "resample_indices"]

#: Indices per chunk of bootstrap resamples: 2^22 int64 = 32 MB.
CHUNK_ELEMENTS = 1 << 22


def resample_indices(
    sizes: Sequence[int],
    n_resamples: int,
    seed: int,
    device: torch.device | str,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Bootstrap index matrices, one chunk of resamples at a time.

    Each chunk holds ``b`` resamples (``b * sum(sizes) <= chunk_elements``, at least 1)
    and yields one index matrix ``[b, n]`` per population size ``n`` in ``sizes``, drawn
    in that order from one generator: two populations (ID and OOD scores) are
    resampled separately, so every resample keeps both sizes.

    Args:
        sizes: The number of rows of each population (each > 0).
        n_resamples: Resamples in all, B >= 1.
        seed: Seed of the ``torch.Generator`` on ``device``.
        device: Where the indices are drawn.
        chunk_elements: Indices drawn per chunk (bounds the memory).

    Raises:
        ValueError: ``n_resamples < 1`` or an empty population.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1; got {n_resamples}")
    if not sizes or min(sizes) < 1:
        raise ValueError(f"every population to resample needs rows; got sizes {list(sizes)}")
    generator = torch.Generator(device=device).manual_seed(seed)
    step = max(1, chunk_elements // sum(sizes))
    for low in range(0, n_resamples, step):
        b = min(step, n_resamples - low)
        yield tuple(torch.randint(n, (b, n), generator=generator, device=device) for n in sizes)


def bootstrap_means(values: torch.Tensor, n_resamples: int = 1000, seed: int = 0) -> torch.Tensor:
    """Column means of ``values`` ``[N, J]`` over bootstrap resamples of its rows: ``[B, J]``.

    Every column is resampled with the same rows (a paired resample), drawn by
    :func:`resample_indices` from a generator seeded with ``seed`` on the data's device.
    """
    n = values.shape[0]
    if n == 0 or n_resamples < 1:
        raise ValueError(f"need rows and n_resamples >= 1; got {n} rows, {n_resamples}")
    out = []
    for (index,) in resample_indices((n,), n_resamples, seed, values.device):
        out.append(torch.stack([column[index].mean(dim=1) for column in values.T], dim=1))
    return torch.cat(out)


def percentile_interval(samples: torch.Tensor, level: float = 0.95) -> list[float]:
    """The percentile interval ``[low, high]`` of bootstrap values: their
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (linear interpolation, as
    ``numpy.percentile``), computed in the values' dtype."""
    tail = (1 - level) / 2
    qs = torch.tensor([tail, 1 - tail], dtype=samples.dtype, device=samples.device)
    return [float(v) for v in torch.quantile(samples, qs)]
