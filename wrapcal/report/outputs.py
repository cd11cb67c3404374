"""What ``evaluate`` collects from each model: outputs on the test set and OOD sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from wrapcal.plugin.prediction import Prediction

__all__ = ["ModelOutputs", "SetOutputs"]


@dataclass
class SetOutputs:
    """One model's outputs on one data set, on the CPU.

    Attributes:
        prediction: Everything the model predicted (probabilities, scores, plugin
            outputs such as prediction sets).
        labels: ``[N]`` labels, or ``None`` when the data has none.
        seconds: Wall-clock time of the pass (reading the data included).
    """

    prediction: Prediction
    labels: Tensor | None
    seconds: float

    @property
    def probs(self) -> Tensor:
        """``[N, K]`` predictive probabilities."""
        return self.prediction.probs

    @property
    def scores(self) -> dict[str, Tensor]:
        """Named scores ``[N]``, higher = more uncertain / more OOD."""
        return self.prediction.scores


@dataclass
class ModelOutputs:
    """Everything one model produced: the test set's outputs and each OOD set's."""

    name: str
    info: dict[str, Any]
    test: SetOutputs
    ood: dict[str, SetOutputs] = field(default_factory=dict)
