"""``fit_calibrator``: any registered calibrator plugin, fitted on logits you already have.

The core never imports a calibrator by name: the method is looked up in the plugin
registry, like ``wrap`` does, and fitted with :meth:`~wrapcal.Calibrator.fit_logits`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wrapcal.model import discovery
from wrapcal.model.assemble import create_plugin
from wrapcal.plugin.calibrator import Calibrator

if TYPE_CHECKING:
    from wrapcal.plugin.validation import LabelsLike, LogitsLike

__all__ = ["fit_calibrator"]


def _calibrator_names() -> list[str]:
    return sorted(
        name
        for name, info in discovery.plugin_registry().items()
        if isinstance(info.factory, type) and issubclass(info.factory, Calibrator)
    )


def fit_calibrator(
    logits: LogitsLike,
    labels: LabelsLike,
    method: str = "temperature",
    **params: Any,
) -> Calibrator:
    """Fit a post-hoc calibrator on logits you already have.

    >>> cal = wrapcal.fit_calibrator(val_logits, val_labels, method="dirichlet")
    >>> probs = scipy.special.softmax(cal.transform(test_logits), axis=1)

    Args:
        logits: ``[N, K]`` held-out logits (numpy, torch on any device, or lists);
            ``[N]`` for a single-logit binary classifier.
        labels: ``[N]`` integer class indices.
        method: The registered name of a calibrator plugin: ``"temperature"``,
            ``"vector_scaling"``, ``"matrix_scaling"``, ``"dirichlet"``,
            ``"ensemble_temperature"``, ``"histogram_binning"``, ``"isotonic"``,
            ``"auto_calibration"`` with the built-in plugins.
        **params: The plugin's parameters.

    Returns:
        The fitted :class:`Calibrator`: ``transform(logits)`` gives calibrated logits
        (log-probabilities for the probability-valued methods).

    Raises:
        PluginNotFoundError: No plugin has that name.
        TypeError: The plugin is not a calibrator, or has no such parameter.
        ValueError: A parameter value it does not accept.
        DataError: Bad logits or labels (see :meth:`Calibrator.fit_logits`).
    """
    plugin = create_plugin(method, params)
    if not isinstance(plugin, Calibrator):
        raise TypeError(
            f"plugin {method} is not a calibrator (a wrapcal.Calibrator); calibrators: "
            f"{', '.join(_calibrator_names()) or 'none installed'}"
        )
    return plugin.fit_logits(logits, labels)
