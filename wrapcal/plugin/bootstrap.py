"""The bootstrap plugins and the report share: paired resamples of rows, percentile intervals.

Resamples are drawn from a ``torch.Generator`` seeded on the data's device, in chunks of
about 4M indices whatever the number of rows and resamples, so memory stays bounded.
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK_ELEMENTS", "bootstrap_means", "percentile_interval"]

#: Indices per chunk of bootstrap resamples.
CHUNK_ELEMENTS = 1 << 22


def bootstrap_means(values: torch.Tensor, n_resamples: int = 1000, seed: int = 0) -> torch.Tensor:
    """Column means of ``values`` ``[N, J]`` over bootstrap resamples of its rows: ``[B, J]``.

    Every column is resampled with the same rows (a paired resample), drawn from a
    ``torch.Generator`` seeded with ``seed`` on the data's device, in chunks of about
    4M indices whatever N and B, as :mod:`wrapcal.metrics.bootstrap` does for ECE and AUROC.
    """
    n = values.shape[0]
    if n == 0 or n_resamples < 1:
        raise ValueError(f"need rows and n_resamples >= 1; got {n} rows, {n_resamples}")
    generator = torch.Generator(device=values.device).manual_seed(seed)
    step, out = max(1, CHUNK_ELEMENTS // n), []
    for low in range(0, n_resamples, step):
        index = torch.randint(
            n, (min(step, n_resamples - low), n), generator=generator, device=values.device
        )
        out.append(torch.stack([column[index].mean(dim=1) for column in values.T], dim=1))
    return torch.cat(out)


def percentile_interval(samples: torch.Tensor, level: float = 0.95) -> list[float]:
    """The percentile interval ``[low, high]`` of bootstrap values (linear interpolation,
    as ``numpy.percentile``)."""
    tail = (1 - level) / 2
    qs = torch.tensor([tail, 1 - tail], dtype=samples.dtype, device=samples.device)
    return [float(v) for v in torch.quantile(samples, qs)]
