"""The fit loop: one backbone pass per data set some plugin reads, then every plugin in
stage order, each seeing the plugins fitted before it.

It works on any object with the parts of a :class:`~wrapcal.WrappedModel` (it does
not import it): ``plugins``, ``plugin_names``, ``view(i)``, ``backbone``,
``_prepare``, ``num_features``, ``num_classes_out``, ``device``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from wrapcal import distributed
from wrapcal.data import check_labels
from wrapcal.errors import DataError
from wrapcal.features.disk_arrays import DiskFeatures
from wrapcal.features.extract import FeatureSet, FitData, all_finite
from wrapcal.features.memory_store import cached_features
from wrapcal.model.chain import named_errors
from wrapcal.model.operating_points import measure_operating_points
from wrapcal.plugin.base import get_tags

__all__ = ["fit_from_data", "fit_from_features", "read_sets"]


def read_sets(wrapped: Any) -> tuple[set[str], dict[str, dict[str, str]]]:
    """The ``fit`` data sets some plugin reads, and for each plugin the sets it needs
    (with why)."""
    reads: set[str] = set()
    needs: dict[str, dict[str, str]] = {}
    for name, plugin in zip(wrapped.plugin_names, wrapped.plugins, strict=True):
        tags = get_tags(plugin)
        reads |= set(tags.fit_requires) | set(tags.fit_reads)
        needs[name] = dict(tags.fit_requires)
    return reads, needs


def _given(sets: dict[str, Any]) -> dict[str, Any]:
    for key in sets:
        if not isinstance(key, str) or not key.isidentifier():
            raise DataError(f"fit data set names must be identifiers; got {key!r}")
    return {k: v for k, v in sets.items() if v is not None}


def _check_required(wrapped: Any, given: dict[str, Any]) -> set[str]:
    """Fail before any backbone pass when a plugin's required set is missing; return
    the given sets that some plugin reads (warning about the others)."""
    reads, needs = read_sets(wrapped)
    for plugin, required in needs.items():
        for name, why in required.items():
            if name not in given:
                have = ", ".join(sorted(given)) or "none"
                raise DataError(
                    f"plugin {plugin} needs wrapped.fit({name}=...)"
                    f"{': ' + why if why else ''}; data given: {have}"
                )
    unused = sorted(set(given) - reads)
    if unused and wrapped.plugins:
        warnings.warn(
            f"no plugin reads {', '.join(f'{n}=' for n in unused)}: "
            f"{'it is' if len(unused) == 1 else 'they are'} ignored",
            UserWarning,
            stacklevel=4,
        )
    return set(given) & reads


def fit_from_data(wrapped: Any, sets: dict[str, Any], options: dict[str, Any]) -> Any:
    """``wrapped.fit``: extract the features of the sets that are read, fit the plugins."""
    given = _given(sets)
    used = _check_required(wrapped, given)

    if distributed.active():
        for name, plugin in zip(wrapped.plugin_names, wrapped.plugins, strict=True):
            if get_tags(plugin).streams_data:
                raise DataError(
                    f"plugin {name} trains the network on batches of the data, which wrapcal "
                    "does not distribute: fine-tune with DistributedDataParallel yourself, "
                    "then wrap the model, or run this fit in one process"
                )

    def extract(name: str) -> FeatureSet:
        found, ran = cached_features(
            wrapped.backbone,
            wrapped._prepare,
            distributed.shard(given[name]),  # this rank's shard (all of it in one process)
            name,
            num_features=wrapped.num_features,
            num_classes=wrapped.num_classes_out,
            batch_size=int(options.get("batch_size", 256)),
            progress=bool(options.get("progress", True)) and distributed.rank() == 0,
            cache=options.get("cache"),
        )
        wrapped.backbone_passes += int(ran)
        return found

    def extract_all() -> dict[str, FeatureSet]:
        out = {}
        for name in sorted(used, key=list(given).index):
            local = distributed.agree(lambda n=name: extract(n), f"computing {name} features")
            combine = _kept_sharded if _shardable(wrapped, name) else _gathered
            out[name] = distributed.agree(
                lambda c=combine, s=local: c(s), f"gathering {name} features"
            )
        return out

    data = FitData(extract_all(), dict(options))
    for feature_set in data.sets.values():
        wrapped.input_shape = feature_set.input_shape
    _warn_on_missing_classes(data, wrapped.num_classes_out)
    return _fit_plugins(wrapped, data, extract_all)


def _shardable(wrapped: Any, name: str) -> bool:
    """Whether the fit set ``name`` may stay sharded: under torch.distributed, when
    every plugin that reads it combines across ranks itself."""
    if not distributed.active():
        return False
    readers = [
        get_tags(p)
        for p in wrapped.plugins
        if name in get_tags(p).fit_reads or name in get_tags(p).fit_requires
    ]
    return all(tags.fits_from_shards for tags in readers)


def _kept_sharded(local: FeatureSet) -> FeatureSet:
    """This rank's rows, marked with every rank's row count (nothing gathered)."""
    counts = distributed.exchange(len(local))
    return FeatureSet(
        local.name, local.features, local.labels, local.data, local.input_shape, tuple(counts)
    )


def _gathered(local: FeatureSet) -> FeatureSet:
    """Every rank's rows of a feature set, in rank order (the set itself in one process)."""
    if not distributed.active():
        return local
    features = local.features[:] if isinstance(local.features, DiskFeatures) else local.features
    return FeatureSet(
        local.name,
        distributed.gather_rows(features),
        distributed.gather_rows(local.labels),
        local.data,
        local.input_shape,
    )


