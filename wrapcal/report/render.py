"""Render a report's dict as Markdown or as one self-contained HTML page.

The HTML page has inline CSS, the figures as ``data:image/png;base64`` URIs, no script
and no external URL: it reads the same offline, attached to an e-mail or archived.
Numbers are shown as percentages except NLL and Brier; the JSON keeps the fractions.
"""

from __future__ import annotations

import base64
import html as _html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wrapcal.report.plots import FigureFile

__all__ = ["CALIBRATION_COLUMNS", "OOD_COLUMNS", "Column", "html", "markdown"]


@dataclass(frozen=True)
class Column:
    """A metric column: its key in the dict, header, unit and better direction."""

    key: str
    label: str
    percent: bool
    higher_is_better: bool
    ci: str | None = None

    @property
    def header(self) -> str:
        unit = " (%)" if self.percent else ""
        return f"{self.label}{unit} {'↑' if self.higher_is_better else '↓'}"

    def value(self, row: dict[str, Any]) -> float | None:
        v = row.get(self.key)
        return None if v is None else float(v)

    def text(self, value: float | None) -> str:
        if value is None:
            return "—"
        return f"{100 * value:.2f}" if self.percent else f"{value:.4f}"

    def ci_text(self, row: dict[str, Any]) -> str:
        ci = row.get(self.ci) if self.ci else None
        if not ci or ci[0] is None or ci[1] is None:
            return "—"
        return f"{self.text(ci[0])} – {self.text(ci[1])}"


CALIBRATION_COLUMNS = (
    Column("accuracy", "Accuracy", True, True),
    Column("nll", "NLL", False, False),
    Column("brier", "Brier", False, False),
    Column("ece", "ECE", True, False, ci="ece_ci"),
    Column("adaptive_ece", "Adaptive ECE", True, False),
    Column("mce", "MCE", True, False),
    Column("classwise_ece", "Class-wise ECE", True, False),
    Column("aurc", "AURC", True, False),
)
OOD_COLUMNS = (
    Column("auroc", "AUROC", True, True, ci="auroc_ci"),
    Column("aupr_in", "AUPR-In", True, True),
    Column("aupr_out", "AUPR-Out", True, True),
    Column("fpr95", "FPR@95TPR", True, False),
)

_LEGEND = (
    "Values in % except NLL and Brier; ↑ higher is better, ↓ lower is better; the best "
    "value of each column is in bold."
)


def _best(columns: Sequence[Column], rows: list[dict[str, Any]]) -> dict[str, set[int]]:
    """Per column, the rows holding the best value as displayed (ties all count; a
    column whose rows are all equal has none)."""
    best: dict[str, set[int]] = {}
    if len(rows) < 2:
        return best
    for col in columns:
        shown = {i: col.text(col.value(r)) for i, r in enumerate(rows) if col.value(r) is not None}
        if len(shown) < 2:
            continue
        numbers = {i: float(t) for i, t in shown.items()}
        target = (max if col.higher_is_better else min)(numbers.values())
        winners = {i for i, v in numbers.items() if v == target}
        if len(winners) < len(numbers):  # all equal: nothing stands out, bold nothing
            best[col.key] = winners
    return best


def _header_cells(columns: Sequence[Column]) -> list[str]:
    cells = []
    for col in columns:
        cells.append(col.header)
        if col.ci:
            cells.append(f"{col.label} 95% CI")
    return cells


def _seconds(value: float) -> str:
    return f"{value:.2f}"


def _model_kind(info: dict[str, Any]) -> str:
    if "plugins" in info:
        inner = info.get("wrapped") or "model"
        plugins = ", ".join(info["plugins"]) or "no plugins"
        return f"wrapped {inner} ({plugins})"
    return f"bare {info['class']}"


def _ood_sets(data: dict[str, Any]) -> list[str]:
    return list(data["data"]["ood"])


def _ood_rows(data: dict[str, Any], ood_set: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (model, score, row)
        for model, sets in data["ood"].items()
        for score, row in sets.get(ood_set, {}).items()
    ]


def _summary_line(data: dict[str, Any]) -> tuple[str, str]:
    test = data["data"]["test"]
    created = f"Created {data['created']} by wrapcal {data['wrapcal_version']}"
    env = data["environment"]
    created += f" (torch {env['torch']}, Python {env['python']})."
    sets = ", ".join(f"{name} ({v['n']} samples)" for name, v in data["data"]["ood"].items())
    sizes = f"Test set: {test['n']} samples, {test['num_classes']} classes. "
    sizes += f"OOD sets: {sets}." if sets else "No OOD sets."
    return created, sizes


_CONVENTION_LABELS = (
    ("ece", "Calibration"),
    ("ood", "OOD detection"),
    ("scores", "Scores"),
    ("other", "Other metrics"),
    ("bootstrap", "Bootstrap"),
)


