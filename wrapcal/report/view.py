"""The report's data laid out for the templates: sections, tables of cells, figures.

Everything here is text and numbers (no markup): the Jinja2 templates turn it into HTML
(autoescaped) or Markdown. A cell is ``{"text", "best", "sub", "flag"}``: the shown
value, whether it is the best of its column, a second line (an interval, a score name)
and a warning (``"inverted"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from wrapcal.report.columns import (
    CALIBRATION_COLUMNS,
    LEGEND,
    OOD_COLUMNS,
    Column,
    best_rows,
    interval_text,
    percent_text,
)
from wrapcal.report.plugin_metrics import plugin_section
from wrapcal.report.summary import INVERTED_NOTE

if TYPE_CHECKING:
    from wrapcal.report.figures import FigureFile

__all__ = ["context"]

CONVENTION_LABELS = (
    ("ece", "Calibration"),
    ("ood", "OOD detection"),
    ("summary", "Summary"),
    ("scores", "Scores"),
    ("other", "Other metrics"),
    ("bootstrap", "Bootstrap"),
)


def _cell(
    text: str,
    best: bool = False,
    sub: str | None = None,
    flag: str | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    return {"text": text, "best": best, "sub": sub, "flag": flag, "label": label}


def _header(columns: Sequence[Column]) -> list[str]:
    cells = []
    for col in columns:
        cells.append(col.header)
        if col.ci:
            cells.append(col.ci_header)
    return cells


def _metric_cells(
    columns: Sequence[Column],
    row: dict[str, Any],
    best: dict[str, set[int]],
    i: int,
    inverted: bool = False,
) -> list[dict[str, Any]]:
    cells = []
    for col in columns:
        flag = "inverted" if inverted and col.key == "auroc" else None
        cells.append(_cell(col.text(col.value(row)), i in best.get(col.key, ()), flag=flag))
        if col.ci:
            cells.append(_cell(col.ci_text(row)))
    return cells


def _model_kind(info: dict[str, Any]) -> str:
    if "plugins" in info:
        plugins = ", ".join(info["plugins"]) or "no plugins"
        return f"wrapped {info.get('wrapped') or 'model'} ({plugins})"
    return f"bare {info['class']}"


def _inverted(row: dict[str, Any]) -> bool:
    return row.get("auroc") is not None and row["auroc"] < 0.5


def _summary(data: dict[str, Any]) -> dict[str, Any] | None:
    summary = data.get("summary")
    if not summary:
        return None
    sets = list(data["data"]["ood"])
    flat = []  # one dict per model with the columns that get a best mark
    for entry in summary["models"].values():
        row = {"accuracy": entry["accuracy"], "ece": entry["ece"]}
        for j, s in enumerate(sets):
            cell = entry["ood"].get(s)
            row[f"auroc{j}"] = cell["auroc"] if cell else None
        flat.append(row)
    columns = [Column("accuracy", "", True, True), Column("ece", "", True, False)]
    columns += [Column(f"auroc{j}", "", True, True) for j in range(len(sets))]
    best = best_rows(columns, flat)
    rows = []
    for i, (name, entry) in enumerate(summary["models"].items()):
        cells = [
            _cell(percent_text(entry["accuracy"]), i in best.get("accuracy", ())),
            _cell(percent_text(entry["baseline_ece"])),
            _cell(
                percent_text(entry["ece"]),
                i in best.get("ece", ()),
                sub=interval_text(entry["ece_ci"]) if entry["ece_ci"] else None,
            ),
        ]
        for j, s in enumerate(sets):
            cell = entry["ood"].get(s)
            if cell is None:
                cells += [_cell("—"), _cell("—")]
                continue
            ci = interval_text(cell["auroc_ci"]) if cell["auroc_ci"] else None
            flag = "inverted" if cell["inverted"] else None
            threshold = "—" if cell["threshold"] is None else f"≤ {cell['threshold']:.4g}"
            best_here = i in best.get(f"auroc{j}", ())
            cells += [
                _cell(percent_text(cell["auroc"]), best_here, ci, flag, label=cell["score"]),
                _cell(threshold, sub=_fpr_text(cell)),
            ]
        rows.append({"model": name, "cells": cells})
    inverted = [
        {
            "model": item["model"],
            "ood_set": item["ood_set"],
            "score": item["score"],
            "auroc": percent_text(item["auroc"]),
            "ci": interval_text(item["auroc_ci"]) if item.get("auroc_ci") else None,
        }
        for item in summary["inverted"]
    ]
    header = ["Model", "Accuracy (%) ↑", "ECE before (%)", "ECE (%) ↓"]
    for s in sets:
        header += [f"{s}: best score, AUROC (%) ↑", f"{s}: accept if score"]
    return {
        "sets": sets,
        "header": header,
        "tpr": f"{100 * summary['tpr']:g}%",
        "rows": rows,
        "baseline": summary["baseline"],
        "inverted": inverted,
        "notes": _summary_notes(data, summary),
    }


def _fpr_text(cell: dict[str, Any]) -> str | None:
    return None if cell["fpr95"] is None else f"FPR95 {percent_text(cell['fpr95'])}%"


def _summary_notes(data: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """What the summary's numbers were measured on, and with what interval."""
    settings, test = data["settings"], data["data"]["test"]
    sets = "; ".join(f"{name}: n = {v['n']}" for name, v in data["data"]["ood"].items())
    level = f"{100 * settings['level']:g}%"
    notes = [
        f"Measured on the test set (n = {test['n']}, {test['num_classes']} classes)"
        + (f" and the OOD sets ({sets})." if sets else ".")
        + (
            f" Intervals: {level} bootstrap, B = {settings['bootstrap']} resamples, seed "
            f"{settings['seed']}."
            if settings["bootstrap"]
            else " No bootstrap intervals (bootstrap = 0)."
        ),
    ]
    if summary["baseline"] is not None:
        notes.append(
            f"ECE before is the ECE of the model {summary['baseline']!r} on the same test set."
        )
    else:
        notes.append("ECE before: no baseline model (name one 'baseline' to compare).")
    if sets:
        tpr = f"{100 * summary['tpr']:g}%"
        cells = [c for e in summary["models"].values() for c in e["ood"].values() if c]
        accepted = next((c for c in cells if c.get("accepted_ci")), None)
        new_data = ""
        if accepted is not None:
            low, high = accepted["accepted_ci"]
            new_data = (
                f"; on new in-distribution data it accepts between {percent_text(low)}% and "
                f"{percent_text(high)}% ({level} interval of the order statistic, exact for "
                "a continuous score)"
            )
        notes.append(
            "Best score: the score with the highest AUROC on that OOD set, chosen on the "
            "same test and OOD samples it is measured on, so expect a slightly lower AUROC "
            f"on new data. Threshold: accept a sample as in-distribution when its score is "
            f"≤ the threshold, the score accepting {tpr} of the in-distribution test set "
            f"(the convention of FPR@95TPR){new_data}. Below it, FPR95: the share of the OOD set "
            "accepted at that threshold (FPR@95TPR)."
        )
    return notes


