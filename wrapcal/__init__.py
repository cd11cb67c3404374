"""wrapcal: retrofit calibration, uncertainty and OOD detection onto existing classifiers.

>>> import timm, wrapcal
>>> wrapped = wrapcal.wrap(timm.create_model("resnet18", num_classes=10), ["temperature"])
"""

from wrapcal import conformal, metrics, selective
from wrapcal.assemble import wrap
from wrapcal.cache import FeatureSet, FitData
from wrapcal.calibrate import fit_temperature
from wrapcal.calibrator import Calibrator, fit_calibrator
from wrapcal.conformal import ConformalPredictor, conformal_sets, fit_conformal
from wrapcal.errors import (
    DataError,
    NotFittedError,
    PluginNotFoundError,
    SavedFileError,
    SplitError,
    WrapcalError,
)
from wrapcal.hookspecs import hookimpl, hookspec
from wrapcal.loading import load
from wrapcal.manager import get_plugin_manager, plugin_registry
from wrapcal.plugin import Plugin, get_tags
from wrapcal.prediction import Prediction
from wrapcal.saving import save
from wrapcal.selective import AbstentionRule, fit_abstention
from wrapcal.split import Split
from wrapcal.types import ModelView, OutputContext, OutputKind, PluginTags, Stage
from wrapcal.wrapped import WrappedModel

__version__ = "0.2.0"


def __getattr__(name: str):
    # The report pulls in matplotlib: import it only when it is asked for.
    if name in ("evaluate", "Report", "log_report"):
        from wrapcal import report

        return getattr(report, name)
    if name == "export":
        # The exporter pulls in torch.export: import it only when it is asked for. The
        # module itself is callable: ``wrapcal.export(wrapped, "model.onnx")``.
        import importlib

        return importlib.import_module("wrapcal.export")
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
    "PluginNotFoundError",
    "PluginTags",
    "Prediction",
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
    "plugin_registry",
    "save",
    "selective",
    "wrap",
]
