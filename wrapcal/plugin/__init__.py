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
  (:func:`bootstrap_means`, :func:`percentile_interval`);
* shard helpers, for a plugin that declares ``tags.fits_from_shards`` and combines its
  statistics over the ranks of ``torch.distributed`` itself (most only need
  :class:`FeatureSet`'s ``sum_over_shards``/``cat_over_shards``...): :func:`active`
  (whether a process group of more than one rank runs), :func:`rank`, :func:`world`,
  :func:`gather_rows` (every rank's rows, in rank order) and :func:`exchange` (every
  rank's small picklable value). Each starts with a status exchange, so a rank that
  failed before reaching it is reported on every rank, where ``torch.distributed``'s own
  collectives would wait until the backend's timeout.

``wrapcal.testing.check_plugin`` runs every rule of the contract on a plugin.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Only the SDK's own modules and the errors are imported here. Importing any
# ``wrapcal.plugin.X`` runs this file first, and the core's modules import SDK modules:
# a module of a layer above imported here would import this package back half-built
# (``wrapcal.data`` needs ``wrapcal.plugin.validation``, say), in whichever order a
# program happens to import them. Those names come from ``_LAZY`` below instead.
from wrapcal.errors import DataError, DistributedError, NotFittedError, SplitError, WrapcalError
from wrapcal.plugin.base import Plugin, ShapeSpec, get_tags
from wrapcal.plugin.bootstrap import bootstrap_means, percentile_interval
from wrapcal.plugin.calibrator import (
    Calibrator,
    calibrated_log_probs,
    out_of_fold_log_probs,
    stratified_folds,
)
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
from wrapcal.plugin.types import (
    FeatureRows,
    ModelView,
    OutputContext,
    OutputKind,
    PluginTags,
    Stage,
)
from wrapcal.plugin.validation import LabelsLike, LogitsLike, check_labels, check_logits

if TYPE_CHECKING:  # what type checkers see for the names ``_LAZY`` gives at run time
    from wrapcal.data import iter_batches, num_samples
    from wrapcal.distributed import active, exchange, gather_rows, rank, world
    from wrapcal.features.disk_arrays import DiskFeatures
    from wrapcal.features.extract import FeatureSet, FitData
    from wrapcal.files.families import ModelFamily, check_spec
    from wrapcal.model.assemble import create_plugin
    from wrapcal.model.split import DistilledHead, FeatureTap, Split, TappedBackbone

# Names from the layers above the SDK (the data readers, the feature sets, the shard
# helpers, the model's split, the model families, the plugin registry), imported when
# first used (PEP 562; ``from wrapcal.plugin import FitData`` goes through
# ``__getattr__`` too) so that the core can import SDK modules in any order.
_LAZY = {
    "iter_batches": "wrapcal.data",
    "num_samples": "wrapcal.data",
    "DiskFeatures": "wrapcal.features.disk_arrays",
    "FeatureSet": "wrapcal.features.extract",
    "FitData": "wrapcal.features.extract",
    "active": "wrapcal.distributed",
    "exchange": "wrapcal.distributed",
    "gather_rows": "wrapcal.distributed",
    "rank": "wrapcal.distributed",
    "world": "wrapcal.distributed",
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
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
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
    "FeatureRows",
    "FeatureSet",
    "FeatureTap",
    "FitData",
    "Interval",
    "LabelsLike",
    "LogitsLike",
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
    "active",
    "bootstrap_means",
    "calibrated_log_probs",
    "check_features",
    "check_labels",
    "check_logits",
    "check_spec",
    "combine_members",
    "create_plugin",
    "entropy",
    "exchange",
    "fit_head_lbfgs",
    "gather_rows",
    "get_tags",
    "hookimpl",
    "in_mode",
    "iter_batches",
    "logits_to_log_probs",
    "logits_to_probs",
    "num_samples",
    "one_cpu_thread",
    "out_of_fold_log_probs",
    "percentile_interval",
    "preserved_modes",
    "rank",
    "shuffled_batches",
    "small_work_threads",
    "stratified_folds",
    "train_head",
    "world",
]
