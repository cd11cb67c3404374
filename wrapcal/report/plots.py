"""Matplotlib figures for reports: reliability diagram, OOD score histograms, ROC curves.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, never pyplot, so
they work headless, in threads and without touching the user's global pyplot state.
Every function returns the Figure; pass ``ax`` to draw into an axes of your own (the
function then returns ``ax.figure``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from wrapcal.metrics.calibration import DEFAULT_BINS, ArrayLike, ece, reliability_bins
from wrapcal.metrics.ood import auroc, check_scores, roc_curve

__all__ = ["reliability_diagram", "roc_curves", "score_histograms"]

_ID_COLOR = "#1f77b4"
_GAP_COLOR = "#d62728"


@dataclass
class FigureFile:
    """A figure of the report, rendered to PNG.

    Attributes:
        kind: ``"reliability"`` or ``"ood"``.
        model: The model's name.
        score: The OOD score's name (``None`` for a reliability diagram).
        title: A caption.
        filename: Its file name under ``figures/``.
        png: The PNG bytes.
    """

    kind: str
    model: str
    score: str | None
    title: str
    filename: str
    png: bytes


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: fig.savefig and fig.canvas work without pyplot
    return fig


def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """The given axes and their figure, or a new figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    fig = _new_figure(figsize)
    return fig, fig.add_subplot()


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


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
    Without ``ax`` the figure also has a histogram of the confidences below, sharing x.

    Args:
        probs: ``[N, K]`` probabilities.
        labels: ``[N]`` class indices.
        n_bins: Equal-width bins on (0, 1], as for :func:`wrapcal.metrics.ece`.
        ax: Axes to draw the diagram into (no histogram then).
        title: Title of the diagram.

    Returns:
        The Figure drawn into.
    """
    stats = {k: _numpy(v) for k, v in reliability_bins(probs, labels, n_bins).items()}
    count, conf, acc, edges = stats["count"], stats["confidence"], stats["accuracy"], stats["edges"]
    n = count.sum()
    ece_value = ece(probs, labels, n_bins)
    filled = count > 0
    left, width = edges[:-1][filled], np.diff(edges)[filled]
    acc_f, conf_f = acc[filled], conf[filled]

    if ax is None:
        fig = _new_figure((5.0, 6.0))
        ax, hist_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        fig, hist_ax = ax.figure, None

    ax.bar(
        left,
        acc_f,
        width,
        align="edge",
        color=_ID_COLOR,
        edgecolor="white",
        linewidth=0.8,
        label="accuracy",
    )
    ax.bar(
        left,
        conf_f - acc_f,
        width,
        bottom=acc_f,
        align="edge",
        facecolor="none",
        edgecolor=_GAP_COLOR,
        hatch="//",
        linewidth=0.8,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="0.3", linewidth=1, label="perfect calibration")
    ax.text(
        0.04,
        0.95,
        f"ECE = {100 * ece_value:.2f}%\nN = {int(n)}, {n_bins} bins",
        transform=ax.transAxes,
        va="top",
        ha="left",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9},
    )
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ax.set_title(title if title is not None else "Reliability diagram")
    # Top left sits above the bars of the usual, over-confident model.
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.84), fontsize="small")
    if hist_ax is None:
        ax.set_xlabel("confidence (max probability)")
    else:
        hist_ax.bar(
            edges[:-1],
            count / n,
            np.diff(edges),
            align="edge",
            color="0.55",
            edgecolor="white",
            linewidth=0.8,
        )
        hist_ax.set(xlabel="confidence (max probability)", ylabel="share of samples")
    return fig


def _score_arrays(
    scores_in: ArrayLike, scores_out: dict[str, ArrayLike]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if not scores_out:
        raise ValueError("scores_out is empty — pass {'name of OOD set': scores, ...}")
    checked = {name: check_scores(scores_in, s) for name, s in scores_out.items()}
    first = next(iter(checked.values()))[0]
    return _numpy(first), {name: _numpy(pair[1]) for name, pair in checked.items()}


def score_histograms(
    scores_in: ArrayLike,
    scores_out: dict[str, ArrayLike],
    score_name: str,
    ax: Axes | None = None,
) -> Figure:
    """Overlaid density histograms of an OOD score: ID against each OOD set.

    Args:
        scores_in: ``[N_in]`` scores of the in-distribution test set (higher = more OOD).
        scores_out: OOD set name -> ``[N_out]`` scores.
        score_name: The score's name, for the axis label and title.
        ax: Axes to draw into.

    Returns:
        The Figure drawn into.
    """
    s_in, outs = _score_arrays(scores_in, scores_out)
    fig, ax = _figure_and_axes(ax, (6.0, 4.0))
    everything = np.concatenate([s_in, *outs.values()])
    lo, hi = everything.min(), everything.max()
    # Shared bins keep the densities comparable; a constant score still gets one bin.
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 51)
    ax.hist(
        s_in,
        bins=bins,
        density=True,
        color=_ID_COLOR,
        alpha=0.5,
        label=f"in-distribution (n={len(s_in)})",
    )
    for name, s_out in outs.items():
        ax.hist(
            s_out,
            bins=bins,
            density=True,
            histtype="step",
            linewidth=1.6,
            label=f"{name} (n={len(s_out)})",
        )
    ax.set(xlabel=f"{score_name} (higher = more OOD)", ylabel="density")
    ax.set_title(f"{score_name}: in-distribution vs OOD")
    ax.legend(fontsize="small")
    return fig


def roc_curves(
    scores_in: ArrayLike,
    scores_out: dict[str, ArrayLike],
    score_name: str,
    ax: Axes | None = None,
) -> Figure:
    """ROC curve of each OOD set with in-distribution positive, AUROC in the legend.

    Args:
        scores_in: ``[N_in]`` scores of the in-distribution test set (higher = more OOD).
        scores_out: OOD set name -> ``[N_out]`` scores.
        score_name: The score's name, for the title.
        ax: Axes to draw into.

    Returns:
        The Figure drawn into.
    """
    _score_arrays(scores_in, scores_out)  # validates before drawing anything
    fig, ax = _figure_and_axes(ax, (5.0, 5.0))
    for name, s_out in scores_out.items():
        fpr, tpr, _ = roc_curve(scores_in, s_out)
        ax.plot(
            _numpy(fpr),
            _numpy(tpr),
            linewidth=1.6,
            label=f"{name} (AUROC {100 * auroc(scores_in, s_out):.1f}%)",
        )
    ax.plot([0, 1], [0, 1], ":", color="0.4", linewidth=1, label="chance")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        aspect="equal",
        xlabel="false positive rate (OOD accepted)",
        ylabel="true positive rate (ID accepted)",
    )
    ax.set_title(f"ROC, {score_name} (ID = positive)")
    ax.legend(loc="lower right", fontsize="small")
    return fig
