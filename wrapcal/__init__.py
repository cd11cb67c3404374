"""wrapcal: retrofit calibration, uncertainty and OOD detection onto existing classifiers.

>>> import timm, wrapcal
>>> wrapped = wrapcal.wrap(timm.create_model("resnet18", num_classes=10), ["temperature"])
"""

from typing import TYPE_CHECKING, Any

from wrapcal import _compat, distributed, metrics
from wrapcal._version import __version__
from wrapcal.errors import (
    DataError,
    NotFittedError,
    PluginNameClashError,
    PluginNotFoundError,
    SavedFileError,
    SplitError,
    WrapcalError,
)
from wrapcal.features.extract import FeatureSet, FitData
from wrapcal.files.format import save
from wrapcal.files.load import load
from wrapcal.files.preprocess import Preprocess
from wrapcal.logits import abstention as selective
from wrapcal.logits import conformal
from wrapcal.logits.abstention import AbstentionRule, fit_abstention
from wrapcal.logits.calibrators import fit_calibrator
from wrapcal.logits.conformal import ConformalPredictor, conformal_sets, fit_conformal
from wrapcal.logits.temperature import fit_temperature
from wrapcal.model.assemble import wrap
from wrapcal.model.discovery import get_plugin_manager, plugin_registry
from wrapcal.model.split import Split
from wrapcal.model.wrapped import WrappedModel
from wrapcal.plugin.base import Plugin, get_tags
from wrapcal.plugin.calibrator import Calibrator
from wrapcal.plugin.hookspecs import hookimpl, hookspec
from wrapcal.plugin.prediction import Prediction
from wrapcal.plugin.types import ModelView, OutputContext, OutputKind, PluginTags, Stage

# Import paths of 0.2.0 (``wrapcal.cache``, ``wrapcal.params``, ``wrapcal_plugins.knn``...)
# keep working for this release, with a DeprecationWarning naming the new path.
_compat.install()

if TYPE_CHECKING:
    # What the lazy attributes below are, for type checkers (imported on first use).
    from wrapcal.monitoring import monitor
    from wrapcal.report.evaluate import evaluate
    from wrapcal.report.report import Report
    from wrapcal.report.tracking import log_report


def __getattr__(name: str) -> Any:  # Any: a function, a class or the export module
    # The report pulls in matplotlib: import it only when it is asked for.
    if name in ("evaluate", "Report", "log_report"):
        from wrapcal import report

        return getattr(report, name)
    if name in ("export", "monitoring"):
        # The exporter pulls in torch.export, the monitor scipy's tests: imported only
        # when asked for. The export module itself is callable:
        # ``wrapcal.export(wrapped, "model.onnx")``.
        import importlib

        return importlib.import_module(f"wrapcal.{name}")
    if name == "monitor":
        # The monitor pulls in scipy's tests: imported only when asked for.
        from wrapcal.monitoring import monitor

        return monitor
    raise AttributeError(f"module 'wrapcal' has no attribute {name!r}")


__all__ = [
    "AbstentionRule",
    "Calibrator",
    "ConformalPredictor",
    "DataError",
    "FeatureSet",
    "FitData",
    "ModelView",
    "NotFittedError",
    "OutputContext",
    "OutputKind",
    "Plugin",
    "PluginNameClashError",
    "PluginNotFoundError",
    "PluginTags",
    "Prediction",
    "Preprocess",
    "Report",
    "SavedFileError",
    "Split",
    "SplitError",
    "Stage",
    "WrapcalError",
    "WrappedModel",
    "__version__",
    "conformal",
    "conformal_sets",
    "distributed",
    "evaluate",
    "export",
    "fit_abstention",
    "fit_calibrator",
    "fit_conformal",
    "fit_temperature",
    "get_plugin_manager",
    "get_tags",
    "hookimpl",
    "hookspec",
    "load",
    "log_report",
    "metrics",
    "monitor",
    "plugin_registry",
    "save",
    "selective",
    "wrap",
]