# --- Markdown ------------------------------------------------------------------------


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]], right_from: int) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _md_metric_cells(
    columns: Sequence[Column], row: dict[str, Any], best: dict[str, set[int]], i: int
) -> list[str]:
    cells = []
    for col in columns:
        text = col.text(col.value(row))
        cells.append(f"**{text}**" if i in best.get(col.key, ()) else text)
        if col.ci:
            cells.append(col.ci_text(row))
    return cells


def _plugin_metric_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """``(model, plugin, metric, value, interval)`` for every plugin's reported metric."""
    rows = []
    for model, plugins in data.get("plugin_metrics", {}).items():
        for plugin, metrics in plugins.items():
            for metric, entry in metrics.items():
                if not isinstance(entry, dict) or "value" not in entry:
                    continue  # tables and lists stay in the JSON
                column = Column("value", metric, bool(entry.get("percent")), True, ci="ci")
                value = column.text(column.value(entry))
                rows.append((model, plugin, metric, value, column.ci_text(entry)))
    return rows


_PLUGIN_METRICS_NOTE = (
    "Metrics the plugins report on their own outputs (prediction sets, decisions) on "
    "the labelled test set; per-class tables are in report.json."
)


def markdown(
    data: dict[str, Any],
    figures: Sequence[FigureFile] = (),
    figure_dir: str | None = None,
) -> str:
    """The report as Markdown; with ``figure_dir``, images link to ``figure_dir/<file>``."""
    created, sizes = _summary_line(data)
    lines = [f"# {data['title']}", "", created, sizes, "", "## Conventions", ""]
    lines += [f"- **{label}:** {data['conventions'][key]}" for key, label in _CONVENTION_LABELS]

    lines += ["", "## Models", ""]
    header = ["Model", "Type", "Device", "Parameters", "Test (s)", "OOD (s)", "Total (s)"]
    rows = []
    for name, info in data["models"].items():
        sec = info["seconds"]
        rows.append(
            [
                _md(name),
                _md(_model_kind(info)),
                _md(info["device"]),
                f"{info['parameters']:,}",
                _seconds(sec["test"]),
                _seconds(sum(sec["ood"].values())),
                _seconds(sec["total"]),
            ]
        )
    lines += _md_table(header, rows, right_from=3)

    cal_rows = list(data["calibration"].items())
    best = _best(CALIBRATION_COLUMNS, [r for _, r in cal_rows])
    lines += ["", f"## Calibration (test set, n = {data['data']['test']['n']})", "", _LEGEND, ""]
    lines += _md_table(
        ["Model", *_header_cells(CALIBRATION_COLUMNS)],
        [
            [_md(name), *_md_metric_cells(CALIBRATION_COLUMNS, row, best, i)]
            for i, (name, row) in enumerate(cal_rows)
        ],
        right_from=1,
    )
    if figure_dir is not None:
        for fig in (f for f in figures if f.kind == "reliability"):
            lines += ["", f"![{_md(fig.title)}]({figure_dir}/{fig.filename})"]

    if _ood_sets(data):
        lines += ["", "## OOD detection", "", _LEGEND]
    for ood_set in _ood_sets(data):
        rows_in = _ood_rows(data, ood_set)
        best = _best(OOD_COLUMNS, [r for _, _, r in rows_in])
        n = data["data"]["ood"][ood_set]["n"]
        lines += ["", f"### {_md(ood_set)} (n = {n})", ""]
        lines += _md_table(
            ["Model", "Score", *_header_cells(OOD_COLUMNS)],
            [
                [_md(model), _md(score), *_ood_md_cells(row, best, i)]
                for i, (model, score, row) in enumerate(rows_in)
            ],
            right_from=2,
        )
    plugin_rows = _plugin_metric_rows(data)
    if plugin_rows:
        lines += ["", "## Plugin metrics", "", _PLUGIN_METRICS_NOTE, ""]
        lines += _md_table(
            ["Model", "Plugin", "Metric", "Value", "95% interval"],
            [[_md(c) for c in row] for row in plugin_rows],
            right_from=3,
        )
    if figure_dir is not None and any(f.kind == "ood" for f in figures):
        lines += ["", "## OOD score figures", ""]
        for fig in (f for f in figures if f.kind == "ood"):
            lines += [f"![{_md(fig.title)}]({figure_dir}/{fig.filename})", ""]
    lines += ["", "## Settings", ""]
    lines += [f"- {key}: {value}" for key, value in data["settings"].items()]
    return "\n".join(lines).rstrip() + "\n"


def _ood_md_cells(row: dict[str, Any], best: dict[str, set[int]], i: int) -> list[str]:
    if "error" in row:
        return [f"not measured: {_md(row['error'])}"] + [""] * (len(_header_cells(OOD_COLUMNS)) - 1)
    return _md_metric_cells(OOD_COLUMNS, row, best, i)


