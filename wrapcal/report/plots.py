"""Matplotlib figures for reports: reliability diagram, OOD score histograms, ROC curves
(from :mod:`wrapcal.report.curves`), and a plugin's curve (risk against coverage).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, never pyplot, so
they work headless, in threads and without touching the user's global pyplot state.
Every function returns the Figure; pass ``ax`` to draw into an axes of your own (the
function then returns ``ax.figure``).

What is drawn is data a test can read back: the reliability diagram's bars are the
``BarContainer`` labelled ``"accuracy"`` (heights = per-bin accuracy) and ``"gap to
confidence"`` (from the accuracy to the mean confidence); each histogram is a
``StepPatch`` whose ``get_data()`` gives the densities and bin edges, labelled with its
data set; each ROC curve is a line labelled with its OOD set (or score). Legends sit
outside the axes, so they never cover a bar.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from wrapcal.metrics.calibration import DEFAULT_BINS, ece, reliability_bins
from wrapcal.metrics.inputs import ArrayLike
from wrapcal.metrics.ood import check_scores
from wrapcal.report.curves import curve_plot, roc_curves, roc_pairs
from wrapcal.report.plot_style import (
    GAP_COLOR,
    ID_COLOR,
    LEGEND_ROW_IN,
    SMALL_PT,
    curve_styles,
    legend_below,
    legend_rows,
    margins,
    new_figure,
    root_figure,
    set_title,
    style,
    to_numpy,
)

__all__ = [
    "curve_plot",
    "histogram_bins",
    "reliability_diagram",
    "roc_curves",
    "roc_pairs",
    "score_histograms",
]


def reliability_diagram(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = DEFAULT_BINS,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Accuracy per confidence bin against the diagonal, with the gaps and the ECE.

    Blue bars are each bin's accuracy; red hatched bars span the gap between accuracy and
    the bin's mean confidence (above the bar: over-confident, inside it: under-confident).
    Without ``ax`` the figure also has a histogram of the confidences below, sharing x,
    and the legend above the diagram.

    Args:
        probs: ``[N, K]`` probabilities.
        labels: ``[N]`` class indices.
        n_bins: Equal-width bins on (0, 1], as for :func:`wrapcal.metrics.ece`.
        ax: Axes to draw the diagram into (no histogram then).
        title: Title of the diagram.

    Returns:
        The Figure drawn into.
    """
    stats = {k: to_numpy(v) for k, v in reliability_bins(probs, labels, n_bins).items()}
    count, conf, acc, edges = stats["count"], stats["confidence"], stats["accuracy"], stats["edges"]
    n = count.sum()
    ece_value = ece(probs, labels, n_bins)
    filled = count > 0
    left, width = edges[:-1][filled], np.diff(edges)[filled]

    if ax is None:
        fig = new_figure((4.6, 5.6))
        ax, hist_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        margins(fig, left=0.7, right=0.15, top=1.05, bottom=0.55, hspace=0.08)
    else:
        fig, hist_ax = root_figure(ax), None
    ax.bar(
        left,
        acc[filled],
        width,
        align="edge",
        color=ID_COLOR,
        edgecolor="white",
        linewidth=0.8,
        label="accuracy",
    )
    ax.bar(
        left,
        conf[filled] - acc[filled],
        width,
        bottom=acc[filled],
        align="edge",
        facecolor="none",
        edgecolor=GAP_COLOR,
        hatch="//",
        linewidth=0.8,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="0.3", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    heading = title if title is not None else "Reliability diagram"
    set_title(ax, f"{heading}\nECE {100 * ece_value:.2f}%  (n = {int(n)}, {n_bins} bins)")
    style(ax)
    if hist_ax is None:
        ax.set_xlabel("confidence (max probability)")
        ax.legend(loc="upper left", fontsize=SMALL_PT)
        return fig
    # Above the diagram, under the title: outside the bars whatever the model does.
    ax.legend(
        loc="lower center",
        bbox_to_anchor=(0.5, 1.16),
        ncol=2,
        fontsize=SMALL_PT,
        frameon=False,
        handlelength=1.6,
        columnspacing=1.0,
    )
    hist_ax.bar(
        edges[:-1],
        count / n,
        np.diff(edges),
        align="edge",
        color="0.55",
        edgecolor="white",
        linewidth=0.8,
        label="share of samples",
    )
    hist_ax.set(xlabel="confidence (max probability)", ylabel="share")
    style(hist_ax)
    return fig


def _score_arrays(
    scores_in: ArrayLike, scores_out: Mapping[str, ArrayLike]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if not scores_out:
        raise ValueError("scores_out is empty — pass {'name of OOD set': scores, ...}")
    checked = {name: check_scores(scores_in, s) for name, s in scores_out.items()}
    first = next(iter(checked.values()))[0]
    return to_numpy(first), {name: to_numpy(pair[1]) for name, pair in checked.items()}


def histogram_bins(groups: Sequence[np.ndarray], n_bins: int = 40) -> tuple[np.ndarray, str]:
    """Bin edges shared by the histograms of several groups of one score, and the x scale.

    * Integer scores over a short range (a set size): one bin per value.
    * Non-negative scores where some group piles up at the minimum (``msp`` or
      ``entropy`` of a confident model: the group's median within the lowest 2% of the
      range): ``"log"`` scale, geometric bins from the 1st percentile of the positive
      values to the maximum; smaller values are counted in the first bin.
    * Otherwise linear bins over the 0.5 to 99.5 percentiles of all the values, so a few
      outliers do not squash the bulk into one bin; values outside go to the end bins.

    Args:
        groups: The score's values in each group (in-distribution, each OOD set).
        n_bins: Number of bins (log and linear scales).

    Returns:
        ``(edges, scale)`` with ``scale`` ``"linear"`` or ``"log"``; values are to be
        clipped into ``[edges[0], edges[-1]]``.
    """
    groups = [np.asarray(g, dtype=np.float64) for g in groups]
    values = np.concatenate(groups)
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return np.array([lo - 0.5, lo + 0.5]), "linear"
    if np.all(values == np.round(values)) and hi - lo <= 50:
        return np.arange(lo - 0.5, hi + 1.0), "linear"
    piled = any(np.median(g) - lo < 0.02 * (hi - lo) for g in groups)
    positive = values[values > 0]
    if lo >= 0 and piled and positive.size:
        low = float(np.quantile(positive, 0.01))
        if 0 < low < hi:
            return np.geomspace(low, hi, n_bins + 1), "log"
    q_lo, q_hi = np.quantile(values, [0.005, 0.995])
    if q_hi <= q_lo:
        q_lo, q_hi = lo, hi
    return np.linspace(q_lo, q_hi, n_bins + 1), "linear"


def _densities(x: np.ndarray, edges: np.ndarray, scale: str) -> np.ndarray:
    """Density of ``x`` over ``edges`` (per unit of log10 on a log scale)."""
    x = np.clip(x, edges[0], edges[-1])
    if scale == "log":
        return np.histogram(np.log10(x), bins=np.log10(edges), density=True)[0]
    return np.histogram(x, bins=edges, density=True)[0]


def score_histograms(
    scores_in: ArrayLike,
    scores_out: Mapping[str, ArrayLike],
    score_name: str,
    ax: Axes | None = None,
    threshold: float | None = None,
    tpr: float = 0.95,
    title: str | None = None,
) -> Figure:
    """Density histograms of an OOD score: in-distribution (filled) against each OOD set.

    Bins come from :func:`histogram_bins` over all the scores together (shared bins keep
    the densities comparable). The legend sits below the axes.

    Args:
        scores_in: ``[N_in]`` scores of the in-distribution test set (higher = more OOD).
        scores_out: OOD set name -> ``[N_out]`` scores.
        score_name: The score's name, for the axis label and title.
        ax: Axes to draw into.
        threshold: A threshold to mark (e.g. the one accepting 95% of the test set).
        tpr: The share of in-distribution samples ``threshold`` accepts, for its label.
        title: The title (default: names the score).

    Returns:
        The Figure drawn into.
    """
    s_in, outs = _score_arrays(scores_in, scores_out)
    entries = 1 + len(outs) + (threshold is not None)
    if ax is None:
        rows = legend_rows(entries, ncol=1)
        fig = new_figure((4.6, 3.3 + rows * LEGEND_ROW_IN))
        ax = fig.add_subplot()
        margins(fig, left=0.7, right=0.15, top=0.35, bottom=0.75 + rows * LEGEND_ROW_IN)
    else:
        fig = root_figure(ax)
    edges, scale = histogram_bins([s_in, *outs.values()])
    ax.stairs(
        _densities(s_in, edges, scale),
        edges,
        fill=True,
        color=ID_COLOR,
        alpha=0.45,
        label=f"in-distribution test (n={len(s_in)})",
    )
    for (name, s_out), (color, linestyle) in zip(
        outs.items(), curve_styles(len(outs)), strict=True
    ):
        ax.stairs(
            _densities(s_out, edges, scale),
            edges,
            linewidth=1.6,
            color=color,
            linestyle=linestyle,
            label=f"{name} (n={len(s_out)})",
        )
    if threshold is not None:
        # Inside the bins' range (a threshold of 0 cannot be drawn on a log axis).
        ax.axvline(
            min(max(threshold, edges[0]), edges[-1]),
            color="black",
            linestyle="--",
            linewidth=1.2,
            label=f"accepts {100 * tpr:g}% of ID: {threshold:.4g}",
        )
    if scale == "log":
        ax.set_xscale("log")
        ax.set(xlabel=f"{score_name} (log scale; higher = more OOD)", ylabel="density per decade")
    else:
        ax.set(xlabel=f"{score_name} (higher = more OOD)", ylabel="density")
    ax.set_xlim(edges[0], edges[-1])
    set_title(ax, title or f"{score_name}: in-distribution vs OOD")
    style(ax)
    legend_below(ax, ncol=1)
    return fig
