"""Temperature scaling (Guo et al. 2017): one scalar T divides the final logits.

T is fitted by minimising the NLL of the calibration set's logits, as they come out of
the plugins fitted before it (a retrained head, the discrepancy heads' or MC dropout's
averaged output, which are log-mean-probabilities and so valid logits). Dividing by
T > 0 keeps the arg-max, so predictions and accuracy never change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from wrapcal import PluginTags, fit_temperature, hookimpl
from wrapcal.plugin import Calibrator, Interval

if TYPE_CHECKING:
    from collections.abc import Callable

    from wrapcal.plugin import LabelsLike, LogitsLike

__all__ = ["TemperatureScaler"]


class TemperatureScaler(Calibrator):
    """Temperature scaling: divide the logits by one T fitted on calibration data.

    Args:
        max_iter: Maximum number of solver steps (4-5 are needed; see
            :func:`wrapcal.logits.temperature.fit_temperature`).

    Attributes:
        temperature_: The fitted temperature (a float); the buffer ``temperature``
            holds it in the saved weights.
    """

    calibrator_name = "temperature"
    fit_reason = "temperature scaling fits T on held-out labelled data the model was not trained on"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "max_iter": [Interval(int, 1, 100_000)]
    }

    def __init__(self, max_iter: int = 100) -> None:
        super().__init__()
        self.max_iter = max_iter
        # float64 so temperature_ returns the fitted value exactly; saved with the model.
        self.register_buffer("temperature", torch.ones((), dtype=torch.float64))

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.exportable = True
        return tags

    @property
    def temperature_(self) -> float:
        """The fitted temperature T > 0 (``NotFittedError`` before ``fit``)."""
        self.check_is_fitted()
        return float(self.temperature)

    def fit_logits(self, logits: LogitsLike, labels: LabelsLike) -> TemperatureScaler:
        """Fit T on logits and labels directly, without a wrapped model.

        Args:
            logits: ``[N, K]`` logits, or ``[N]`` / ``[N, 1]`` for one binary logit.
            labels: ``[N]`` class indices.

        Returns:
            self
        """
        self.temperature.fill_(fit_temperature(logits, labels, max_iter=self.max_iter))
        self.fitted_ = True
        return self

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Divide logits by the fitted temperature, in the logits' dtype and device."""
        self.check_is_fitted()
        return logits / self.temperature.to(device=logits.device, dtype=logits.dtype)

    def validate_state(self) -> None:
        """A loaded temperature must be a positive finite number, as ``fit`` gives."""
        super().validate_state()
        if not float(self.temperature) > 0:
            raise ValueError(f"the temperature is {float(self.temperature)}; it must be > 0")


@hookimpl
def wrapcal_register_plugins(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("temperature", TemperatureScaler)
