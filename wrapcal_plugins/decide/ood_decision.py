"""One OOD decision from every OOD score, with a guaranteed false-alarm rate.

The ``ood`` plugin (``Stage.DECIDE``) turns the model's OOD scores into three outputs:

* ``ood`` ``[B]`` (``OutputKind.OOD_SCORE``, higher = more OOD): the scores combined;
* ``ood_pvalue`` ``[B]`` (``OutputKind.VALUE``): a conformal p-value of the input being
  in-distribution (Bates, Candès, Lei, Romano & Sesia, "Testing for outliers with
  conformal p-values", Annals of Statistics 2023)::

      p(x) = (1 + #{i : T_i >= T(x)}) / (n_cal + 1)

  where ``T`` is the combined score ``ood`` and ``T_1 .. T_n_cal`` its values on the
  ``calibration`` set;
* ``is_ood`` ``[B]`` (``OutputKind.DECISION``): ``p(x) <= alpha``. For an input
  exchangeable with the calibration set, ``P(is_ood) <= alpha`` (marginally, over the
  calibration draw and the input), whatever the scores and however they are combined,
  as long as the combination never saw the calibration set.

How the scores are combined (``docs/ood_decision.md`` measures the choices):

1. Each score ``s_j`` is turned into a p-value against its own in-distribution
   reference, the ``train`` set's scores (at most ``max_reference`` rows, a seeded
   sample): ``p_j(x) = (1 + #{r in R_j : r >= s_j(x)}) / (|R_j| + 1)``. This puts
   scores of every scale on one scale, "how unusual for in-distribution data", with
   no OOD data.
2. ``combination`` merges them into ``T`` (higher = more OOD):

   * ``"cauchy"`` (default): ``T = sum_j tan(pi (1/2 - p_j'))`` with
     ``p_j' = (1 + #{r >= s_j}) / (|R_j| + 2)`` (finite terms), the Cauchy combination
     (Liu & Xie, JASA 2020, up to the factor ``1/J``): heavy-tailed, so ``T`` follows
     the smallest p-values (one detector that is sure an input is OOD decides, however many others
     see nothing), while several moderately small p-values still add up; redundant
     copies of one detector (``energy``, ``max_logit``, ``gen``...) do not drown a
     different detector's evidence, as they do in a sum;
   * ``"fisher"``: ``T = -2 sum_j log p_j`` (Fisher 1925): evidence adds up over
     detectors; diluted by many redundant or uninformative scores;
   * ``"min_p"``: ``T = -log min_j p_j`` (the statistic of Bonferroni's test): follows
     the single most alarmed detector only;
   * ``"stouffer"``: ``T = sum_j Phi^-1(1 - p_j')``.

   Each term is a function of the integer count ``#{r >= s_j}``, tabulated at ``fit``
   and rounded to a multiple of 2**-24 (:func:`contributions`): ``T`` is then an exact
   float64 sum, the same in PyTorch and ONNX Runtime, so calibration and new inputs
   with equal counts tie exactly.

3. ``T`` is calibrated on the ``calibration`` set: the final p-value above. The
   per-score p-values were computed against ``train``, a set disjoint from
   ``calibration``: calibrating on the same set would make ``T`` see its own
   calibration data, and the false-alarm rate would no longer be guaranteed.

Which data: ``fit`` requires both ``train`` (the detectors fit on it, and it gives the
reference distributions) and ``calibration`` (in-distribution data nothing else learned
from, for the final p-value). With only one set there is no valid split: the detectors
(KNN's bank, Mahalanobis' means) were fitted on it, so its scores are in-sample, lower
than on new data, and the p-value would flag too many normal inputs. A detector that
itself fits on ``calibration`` when both are given makes the same mistake for its
score: the built-in feature detectors read ``train`` first; ``kl_matching`` reads
``calibration`` first (its class templates are means over many images, and the
benchmark's false-alarm rates with it stay at ``alpha``), ``scores=[...]`` leaves any
score out.

Inference is plain tensor operations (two ``searchsorted`` look-ups): it exports to
ONNX and ``.pt2`` with ``ood``, ``ood_pvalue`` and ``is_ood`` among the outputs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from wrapcal import OutputContext, OutputKind, Plugin, PluginTags, Stage, hookimpl
from wrapcal.plugin import Check, DataError, Interval, Options, bootstrap_means, percentile_interval

if TYPE_CHECKING:
    from collections.abc import Callable

    from wrapcal import FitData, ModelView, Prediction

__all__ = [
    "COMBINATIONS",
    "OODDecision",
    "combine",
    "combine_counts",
    "conformal_pvalues",
    "contributions",
    "reference_counts",
    "reference_pvalues",
]

_NAME = "ood"
#: How the per-score p-values are merged (module docstring).
COMBINATIONS = ("cauchy", "fisher", "min_p", "stouffer")
#: The outputs, and what each is.
OUTPUTS = {
    "ood": OutputKind.OOD_SCORE,
    "ood_pvalue": OutputKind.VALUE,
    "is_ood": OutputKind.DECISION,
}
_F64 = (torch.float64,)
#: Every term of ``T`` is a multiple of this: sums of up to 2**29 / GRID in magnitude are
#: exact in float64 (module docstring of :func:`contributions`).
GRID = 2.0**-24
_WHY_TRAIN = "the in-distribution reference of each score (the data the detectors fit on)"
_WHY_CALIBRATION = (
    "held-out in-distribution data for the conformal p-value, disjoint from train: "
    "split your in-distribution data in two (train=..., calibration=...)"
)
N_RESAMPLES, LEVEL = 1000, 0.95


def _names(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(v, str) and v for v in value)
        and len(set(value)) == len(value)
    )


# --- the math, shared by fit, inference, the tests and the benchmark ----------------------


def reference_counts(reference: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``#{r >= s}`` ``[B, J]`` (int64) of scores ``[B, J]`` against sorted references
    ``[J, n]``: ``n - searchsorted(r, s, side="left")``."""
    below = torch.searchsorted(reference, scores.T.contiguous().to(reference.dtype))
    return (reference.shape[1] - below).T


