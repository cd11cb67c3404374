"""The monitoring report over time: time-series figures, a self-contained HTML page and
Markdown, from the Jinja2 templates in ``wrapcal/monitoring/templates``.

The page follows ``evaluate``'s report (:mod:`wrapcal.report.render`): its stylesheet,
figures as ``data:`` URIs, no script and no external URL, autoescaped. One figure per
quantity over the windows (x axis: the window), each marking the windows whose rule
fired: estimated (and realised) accuracy with the interval, OOD rate against the
expected rate, drift p-values against the test's level, set sizes and decision rates.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from functools import cache
from typing import Any

from jinja2 import ChoiceLoader, Environment, PackageLoader, StrictUndefined, select_autoescape
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from wrapcal.report.figures import DPI, FigureFile
from wrapcal.report.plot_style import (
    GAP_COLOR,
    ID_COLOR,
    legend_below,
    legend_rows,
    margins,
    new_figure,
    ood_color,
    set_title,
    style,
)
from wrapcal.report.render import squeeze_blank_lines

# The figures read a MonitorResult (windows, reference, rules, settings); it is not
# imported, even for typing, because MonitorResult.save imports this module.
MonitorResult = Any

__all__ = ["render_html", "render_markdown", "time_series_figures"]

_WIDTH, _HEIGHT = 6.4, 3.0


def _png(fig: Figure) -> tuple[bytes, int, int]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    fig.clear()
    return buf.getvalue(), width, height


def _figure(n_legend: int) -> tuple[Figure, Any]:
    rows = legend_rows(n_legend, 3)
    fig = new_figure((_WIDTH, _HEIGHT + 0.2 * rows))
    margins(fig, left=0.75, right=0.2, top=0.35, bottom=0.75 + 0.2 * rows)
    ax = fig.add_subplot()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # windows are counted
    return fig, ax


def _mark(ax: Any, xs: list[int], ys: list[float], label: str) -> None:
    if xs:
        ax.scatter(xs, ys, marker="x", s=60, color=GAP_COLOR, zorder=5, label=label)


def _file(fig: Figure, kind: str, title: str, stem: str) -> FigureFile:
    png, width, height = _png(fig)
    return FigureFile(kind, "monitor", None, title, f"{stem}.png", png, width, height, 9 * DPI / 72)


def _accuracy_figure(result: MonitorResult) -> FigureFile:
    w = result.windows
    x = [s.index for s in w]
    labelled = [s for s in w if s.accuracy is not None]
    fig, ax = _figure(4 + bool(labelled))
    ax.fill_between(
        x,
        [100 * s.estimated_accuracy_ci[0] for s in w],
        [100 * s.estimated_accuracy_ci[1] for s in w],
        color=ID_COLOR,
        alpha=0.2,
        label=f"{result.settings['level']:.0%} interval",
    )
    ax.plot(x, [100 * s.estimated_accuracy for s in w], "o-", color=ID_COLOR, label="estimated")
    if labelled:
        ax.plot(
            [s.index for s in labelled],
            [100 * s.accuracy for s in labelled],
            "s--",
            color="#444444",
            label="realised",
        )
    base = result.reference.baseline_accuracy
    if base is not None:
        ax.axhline(100 * base, color="#1b9e77", lw=1, label="calibration set")
        if result.rules.max_drop is not None:
            ax.axhline(100 * (base - result.rules.max_drop), color="#1b9e77", ls=":", lw=1)
    if result.rules.min_accuracy is not None:
        ax.axhline(100 * result.rules.min_accuracy, color=GAP_COLOR, ls=":", lw=1)
    fired = [s for s in w if any(a.rule.startswith("accuracy") for a in s.alerts)]
    _mark(ax, [s.index for s in fired], [100 * s.estimated_accuracy for s in fired], "alert")
    ax.set_xlabel("window")
    ax.set_ylabel("accuracy (%)")
    set_title(ax, "Estimated accuracy")
    style(ax)
    legend_below(ax, ncol=3)
    return _file(fig, "accuracy", "Estimated accuracy per window", "accuracy")


def _ood_figure(result: MonitorResult) -> FigureFile | None:
    w = [s for s in result.windows if s.ood is not None]
    if not w:
        return None
    fig, ax = _figure(3)
    x = [s.index for s in w]
    ax.plot(x, [100 * s.ood["rate"] for s in w], "o-", color=ood_color(0), label="OOD rate")
    ax.plot(x, [100 * s.ood["expected"] for s in w], "--", color=ID_COLOR, label="expected")
    fired = [s for s in w if any(a.rule == "ood_rate" for a in s.alerts)]
    _mark(ax, [s.index for s in fired], [100 * s.ood["rate"] for s in fired], "alert")
    ax.set_xlabel("window")
    ax.set_ylabel(f"flagged by {w[0].ood['output']} (%)")
    set_title(ax, "OOD rate")
    style(ax)
    legend_below(ax, ncol=3)
    return _file(fig, "ood", "OOD rate per window", "ood_rate")


def _drift_figure(result: MonitorResult) -> FigureFile | None:
    names = sorted({k for s in result.windows for k in s.drift})
    if not names:
        return None
    fig, ax = _figure(len(names) + 2)
    for i, name in enumerate(names):
        pts = [(s.index, s.drift[name]["pvalue"]) for s in result.windows if name in s.drift]
        ax.plot(
            [p[0] for p in pts],
            [-math.log10(max(p[1], 1e-300)) for p in pts],
            "o-",
            ms=3,
            color=ood_color(i),
            label=name,
        )
    if result.rules.drift_alpha is not None:
        level = result.rules.drift_alpha / len(names)
        ax.axhline(-math.log10(level), color=GAP_COLOR, ls=":", lw=1, label="test level")
    fired = [s for s in result.windows if any(a.rule == "drift" for a in s.alerts)]
    _mark(
        ax,
        [s.index for s in fired],
        [-math.log10(max(min(d["pvalue"] for d in s.drift.values()), 1e-300)) for s in fired],
        "alert",
    )
    # Shifted windows reach p = 1e-300: linear near the test's level, logarithmic above.
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("window")
    ax.set_ylabel("-log10 KS p-value")
    set_title(ax, "Drift of each score against the calibration set")
    style(ax)
    legend_below(ax, ncol=3)
    return _file(fig, "drift", "Drift per window (two-sample KS)", "drift")


def _outputs_figure(result: MonitorResult) -> FigureFile | None:
    sets = sorted({k for s in result.windows for k in s.sets})
    # The OOD decision has its own figure.
    shown = (result.settings.get("ood") or {}).get("output")
    decisions = sorted({k for s in result.windows for k in s.decisions if k != shown})
    if not sets and not decisions:
        return None
    fig, ax = _figure(len(sets) + len(decisions))
    x = [s.index for s in result.windows]
    for i, name in enumerate(decisions):
        ax.plot(
            x,
            [100 * s.decisions.get(name, math.nan) for s in result.windows],
            "o-",
            color=ood_color(i),
            label=f"{name} (%)",
        )
    for j, name in enumerate(sets):
        ax.plot(
            x,
            [s.sets.get(name, math.nan) for s in result.windows],
            "s--",
            color=ood_color(len(decisions) + j),
            label=f"mean {name} size",
        )
    ax.set_xlabel("window")
    ax.set_ylabel("rate (%) / set size")
    set_title(ax, "Decisions and set sizes")
    style(ax)
    legend_below(ax, ncol=3)
    return _file(fig, "outputs", "Decision rates and mean set sizes per window", "outputs")


def time_series_figures(result: MonitorResult) -> list[FigureFile]:
    """The report's figures, one per quantity over the windows."""
    if not result.windows:
        return []
    found = [
        _accuracy_figure(result),
        _ood_figure(result),
        _drift_figure(result),
        _outputs_figure(result),
    ]
    return [f for f in found if f is not None]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _pct(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


@cache
def environment() -> Environment:
    """The monitor's Jinja2 environment (its templates, and the report's stylesheet)."""
    env = Environment(
        loader=ChoiceLoader(
            [PackageLoader("wrapcal.monitoring", "templates"), PackageLoader("wrapcal.report")]
        ),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(b64=_b64, pct=_pct, md=_md)
    return env


def _context(data: dict[str, Any], figures: Sequence[FigureFile]) -> dict[str, Any]:
    settings = data["settings"]
    ood = settings.get("ood")
    return {
        "title": f"wrapcal monitor: {settings['model']}",
        "created": data["created"],
        "data": data,
        "windows": data["windows"],
        "alerts": data["alerts"],
        "rules": data["rules"],
        "reference": data["reference"],
        "ood": ood,
        "figures": list(figures),
        "drift_scores": sorted({k for w in data["windows"] for k in w["drift"]}),
    }


def render_html(data: dict[str, Any], figures: Sequence[FigureFile] = ()) -> str:
    """The report as one self-contained HTML page."""
    return environment().get_template("monitor.html").render(_context(data, figures)).lstrip()


def render_markdown(
    data: dict[str, Any], figures: Sequence[FigureFile] = (), figure_dir: str | None = None
) -> str:
    """The report as Markdown; with ``figure_dir``, images link to ``figure_dir/<file>``."""
    text = (
        environment()
        .get_template("monitor.md")
        .render(_context(data, figures), figure_dir=figure_dir)
    )
    return squeeze_blank_lines(text)
