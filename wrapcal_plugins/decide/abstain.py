"""Abstention at a chosen risk: withhold predictions so that accepted ones err rarely.

The ``abstain`` plugin (``Stage.DECIDE``) adds ``abstain`` ``[B]`` (bool) to each
prediction: True where the prediction's confidence score is above a threshold chosen on
held-out labelled data so that, with probability at least ``1 - delta`` over that data,
the error rate of the accepted predictions on new data from the same distribution is at
most ``risk``. The selection and its guarantee are
:func:`wrapcal.logits.abstention.fit_abstention` (Learn then Test with exact binomial
p-values, fixed-sequence testing from the most conservative threshold of a fixed grid).

Which confidence: calibrators (temperature scaling) change the ranking of inputs by
confidence, often for the worse for abstention. With ``ranking="auto"`` (the default)
the plugin compares on its calibration data the calibrated ``msp`` (``1 - max p`` of the
final probabilities, the core's ``msp``) and ``raw_msp`` (``1 - max p`` of
:attr:`~wrapcal.OutputContext.combined`, the members combined before any calibrator) and
tests each at ``delta / 2``, keeping the one whose certified threshold accepts more (the
guarantee covers that choice: both hold at once with probability ``1 - delta``);
``score_`` says which. At
inference it reads the same: ``outputs["msp"]`` or ``combined``. The predicted label is
the same either way (calibrators keep the argmax of the built-in chain's probabilities).

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
from wrapcal.plugin import (
    Interval,
    Options,
    bootstrap_means,
    combine_members,
    logits_to_probs,
    percentile_interval,
)

from .conformal import FIT_SETS, N_RESAMPLES

if TYPE_CHECKING:
    from collections.abc import Callable

    from wrapcal import FitData, ModelView, Prediction

__all__ = ["Abstain"]

_WHY = "choosing the abstention threshold needs held-out labelled data"
#: What ``ranking`` compares: the score names each choice may pick.
_RANKINGS = {"auto": ("msp", "raw_msp"), "calibrated": ("msp",), "raw": ("raw_msp",)}


class Abstain(Plugin):
    """Selective prediction with a guaranteed error rate of the accepted predictions.

    Args:
        risk: Target error rate of accepted predictions.
        delta: Allowed probability (over the calibration data) of missing the target.
        grid: Number of score thresholds tried (fixed before seeing data); None: 1000
            for ``fixed_sequence``, 100 for ``bonferroni`` (which tests each at
            ``delta / grid``).
        seed: Seed of the report's bootstrap.
        ranking: Which confidence ranks the inputs: ``"auto"`` (the calibrated ``msp``
            or ``raw_msp``, each tested at ``delta / 2``, the one certified to accept
            more), ``"calibrated"`` (``msp`` only, as 0.2.0) or ``"raw"``
            (``raw_msp``: ``1 - max p`` of the combined logits before calibrators).
        method: ``"fixed_sequence"`` (Learn then Test) or ``"bonferroni"`` (0.2.0's
            rule), see :func:`wrapcal.logits.abstention.fit_abstention`.

    Attributes:
        threshold_: The chosen threshold on ``score_`` (accept when the score is
            ``<= threshold_``; -1: no threshold met the target with confidence, every
            input is abstained on).
        score_: ``"msp"`` or ``"raw_msp"``: the score the threshold applies to (files
            written by 0.2.0 hold ``msp``).
        risk_bound_: Clopper-Pearson upper bound on the selective risk at
            ``threshold_`` (at confidence ``1 - delta``, ``1 - delta / grid`` for
            ``bonferroni``; at most ``risk`` when a threshold was found).
        accepted_: Share of calibration samples accepted.
        calibration_risk_: Their error rate among those accepted.
        n_calibration_: Calibration samples.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "risk": [Interval(float, 0, 1, closed="neither")],
        "delta": [Interval(float, 0, 0.5, closed="neither")],
        "grid": [Interval(int, 2, 100_000), None],
        "seed": [Interval(int, 0, 2**63 - 1)],
        "ranking": [Options(str, _RANKINGS)],
        "method": [Options(str, selective.METHODS)],
    }
    _state_constraints: ClassVar[dict[str, list[Any]]] = {
        "threshold_": [Interval(float, -1, 1)],
        "risk_bound_": [Interval(float, 0, 1)],
        "accepted_": [Interval(float, 0, 1)],
        "calibration_risk_": [Interval(float, 0, 1)],
        "n_calibration_": [Interval(int, 1, None)],
        "score_": [Options(str, ("msp", "raw_msp"))],
    }

    def __init__(
        self,
        risk: float = 0.05,
        delta: float = 0.1,
        grid: int | None = None,
        seed: int = 0,
        ranking: str = "auto",
        method: str = "fixed_sequence",
    ):
        super().__init__()
        self.risk = risk
        self.delta = delta
        self.grid = grid
        self.seed = seed
        self.ranking = ranking
        self.method = method
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
        """Choose the ranking and the threshold on the calibration data, from the msp the
        model reports (every plugin before this one) and the msp of its combined logits
        before calibrators."""
        found = data.first(FIT_SETS, "abstain", _WHY)
        labels = found.require_labels("abstain")
        prediction = model.predict_features(found.features)
        correct = prediction.label == labels.to(prediction.label.device)
        raw_msp = None
        if "raw_msp" in _RANKINGS[self.ranking]:
            with torch.no_grad():  # in row chunks: the set may live on disk
                raw_msp = torch.cat(
                    [_raw_msp(combine_members(model.members(rows))) for rows, _ in found.batches()]
                )
        return self.fit_scores(prediction.scores["msp"], correct, raw_msp=raw_msp)

    def fit_scores(self, msp: Any, correct: Any, raw_msp: Any = None) -> Abstain:
        """Choose the ranking and threshold from calibration scores ``[n]`` and
        correctness ``[n]``.

        Args:
            msp: ``1 - max p`` of the final (calibrated) probabilities.
            correct: Whether each prediction was right.
            raw_msp: ``1 - max p`` of the combined logits before calibrators; None: only
                ``msp`` is considered (whatever ``ranking`` says, unless it is
                ``"raw"``, which needs it).

        Returns:
            self
        """
        if self.ranking == "raw":
            if raw_msp is None:
                raise ValueError("abstain: ranking='raw' needs raw_msp; pass raw_msp=...")
            rule = fit_abstention(
                raw_msp, correct, risk=self.risk, delta=self.delta, grid=self.grid,
                method=self.method,
            )  # fmt: skip
            rule.score = "raw_msp"
        else:
            others = None
            if raw_msp is not None and self.ranking == "auto":
                others = {"raw_msp": raw_msp}
            rule = fit_abstention(
                msp, correct, risk=self.risk, delta=self.delta, grid=self.grid,
                alternatives=others, method=self.method,
            )  # fmt: skip
        self.threshold.fill_(rule.threshold)
        self.threshold_, self.risk_bound_ = rule.threshold, rule.bound
        self.accepted_, self.calibration_risk_ = rule.accepted, rule.calibration_risk
        self.n_calibration_, self.score_ = rule.n, rule.score
        self.fitted_ = True
        return self

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the learned values; a file written by 0.2.0 has no ``score_``: its
        threshold applies to ``msp``, the only score 0.2.0 used."""
        if isinstance(state, dict) and state.get("fitted") and "score_" not in state:
            state = {**state, "score_": "msp"}
        super().set_state(state)

    @property
    def rule_(self) -> AbstentionRule:
        """The fitted rule, as :func:`wrapcal.logits.abstention.fit_abstention` returns it."""
        self.check_is_fitted()
        return AbstentionRule(
            self.threshold_, self.risk, self.delta, self.risk_bound_, self.accepted_,
            self.calibration_risk_, self.n_calibration_, self.score_, self.method,
        )  # fmt: skip

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``abstain`` ``[B]``: ``score > threshold`` compared in float64, the score being
        the core's ``msp`` or ``raw_msp`` of ``context.combined`` (``score_``)."""
        self.check_is_fitted()
        if self.score_ == "raw_msp":
            score = _raw_msp(context.combined).to(torch.float64)
        else:
            score = context.outputs["msp"].to(torch.float64)
        return {"abstain": score > self.threshold.to(score.device)}

    def report_metrics(self, prediction: Prediction, labels: torch.Tensor) -> dict[str, Any]:
        """Accepted share and their error rate on the test set, with the risk-coverage curve.

        Returns ``accepted`` (coverage of the selective classifier) and
        ``selective_risk`` with 95% percentile intervals (1000 paired resamples seeded
        with ``seed``), ``target_risk``, ``risk_bound`` and ``threshold`` from the
        calibration, and ``risk_coverage`` (``coverage``, ``risk`` lists over the test
        set, most confident first, with the ``operating_point``). The curve ranks by the
        calibrated ``msp`` (the prediction holds no logits before calibrators); when the
        rule uses ``raw_msp`` (``score_``) its operating point need not lie on it.
        """
        correct = (prediction.label == labels.to(prediction.label.device)).double()
        accept = (~prediction.outputs["abstain"]).double()
        means = bootstrap_means(
            torch.stack([accept, accept * (1 - correct)], 1), N_RESAMPLES, self.seed
        )
        kept = accept.sum()
        risk = float(((1 - correct) * accept).sum() / kept) if kept > 0 else 0.0
        ratio = means[:, 1] / means[:, 0].clamp_min(1e-300)
        curve: dict[str, Any] = dict(
            selective.risk_coverage_curve(prediction.scores["msp"], correct.bool())
        )
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


def _raw_msp(combined: torch.Tensor) -> torch.Tensor:
    """``1 - max p`` of the combined logits before calibrators, as the core computes
    ``msp`` from the final ones."""
    return 1 - logits_to_probs(combined).amax(dim=-1)


@hookimpl
def wrapcal_register_plugins(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("abstain", Abstain)
