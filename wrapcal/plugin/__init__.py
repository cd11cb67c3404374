"""The plugin SDK: everything a plugin author imports, in one place.

>>> from wrapcal.plugin import Plugin, PluginTags, Stage, OutputKind, Interval, hookimpl

A plugin package imports ``wrapcal`` (the public API) and ``wrapcal.plugin`` (this
module), nothing deeper: the core's own modules may move between releases, the names
here do not. wrapcal's built-in plugins hold themselves to the same rule (a test walks
their imports), so every name a plugin really needs is here.

What is here:

* the contract: :class:`Plugin`, :class:`Calibrator` (the base of logits calibrators),
  :class:`Stage`, :class:`OutputKind`, :class:`PluginTags`, :class:`OutputContext`,
  :class:`ModelView`, :class:`Prediction`, :func:`get_tags`, ``ShapeSpec``;
* what ``fit`` receives: :class:`FitData`, :class:`FeatureSet` (and
  :class:`DiskFeatures`, features larger than memory);
* parameter constraints: :class:`Interval`, :class:`Options`, :class:`Check`;
* discovery: :data:`hookimpl`, and for adapters :class:`Split`, :class:`TappedBackbone`,
  :class:`FeatureTap`, :class:`DistilledHead`, :class:`ModelFamily`, :func:`check_spec`,
  and :func:`create_plugin` (a plugin built by its registered name);
* the errors a plugin raises: :class:`WrapcalError`, :class:`DataError`,
  :class:`NotFittedError`, :class:`SplitError`, :class:`DistributedError`;
* shared helpers: probabilities from logits (:func:`logits_to_probs`,
  :func:`logits_to_log_probs`, :func:`combine_members`, :func:`entropy`), input checks
  (:func:`check_logits`, :func:`check_labels`, :func:`check_features`), modes and
  threads (:func:`in_mode`, :func:`preserved_modes`, :func:`one_cpu_thread`), data
  (:func:`iter_batches`, :func:`num_samples`), head training (:func:`shuffled_batches`,
  :func:`fit_head_lbfgs`, :func:`train_head`, :func:`small_work_threads`), calibrator
  helpers (:func:`calibrated_log_probs`, :func:`stratified_folds`) and the bootstrap
  (:func:`bootstrap_means`, :func:`percentile_interval`).

``wrapcal.testing.check_plugin`` runs every rule of the contract on a plugin.
"""

from __future__ import annotations

import importlib
from typing import Any

from wrapcal.data import iter_batches, num_samples
from wrapcal.distributed import DistributedError
from wrapcal.errors import DataError, NotFittedError, SplitError, WrapcalError
from wrapcal.features.disk_arrays import DiskFeatures
from wrapcal.features.extract import FeatureSet, FitData
from wrapcal.plugin.base import Plugin, ShapeSpec, get_tags
from wrapcal.plugin.bootstrap import bootstrap_means, percentile_interval
from wrapcal.plugin.calibrator import Calibrator, calibrated_log_probs, stratified_folds
from wrapcal.plugin.constraints import Check, Interval, Options
from wrapcal.plugin.hookspecs import hookimpl
from wrapcal.plugin.prediction import Prediction
from wrapcal.plugin.probs import combine_members, entropy, logits_to_log_probs, logits_to_probs
from wrapcal.plugin.torch_helpers import (
    HOW_TO_SPLIT_BY_HAND,
    check_features,
    in_mode,
    one_cpu_thread,
    preserved_modes,
)
from wrapcal.plugin.training import (
    LossFn,
    fit_head_lbfgs,
    shuffled_batches,
    small_work_threads,
    train_head,
)
from wrapcal.plugin.types import ModelView, OutputContext, OutputKind, PluginTags, Stage
from wrapcal.plugin.validation import check_labels, check_logits

# Names from the layers above the SDK (the model's split, the model families, the plugin
# registry), imported when first used so that importing the SDK stays cheap and the core
# can import SDK modules without importing itself.
_LAZY = {
    "create_plugin": "wrapcal.model.assemble",
    "Split": "wrapcal.model.split",
    "TappedBackbone": "wrapcal.model.split",
    "FeatureTap": "wrapcal.model.split",
    "DistilledHead": "wrapcal.model.split",
    "ModelFamily": "wrapcal.files.families",
    "check_spec": "wrapcal.files.families",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wrapcal.plugin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "HOW_TO_SPLIT_BY_HAND",
    "Calibrator",
    "Check",
    "DataError",
    "DiskFeatures",
    "DistilledHead",
    "DistributedError",
    "FeatureSet",
    "FeatureTap",
    "FitData",
    "Interval",
    "LossFn",
    "ModelFamily",
    "ModelView",
    "NotFittedError",
    "Options",
    "OutputContext",
    "OutputKind",
    "Plugin",
    "PluginTags",
    "Prediction",
    "ShapeSpec",
    "Split",
    "SplitError",
    "Stage",
    "TappedBackbone",
    "WrapcalError",
    "bootstrap_means",
    "calibrated_log_probs",
    "check_features",
    "check_labels",
    "check_logits",
    "check_spec",
    "combine_members",
    "create_plugin",
    "entropy",
    "fit_head_lbfgs",
    "get_tags",
    "hookimpl",
    "in_mode",
    "iter_batches",
    "logits_to_log_probs",
    "logits_to_probs",
    "num_samples",
    "one_cpu_thread",
    "percentile_interval",
    "preserved_modes",
    "shuffled_batches",
    "small_work_threads",
    "stratified_folds",
    "train_head",
]
