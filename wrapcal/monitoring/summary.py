"""One window's summary: what the monitor keeps of it once its batches are through.

While a window runs, :class:`WindowAccumulator` holds one float per input per score
(and the confidences and hits): never an input, a feature or a probability row. When
the window ends it becomes a :class:`WindowSummary` of plain numbers, and the values
are dropped, so a run of any length keeps only its summaries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wrapcal.errors import DataError
from wrapcal.monitoring.alerts import Alert, AlertRules, check_rules
from wrapcal.monitoring.stats import (
    binomial_pvalue,
    ece_from_confidence,
    estimate_accuracy,
    ks_test,
    psi,
)
from wrapcal.plugin.base import get_tags
from wrapcal.plugin.prediction import Prediction
from wrapcal.plugin.types import OutputKind

if TYPE_CHECKING:
    from wrapcal.model.wrapped import WrappedModel
    from wrapcal.monitoring.reference import Reference
    from wrapcal.monitoring.windows import WindowInfo

__all__ = ["DECISION_OOD", "OodPlan", "WindowAccumulator", "WindowSummary", "plan_ood"]

#: The output of the ``ood`` decision plugin: a bool per input.
DECISION_OOD = "is_ood"


@dataclass
class OodPlan:
    """How a window's OOD rate is counted.

    Attributes:
        output: ``is_ood`` (the ``ood`` decision plugin's output) or a score's name.
        threshold: For a score, inputs with ``score > threshold`` count as OOD (the
            threshold accepting ``1 - expected`` of the calibration set).
        expected: The rate expected on in-distribution data: the decision plugin's
            ``alpha``, or ``1 - accept_rate`` of the threshold.
    """

    output: str
    threshold: float | None
    expected: float

    def flags(self, pred: Prediction) -> torch.Tensor:
        """The inputs of a batch counted as OOD (bool ``[B]``)."""
        if self.threshold is None:
            return pred.outputs[self.output].bool()
        return pred.scores[self.output] > self.threshold


def _decision_alpha(wrapped: WrappedModel, reference: Reference) -> float:
    for plugin in wrapped.plugins:
        # Its parameters (get_params, the contract's method): the decision's alpha.
        alpha = plugin.get_params().get("alpha")
        if DECISION_OOD in get_tags(plugin).outputs and isinstance(alpha, (int, float)):
            return float(alpha)
    if DECISION_OOD in reference.decisions:
        return reference.decisions[DECISION_OOD]
    raise ValueError(
        f"the model outputs {DECISION_OOD!r} but no plugin says its rate (an 'alpha'); "
        "pass ood_score=<a score name> to count inputs past its threshold instead"
    )


def plan_ood(
    wrapped: WrappedModel, pred: Prediction, reference: Reference, ood_score: str | None
) -> OodPlan | None:
    """Choose how OOD inputs are counted, from the outputs of a first batch.

    ``ood_score="auto"``: the ``ood`` plugin's ``is_ood`` when the model has it, else
    the first OOD score a plugin adds (kind ``ood_score``: ``knn``, ``vim``...), else
    ``msp``. A score name: inputs past that score's threshold. ``None``: no OOD rate.

    Raises:
        ValueError: A score the model does not output, or one without a threshold.
    """
    if ood_score is None:
        return None
    if ood_score == "auto":
        if DECISION_OOD in pred.outputs:
            ood_score = DECISION_OOD
        else:
            # A plugin's detector (knn, vim...), not the core's logit scores.
            found = [
                name
                for plugin in wrapped.plugins
                for name, kind in get_tags(plugin).outputs.items()
                if kind == OutputKind.OOD_SCORE and name in pred.scores
            ]
            ood_score = found[0] if found else "msp"
    if ood_score == DECISION_OOD:
        if DECISION_OOD not in pred.outputs:
            raise ValueError(
                f"ood_score={DECISION_OOD!r} needs the 'ood' decision plugin, which this "
                f"model lacks; its scores are {sorted(pred.scores)}"
            )
        return OodPlan(DECISION_OOD, None, _decision_alpha(wrapped, reference))
    if ood_score not in pred.scores:
        raise ValueError(
            f"ood_score={ood_score!r} is not a score of this model; it has {sorted(pred.scores)}"
        )
    if ood_score not in reference.thresholds:
        raise ValueError(
            f"no threshold for the score {ood_score!r}: the model has no operating points "
            "for it; pass reference=<calibration data> to measure one"
        )
    return OodPlan(ood_score, reference.thresholds[ood_score], 1 - reference.accept_rate)


@dataclass
class WindowSummary:
    """What the monitor keeps of a window: plain numbers (fractions, not percentages).

    Attributes:
        index: Position in the stream.
        name: The window's name.
        timestamp: Its timestamp as given, or ``None``.
        n: Inputs in it.
        estimated_accuracy: Mean calibrated confidence (NannyML's CBPE accuracy).
        estimated_accuracy_ci: Its interval (see :mod:`wrapcal.monitoring.stats`).
        baseline_accuracy: The reference's (see :attr:`Reference.baseline_accuracy`).
        ood: ``output``, ``threshold``, ``flagged``, ``rate``, ``expected`` and the
            binomial test's ``pvalue``; ``None`` without an OOD rate.
        decisions: Per decision output (``abstain``, ``is_ood``), the share flagged.
        sets: Per set output (conformal ``sets``), the mean set size.
        drift: Per score, the KS statistic ``ks``, its ``pvalue`` and ``psi``; empty
            without reference data.
        accuracy: Realised accuracy (labelled windows only).
        ece: Top-label ECE, 15 bins (labelled windows only).
        estimate_error: ``estimated_accuracy - accuracy`` (labelled windows only).
        seconds: Time spent on the window, the backbone pass included.
        alerts: The rules that fired.
    """

    index: int
    name: str
    timestamp: str | None
    n: int
    estimated_accuracy: float
    estimated_accuracy_ci: list[float]
    baseline_accuracy: float | None
    ood: dict[str, Any] | None
    decisions: dict[str, float] = field(default_factory=dict)
    sets: dict[str, float] = field(default_factory=dict)
    drift: dict[str, dict[str, float]] = field(default_factory=dict)
    accuracy: float | None = None
    ece: float | None = None
    estimate_error: float | None = None
    seconds: float = 0.0
    alerts: list[Alert] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        out = asdict(self)
        out["alerts"] = [a.to_dict() for a in self.alerts]
        return out


class WindowAccumulator:
    """Collects one window's per-input values, batch by batch, then summarises them."""

    def __init__(self, plan: OodPlan | None) -> None:
        self.plan = plan
        self.conf: list[torch.Tensor] = []
        self.hits: list[torch.Tensor] = []
        self.labelled: list[bool] = []
        self.scores: dict[str, list[torch.Tensor]] = {}
        self.decisions: dict[str, list[torch.Tensor]] = {}
        self.sets: dict[str, list[torch.Tensor]] = {}
        self.flagged = 0

    def add(self, pred: Prediction, labels: torch.Tensor | None) -> None:
        """Keep what the summary needs of one batch's prediction (on the CPU)."""
        self.conf.append(pred.confidence.detach().float().cpu())
        self.labelled.append(labels is not None)
        if labels is not None:
            self.hits.append(pred.label.cpu() == labels.cpu())
        for name, value in pred.scores.items():
            self.scores.setdefault(name, []).append(value.detach().float().cpu())
        for name, value in pred.outputs.items():
            if pred.kinds[name] == OutputKind.DECISION:
                self.decisions.setdefault(name, []).append(value.detach().cpu().bool())
            elif pred.kinds[name] == OutputKind.SET:
                self.sets.setdefault(name, []).append(value.detach().cpu().sum(dim=1))
        if self.plan is not None:
            self.flagged += int(self.plan.flags(pred).sum())

    def summarise(
        self,
        info: WindowInfo,
        reference: Reference,
        rules: AlertRules,
        level: float = 0.95,
        seconds: float = 0.0,
    ) -> WindowSummary:
        """The window's summary and alerts.

        Raises:
            DataError: An empty window, or one with labels on some batches only.
        """
        if not self.conf or not sum(c.numel() for c in self.conf):
            raise DataError(f"{info.name} (window {info.index}) has no inputs")
        if any(self.labelled) and not all(self.labelled):
            raise DataError(f"{info.name}: some batches have labels and some do not")
        conf = torch.cat(self.conf)
        n = int(conf.numel())
        estimate, low, high = estimate_accuracy(conf, level)
        ood = None
        if self.plan is not None:
            ood = {
                "output": self.plan.output,
                "threshold": self.plan.threshold,
                "flagged": self.flagged,
                "rate": self.flagged / n,
                "expected": self.plan.expected,
                "pvalue": binomial_pvalue(self.flagged, n, self.plan.expected),
            }
        drift: dict[str, dict[str, float]] = {}
        for name, parts in self.scores.items():
            ref = reference.scores.get(name)
            values = torch.cat(parts).double().numpy()
            values = values[np.isfinite(values)]
            if not ref or not values.size:
                continue
            ref_values = np.asarray(ref, dtype=np.float64)
            ks, pvalue = ks_test(values, ref_values)
            drift[name] = {"ks": ks, "pvalue": pvalue, "psi": psi(values, ref_values)}
        summary = WindowSummary(
            index=info.index,
            name=info.name,
            timestamp=info.timestamp,
            n=n,
            estimated_accuracy=estimate,
            estimated_accuracy_ci=[low, high],
            baseline_accuracy=reference.baseline_accuracy,
            ood=ood,
            decisions={k: float(torch.cat(v).double().mean()) for k, v in self.decisions.items()},
            sets={k: float(torch.cat(v).double().mean()) for k, v in self.sets.items()},
            drift=drift,
            seconds=seconds,
        )
        if self.hits:
            hits = torch.cat(self.hits)
            summary.accuracy = float(hits.double().mean())
            summary.ece = ece_from_confidence(conf, hits)
            summary.estimate_error = estimate - summary.accuracy
        summary.alerts = check_rules(summary.to_dict(), rules)
        return summary
