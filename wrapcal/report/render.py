"""Render a report's data as one self-contained HTML page or as Markdown, from the Jinja2
templates in ``wrapcal/report/templates``.

The HTML page has inline CSS, the figures as ``data:image/png;base64`` URIs, no script
and no external URL: it reads the same offline, attached to an e-mail or archived. It is
autoescaped: every value from the data is text, whatever characters a model or data set
name holds. Numbers are shown as percentages except NLL and Brier; the JSON keeps the
fractions. The templates get their content from :func:`wrapcal.report.view.context`.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from wrapcal.report.columns import CALIBRATION_COLUMNS, OOD_COLUMNS, Column, best_rows
from wrapcal.report.view import context

if TYPE_CHECKING:
    from wrapcal.report.figures import FigureFile

__all__ = [
    "CALIBRATION_COLUMNS",
    "OOD_COLUMNS",
    "Column",
    "best_rows",
    "html",
    "markdown",
    "squeeze_blank_lines",
]

_NBSP = "\u00a0"


def _md(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _nbsp(text: str) -> str:
    """No-break spaces keep "(%) ↑" and "95% CI" together when a narrow header wraps."""
    return (
        text.replace(" ↑", _NBSP + "↑")
        .replace(" ↓", _NBSP + "↓")
        .replace("% CI", "%" + _NBSP + "CI")
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@cache
def environment() -> Environment:
    """The report's Jinja2 environment: HTML autoescaped, Markdown not."""
    env = Environment(
        loader=PackageLoader("wrapcal.report", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(md=_md, nbsp=_nbsp, b64=_b64)
    return env


def html(data: dict[str, Any], figures: Sequence[FigureFile] = (), standalone: bool = True) -> str:
    """The report as one self-contained HTML page (``standalone=False``: the content
    alone, in a ``div``, for a notebook)."""
    page = (
        environment()
        .get_template("report.html")
        .render(context(data, figures), standalone=standalone)
    )
    return page.lstrip()


def markdown(
    data: dict[str, Any], figures: Sequence[FigureFile] = (), figure_dir: str | None = None
) -> str:
    """The report as Markdown; with ``figure_dir``, images link to ``figure_dir/<file>``."""
    text = (
        environment()
        .get_template("report.md")
        .render(context(data, figures), figure_dir=figure_dir)
    )
    return squeeze_blank_lines(text)


def squeeze_blank_lines(text: str) -> str:
    """Rendered Markdown with at most one blank line in a row: template blocks that
    render nothing leave runs of them."""
    lines, blank = [], False
    for line in text.splitlines():
        if line.strip() or not blank:
            lines.append(line.rstrip())
        blank = not line.strip()
    return "\n".join(lines).strip() + "\n"