def _matrix(data: dict[str, Any]) -> dict[str, Any] | None:
    summary = data.get("summary")
    sets = list(data["data"]["ood"])
    if not summary or not sets:
        return None
    flat = [
        {s: (e["ood"].get(s) or {}).get("auroc") for s in sets} for e in summary["models"].values()
    ]
    best = best_rows([Column(s, s, True, True) for s in sets], flat)
    rows = []
    for i, (name, entry) in enumerate(summary["models"].items()):
        cells = []
        for s in sets:
            c = entry["ood"].get(s)
            if c is None:
                cells.append(_cell("—"))
                continue
            flag = "inverted" if c["inverted"] else None
            ci = interval_text(c["auroc_ci"]) if c["auroc_ci"] else None
            best_here = i in best.get(s, ())
            cells.append(_cell(percent_text(c["auroc"]), best_here, ci, flag, label=c["score"]))
        rows.append({"model": name, "cells": cells})
    return {"sets": sets, "rows": rows}


def _ood_tables(data: dict[str, Any]) -> list[dict[str, Any]]:
    tables = []
    for ood_set, info in data["data"]["ood"].items():
        entries = [
            (model, score, row)
            for model, sets in data["ood"].items()
            for score, row in sets.get(ood_set, {}).items()
        ]
        best = best_rows(OOD_COLUMNS, [r for _, _, r in entries if "error" not in r])
        # best_rows indexes the measured rows only: map back to positions in entries.
        measured = [i for i, (_, _, r) in enumerate(entries) if "error" not in r]
        best = {k: {measured[j] for j in v} for k, v in best.items()}
        rows, previous = [], None
        for i, (model, score, row) in enumerate(entries):
            inverted = _inverted(row)
            rows.append(
                {
                    "model": model,
                    "first": model != previous,
                    "score": score,
                    "error": row.get("error"),
                    "inverted": inverted,
                    "cells": []
                    if "error" in row
                    else _metric_cells(OOD_COLUMNS, row, best, i, inverted),
                }
            )
            previous = model
        tables.append(
            {
                "name": ood_set,
                "n": info["n"],
                "rows": rows,
                "inverted": sum(r["inverted"] for r in rows),
            }
        )
    return tables


