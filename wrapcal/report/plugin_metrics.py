"""What a plugin's ``report_metrics`` entry is, for the report: a number, a table, a curve.

Plugins return JSON-able values (see :meth:`wrapcal.Plugin.report_metrics`); the report
recognises three shapes and shows each one its own way (anything else stays in the JSON):

* a **number**: ``{"value": v, "ci": [low, high]?, "percent": bool?,
  "higher_is_better": bool?, ...}``; other keys (``"class": 3``) become a note;
* a **curve**: ``{"x": [...], "y": [...], "x_label"?, "y_label"?, "point"?: {"x", "y"},
  "percent"?}``, or two equal-length number lists beside an ``"operating_point"`` (or
  ``"point"``) dict keyed by their names, as ``{"coverage": [...], "risk": [...],
  "operating_point": {"coverage": c, "risk": r}}``; drawn as a figure;
* a **table**: equal-length lists (``{"class": [...], "n": [...], "coverage": [...]}``).

Classes are shown by name when the report knows the names (``data["data"]["test"]
["class_names"]``): a table column named ``class`` (or ``label``) of class indices, and a
number's ``"class"`` note (``worst_class_coverage``: ``class cat``).

Fractions are shown as percentages, as everywhere in the report: a number with
``"percent": true``; a table column of floats within [0, 1] (or named in the table's
``"percent"`` list); a curve whose values all lie within [0, 1] (unless it says
``"percent": false``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wrapcal.report.columns import interval_text, number_text, percent_text

__all__ = [
    "CLASS_KEYS",
    "Curve",
    "Table",
    "as_curve",
    "as_table",
    "class_text",
    "plugin_section",
    "scalar_note",
]

PLUGIN_NOTE = (
    "Metrics the plugins report on their own outputs (prediction sets, decisions) on the "
    "labelled test set, with 95% bootstrap intervals where the plugin gives them; "
    "fractions in %."
)
#: Tables longer than this sit behind a details element on the page.
LONG_TABLE = 12

_SCALAR_KEYS = {"value", "ci", "percent", "higher_is_better"}
#: Keys (table columns, a number's note) whose values are class indices.
CLASS_KEYS = ("class", "label")
_META = {"percent", "x_label", "y_label", "point", "operating_point", "title"}


@dataclass(frozen=True)
class Curve:
    """A plugin's curve, normalised: ``x``/``y`` values and labels, an optional point."""

    x: list[float]
    y: list[float]
    x_label: str
    y_label: str
    point: tuple[float, float] | None
    percent: bool


@dataclass(frozen=True)
class Table:
    """A plugin's table: column names, which are percentages, and the rows."""

    columns: list[str]
    percent: list[bool]
    rows: list[list[Any]]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_is_number(x) for x in v)


def _fractions(values: list[Any]) -> bool:
    return all(0 <= x <= 1 for x in values)


def as_curve(entry: Any) -> Curve | None:
    """The entry as a curve, or ``None`` if it is not one."""
    if not isinstance(entry, dict):
        return None
    if _numbers(entry.get("x")) and _numbers(entry.get("y")):
        xk, yk = "x", "y"
        labels = (str(entry.get("x_label", "x")), str(entry.get("y_label", "y")))
        raw = entry.get("point")
    else:
        raw = entry.get("operating_point", entry.get("point"))
        lists = [k for k, v in entry.items() if k not in _META and _numbers(v)]
        if not isinstance(raw, dict) or len(lists) != 2:
            return None
        xk, yk = lists
        labels = (xk.replace("_", " "), yk.replace("_", " "))
    x, y = entry[xk], entry[yk]
    if len(x) != len(y) or len(x) < 2:
        return None
    point = None
    if isinstance(raw, dict) and _is_number(raw.get(xk)) and _is_number(raw.get(yk)):
        point = (float(raw[xk]), float(raw[yk]))
    elif isinstance(raw, (list, tuple)) and len(raw) == 2 and all(map(_is_number, raw)):
        point = (float(raw[0]), float(raw[1]))
    percent = entry.get("percent")
    if not isinstance(percent, bool):
        percent = _fractions(x) and _fractions(y)
    return Curve([float(v) for v in x], [float(v) for v in y], *labels, point, percent)


