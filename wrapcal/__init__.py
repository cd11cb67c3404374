"""wrapcal: retrofit calibration, uncertainty and OOD detection onto existing classifiers.

>>> import timm, wrapcal
>>> wrapped = wrapcal.wrap(timm.create_model("resnet18", num_classes=10), ["temperature"])
"""

from wrapcal import metrics
from wrapcal.calibrate import fit_temperature
from wrapcal.errors import (
    DataError,
    NotFittedError,
    PluginNotFoundError,
    SavedFileError,
    SplitError,
    WrapcalError,
)
from wrapcal.hookspecs import hookimpl, hookspec
from wrapcal.manager import get_plugin_manager, plugin_registry
from wrapcal.persistence import load
from wrapcal.plugin import Plugin, Stage
from wrapcal.prediction import Prediction
from wrapcal.split import Split
from wrapcal.wrapped import WrappedModel, wrap

__version__ = "0.1.0"


def __getattr__(name: str):
    # The report pulls in matplotlib: import it only when it is asked for.
    if name in ("evaluate", "Report"):
        from wrapcal import report

        return getattr(report, name)
    raise AttributeError(f"module 'wrapcal' has no attribute {name!r}")


__all__ = [
    "DataError",
    "NotFittedError",
    "Plugin",
    "PluginNotFoundError",
    "Prediction",
    "Report",
    "SavedFileError",
    "Split",
    "SplitError",
    "Stage",
    "WrapcalError",
    "WrappedModel",
    "__version__",
    "evaluate",
    "fit_temperature",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "load",
    "metrics",
    "plugin_registry",
    "wrap",
]
