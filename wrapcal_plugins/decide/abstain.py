"""Abstention at a chosen risk: withhold predictions so that accepted ones err rarely.

The ``abstain`` plugin (``Stage.DECIDE``) adds ``abstain`` ``[B]`` (bool) to each
prediction: True where the prediction's ``msp`` (1 - its calibrated top probability) is
above a threshold chosen on held-out labelled data so that, with probability at least
``1 - delta`` over that data, the error rate of the accepted predictions on new data from
the same distribution is at most ``risk``. The selection and its guarantee are
:func:`wrapcal.logits.abstention.fit_abstention` (Learn then Test with exact binomial p-values on
a fixed grid, Bonferroni-corrected).

A plugin of its own rather than an option of ``conformal``: it answers another question
(accept or not, rather than which classes), has its own parameters (``risk``,
``delta``) and guarantee, and is useful without sets; both can be used together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from wrapcal import (
    AbstentionRule,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    fit_abstention,
    hookimpl,
    selective,
)
from wrapcal.plugin import Interval, bootstrap_means, percentile_interval

from .conformal import FIT_SETS, N_RESAMPLES

if TYPE_CHECKING:
    from collections.abc import Callable

    from wrapcal import FitData, ModelView, Prediction

__all__ = ["Abstain"]

_WHY = "choosing the abstention threshold needs held-out labelled data"


class Abstain(Plugin):
    """Selective prediction with a guaranteed error rate of the accepted predictions.

    Args:
        risk: Target error rate of accepted predictions.
        delta: Allowed probability (over the calibration data) of missing the target.
        grid: Number of msp thresholds tried (fixed before seeing data); the
            Bonferroni correction tests each at ``delta / grid``.
        seed: Seed of the report's bootstrap.

    Attributes:
        threshold_: The chosen msp threshold (accept when ``msp <= threshold_``; -1:
            no threshold met the target with confidence, every input is abstained on).
        risk_bound_: Upper bound on the selective risk at ``threshold_`` at confidence
            ``1 - delta / grid`` (at most ``risk`` when a threshold was found).
        accepted_: Share of calibration samples accepted.
        calibration_risk_: Their error rate among those accepted.
        n_calibration_: Calibration samples.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "risk": [Interval(float, 0, 1, closed="neither")],
        "delta": [Interval(float, 0, 0.5, closed="neither")],
        "grid": [Interval(int, 2, 100_000)],
        "seed": [Interval(int, 0, 2**63 - 1)],
    }
    _state_constraints: ClassVar[dict[str, list[Any]]] = {
        "threshold_": [Interval(float, -1, 1)],
        "risk_bound_": [Interval(float, 0, 1)],
        "accepted_": [Interval(float, 0, 1)],
        "calibration_risk_": [Interval(float, 0, 1)],
        "n_calibration_": [Interval(int, 1, None)],
    }

    def __init__(self, risk: float = 0.05, delta: float = 0.1, grid: int = 100, seed: int = 0):
        super().__init__()
        self.risk = risk
        self.delta = delta
        self.grid = grid
        self.seed = seed
        # float64 so threshold_ is the grid value exactly; saved with the model.
        self.register_buffer("threshold", torch.full((), -1.0, dtype=torch.float64))

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DECIDE
        tags.fit_reads = FIT_SETS
        tags.exportable = True
        tags.outputs = {"abstain": OutputKind.DECISION}
        return tags

    def fit(self, model: ModelView, data: FitData) -> Abstain:
        """Choose the threshold on the msp the model reports (every plugin before this one)."""
        found = data.first(FIT_SETS, "abstain", _WHY)
        labels = found.require_labels("abstain")
        prediction = model.predict_features(found.features)
        correct = prediction.label == labels.to(prediction.label.device)
        return self.fit_scores(prediction.scores["msp"], correct)

    def fit_scores(self, msp: Any, correct: Any) -> Abstain:
        """Choose the threshold from calibration ``msp`` ``[n]`` and correctness ``[n]``.

        Returns:
            self
        """
        rule = fit_abstention(msp, correct, risk=self.risk, delta=self.delta, grid=self.grid)
        self.threshold.fill_(rule.threshold)
        self.threshold_, self.risk_bound_ = rule.threshold, rule.bound
        self.accepted_, self.calibration_risk_ = rule.accepted, rule.calibration_risk
        self.n_calibration_ = rule.n
        self.fitted_ = True
        return self

    @property
    def rule_(self) -> AbstentionRule:
        """The fitted rule, as :func:`wrapcal.logits.abstention.fit_abstention` returns it."""
        self.check_is_fitted()
        return AbstentionRule(
            self.threshold_, self.risk, self.delta, self.risk_bound_, self.accepted_,
            self.calibration_risk_, self.n_calibration_,
        )  # fmt: skip

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``abstain`` ``[B]``: ``msp > threshold`` (the core's msp, compared in float64)."""
        self.check_is_fitted()
        msp = context.outputs["msp"].to(torch.float64)
        return {"abstain": msp > self.threshold.to(msp.device)}

    def report_metrics(self, prediction: Prediction, labels: torch.Tensor) -> dict[str, Any]:
        """Accepted share and their error rate on the test set, with the risk-coverage curve.

        Returns ``accepted`` (coverage of the selective classifier) and
        ``selective_risk`` with 95% percentile intervals (1000 paired resamples seeded
        with ``seed``), ``target_risk``, ``risk_bound`` and ``threshold`` from the
        calibration, and ``risk_coverage`` (``coverage``, ``risk`` lists over the test
        set, most confident first, with the ``operating_point``).
        """
        correct = (prediction.label == labels.to(prediction.label.device)).double()
        accept = (~prediction.outputs["abstain"]).double()
        means = bootstrap_means(
            torch.stack([accept, accept * (1 - correct)], 1), N_RESAMPLES, self.seed
        )
        kept = accept.sum()
        risk = float(((1 - correct) * accept).sum() / kept) if kept > 0 else 0.0
        ratio = means[:, 1] / means[:, 0].clamp_min(1e-300)
        curve = selective.risk_coverage_curve(prediction.scores["msp"], correct.bool())
        curve["operating_point"] = {"coverage": float(accept.mean()), "risk": risk}
        return {
            "accepted": {
                "value": float(accept.mean()),
                "ci": percentile_interval(means[:, 0]),
                "percent": True,
            },
            "selective_risk": {
                "value": risk,
                "ci": percentile_interval(ratio[means[:, 0] > 0]) if kept > 0 else None,
                "percent": True,
                "higher_is_better": False,
            },
            "target_risk": {"value": self.risk, "percent": True},
            "risk_bound": {"value": self.risk_bound_, "percent": True},
            "threshold": {"value": self.threshold_},
            "risk_coverage": curve,
        }


@hookimpl
def wrapcal_register_plugins(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("abstain", Abstain)