def reference_pvalues(reference: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Per-score p-values ``[B, J]`` of scores ``[B, J]`` against sorted references ``[J, n]``:
    ``(1 + #{r >= s}) / (n + 1)``."""
    counts = reference_counts(reference, scores)
    return (1 + counts).to(reference.dtype) / (reference.shape[1] + 1)


def contributions(combination: str, n_reference: int) -> torch.Tensor:
    """What one score adds to ``T`` for each count ``k = #{r >= s}`` in ``0 .. n``
    (``[n + 1]``, float64), with ``p = (1 + k) / (n + 1)`` and ``p' = (1 + k) / (n + 2)``
    (strictly inside (0, 1), so every term is finite)::

        fisher    -2 log p          (T: the sum over scores)
        min_p     -log p            (T: the largest)
        stouffer  Phi^-1(1 - p')    (T: the sum)
        cauchy    tan(pi (1/2 - p'))  (T: the sum; the mean up to the factor J)

    Each value is rounded to a multiple of :data:`GRID`: sums of such numbers are exact
    in float64, so ``T`` is the same in any order of addition, in PyTorch, in an ONNX
    runtime, and for a calibration image and a new one with the same counts (ties at
    the saturated end, where every score is beyond its whole reference, are common).
    """
    if combination not in COMBINATIONS:
        raise ValueError(f"unknown combination {combination!r}; use one of {COMBINATIONS}")
    k = torch.arange(n_reference + 1, dtype=torch.float64)
    p = (1 + k) / (n_reference + 1)
    inner = (1 + k) / (n_reference + 2)
    if combination == "fisher":
        values = -2 * p.log()
    elif combination == "min_p":
        values = -p.log()
    elif combination == "stouffer":
        values = math.sqrt(2) * torch.erfinv(1 - 2 * inner)
    else:
        values = torch.tan(math.pi * (0.5 - inner))
    return (values / GRID).round() * GRID


def combine_counts(counts: torch.Tensor, table: torch.Tensor, combination: str) -> torch.Tensor:
    """``T`` ``[B]`` from counts ``[B, J]`` and :func:`contributions` ``table``."""
    values = table[counts]
    return values.amax(dim=1) if combination == "min_p" else values.sum(dim=1)


def combine(pvalues: torch.Tensor, combination: str, n_reference: int) -> torch.Tensor:
    """The combined statistic ``T`` ``[B]`` (higher = more OOD) of per-score p-values
    ``[B, J]`` against references of ``n_reference`` rows (:func:`contributions`)."""
    counts = (pvalues * (n_reference + 1)).round().long() - 1
    return combine_counts(counts, contributions(combination, n_reference), combination)


def conformal_pvalues(calibration: torch.Tensor, statistic: torch.Tensor) -> torch.Tensor:
    """Conformal p-values ``[B]`` of statistics ``[B]`` against the sorted calibration
    statistics ``[n]``: ``(1 + #{T_i >= T}) / (n + 1)`` (Bates et al. 2023)."""
    n = calibration.shape[0]
    below = torch.searchsorted(calibration, statistic.contiguous().to(calibration.dtype))
    return (1 + n - below).to(calibration.dtype) / (n + 1)


class OODDecision(Plugin):
    """A combined OOD score, its conformal p-value and a decision at a false-alarm rate.

    Args:
        alpha: The false-alarm rate: ``is_ood`` flags at most this share of
            in-distribution inputs (marginally).
        scores: The scores to combine, by name (OOD scores or uncertainty scores the
            model reports before this plugin); ``None``: every ``OutputKind.OOD_SCORE``
            the model has at ``fit`` (the core's ``energy`` and ``max_logit``, each
            detector's, ``mutual_information``, ``discrepancy``...).
        combination: ``"cauchy"`` (default), ``"fisher"``, ``"min_p"`` or ``"stouffer"``
            (module docstring; ``docs/ood_decision.md`` compares them).
        max_reference: At most this many ``train`` rows (a seeded sample) give each
            score's reference distribution (kept in the model: ``J x max_reference``
            float64).
        seed: Seed of that sample.

    Attributes:
        scores_: The scores combined, in order.
        n_reference_: Rows of each reference.
        n_calibration_: Calibration samples behind the p-value.
        reference: Buffer ``[J, n_reference_]`` (float64): each score's sorted
            in-distribution reference.
        calibration_statistics: Buffer ``[n_calibration_]`` (float64): the sorted
            combined scores of the calibration set.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "alpha": [Interval(float, 0, 1, closed="neither")],
        "scores": [None, Check(_names, "a non-empty list of distinct score names")],
        "combination": [Options(str, COMBINATIONS)],
        "max_reference": [Interval(int, 1, 10_000_000)],
        "seed": [Interval(int, 0, 2**63 - 1)],
    }
    _state_constraints: ClassVar[dict[str, list[Any]]] = {
        "scores_": [None, Check(_names, "a non-empty list of distinct score names")],
        "n_reference_": [None, Interval(int, 1, None)],
        "n_calibration_": [None, Interval(int, 1, None)],
    }

    def __init__(
        self,
        alpha: float = 0.05,
        scores: list[str] | None = None,
        combination: str = "cauchy",
        max_reference: int = 10_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.scores = scores
        self.combination = combination
        self.max_reference = max_reference
        self.seed = seed
        self.register_learned_buffer("reference", (None, None), _F64)
        self.register_learned_buffer("calibration_statistics", (None,), _F64)
        self.register_learned_buffer("contribution", (None,), _F64)

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DECIDE
        tags.fit_requires = {"train": _WHY_TRAIN, "calibration": _WHY_CALIBRATION}
        tags.exportable = True
        tags.outputs = dict(OUTPUTS)
        return tags

    # --- fitting -------------------------------------------------------------------------

    def fit(self, model: ModelView, data: FitData) -> OODDecision:
        """References from ``train``'s scores, the final p-value from ``calibration``'s."""
        train = data.require("train", _NAME, _WHY_TRAIN)
        calibration = data.require("calibration", _NAME, _WHY_CALIBRATION)
        rows = train.total
        features = train.features
        if rows > self.max_reference:
            generator = torch.Generator().manual_seed(self.seed)
            pick = torch.randperm(rows, generator=generator)[: self.max_reference].sort().values
            features = features[pick]
        reference = model.predict_features(features)
        names = self._chosen(reference)
        table = self._matrix(reference, names, "train")
        self.reference = table.T.contiguous().sort(dim=1).values.to(model.device)
        self.contribution = contributions(self.combination, table.shape[0]).to(model.device)
        self.scores_ = names
        self.n_reference_ = int(table.shape[0])
        held_out = self._matrix(model.predict_features(calibration.features), names, "calibration")
        statistic = self._statistic(held_out)
        self.calibration_statistics = statistic.sort().values.to(model.device)
        self.n_calibration_ = int(statistic.shape[0])
        self.fitted_ = True
        return self

    def _chosen(self, prediction: Prediction) -> list[str]:
        if self.scores is None:
            names = [n for n, kind in prediction.kinds.items() if kind is OutputKind.OOD_SCORE]
            if not names:
                raise DataError(
                    "plugin ood: the model has no OOD score to combine; add a detector "
                    "(e.g. plugins=['knn', 'vim', 'ood']) or name scores with ood's scores=[...]"
                )
            return names
        missing = [n for n in self.scores if n not in prediction.scores]
        if missing:
            raise DataError(
                f"plugin ood: scores {missing} are not among the model's scores "
                f"{sorted(prediction.scores)}; add the plugin that produces them before "
                "ood, or leave them out of scores=[...]"
            )
        return list(self.scores)

    @staticmethod
    def _matrix(prediction: Prediction, names: list[str], where: str) -> torch.Tensor:
        table = torch.stack([prediction.scores[n].double() for n in names], dim=1)
        if not bool(torch.isfinite(table).all()):
            bad = [n for i, n in enumerate(names) if not bool(torch.isfinite(table[:, i]).all())]
            raise DataError(
                f"plugin ood: scores {bad} hold NaN or inf values on the {where} set; "
                "leave them out with scores=[...]"
            )
        return table

    def _statistic(self, table: torch.Tensor) -> torch.Tensor:
        counts = reference_counts(self.reference, table)
        return combine_counts(counts, self.contribution, self.combination)

    def validate_state(self) -> None:
        """Finite, sorted tensors whose sizes match the recorded counts."""
        super().validate_state()
        if not self.fitted_:
            return
        reference, calibration = self.reference, self.calibration_statistics
        names = self.__dict__.get("scores_") or []
        if not names or reference.shape != (len(names), self.n_reference_):
            raise ValueError(
                "learned tensor reference must be [len(scores_), n_reference_] = "
                f"[{len(names)}, {self.n_reference_}]; got {tuple(reference.shape)}"
            )
        expected = contributions(self.combination, self.n_reference_)
        if not torch.equal(self.contribution.cpu(), expected):
            raise ValueError(
                f"learned tensor contribution must be the {self.combination} terms of "
                f"{self.n_reference_} reference rows (wrapcal_plugins.decide.ood_decision."
                "contributions)"
            )
        if calibration.shape != (self.n_calibration_,):
            raise ValueError(
                f"learned tensor calibration_statistics must have {self.n_calibration_} "
                f"values; got {tuple(calibration.shape)}"
            )
        for name, values in (("reference", reference), ("calibration_statistics", calibration)):
            if values.numel() and bool((values.diff(dim=-1) < 0).any()):
                raise ValueError(f"learned tensor {name} must be sorted in ascending order")

    # --- inference -----------------------------------------------------------------------

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``ood``, ``ood_pvalue`` (in the probabilities' dtype) and ``is_ood``."""
        self.check_is_fitted()
        names: list[str] = self.scores_
        earlier = context.outputs
        missing = [n for n in names if n not in earlier]
        if missing:
            raise ValueError(
                f"plugin ood was fitted on scores {names}, and {missing} are missing "
                "now: keep the plugins that produce them"
            )
        table = torch.stack([earlier[n].to(self.reference.dtype) for n in names], dim=1)
        statistic = self._statistic(table)
        pvalue = conformal_pvalues(self.calibration_statistics, statistic)
        dtype = context.probs.dtype
        return {
            "ood": statistic.to(dtype),
            "ood_pvalue": pvalue.to(dtype),
            # Decided in float64: the float32 p-value must not move an input across alpha.
            "is_ood": pvalue <= self.alpha,
        }

    # --- the report --------------------------------------------------------------------

    def report_metrics(self, prediction: Prediction, labels: torch.Tensor) -> dict[str, Any]:
        """On the in-distribution test set: the share flagged (the false-alarm rate, with
        a 95% bootstrap interval) beside ``alpha``."""
        return false_alarm_metrics(prediction.outputs["is_ood"], self.alpha, self.seed)


def false_alarm_metrics(is_ood: torch.Tensor, alpha: float, seed: int = 0) -> dict[str, Any]:
    """``false_alarm_rate`` (share of ``is_ood`` with its bootstrap interval) and ``alpha``."""
    flagged = is_ood.double()[:, None]
    means = bootstrap_means(flagged, N_RESAMPLES, seed)
    return {
        "false_alarm_rate": {
            "value": float(flagged.mean()),
            "ci": percentile_interval(means[:, 0]),
            "percent": True,
            "higher_is_better": False,
        },
        "alpha": {"value": float(alpha), "percent": True},
    }


@hookimpl
def wrapcal_register_plugins(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register(_NAME, OODDecision)
