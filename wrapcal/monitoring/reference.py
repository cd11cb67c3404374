"""The reference a monitor compares each window with: the calibration set, summarised.

A saved model holds its operating points (:mod:`wrapcal.model.operating_points`): each
score's threshold accepting 95% of the calibration set, and the calibration set's
accuracy, ECE and NLL. That is enough for the OOD rate and the accuracy-drop rule, not
for drift: a distribution test needs the calibration scores themselves. So the
reference is built one of two ways:

* :meth:`Reference.from_data` (``reference=`` calibration data): one backbone pass over
  the user's labelled (or unlabelled) calibration data; it keeps, per score, its sorted
  values (at most :data:`MAX_POINTS` evenly spaced order statistics: a few kB per score,
  whatever the set's size), the mean calibrated confidence, the accuracy with labels and
  the rates of the decisions and sets. :meth:`Reference.save` writes it as a small JSON
  file to keep beside the model (``--reference ref.json`` on the command line), so the
  calibration data is read once, not at every monitoring run.
* :meth:`Reference.from_model` (no ``reference=``): the operating points alone. Drift
  is then not tested (said in every window's summary), and the accuracy baseline is
  the calibration accuracy measured at ``fit`` (in-sample).

Keeping quantiles rather than every value makes the two-sample test conservative (the
reference's empirical CDF is known to within ``1 / MAX_POINTS``; the test counts it as
a sample of ``MAX_POINTS`` values, never more than the data held).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from wrapcal.data import iter_batches
from wrapcal.errors import DataError
from wrapcal.metrics import acceptance_threshold
from wrapcal.monitoring.stats import quantile_points
from wrapcal.plugin.prediction import Prediction
from wrapcal.plugin.types import OutputKind

if TYPE_CHECKING:
    from wrapcal.model.wrapped import WrappedModel

__all__ = ["ACCEPT_RATE", "FORMAT", "MAX_POINTS", "Reference"]

#: The most values kept per score.
MAX_POINTS = 2000
#: The acceptance rate of a threshold measured here when the model has none.
ACCEPT_RATE = 0.95
#: The ``format`` field of a saved reference.
FORMAT = "wrapcal-monitor-reference/1"


def _check_points(max_points: int) -> None:
    if isinstance(max_points, bool) or int(max_points) != max_points or max_points < 10:
        raise ValueError(f"max_points must be an integer of at least 10; got {max_points!r}")


class _Collector:
    """The per-input values a reference summarises, batch by batch (on the CPU)."""

    def __init__(self) -> None:
        self.conf: list[torch.Tensor] = []
        self.hits: list[torch.Tensor] = []
        self.labelled: list[bool] = []
        self.scores: dict[str, list[torch.Tensor]] = {}
        self.decisions: dict[str, list[torch.Tensor]] = {}
        self.sets: dict[str, list[torch.Tensor]] = {}

    def add(self, pred: Prediction, labels: torch.Tensor | None) -> None:
        self.conf.append(pred.confidence.detach().cpu())
        self.labelled.append(labels is not None)
        if labels is not None:
            self.hits.append(pred.label.cpu() == torch.as_tensor(labels).cpu())
        for name, value in pred.scores.items():
            self.scores.setdefault(name, []).append(value.detach().cpu())
        for name, value in pred.outputs.items():
            if pred.kinds[name] == OutputKind.DECISION:
                self.decisions.setdefault(name, []).append(value.detach().cpu())
            elif pred.kinds[name] == OutputKind.SET:
                self.sets.setdefault(name, []).append(value.detach().cpu().sum(dim=1))

    def reference(self, wrapped: WrappedModel, max_points: int) -> Reference:
        if not self.conf:
            raise DataError("the reference data is empty: pass the calibration set")
        if any(self.labelled) and not all(self.labelled):
            raise DataError("some reference batches have labels and some do not")
        confidence = torch.cat(self.conf).double()
        points = wrapped.operating_points or {}
        accept = float(points.get("accept_rate", ACCEPT_RATE))
        thresholds = dict(points.get("thresholds", {}))
        summary = {k: torch.cat(v).double() for k, v in self.scores.items()}
        for name, values in summary.items():
            if name not in thresholds and bool(torch.isfinite(values).all()):
                thresholds[name] = acceptance_threshold(values, accept)
        return Reference(
            n=int(confidence.numel()),
            estimated_accuracy=float(confidence.mean()),
            accuracy=float(torch.cat(self.hits).double().mean()) if self.hits else None,
            scores={k: quantile_points(v, max_points) for k, v in summary.items()},
            decisions={k: float(torch.cat(v).double().mean()) for k, v in self.decisions.items()},
            sets={k: float(torch.cat(v).double().mean()) for k, v in self.sets.items()},
            thresholds=thresholds,
            accept_rate=accept,
            source="data",
        )


@dataclass
class Reference:
    """The calibration set as the monitor sees it.

    Attributes:
        n: Inputs it summarises (0 when built from the operating points alone).
        estimated_accuracy: Mean calibrated confidence on it (``None`` without data).
        accuracy: Its accuracy (with labels; from the operating points otherwise).
        scores: Per score, its sorted values (or evenly spaced order statistics).
        decisions: Per decision output (``is_ood``, ``abstain``), the share flagged.
        sets: Per set output (``sets``), the mean set size.
        thresholds: Per score, the threshold accepting ``accept_rate`` of the
            calibration set: the model's operating points, else measured here.
        accept_rate: The share of the calibration set each threshold accepts.
        source: ``"data"`` or ``"operating_points"``.
    """

    n: int
    estimated_accuracy: float | None
    accuracy: float | None
    scores: dict[str, list[float]] = field(default_factory=dict)
    decisions: dict[str, float] = field(default_factory=dict)
    sets: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    accept_rate: float = ACCEPT_RATE
    source: str = "data"

    @property
    def baseline_accuracy(self) -> float | None:
        """What the accuracy-drop rule compares with: the mean calibrated confidence on
        the calibration set (an estimate compared with an estimate), else its accuracy."""
        return self.estimated_accuracy if self.estimated_accuracy is not None else self.accuracy

    @classmethod
    def from_model(cls, wrapped: WrappedModel) -> Reference:
        """The reference the model's operating points give (no drift test)."""
        points = wrapped.operating_points or {}
        return cls(
            n=0,
            estimated_accuracy=None,
            accuracy=points.get("metrics", {}).get("accuracy"),
            thresholds=dict(points.get("thresholds", {})),
            accept_rate=float(points.get("accept_rate", ACCEPT_RATE)),
            source="operating_points",
        )

    @classmethod
    def from_data(
        cls,
        wrapped: WrappedModel,
        data: Any,
        *,
        batch_size: int = 256,
        max_points: int = MAX_POINTS,
    ) -> Reference:
        """Summarise the calibration data (one backbone pass; labels optional).

        Args:
            wrapped: The fitted model the monitor will watch.
            data: Its calibration set (what ``fit(calibration=...)`` got), or any
                in-distribution data held out from training.
            batch_size: Inputs per batch of the pass.
            max_points: The most values kept per score.

        Raises:
            DataError: Empty data, or some batches labelled and some not.
        """
        _check_points(max_points)
        collector = _Collector()
        for x, y in iter_batches(data, batch_size):
            if x.shape[0]:
                collector.add(wrapped.predict(x, batch_size=batch_size), y)
        return collector.reference(wrapped, max_points)

    @classmethod
    def from_prediction(
        cls,
        wrapped: WrappedModel,
        prediction: Prediction,
        labels: torch.Tensor | None = None,
        *,
        max_points: int = MAX_POINTS,
    ) -> Reference:
        """Summarise a prediction of the calibration set already at hand, e.g.
        ``wrapped.predict_features(features)`` from the features ``fit`` cached: no
        backbone pass.

        Raises:
            DataError: An empty prediction, or labels of another length.
        """
        _check_points(max_points)
        if labels is not None and len(labels) != len(prediction):
            raise DataError(
                f"{len(labels)} labels for a prediction of {len(prediction)} inputs; give "
                "the calibration set's labels in the same order"
            )
        collector = _Collector()
        if len(prediction):
            collector.add(prediction, labels)
        return collector.reference(wrapped, max_points)

    # --- files ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (with the format's name)."""
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reference:
        """The reference :meth:`to_dict` gave, checked.

        Raises:
            ValueError: Not a monitor reference, or values of the wrong type.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                "not a monitor reference (no 'format': "
                f"{FORMAT!r}); write one with Reference.from_data(...).save(path)"
            )
        body = {k: v for k, v in data.items() if k != "format"}
        try:
            ref = cls(**body)
        except TypeError as err:
            raise ValueError(f"a monitor reference with unexpected fields: {err}") from None

        def finite(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        ok = (
            isinstance(ref.n, int)
            and all(v is None or finite(v) for v in (ref.estimated_accuracy, ref.accuracy))
            and all(
                isinstance(k, str) and isinstance(v, list) and all(finite(x) for x in v)
                for k, v in ref.scores.items()
            )
            and all(
                isinstance(k, str) and finite(v)
                for table in (ref.decisions, ref.sets, ref.thresholds)
                for k, v in table.items()
            )
            and finite(ref.accept_rate)
        )
        if not ok:
            raise ValueError("a monitor reference with values that are not finite numbers")
        return ref

    def save(self, path: str | Path) -> Path:
        """Write the reference as JSON (a few kB per score)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read a reference :meth:`save` wrote."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON ({err.msg}); give a saved reference") from None
        return cls.from_dict(data)
