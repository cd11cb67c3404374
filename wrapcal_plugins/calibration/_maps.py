"""One-dimensional calibration maps as knot tables: fitted in numpy, applied in torch.

Histogram binning and isotonic regression learn, for each of ``R`` rows (a class, or
the pooled top label), a map from a probability in ``[0, 1]`` to a calibrated one:

* a step map (binning): sorted inner bin edges and one value per bin; a probability
  goes to the bin ``i`` with ``edges[i - 1] < p <= edges[i]`` (bins closed on the
  right, as ``wrapcal.metrics`` bins confidences);
* a piecewise-linear map (isotonic regression): knots ``x`` (strictly increasing) and
  ``y``; linear in between and constant outside, as ``numpy.interp`` and scikit-learn's
  ``IsotonicRegression(out_of_bounds="clip")`` apply them.

Rows have different lengths; they are stored padded to one ``[R, M]`` table with
knots above 1 that no probability reaches (finite: loaded buffers must be), so the
lookups are ``torch.searchsorted`` and gathers: plain tensor operations that export.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "PAD",
    "equal_width_map",
    "interp_lookup",
    "isotonic_map",
    "pad_knots",
    "pad_steps",
    "step_lookup",
    "uniform_mass_map",
]

#: Padding knots start here: above every probability, finite.
PAD = 2.0


def uniform_mass_map(
    scores: np.ndarray,
    hits: np.ndarray,
    n_bins: int,
    prior: np.ndarray | None = None,
    weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Gupta & Ramdas's (2021) uniform-mass binning of ``scores`` against 0/1 ``hits``.

    The sorted scores are split into ``n_bins`` groups of sizes differing by at most
    one (``numpy.array_split``); a group's largest score is its bin's upper edge (the
    last bin is open above). A bin's value is the mean of its hits, 0.5 if it is empty
    (ties can empty one). Their code also adds tiny random noise to break ties
    ("delta-randomisation"); this does not, so the map is deterministic.

    With ``prior`` (a value in ``[0, 1]`` per score) and ``weight > 0``, a bin's value
    is shrunk towards the mean prior of its samples: ``(sum hits + weight * mean prior)
    / (count + weight)``, the posterior mean of a bin with ``weight`` pseudo-observations
    at the prior (an empty bin gets the prior's overall mean).

    Returns:
        ``(edges [n_bins - 1], values [n_bins])``.
    """
    ordered = np.sort(scores)
    groups = np.array_split(ordered, n_bins)
    edges = np.array([g[-1] for g in groups[:-1]], dtype=np.float64)
    index = np.searchsorted(edges, scores, side="left")  # number of edges < score
    if prior is None or weight <= 0:
        return edges, _bin_means(index, hits, n_bins, np.full(n_bins, 0.5))
    counts = np.bincount(index, minlength=n_bins)
    sums = np.bincount(index, weights=hits.astype(np.float64), minlength=n_bins)
    prior = np.asarray(prior, dtype=np.float64)
    prior_means = np.where(
        counts > 0,
        np.bincount(index, weights=prior, minlength=n_bins) / np.maximum(counts, 1),
        prior.mean(),
    )
    values = (sums + weight * prior_means) / (counts + weight)
    return edges, np.clip(values, 0.0, 1.0)