def _models(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, info in data["models"].items():
        sec = info["seconds"]
        rows.append(
            {
                "name": name,
                "kind": _model_kind(info),
                "device": info["device"],
                "parameters": f"{info['parameters']:,}",
                "scores": ", ".join(info["scores"]),
                "test": f"{sec['test']:.2f}",
                "ood": f"{sum(sec['ood'].values()):.2f}",
                "total": f"{sec['total']:.2f}",
            }
        )
    return rows


def _figures(figures: Sequence[FigureFile]) -> dict[str, Any]:
    return {
        "reliability": [f for f in figures if f.kind == "reliability"],
        "ood": [f for f in figures if f.kind in ("histogram", "roc")],
        "ood_extra": [f for f in figures if f.kind == "roc_scores"],
    }


def _names_text(names: Sequence[str] | None, shown: int = 20) -> str:
    """The class names in output order, for the page's header (the first ``shown``)."""
    if not names:
        return ""
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return f" ({', '.join(names[:shown])}{more})"


def context(data: dict[str, Any], figures: Sequence[FigureFile] = ()) -> dict[str, Any]:
    """Everything the templates show, from a report's data and its rendered figures."""
    test, env = data["data"]["test"], data["environment"]
    sets = "; ".join(f"{name} ({v['n']} samples)" for name, v in data["data"]["ood"].items())
    cal_rows = list(data["calibration"].items())
    cal_best = best_rows(CALIBRATION_COLUMNS, [r for _, r in cal_rows])
    ctx = {
        "title": data["title"],
        "created": (
            f"Created {data['created']} by wrapcal {data['wrapcal_version']} "
            f"(torch {env['torch']}, Python {env['python']})."
        ),
        "sizes": (
            f"Test set: {test['n']} samples, {test['num_classes']} classes"
            + _names_text(test.get("class_names"))
            + ". "
            + (f"OOD sets: {sets}." if sets else "No OOD sets.")
        ),
        "legend": LEGEND,
        "inverted_note": INVERTED_NOTE,
        "summary": _summary(data),
        "matrix": _matrix(data),
        "calibration": {
            "n": test["n"],
            "header": _header(CALIBRATION_COLUMNS),
            "rows": [
                {"model": name, "cells": _metric_cells(CALIBRATION_COLUMNS, row, cal_best, i)}
                for i, (name, row) in enumerate(cal_rows)
            ],
        },
        "ood_header": _header(OOD_COLUMNS),
        "ood_tables": _ood_tables(data),
        "plugins": plugin_section(data, figures),
        "models": _models(data),
        "figures": _figures(figures),
        "conventions": [
            (label, data["conventions"][key])
            for key, label in CONVENTION_LABELS
            if key in data["conventions"]
        ],
        "settings": ", ".join(f"{k} = {v}" for k, v in data["settings"].items()),
        "platform": env["platform"],
    }
    toc = [("summary", "Summary")] if ctx["summary"] else []
    toc.append(("calibration", "Calibration"))
    if ctx["ood_tables"]:
        toc.append(("ood", "OOD detection"))
    if ctx["plugins"]:
        toc.append(("plugin-metrics", "Plugin metrics"))
    toc += [("models", "Models"), ("conventions", "Conventions and settings")]
    ctx["toc"] = toc
    return ctx