# --- HTML ----------------------------------------------------------------------------

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f5f6f8; color: #1d232b;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; background: #fff;
  min-height: 100vh; }
h1 { font-size: 28px; margin: 0 0 6px; }
h2 { font-size: 21px; margin: 36px 0 10px; padding-bottom: 4px;
  border-bottom: 2px solid #e3e6ea; }
h3 { font-size: 17px; margin: 24px 0 8px; }
p { margin: 6px 0; }
.meta { color: #545d69; margin: 0; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 0.92em; }
.conventions { background: #f2f6fb; border-left: 4px solid #3b73b9; padding: 10px 16px;
  margin: 18px 0 6px; }
.conventions dl { margin: 0; display: grid; grid-template-columns: 140px 1fr;
  gap: 6px 14px; }
.conventions dt { font-weight: 600; }
.conventions dd { margin: 0; }
.legend { color: #545d69; font-size: 13px; }
.table-wrap { overflow-x: auto; margin: 8px 0 4px; }
table { border-collapse: collapse; font-size: 13.5px; min-width: 50%; }
th, td { padding: 5px 9px; border-bottom: 1px solid #e3e6ea; white-space: nowrap; }
th { background: #eef1f5; text-align: left; font-weight: 600; vertical-align: bottom;
  white-space: normal; min-width: 4.5em; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.ci { color: #66707c; font-size: 12.5px; }
td.wrap { white-space: normal; min-width: 12em; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.group-start td { border-top: 2px solid #cfd5dc; }
td.best { font-weight: 700; color: #0b5d1e; }
td.error { color: #9b1c1c; white-space: normal; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr));
  gap: 18px; margin-top: 12px; }
.figures.wide { grid-template-columns: 1fr; }
figure { margin: 0; border: 1px solid #e3e6ea; border-radius: 6px; padding: 8px;
  background: #fff; }
figure img { display: block; width: 100%; height: auto; margin: 0 auto; }
.figures:not(.wide) figure img { max-width: 480px; }
figure.wide img { max-width: 1000px; }
figcaption { font-size: 13px; color: #545d69; text-align: center; margin-top: 4px; }
footer { margin-top: 40px; color: #66707c; font-size: 13px; }
"""


def _e(text: Any) -> str:
    return _html.escape(str(text), quote=True)


def _html_table(header: list[tuple[str, bool]], body: list[str]) -> str:
    head = "".join(
        f'<th class="num">{_e(h)}</th>' if num else f"<th>{_e(h)}</th>" for h, num in header
    )
    return (
        f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _html_metric_cells(
    columns: Sequence[Column], row: dict[str, Any], best: dict[str, set[int]], i: int
) -> str:
    cells = []
    for col in columns:
        cls = "num best" if i in best.get(col.key, ()) else "num"
        cells.append(f'<td class="{cls}">{_e(col.text(col.value(row)))}</td>')
        if col.ci:
            cells.append(f'<td class="num ci">{_e(col.ci_text(row))}</td>')
    return "".join(cells)


def _metric_header(columns: Sequence[Column]) -> list[tuple[str, bool]]:
    # No-break spaces keep "(%) ↑" and "95% CI" together when a narrow header wraps.
    nbsp = "\u00a0"
    return [
        (
            h.replace(" ↑", nbsp + "↑")
            .replace(" ↓", nbsp + "↓")
            .replace("% CI", "%" + nbsp + "CI"),
            True,
        )
        for h in _header_cells(columns)
    ]


def _img(fig: FigureFile) -> str:
    src = "data:image/png;base64," + base64.b64encode(fig.png).decode("ascii")
    return f'<img src="{src}" alt="{_e(fig.title)}">'


def _models_html(data: dict[str, Any]) -> str:
    header = [("Model", False), ("Type", False), ("Device", False), ("Parameters", True)]
    header += [("Scores", False), ("Test (s)", True), ("OOD (s)", True), ("Total (s)", True)]
    body = []
    for name, info in data["models"].items():
        sec = info["seconds"]
        body.append(
            f"<tr><td><b>{_e(name)}</b></td><td class='wrap'>{_e(_model_kind(info))}</td>"
            f"<td>{_e(info['device'])}</td><td class='num'>{info['parameters']:,}</td>"
            f"<td class='mono wrap'>{_e(', '.join(info['scores']))}</td>"
            f"<td class='num'>{_seconds(sec['test'])}</td>"
            f"<td class='num'>{_seconds(sum(sec['ood'].values()))}</td>"
            f"<td class='num'>{_seconds(sec['total'])}</td></tr>"
        )
    return _html_table(header, body)


def _calibration_html(data: dict[str, Any]) -> str:
    rows = list(data["calibration"].items())
    best = _best(CALIBRATION_COLUMNS, [r for _, r in rows])
    body = [
        f"<tr><td><b>{_e(name)}</b></td>"
        f"{_html_metric_cells(CALIBRATION_COLUMNS, row, best, i)}</tr>"
        for i, (name, row) in enumerate(rows)
    ]
    return _html_table([("Model", False), *_metric_header(CALIBRATION_COLUMNS)], body)


def _ood_html(data: dict[str, Any], ood_set: str) -> str:
    rows = _ood_rows(data, ood_set)
    best = _best(OOD_COLUMNS, [r for _, _, r in rows])
    width = len(_header_cells(OOD_COLUMNS))
    body, previous = [], None
    for i, (model, score, row) in enumerate(rows):
        # A rule between models; the model's name only on its first row.
        start = model != previous
        cls = ' class="group-start"' if start and i else ""
        name = f"<b>{_e(model)}</b>" if start else ""
        if "error" in row:
            metrics = f'<td class="error" colspan="{width}">not measured: {_e(row["error"])}</td>'
        else:
            metrics = _html_metric_cells(OOD_COLUMNS, row, best, i)
        body.append(f"<tr{cls}><td>{name}</td><td class='mono'>{_e(score)}</td>{metrics}</tr>")
        previous = model
    return _html_table([("Model", False), ("Score", False), *_metric_header(OOD_COLUMNS)], body)


def html(data: dict[str, Any], figures: Sequence[FigureFile] = (), standalone: bool = True) -> str:
    """The report as HTML; ``standalone`` wraps it in a complete page with its CSS."""
    created, sizes = _summary_line(data)
    parts = [f"<h1>{_e(data['title'])}</h1>", f'<p class="meta">{_e(created)}</p>']
    parts.append(f'<p class="meta">{_e(sizes)}</p>')
    conv = "".join(
        f"<dt>{_e(label)}</dt><dd>{_e(data['conventions'][key])}</dd>"
        for key, label in _CONVENTION_LABELS
    )
    parts.append(f'<section class="conventions"><dl>{conv}</dl></section>')

    parts += ["<h2>Models</h2>", _models_html(data)]

    parts.append(f"<h2>Calibration <small>(test set, n = {data['data']['test']['n']})</small></h2>")
    parts += [f'<p class="legend">{_e(_LEGEND)}</p>', _calibration_html(data)]
    reliability = [f for f in figures if f.kind == "reliability"]
    if reliability:
        parts.append('<div class="figures">')
        parts += [
            f"<figure>{_img(f)}<figcaption>{_e(f.title)}</figcaption></figure>" for f in reliability
        ]
        parts.append("</div>")

    if _ood_sets(data):
        parts += ["<h2>OOD detection</h2>", f'<p class="legend">{_e(_LEGEND)}</p>']
    for ood_set in _ood_sets(data):
        n = data["data"]["ood"][ood_set]["n"]
        parts += [
            f"<h3>OOD set <code>{_e(ood_set)}</code> (n = {n})</h3>",
            _ood_html(data, ood_set),
        ]
    plugin_rows = _plugin_metric_rows(data)
    if plugin_rows:
        parts += ["<h2>Plugin metrics</h2>", f'<p class="legend">{_e(_PLUGIN_METRICS_NOTE)}</p>']
        body_rows = [
            "<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in plugin_rows
        ]
        header = [(h, False) for h in ("Model", "Plugin", "Metric", "Value", "95% interval")]
        parts.append(_html_table(header, body_rows))
    ood_figures = [f for f in figures if f.kind == "ood"]
    if ood_figures:
        parts.append("<h2>OOD scores: histograms and ROC curves</h2>")
        parts.append(
            '<p class="legend">One figure per model and score; every OOD set in each. '
            "Left: densities of the score, in-distribution filled. Right: ROC curves with "
            "in-distribution as the positive class.</p>"
        )
        for model in data["models"]:
            mine = [f for f in ood_figures if f.model == model]
            if not mine:
                continue
            parts += [f"<h3>{_e(model)}</h3>", '<div class="figures wide">']
            parts += [
                f'<figure class="wide">{_img(f)}<figcaption>{_e(f.title)}</figcaption></figure>'
                for f in mine
            ]
            parts.append("</div>")
    settings = ", ".join(f"{k} = {v}" for k, v in data["settings"].items())
    env = data["environment"]
    parts.append(
        f"<footer>Settings: {_e(settings)}. Platform: {_e(env['platform'])}. "
        f"The numbers are in report.json beside this page (fractions, not %).</footer>"
    )
    body = "\n".join(parts)
    if not standalone:
        return f"<div>{body}</div>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(data['title'])}</title><style>{_CSS}</style></head>"
        f"<body><main>\n{body}\n</main></body></html>\n"
    )