def equal_width_map(
    scores: np.ndarray, hits: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram binning on ``n_bins`` equal-width bins of ``[0, 1]`` (Zadrozny & Elkan
    2001; netcal's ``HistogramBinning``): a bin's value is the mean of its hits, its
    centre if it is empty (as netcal does).

    Returns:
        ``(edges [n_bins - 1], values [n_bins])``.
    """
    edges = np.arange(1, n_bins, dtype=np.float64) / n_bins
    index = np.searchsorted(edges, scores, side="left")
    centres = (np.arange(n_bins) + 0.5) / n_bins
    return edges, _bin_means(index, hits, n_bins, centres)


def _bin_means(index: np.ndarray, hits: np.ndarray, n_bins: int, empty: np.ndarray) -> np.ndarray:
    counts = np.bincount(index, minlength=n_bins)
    sums = np.bincount(index, weights=hits.astype(np.float64), minlength=n_bins)
    return np.where(counts > 0, sums / np.maximum(counts, 1), empty)


def isotonic_map(scores: np.ndarray, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``IsotonicRegression`` (increasing, values in ``[0, 1]``, clipped
    outside the data) of ``hits`` on ``scores``: its knots ``(x, y)``.

    The same steps as scikit-learn's ``fit`` (sort by score then hit, average the hits of
    scores that ``_make_unique`` merges, pool adjacent violators, clip to ``[0, 1]``, drop
    the inner knots of flat runs), without its per-call input validation, which cost
    more than the fit itself when a calibrator fits one map per class and per fold. The
    knots equal scikit-learn's (a test compares them on the shared logit sets)."""
    # Imported here: plugin discovery imports every plugin module, and scipy would add
    # seconds to the first wrap or load of any model.
    from scipy.optimize import isotonic_regression

    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(hits, dtype=np.float64)
    # scikit-learn sorts by score, then hit; hits are 0 or 1, so a group's sum is exact
    # in any order and a stable sort by score alone gives the same groups and means.
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    starts = _merged_starts(x)
    group = np.cumsum(starts) - 1
    weights = np.bincount(group).astype(np.float64)
    means = np.bincount(group, weights=y) / weights
    fitted = np.clip(isotonic_regression(means, weights=weights, increasing=True).x, 0.0, 1.0)
    keep = np.ones(len(fitted), dtype=bool)
    keep[1:-1] = (fitted[1:-1] != fitted[:-2]) | (fitted[1:-1] != fitted[2:])
    return x[starts][keep], fitted[keep]


def _merged_starts(x: np.ndarray) -> np.ndarray:
    """Where a new value starts in sorted ``x`` by scikit-learn's ``_make_unique`` rule:
    a score starts a new value when it is at least float64's resolution (1e-15) above the
    first score of the current value, so that near-equal tiny probabilities merge."""
    eps = np.finfo(np.float64).resolution
    n = len(x)
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    gaps = x[1:] - x[:-1]
    starts[1:] = gaps >= eps  # a gap that wide starts a value whatever came before
    near = np.flatnonzero((gaps > 0) & (gaps < eps)) + 1
    if near.size:
        # Runs of near-equal scores (in practice one, the tiny probabilities): walk each
        # from its first score, jumping to the first score a resolution above.
        heads = np.flatnonzero(starts)
        for head in np.unique(heads[np.searchsorted(heads, near, side="right") - 1]):
            after = np.searchsorted(heads, head, side="right")
            end = int(heads[after]) if after < len(heads) else n
            first = int(head)
            while True:
                nxt = first + int(np.searchsorted(x[first:end] - x[first], eps, side="left"))
                if nxt >= end:
                    break
                starts[nxt] = True
                first = nxt
    return starts


def pad_steps(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step maps ``(edges [B - 1], values [B])`` -> ``edges [R, M - 1]``, ``values [R, M]``
    (float64), edges padded with :data:`PAD` (never below a probability, so never
    counted) and values with 0.5 (never reached)."""
    width = max(len(values) for _, values in rows)
    edges = np.full((len(rows), width - 1), PAD)
    values = np.full((len(rows), width), 0.5)
    for r, (e, v) in enumerate(rows):
        edges[r, : len(e)] = e
        values[r, : len(v)] = v
    return torch.from_numpy(edges), torch.from_numpy(values)


def pad_knots(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Piecewise-linear maps ``(x, y)`` -> ``x [R, M]``, ``y [R, M]`` (float64, M >= 2):
    each row continued with knots ``PAD, PAD + 1, ...`` at its last value, so the map
    stays constant past its last knot and no two knots of a row coincide."""
    width = max(2, *(len(x) for x, _ in rows))
    xs = np.empty((len(rows), width))
    ys = np.empty((len(rows), width))
    for r, (x, y) in enumerate(rows):
        xs[r, : len(x)], ys[r, : len(y)] = x, y
        xs[r, len(x) :] = PAD + np.arange(width - len(x))
        ys[r, len(y) :] = y[-1]
    return torch.from_numpy(xs), torch.from_numpy(ys)


def step_lookup(edges: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Values of step maps at ``scores``: row ``r`` of ``edges [R, E]`` / ``values [R, E+1]``
    maps ``scores[r]`` (``[R, B]``); the result is ``[R, B]`` in the scores' dtype."""
    edges = edges.to(device=scores.device, dtype=scores.dtype)
    index = torch.searchsorted(edges.contiguous(), scores.contiguous())
    return values.to(device=scores.device, dtype=scores.dtype).gather(1, index)


def interp_lookup(xs: torch.Tensor, ys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear maps at ``scores``, row by row as :func:`step_lookup`: linear
    between knots, the end values outside them (``numpy.interp``)."""
    xs = xs.to(device=scores.device, dtype=scores.dtype).contiguous()
    ys = ys.to(device=scores.device, dtype=scores.dtype)
    upper = torch.searchsorted(xs, scores.contiguous(), right=True).clamp(1, xs.shape[1] - 1)
    lower = upper - 1
    x0, x1 = xs.gather(1, lower), xs.gather(1, upper)
    y0, y1 = ys.gather(1, lower), ys.gather(1, upper)
    span = x1 - x0  # > 0, unless two float64 knots round to one value in float32
    t = ((scores - x0) / torch.where(span > 0, span, torch.ones_like(span))).clamp(0, 1)
    return y0 + t * (y1 - y0)
