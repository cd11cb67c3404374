"""The report's metric columns: their units, better direction, and how numbers are shown.

One unit everywhere: every fraction is shown as a percentage with two decimals (the
JSON keeps the fractions); NLL and Brier, which are not fractions, with four. The best
value of each column is marked by :func:`best_rows`, on the numbers as shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CALIBRATION_COLUMNS",
    "LEGEND",
    "OOD_COLUMNS",
    "Column",
    "best_rows",
    "interval_text",
    "number_text",
    "percent_text",
]

LEGEND = (
    "Values in % except NLL and Brier; ↑ higher is better, ↓ lower is better; the best "
    "value of each column is in bold."
)


def percent_text(value: float | None) -> str:
    """A fraction as a percentage with two decimals (``—`` when missing)."""
    return "—" if value is None else f"{100 * value:.2f}"


def number_text(value: float | None, percent: bool) -> str:
    """A value as the report shows it: a percentage, or four decimals."""
    if value is None:
        return "—"
    return percent_text(value) if percent else f"{value:.4f}"


def interval_text(ci: Sequence[float | None] | None, percent: bool = True) -> str:
    """An interval ``low – high`` in the value's unit (``—`` when missing)."""
    if not ci or ci[0] is None or ci[1] is None:
        return "—"
    return f"{number_text(ci[0], percent)} – {number_text(ci[1], percent)}"


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

    @property
    def ci_header(self) -> str:
        return f"{self.label} 95% CI"

    def value(self, row: dict[str, Any]) -> float | None:
        v = row.get(self.key)
        return None if v is None else float(v)

    def text(self, value: float | None) -> str:
        return number_text(value, self.percent)

    def ci_text(self, row: dict[str, Any]) -> str:
        return interval_text(row.get(self.ci) if self.ci else None, self.percent)


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


def best_rows(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> dict[str, set[int]]:
    """Per column, the rows holding the best value as displayed.

    Ties all count; a column whose rows all show the same value, or with fewer than two
    values, has none (nothing stands out).
    """
    best: dict[str, set[int]] = {}
    for col in columns:
        shown = {i: col.text(col.value(r)) for i, r in enumerate(rows) if col.value(r) is not None}
        if len(shown) < 2:
            continue
        numbers = {i: float(t) for i, t in shown.items()}
        target = (max if col.higher_is_better else min)(numbers.values())
        winners = {i for i, v in numbers.items() if v == target}
        if len(winners) < len(numbers):
            best[col.key] = winners
    return best