def _warn_on_missing_classes(data: FitData, classes: int) -> None:
    """A labelled set large enough to hold every class but missing some is most often a
    label mapping error (another class order, a subset of folders): say so loudly."""
    for feature_set in data.sets.values():
        labels = feature_set.labels
        if labels is None or feature_set.total < 10 * classes:
            continue
        present = feature_set.classes_present()
        if present < classes:
            warnings.warn(
                f"the {feature_set.name!r} labels cover {present} of the model's {classes} "
                f"classes in {feature_set.total} samples: calibration and retraining learn "
                "nothing about the others. Check that the labels index the model's classes in its "
                "order (an ImageFolder maps folders in alphabetical order)",
                UserWarning,
                stacklevel=4,
            )


def fit_from_features(wrapped: Any, sets: dict[str, Any], options: dict[str, Any]) -> Any:
    """``wrapped.fit_features``: fit the plugins from features the user computed."""
    given = _given(sets)
    used = _check_required(wrapped, given)
    feature_sets = {}
    for name in used:
        value = given[name]
        feats, labels = value if isinstance(value, (tuple, list)) else (value, None)
        if isinstance(feats, DiskFeatures):
            feats = feats.to(wrapped.device)  # read in chunks by the plugins, never whole
        else:
            feats = torch.as_tensor(feats).to(wrapped.device)
        if feats.ndim != 2 or feats.shape[1] != wrapped.num_features:
            raise DataError(
                f"{name} features have shape {tuple(feats.shape)}; expected "
                f"[N, {wrapped.num_features}], the output of wrapped.backbone"
            )
        if not all_finite(feats):
            raise DataError(f"{name} features hold NaN or inf values; check how they were made")
        if labels is not None:
            labels = check_labels(torch.as_tensor(labels), len(feats), wrapped.num_classes_out)
            labels = labels.to(wrapped.device)
        feature_sets[name] = FeatureSet(name, feats, labels, None)
    _warn_on_missing_classes(FitData(feature_sets), wrapped.num_classes_out)

    def refuse() -> dict[str, FeatureSet]:
        raise DataError("a plugin changed the backbone: call fit(...) with the data instead")

    return _fit_plugins(wrapped, FitData(feature_sets, dict(options)), refuse)


def _fit_plugins(wrapped: Any, data: FitData, recompute: Any) -> Any:
    for index, (name, plugin) in enumerate(zip(wrapped.plugin_names, wrapped.plugins, strict=True)):
        plugin.fitted_ = False
        result = distributed.agree(
            lambda i=index, n=name, p=plugin: named_errors(n, p.fit, wrapped.view(i), data),
            f"fitting plugin {name}",
        )
        if result is not plugin:
            raise TypeError(f"plugin {name}: fit() must return self (the plugin)")
        plugin.fitted_ = True
        if get_tags(plugin).changes_backbone:
            data.sets = recompute()
    calibration = data.calibration
    if calibration is not None and calibration.total:

        def measure() -> Any:
            whole = _gathered(calibration) if calibration.sharded else calibration
            view = wrapped.view(len(wrapped.plugins))
            prediction = view.predict_features(whole.features)
            return measure_operating_points(prediction, whole.labels)

        wrapped.operating_points = distributed.agree(measure, "measuring operating points")
    return wrapped
