"""What every report figure shares: colours, font sizes, fixed margins, legends outside.

Sizes are fixed in inches (no constrained layout: it draws every figure twice) and text
is at least :data:`SMALL_PT` points, so a 460 px wide figure shown 380 px wide on a
phone still reads (9 pt at 100 dpi = 12.5 px, shown as 10.3 px).
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from wrapcal.metrics.inputs import ArrayLike

__all__ = [
    "GAP_COLOR",
    "ID_COLOR",
    "LABEL_PT",
    "LEGEND_ROW_IN",
    "SMALL_PT",
    "TITLE_PT",
    "curve_styles",
    "legend_below",
    "legend_rows",
    "margins",
    "new_figure",
    "ood_color",
    "root_figure",
    "set_title",
    "style",
    "to_numpy",
]

ID_COLOR = "#1f77b4"
GAP_COLOR = "#d62728"
_OOD_COLORS = ("#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#a6761d", "#444444")
#: Font sizes in points.
TITLE_PT, LABEL_PT, SMALL_PT = 11, 10, 9
#: Height of one legend row at SMALL_PT, in inches.
LEGEND_ROW_IN = 0.2


#: Figures with more curves than ``_OOD_COLORS`` holds: tab20's colours, its strong ones
#: first, drawn solid, then the light ones, dashed, so a light colour is not taken for its
#: strong pair. Left out: blue (the in-distribution colour), light blue (near it and
#: light cyan) and light grey (near light purple): 17 colours, no two closer than 0.18 in
#: RGB (light orange and light red).
_WIDE_COLORS = (
    *("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"),
    *("#bcbd22", "#17becf"),
    *("#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2"),
    *("#dbdb8d", "#9edae5"),
)
_STRONG = 9  # the first _STRONG of _WIDE_COLORS are drawn solid, the rest dashed
#: Line styles of the further rounds through the colours (beyond 17 curves).
_ROUND_STYLES = ("-.", ":", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 3)), (0, (8, 4)))


def curve_styles(n: int) -> list[tuple[str, str | tuple]]:
    """A ``(colour, line style)`` for each of ``n`` curves of one figure, all different.

    Up to seven curves get the report's seven colours, solid (as before: the OOD sets of
    a figure). More (every score of a model on one OOD set: ten or more) get distinct
    colours from tab20: 17 of them, strong ones solid and light ones dashed; beyond 17,
    the colours come round again with another line style each round, so the pairs stay
    distinct (:func:`ood_color` alone would repeat a colour after seven).

    Args:
        n: Number of curves.

    Returns:
        ``n`` pairs, to pass as ``color=`` and ``linestyle=``.
    """
    if n <= len(_OOD_COLORS):
        return [(c, "-") for c in _OOD_COLORS[:n]]
    styles: list[tuple[str, str | tuple]] = []
    for i in range(n):
        round_, j = divmod(i, len(_WIDE_COLORS))
        if round_ == 0:
            style: str | tuple = "-" if j < _STRONG else "--"
        else:
            style = _ROUND_STYLES[(round_ - 1) % len(_ROUND_STYLES)]
            if round_ > len(_ROUND_STYLES):  # beyond 102 curves: longer and longer dashes
                style = (0, (round_, 2))
        styles.append((_WIDE_COLORS[j], style))
    return styles


def ood_color(i: int) -> str:
    """The colour of the ``i``-th OOD set (or score) in a figure of at most seven
    curves (:func:`curve_styles` for more)."""
    return _OOD_COLORS[i % len(_OOD_COLORS)]


def root_figure(ax: Axes) -> Figure:
    """The figure an axes is drawn in (the whole figure when the axes sits in a
    ``SubFigure``): what the plotting functions return when given ``ax``."""
    fig = ax.figure
    return fig if isinstance(fig, Figure) else fig.figure


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure on the Agg canvas, outside pyplot."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # attaches itself: fig.savefig and fig.canvas work without pyplot
    return fig


def margins(fig: Figure, left: float, right: float, top: float, bottom: float, **kw: float) -> None:
    """Fixed margins in inches (a layout engine would draw the figure twice)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h, **kw
    )


def set_title(ax: Axes, text: str) -> None:
    """The axes' title at a fixed height: matplotlib would otherwise measure every tick
    label to place it (a fifth of a figure's drawing time)."""
    ax.set_title(text, fontsize=TITLE_PT, y=1.0, pad=6)


def style(ax: Axes) -> None:
    """The report's font sizes and a light grid."""
    ax.tick_params(labelsize=SMALL_PT)
    ax.xaxis.label.set_fontsize(LABEL_PT)
    ax.yaxis.label.set_fontsize(LABEL_PT)
    ax.grid(alpha=0.25, linewidth=0.6)


def legend_below(ax: Axes, ncol: int = 2, gap_in: float = 0.52) -> None:
    """The axes' legend ``gap_in`` inches under the axes (below the x label): it can
    never cover the data."""
    height_in = ax.get_position().height * root_figure(ax).get_size_inches()[1]
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -gap_in / height_in),
        ncol=ncol,
        fontsize=SMALL_PT,
        frameon=False,
        handlelength=1.6,
        columnspacing=1.0,
    )


def legend_rows(n_entries: int, ncol: int = 2) -> int:
    """Rows a legend of ``n_entries`` takes in ``ncol`` columns."""
    return -(-n_entries // ncol)


def to_numpy(x: ArrayLike) -> np.ndarray:
    """Float64 numpy copy of a tensor or array."""
    return torch.as_tensor(x).detach().to("cpu", torch.float64).numpy()