def as_table(entry: Any) -> Table | None:
    """The entry as a table (equal-length lists of scalars), or ``None``."""
    if not isinstance(entry, dict) or "value" in entry or as_curve(entry) is not None:
        return None
    columns = {k: v for k, v in entry.items() if k not in _META}
    if not columns or not all(isinstance(v, list) for v in columns.values()):
        return None
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1 or 0 in lengths:
        return None
    if any(isinstance(x, (dict, list)) for v in columns.values() for x in v):
        return None
    given = entry.get("percent")
    named: list[Any] = given if isinstance(given, list) else []
    percent = [
        name in named or (_numbers(v) and any(isinstance(x, float) for x in v) and _fractions(v))
        for name, v in columns.items()
    ]
    rows = [list(r) for r in zip(*columns.values(), strict=True)]
    return Table(list(columns), percent, rows)


def class_text(value: Any, names: Sequence[str] | None) -> str:
    """A class index as the report shows it: its name when ``names`` has one for it,
    else the number (a value that is not an index is shown as it is)."""
    if names and _is_number(value) and int(value) == value and 0 <= int(value) < len(names):
        return str(names[int(value)])
    return str(value)


def scalar_note(entry: dict[str, Any], names: Sequence[str] | None = None) -> str:
    """The extra keys of a number (``class 3``, or ``class cat`` with the class
    ``names``), as a short note; empty if none."""
    extra = [
        f"{k} {class_text(v, names) if k in CLASS_KEYS else v}"
        for k, v in entry.items()
        if k not in _SCALAR_KEYS
    ]
    return ", ".join(extra)


def plugin_section(data: dict[str, Any], figures: Sequence[Any]) -> dict[str, Any] | None:
    """The plugin metrics section: numbers, tables and the curves among the report's
    figures (``FigureFile`` of kind ``"curve"``); ``None`` if the plugins report nothing.
    Class indices are shown by name when the report knows the names."""
    names = data.get("data", {}).get("test", {}).get("class_names")
    scalars, tables = [], []
    for model, plugins in data.get("plugin_metrics", {}).items():
        for plugin, metrics in plugins.items():
            for metric, entry in metrics.items():
                if isinstance(entry, dict) and "value" in entry:
                    percent = bool(entry.get("percent"))
                    note = scalar_note(entry, names)
                    scalars.append(
                        {
                            "model": model,
                            "plugin": plugin,
                            "metric": f"{metric} ({note})" if note else metric,
                            "value": number_text(entry["value"], percent),
                            "ci": interval_text(entry.get("ci"), percent),
                            "percent": percent,
                        }
                    )
                    continue
                if as_curve(entry) is not None:
                    continue  # drawn as a figure
                table = as_table(entry)
                if table is None:
                    continue  # other JSON stays in report.json
                header = [
                    f"{c} (%)" if p else c
                    for c, p in zip(table.columns, table.percent, strict=True)
                ]
                rows = [
                    [
                        class_text(v, names) if c in CLASS_KEYS else _table_text(v, p)
                        for v, p, c in zip(row, table.percent, table.columns, strict=True)
                    ]
                    for row in table.rows
                ]
                tables.append(
                    {
                        "model": model,
                        "plugin": plugin,
                        "metric": metric,
                        "header": header,
                        "rows": rows,
                        "long": len(rows) > LONG_TABLE,
                    }
                )
    curves = [f for f in figures if f.kind == "curve"]
    if not (scalars or tables or curves):
        return None
    return {"scalars": scalars, "tables": tables, "curves": curves, "note": PLUGIN_NOTE}


def _table_text(value: Any, percent: bool) -> str:
    if percent and isinstance(value, (int, float)):
        return percent_text(float(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
