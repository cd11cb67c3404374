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
    "legend_below",
    "legend_rows",
    "margins",
    "new_figure",
    "ood_color",
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


def ood_color(i: int) -> str:
    """The colour of the ``i``-th OOD set (or score) in a figure."""
    return _OOD_COLORS[i % len(_OOD_COLORS)]


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure on the Agg canvas, outside pyplot."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # attaches itself: fig.savefig and fig.canvas work without pyplot
    return fig


def margins(fig: Figure, left: float, right: float, top: float, bottom: float, **kw) -> None:
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
    ax.xaxis.label.set_size(LABEL_PT)
    ax.yaxis.label.set_size(LABEL_PT)
    ax.grid(alpha=0.25, linewidth=0.6)


def legend_below(ax: Axes, ncol: int = 2, gap_in: float = 0.52) -> None:
    """The axes' legend ``gap_in`` inches under the axes (below the x label): it can
    never cover the data."""
    height_in = ax.get_position().height * ax.figure.get_size_inches()[1]
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
