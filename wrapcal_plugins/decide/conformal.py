"""Conformal prediction sets: the true class in the set with probability >= 1 - alpha.

The ``conformal`` plugin acts last (``Stage.DECIDE``), on the probabilities the wrapped
model reports after every calibrator, and adds to each prediction a ``[B, K]`` boolean
``sets`` mask and a ``set_size`` score (higher = more uncertain). The math — LAC, APS,
RAPS scores, the finite-sample quantile, class-conditional thresholds, the seeded ``U``
— is :mod:`wrapcal.logits.conformal`, shared with the logits-only path
``wrapcal.conformal_sets``; see ``docs/conformal.md``.

It calibrates on ``wrapped.fit(conformal=...)`` when given, else on ``calibration=``.
The guarantee needs calibration data the model (calibrators included) did not learn
from; a temperature fitted on the same data moves one scalar and in practice leaves the
coverage where it was (measured in ``docs/conformal.md``), but ``conformal=`` keeps the
guarantee exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from wrapcal import (
    ConformalPredictor,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    fit_conformal,
    hookimpl,
)
from wrapcal import conformal as split_conformal
from wrapcal.plugin import Interval, Options, bootstrap_means, percentile_interval

if TYPE_CHECKING:
    from collections.abc import Callable

    from wrapcal import FitData, ModelView, Prediction
    from wrapcal.plugin import LabelsLike, LogitsLike

__all__ = ["ConformalSets", "set_metrics"]

#: The ``fit`` data sets read, the first given wins.
FIT_SETS = ("conformal", "calibration")
_WHY = "split conformal calibration needs held-out labelled data"
#: Bootstrap resamples and level of the report's intervals (as ``wrapcal.evaluate``).
N_RESAMPLES, LEVEL = 1000, 0.95
_F64 = (torch.float64,)


class ConformalSets(Plugin):
    """Split conformal prediction sets (LAC, APS, RAPS; marginal or class-conditional).

    Args:
        alpha: Miscoverage: the set holds the true class with probability >= 1 - alpha.
        method: ``"aps"`` (the default: sets that grow with the difficulty of the input,
            the adaptive behaviour a set is for, with coverage exact rather than
            conservative), ``"lac"`` (smallest sets on average) or ``"raps"`` (APS with a
            penalty on long tails).
        classwise: One threshold per class: coverage 1 - alpha within every class.
        k_reg: RAPS: ranks not penalised; ``None``: the paper's choice on a tuning split.
        lam: RAPS: penalty per rank beyond ``k_reg``; ``None``: the paper's choice.
        randomized: APS/RAPS with the papers' randomisation (exact coverage); ``False``
            gives deterministic, larger sets.
        tune_fraction: RAPS with a ``None`` parameter: the share of the calibration data
            that tunes it (not used for the threshold).
        seed: Seed of the randomisation's hash, the RAPS tuning split and the report's
            bootstrap.
        allow_empty: ``True`` (default, the papers' sets): a set may be empty. Not only
            LAC's: randomised APS/RAPS leave out even the top class when ``U p_top``
            exceeds the threshold (at alpha 0.1: 4.8-6.2% of the rows of the shared
            CIFAR-10 logit sets, 0.6-2.3% of the CIFAR-100 ones, 1.0% on the shared
            ResNet-20 over JPEG CIFAR-10).
            ``False``: the top class is always in the set: it is scored 0 in calibration
            and prediction alike, so coverage stays >= 1 - alpha (exact, unless the model
            is more accurate than 1 - alpha: then the sets are the top class alone and
            cover what it does); on the CIFAR-100 logit sets the sets were smaller than
            the default's (``docs/conformal.md``).

    Attributes:
        k_reg_, lam_: The RAPS parameters used (0 for the other methods).
        n_calibration_: Calibration samples behind the thresholds.
        n_tune_: Calibration samples spent on tuning RAPS.
        thresholds: Buffer ``[K]`` (float64): the threshold of each class's score.
        hash_weights: Buffer (float64): the weights of the hash that draws ``U``.
        hash_version_: How ``U`` is drawn from them
            (:data:`wrapcal.logits.conformal.HASH_VERSIONS`; ``None`` in files written
            before it was recorded, which use version 1).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "alpha": [Interval(float, 0, 1, closed="neither")],
        "method": [Options(str, split_conformal.METHODS)],
        "classwise": [bool],
        "k_reg": [None, Interval(int, 0, None)],
        "lam": [None, Interval(float, 0, None)],
        "randomized": [bool],
        "tune_fraction": [Interval(float, 0, 1, closed="neither")],
        "seed": [Interval(int, 0, 2**63 - 1)],
        "allow_empty": [bool],
    }
    _state_constraints: ClassVar[dict[str, list[Any]]] = {
        "k_reg_": [Interval(int, 0, None)],
        "lam_": [Interval(float, 0, None)],
        "n_calibration_": [Interval(int, 1, None)],
        "n_tune_": [Interval(int, 0, None)],
        # None: fitted before U had versions (wrapcal 0.2.0 too), version 1.
        "hash_version_": [None, Options(int, split_conformal.HASH_VERSIONS)],
    }

    def __init__(
        self,
        alpha: float = 0.1,
        method: str = "aps",
        classwise: bool = False,
        k_reg: int | None = None,
        lam: float | None = None,
        randomized: bool = True,
        tune_fraction: float = 0.3,
        seed: int = 0,
        allow_empty: bool = True,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.method = method
        self.classwise = classwise
        self.k_reg = k_reg
        self.lam = lam
        self.randomized = randomized
        self.tune_fraction = tune_fraction
        self.seed = seed
        self.allow_empty = allow_empty
        self.register_learned_buffer("thresholds", (None,), _F64)
        self.register_learned_buffer("hash_weights", (None,), _F64)

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DECIDE
        # conformal= or calibration=: neither is required alone, fit() says if both lack.
        tags.fit_reads = FIT_SETS
        tags.exportable = True
        tags.outputs = {"sets": OutputKind.SET, "set_size": OutputKind.UNCERTAINTY}
        return tags

    # --- fitting -------------------------------------------------------------------------

    def fit(self, model: ModelView, data: FitData) -> ConformalSets:
        """Calibrate on the probabilities the model reports (every plugin before this one)."""
        found = data.first(FIT_SETS, "conformal", _WHY)
        labels = found.require_labels("conformal")
        prediction = model.predict_features(found.features)
        return self._store(
            self._fit(prediction.logits, labels, prediction.probs), prediction.logits.device
        )

    def fit_logits(self, logits: LogitsLike, labels: LabelsLike) -> ConformalSets:
        """Calibrate on logits directly, without a wrapped model (softmax probabilities).

        Returns:
            self
        """
        logits = torch.as_tensor(logits)
        return self._store(self._fit(logits, labels, None), logits.device)

    def _fit(self, logits: Any, labels: Any, probs: torch.Tensor | None) -> ConformalPredictor:
        return fit_conformal(
            logits,
            labels,
            alpha=self.alpha,
            method=self.method,
            classwise=self.classwise,
            seed=self.seed,
            k_reg=self.k_reg,
            lam=self.lam,
            randomized=self.randomized,
            tune_fraction=self.tune_fraction,
            probs=probs,
            allow_empty=self.allow_empty,
        )

    def _store(self, fitted: ConformalPredictor, device: torch.device) -> ConformalSets:
        self.thresholds = fitted.thresholds.to(device)
        self.hash_weights = fitted.weights.to(device)
        self.k_reg_, self.lam_ = fitted.k_reg, fitted.lam
        self.n_calibration_, self.n_tune_ = fitted.n, fitted.n_tune
        self.hash_version_ = fitted.hash_version
        self.fitted_ = True
        return self

    @property
    def predictor_(self) -> ConformalPredictor:
        """The fitted predictor, as :func:`wrapcal.logits.conformal.fit_conformal` returns it."""
        self.check_is_fitted()
        return ConformalPredictor(
            self.method, self.thresholds, self.hash_weights, self.k_reg_, self.lam_,
            self.randomized, self.n_calibration_, self.n_tune_, self.allow_empty,
            self._hash_version,
        )  # fmt: skip

    @property
    def _hash_version(self) -> int:
        """How ``U`` is drawn: files written before versions were recorded use 1."""
        version = self.__dict__.get("hash_version_")
        return 1 if version is None else version

    def validate_state(self) -> None:
        """Thresholds are finite (ALL_CLASSES stands for 'every class') and >= 0."""
        for name in ("thresholds", "hash_weights"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"learned tensor {name} holds NaN or inf values")
        if self.fitted_ and bool((self.thresholds < 0).any()):
            raise ValueError("learned thresholds must be >= 0 (scores are)")

    # --- inference -----------------------------------------------------------------------

    def predict_sets(self, logits: Any) -> torch.Tensor:
        """Sets ``[N, K]`` (bool) of logits, after :meth:`fit_logits`."""
        return self.predictor_.sets(logits)

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``sets`` ``[B, K]`` (bool) and ``set_size`` ``[B]`` (float), plain tensor ops."""
        self.check_is_fitted()
        sets = split_conformal.prediction_sets(
            context.logits, context.probs, self.thresholds, self.hash_weights, self.method,
            self.k_reg_, self.lam_, self.randomized, self.allow_empty, self._hash_version,
        )  # fmt: skip
        return {"sets": sets, "set_size": sets.sum(dim=-1).to(context.probs.dtype)}

    # --- the report --------------------------------------------------------------------

    def report_metrics(self, prediction: Prediction, labels: torch.Tensor) -> dict[str, Any]:
        """Coverage and set size on the test set, with 95% bootstrap intervals.

        Returns ``coverage`` and ``mean_set_size`` (percentile intervals over 1000
        resamples seeded with ``seed``), ``target_coverage``, ``empty_sets``,
        ``singletons``, ``worst_class_coverage`` (with its ``class``), and as JSON tables
        ``coverage_by_class`` (``class``, ``n``, ``coverage``) and
        ``coverage_by_set_size`` (``size``, ``n``, ``coverage``).
        """
        return set_metrics(prediction.outputs["sets"], labels, self.alpha, self.seed)


def set_metrics(
    sets: torch.Tensor, labels: torch.Tensor, alpha: float, seed: int = 0
) -> dict[str, Any]:
    """The metrics of :meth:`ConformalSets.report_metrics` from sets and labels."""
    labels = labels.to(sets.device).long()
    covered = sets.gather(1, labels[:, None])[:, 0].double()
    size = sets.sum(dim=1).double()
    means = bootstrap_means(torch.stack([covered, size], dim=1), N_RESAMPLES, seed)
    classes = sets.shape[1]
    n_class = torch.bincount(labels, minlength=classes)
    hits = torch.zeros(classes, dtype=torch.float64, device=sets.device)
    by_class = hits.index_add_(0, labels, covered) / n_class.clamp_min(1)
    present = n_class > 0
    worst = int(torch.where(present, by_class, torch.full_like(by_class, 2.0)).argmin())
    sizes, size_index = torch.unique(size.long(), return_inverse=True)
    size_n = torch.bincount(size_index, minlength=len(sizes))
    size_hits = torch.zeros(len(sizes), dtype=torch.float64, device=sets.device)
    size_hits.index_add_(0, size_index, covered)
    return {
        "coverage": {
            "value": float(covered.mean()),
            "ci": percentile_interval(means[:, 0]),
            "percent": True,
        },
        "target_coverage": {"value": 1 - alpha, "percent": True},
        "mean_set_size": {
            "value": float(size.mean()),
            "ci": percentile_interval(means[:, 1]),
            "higher_is_better": False,
        },
        "empty_sets": {"value": float((size == 0).double().mean()), "percent": True},
        "singletons": {"value": float((size == 1).double().mean()), "percent": True},
        "worst_class_coverage": {"value": float(by_class[worst]), "class": worst, "percent": True},
        "coverage_by_class": {
            "class": torch.nonzero(present).flatten().tolist(),
            "n": n_class[present].tolist(),
            "coverage": by_class[present].tolist(),
        },
        "coverage_by_set_size": {
            "size": sizes.tolist(),
            "n": size_n.tolist(),
            "coverage": (size_hits / size_n).tolist(),
        },
    }


@hookimpl
def wrapcal_register_plugins(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("conformal", ConformalSets)
