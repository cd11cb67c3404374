"""Alert rules: each a documented test on a window's summary, returned as data.

The rules (docs/monitoring.md), each switched off with ``None``:

* ``accuracy_below``: the estimated accuracy is below ``min_accuracy``;
* ``accuracy_drop``: the estimated accuracy is more than ``max_drop`` below the
  reference's (the mean calibrated confidence on the calibration set);
* ``ood_rate``: the OOD rate is above the rate expected on in-distribution data, by a
  one-sided exact binomial test at level ``ood_alpha``;
* ``drift``: some score's distribution differs from the calibration set's, by a
  two-sample Kolmogorov-Smirnov test at level ``drift_alpha`` shared among the scores
  (Bonferroni: each score is tested at ``drift_alpha / number of scores``).

On windows drawn from the calibration distribution, the chance that a window raises
any alert is at most about ``ood_alpha + drift_alpha`` (a union bound; the accuracy
rules add almost nothing when ``max_drop`` is several standard errors of the estimate);
tests/monitor/test_alerts.py measures it over many clean windows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Alert", "AlertRules", "check_rules"]


@dataclass
class Alert:
    """One rule that fired on one window.

    Attributes:
        rule: ``accuracy_below``, ``accuracy_drop``, ``ood_rate`` or ``drift``.
        window: The window's index.
        name: The window's name.
        message: What happened, in words.
        value: The quantity tested (an accuracy, a rate, a p-value).
        limit: The bound it crossed.
    """

    rule: str
    window: int
    name: str
    message: str
    value: float
    limit: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)


def _fraction(name: str, value: float | None, *, open_low: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1) or None; got {value!r}")
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value < 1):
        raise ValueError(f"{name} must be in (0, 1) or None; got {value!r}")


@dataclass
class AlertRules:
    """The alert rules and their thresholds (``None`` switches a rule off).

    Attributes:
        min_accuracy: Alert when the estimated accuracy is below this.
        max_drop: Alert when the estimated accuracy is more than this below the
            reference's (0.05: five accuracy points).
        ood_alpha: Level of the binomial test of the OOD rate.
        drift_alpha: Level of the drift test, shared among the scores.
    """

    min_accuracy: float | None = None
    max_drop: float | None = 0.05
    ood_alpha: float | None = 0.01
    drift_alpha: float | None = 0.01

    def __post_init__(self) -> None:
        _fraction("min_accuracy", self.min_accuracy)
        _fraction("max_drop", self.max_drop, open_low=True)
        _fraction("ood_alpha", self.ood_alpha, open_low=True)
        _fraction("drift_alpha", self.drift_alpha, open_low=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)


def check_rules(summary: dict[str, Any], rules: AlertRules) -> list[Alert]:
    """The alerts a window's summary raises under ``rules``.

    Args:
        summary: A window's summary (:meth:`WindowSummary.to_dict`'s keys
            ``index``, ``name``, ``estimated_accuracy``, ``baseline_accuracy``,
            ``ood``, ``drift``).
        rules: The rules.
    """
    index, name = summary["index"], summary["name"]
    alerts: list[Alert] = []
    estimate = summary["estimated_accuracy"]
    if rules.min_accuracy is not None and estimate < rules.min_accuracy:
        alerts.append(
            Alert(
                "accuracy_below",
                index,
                name,
                f"estimated accuracy {estimate:.1%} is below {rules.min_accuracy:.1%}",
                estimate,
                rules.min_accuracy,
            )
        )
    baseline = summary.get("baseline_accuracy")
    if rules.max_drop is not None and baseline is not None and baseline - estimate > rules.max_drop:
        alerts.append(
            Alert(
                "accuracy_drop",
                index,
                name,
                f"estimated accuracy {estimate:.1%} is {baseline - estimate:.1%} below the "
                f"calibration set's {baseline:.1%} (limit {rules.max_drop:.1%})",
                estimate,
                baseline - rules.max_drop,
            )
        )
    ood = summary.get("ood")
    if rules.ood_alpha is not None and ood is not None and ood["pvalue"] < rules.ood_alpha:
        alerts.append(
            Alert(
                "ood_rate",
                index,
                name,
                f"OOD rate {ood['rate']:.1%} ({ood['flagged']} of {summary['n']}, by "
                f"{ood['output']}) is above the expected {ood['expected']:.1%} "
                f"(binomial p = {ood['pvalue']:.2g} < {rules.ood_alpha:g})",
                ood["pvalue"],
                rules.ood_alpha,
            )
        )
    drift = summary.get("drift") or {}
    if rules.drift_alpha is not None and drift:
        level = rules.drift_alpha / len(drift)
        shifted = {k: v for k, v in drift.items() if v["pvalue"] < level}
        if shifted:
            worst = min(shifted, key=lambda k: shifted[k]["pvalue"])
            alerts.append(
                Alert(
                    "drift",
                    index,
                    name,
                    f"{len(shifted)} of {len(drift)} scores drifted from the calibration set "
                    f"({', '.join(sorted(shifted))}); strongest {worst}: KS "
                    f"{shifted[worst]['ks']:.3f}, p = {shifted[worst]['pvalue']:.2g} < "
                    f"{level:.2g} ({rules.drift_alpha:g} / {len(drift)} scores)",
                    shifted[worst]["pvalue"],
                    level,
                )
            )
    return alerts
