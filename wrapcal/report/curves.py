"""Line figures of the report: ROC curves (one score over OOD sets, or every score on one
OOD set) and a plugin's curve with its operating point (risk against coverage).

Each ROC curve is a line labelled with what it shows (its OOD set or score), whose data
is :func:`wrapcal.metrics.roc_curve`'s: in-distribution positive, false positive rate
(OOD accepted) on x, true positive rate (ID accepted) on y. Legends sit below the axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from wrapcal.metrics.inputs import ArrayLike
from wrapcal.metrics.ood import auroc, check_scores, roc_curve
from wrapcal.report.plot_style import (
    GAP_COLOR,
    ID_COLOR,
    LEGEND_ROW_IN,
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

__all__ = ["curve_plot", "roc_curves", "roc_pairs"]


def _roc_axes(ax: Axes | None, entries: int) -> tuple[Figure, Axes]:
    if ax is not None:
        return root_figure(ax), ax
    rows = legend_rows(entries, ncol=1)
    fig = new_figure((4.6, 3.9 + rows * LEGEND_ROW_IN))
    ax = fig.add_subplot()
    margins(fig, left=0.7, right=0.35, top=0.35, bottom=0.75 + rows * LEGEND_ROW_IN)
    return fig, ax


def _roc_lines(ax: Axes, pairs: Mapping[str, tuple[ArrayLike, ArrayLike]], title: str) -> None:
    # Every curve its own colour (and line style beyond seven): a figure of every score
    # of a model holds ten or more.
    styles = curve_styles(len(pairs))
    for (name, (s_in, s_out)), (color, linestyle) in zip(pairs.items(), styles, strict=True):
        fpr, tpr, _ = roc_curve(s_in, s_out)
        value = auroc(s_in, s_out)
        flag = ", inverted" if value < 0.5 else ""
        ax.plot(
            to_numpy(fpr),
            to_numpy(tpr),
            linewidth=1.6,
            color=color,
            linestyle=linestyle,
            label=f"{name} (AUROC {100 * value:.2f}%{flag})",
        )
    ax.plot([0, 1], [0, 1], ":", color="0.4", linewidth=1, label="chance")
    ax.axhline(0.95, color="black", linestyle="--", linewidth=0.8, label="95% of ID accepted")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="OOD accepted (FPR)", ylabel="ID accepted (TPR)")
    set_title(ax, title)
    style(ax)
    legend_below(ax, ncol=1)


def roc_curves(
    scores_in: ArrayLike,
    scores_out: Mapping[str, ArrayLike],
    score_name: str,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """ROC curve of each OOD set with in-distribution positive, AUROC in the legend.

    Args:
        scores_in: ``[N_in]`` scores of the in-distribution test set (higher = more OOD).
        scores_out: OOD set name -> ``[N_out]`` scores.
        score_name: The score's name, for the title.
        ax: Axes to draw into.
        title: The title (default: the score's name).

    Returns:
        The Figure drawn into.
    """
    if not scores_out:
        raise ValueError("scores_out is empty — pass {'name of OOD set': scores, ...}")
    for s_out in scores_out.values():
        check_scores(scores_in, s_out)  # validates before drawing anything
    fig, ax = _roc_axes(ax, len(scores_out) + 2)
    pairs = {name: (scores_in, s_out) for name, s_out in scores_out.items()}
    _roc_lines(ax, pairs, title or f"ROC, {score_name} (ID = positive)")
    return fig


def roc_pairs(
    pairs: Mapping[str, tuple[ArrayLike, ArrayLike]], title: str, ax: Axes | None = None
) -> Figure:
    """ROC curves of labelled ``(scores_in, scores_out)`` pairs: every score on one OOD
    set, or each OOD set with its own best score.

    Args:
        pairs: Label -> ``(scores_in, scores_out)``, higher = more OOD.
        title: The title.
        ax: Axes to draw into.

    Returns:
        The Figure drawn into.
    """
    if not pairs:
        raise ValueError("pairs is empty — pass {'label': (scores_in, scores_out), ...}")
    for s_in, s_out in pairs.values():
        check_scores(s_in, s_out)
    fig, ax = _roc_axes(ax, len(pairs) + 2)
    _roc_lines(ax, pairs, title)
    return fig


def curve_plot(
    x: Sequence[float],
    y: Sequence[float],
    *,
    x_label: str,
    y_label: str,
    title: str,
    point: tuple[float, float] | None = None,
    point_label: str = "operating point",
    percent: bool = True,
    ax: Axes | None = None,
) -> Figure:
    """A plugin's curve (e.g. selective risk against coverage) with its operating point.

    Args:
        x: The curve's x values (fractions when ``percent``).
        y: Its y values.
        x_label: The x axis's label.
        y_label: The y axis's label.
        title: The title.
        point: ``(x, y)`` of the chosen operating point, marked and labelled.
        point_label: Its legend label (the coordinates are appended).
        percent: Draw fractions as percentages.
        ax: Axes to draw into.

    Returns:
        The Figure drawn into.
    """
    scale, unit = (100.0, "%") if percent else (1.0, "")
    if ax is None:
        fig = new_figure((4.6, 3.9))
        ax = fig.add_subplot()
        margins(fig, left=0.7, right=0.15, top=0.35, bottom=0.95)
    else:
        fig = root_figure(ax)
    xs, ys = scale * np.asarray(x, dtype=float), scale * np.asarray(y, dtype=float)
    ax.plot(xs, ys, color=ID_COLOR, linewidth=1.6, label=y_label)
    if point is not None:
        px, py = scale * point[0], scale * point[1]
        fmt = ".2f" if percent else ".4g"
        label = f"{point_label}: {x_label} {px:{fmt}}{unit}, {y_label} {py:{fmt}}{unit}"
        ax.plot([px], [py], "o", color=GAP_COLOR, markersize=7, label=label)
    suffix = " (%)" if percent else ""
    ax.set(xlabel=x_label + suffix, ylabel=y_label + suffix)
    set_title(ax, title)
    style(ax)
    legend_below(ax, ncol=1)
    return fig
