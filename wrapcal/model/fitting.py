"""The fit loop: one backbone pass per data set some plugin reads, then every plugin,
each seeing the plugins fitted before it.

Every plugin is fitted on exactly what it receives at inference (the module docstring
of :mod:`wrapcal.model.chain` says how the chain keeps it):

1. The ``FEATURES``-stage plugins are fitted first. Their ``fit`` data holds the
   backbone's own features, as extracted (no feature step applied); the view's
   ``model.features(...)`` runs on them the feature steps of the ``FEATURES`` plugins
   fitted before. Their fit cannot read logits (the view refuses): the heads are
   trained after them.
2. When one of them transforms the features, every ``fit`` data set is passed through
   their steps once (:func:`through_features_stage`): the later plugins' ``fit`` data
   holds the model's features, the very features their heads and detectors read at
   inference (``OutputContext.backbone_features``).
3. Every other plugin is fitted in stage order, with a view of the plugins fitted before
   it (their member, logit and sampler steps).

Combinations that cannot keep this are refused before any backbone pass
(:func:`check_composition`):

* a plugin that changes the head or the backbone at a stage after ``SAMPLE`` (the
  plugins of the later stages read them, and are fitted after them);
* a plugin that changes the head or the backbone at a later stage than a ``HEADS``-stage
  plugin (the discrepancy heads), which trained heads of its own beside them: those
  heads would no longer match the head and features they were trained with (MC dropout
  ``finetune=True`` beside discrepancy);
* a plugin that streams inputs through the backbone (``streams_data``, fine-tuning:
  ``changes_backbone``) beside a ``FEATURES``-stage transform: its batches bypass the
  transform.

It works on any object with the parts of a :class:`~wrapcal.WrappedModel` (the
:class:`Fittable` protocol; it does not import the class).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from wrapcal import distributed
from wrapcal.data import DataSource, layout_problem
from wrapcal.errors import DataError
from wrapcal.features.disk_arrays import DiskFeatures
from wrapcal.features.disk_store import DiskCache
from wrapcal.features.extract import FeatureSet, FitData, all_finite
from wrapcal.features.store import CacheOption
from wrapcal.model.chain import (
    CACHED_BATCH,
    Chain,
    ModelParts,
    PrefixView,
    named_errors,
    transforms_features,
)
from wrapcal.model.operating_points import ACCEPT_RATE, measure_operating_points
from wrapcal.plugin.base import Plugin, get_tags
from wrapcal.plugin.types import Stage
from wrapcal.plugin.validation import check_labels

__all__ = [
    "Fittable",
    "agree_to_fit",
    "check_composition",
    "fit_from_data",
    "fit_from_features",
    "read_sets",
    "through_features_stage",
]

#: The last stage whose plugins may change the head or the backbone: the plugins of the
#: later stages read them, and are fitted after them.
LAST_HEAD_STAGE = Stage.SAMPLE
#: The stages at which a plugin may change the head or the backbone, for messages.
_HEAD_STAGES = ", ".join(stage.name for stage in Stage if stage <= LAST_HEAD_STAGE)


class Fittable(ModelParts, Protocol):
    """What the fit loop reads and sets of a wrapped model (a :class:`~wrapcal.WrappedModel`
    is one)."""

    plugin_names: list[str]
    input_shape: tuple[int, ...] | None
    operating_points: dict[str, Any] | None

    @property
    def plugins(self) -> Iterable[Plugin]: ...

    @property
    def num_classes_out(self) -> int: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def features_of(
        self,
        data: DataSource,
        name: str = "data",
        *,
        batch_size: int = 256,
        progress: bool = False,
        cache: CacheOption = None,
    ) -> tuple[FeatureSet, bool]:
        """The backbone's features of a data set, and whether the backbone ran."""
        ...


#: The model type a fit returns: the one it was given.
FittableT = TypeVar("FittableT", bound=Fittable)


def read_sets(wrapped: Fittable) -> tuple[set[str], dict[str, dict[str, str]]]:
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


def _check_required(wrapped: Fittable, given: dict[str, Any]) -> set[str]:
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


def agree_to_fit(wrapped: Fittable, sets: dict[str, Any], options: dict[str, Any]) -> None:
    """Under ``torch.distributed``, before anything else of a fit: fail every rank unless
    every rank holds the same model (weights, plugins, their parameters and state), the
    same data sets (size, labels, sharding) and the same seed.

    Without it, ranks that loaded different checkpoints or passed different parameters
    each fit their own model and report as if they were one (temperature 4.20 on rank
    0, 12.59 on rank 1). One exchange of short descriptions (digests); the weights'
    digest is the feature cache's fingerprint, which the fit then reuses.

    Raises:
        DistributedError: On every rank, naming what differs, each rank's value and the fix.
    """
    if not distributed.active():
        return

    def describe() -> distributed.Facts:
        given = {str(k): v for k, v in sets.items() if v is not None}
        cache = options.get("cache")
        facts: distributed.Facts = {
            "the data sets given to fit": (
                ", ".join(f"{k}=" for k in given) or "none",
                "pass the same data sets to fit on every rank",
            ),
            "the seed given to fit": (
                repr(options.get("seed", 0)),
                "pass the same seed on every rank",
            ),
            "the feature cache's dtype": (
                str(getattr(cache, "dtype", "float32")),
                "pass the same cache_dtype on every rank",
            ),
            **distributed.model_facts(wrapped),  # type: ignore[arg-type]  # a WrappedModel
        }
        for name, data in given.items():
            facts.update(distributed.data_facts(name, data))
        return facts

    distributed.check_agreement(distributed.agree(describe, "describing the model and data"))


def fit_from_data(wrapped: FittableT, sets: dict[str, Any], options: dict[str, Any]) -> FittableT:
    """``wrapped.fit``: extract the features of the sets that are read, fit the plugins."""
    agree_to_fit(wrapped, sets, options)  # first: what follows must go alike on every rank
    given = _given(sets)
    used = _check_required(wrapped, given)
    check_composition(wrapped)

    if distributed.active():
        for name, plugin in zip(wrapped.plugin_names, wrapped.plugins, strict=True):
            if get_tags(plugin).streams_data:
                raise DataError(
                    f"plugin {name} trains the network on batches of the data, which wrapcal "
                    "does not distribute: fine-tune with DistributedDataParallel yourself, "
                    "then wrap the model, or run this fit in one process"
                )

    def extract(name: str) -> FeatureSet:
        shard = distributed.shard(given[name])  # this rank's shard (all of it in one process)
        try:
            found, ran = wrapped.features_of(
                shard,
                name,
                batch_size=int(options.get("batch_size", 256)),
                progress=bool(options.get("progress", True)) and distributed.rank() == 0,
                cache=options.get("cache"),
            )
        except (RuntimeError, DataError):
            # Images as they come (uint8, channels last) fail deep in the network, or
            # in a check that does not know the model: say what they are and the fix.
            problem = layout_problem(shard, wrapped)
            if problem is None:
                raise
            raise DataError(f"the {name} data: {problem}") from None
        wrapped.backbone_passes += int(ran)
        return found

    def combine(name: str, local: FeatureSet) -> FeatureSet:
        # Every rank read its shard: the shards must add up to the set the ranks agreed on.
        distributed.check_shard_rows(name, given[name], len(local), local.labels is not None)
        return (_kept_sharded if _shardable(wrapped, name) else _gathered)(local)

    def extract_all() -> dict[str, FeatureSet]:
        out = {}
        for name in sorted(used, key=list(given).index):

            def extracted(n: str = name) -> FeatureSet:
                return extract(n)

            local = distributed.agree(extracted, f"computing {name} features")

            def combined(n: str = name, s: FeatureSet = local) -> FeatureSet:
                return combine(n, s)

            out[name] = distributed.agree(combined, f"gathering {name} features")
        return out

    data = FitData(extract_all(), dict(options))
    for feature_set in data.sets.values():
        wrapped.input_shape = feature_set.input_shape
    _warn_on_missing_classes(data, wrapped.num_classes_out)
    return _fit_plugins(wrapped, data, extract_all)


def _shardable(wrapped: Fittable, name: str) -> bool:
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


def fit_from_features(
    wrapped: FittableT, sets: dict[str, Any], options: dict[str, Any]
) -> FittableT:
    """``wrapped.fit_features``: fit the plugins from features the user computed."""
    agree_to_fit(wrapped, sets, options)  # every rank fits from the features it was given
    given = _given(sets)
    used = _check_required(wrapped, given)
    check_composition(wrapped)
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


def check_composition(wrapped: Fittable) -> None:
    """Refuse, before any backbone pass, plugins whose fit could not see what they
    receive at inference (the module docstring).

    Raises:
        ValueError: A plugin changes the head or the backbone after the ``SAMPLE``
            stage, or at a later stage than a plugin that built extra heads on them, or
            streams inputs through the backbone beside a ``FEATURES``-stage transform.
    """
    named = [
        (n, p, get_tags(p)) for n, p in zip(wrapped.plugin_names, wrapped.plugins, strict=True)
    ]
    transforms = [n for n, p, t in named if transforms_features(p, t)]
    for name, _, tags in named:
        changes = [
            what
            for what, flag in (("head", tags.changes_head), ("backbone", tags.changes_backbone))
            if flag
        ]
        if changes and tags.stage > LAST_HEAD_STAGE:
            raise ValueError(
                f"plugin {name} changes the {' and the '.join(changes)} at stage "
                f"{tags.stage.name}, after plugins that read them are fitted: a plugin that "
                f"changes them must be of stage {_HEAD_STAGES} (its author sets tags.stage)"
            )
        # HEADS-stage plugins train heads of their own beside the model's head (on its
        # features): a later change of either leaves them beside a head that is gone.
        builders = [
            (other, other_tags)
            for other, _, other_tags in named
            if other_tags.stage is Stage.HEADS and other_tags.stage < tags.stage
        ]
        if changes and builders:
            other, other_tags = builders[0]
            what = " and the ".join(changes)
            raise ValueError(
                f"plugin {name} changes the {what} at stage {tags.stage.name}, after plugin "
                f"{other} (stage {other_tags.stage.name}) trained its own heads beside them: "
                f"{other}'s heads would no longer match the {what} they were trained with. "
                f"Fit the model with {name} alone first, then wrap the fitted model with "
                f"{other}, beside {name} set not to change the {what} if you want it too "
                "(mc_dropout: finetune=True alone first, then finetune=False beside them)"
            )
        if (tags.streams_data or tags.changes_backbone) and transforms:
            does = (
                "fine-tunes the backbone by streaming inputs through it"
                if tags.changes_backbone
                else "trains on inputs streamed through the backbone (streams_data)"
            )
            raise ValueError(
                f"plugin {name} {does}, past the FEATURES-stage plugin {transforms[0]} that "
                "transforms the features the head reads: the head would be trained on "
                f"features it never sees. Fit the model with {name} alone first, then wrap "
                f"the fitted model with {transforms[0]} (or fine-tune the head only)"
            )


def through_features_stage(
    chain: Chain, data: FitData, scratch: ExitStack, rows: int = CACHED_BATCH
) -> FitData:
    """Every feature set of ``data`` through the ``FEATURES``-stage steps of ``chain``:
    the model's features, what the plugins after that stage fit on.

    Sets in memory stay in memory; sets on disk are written, chunk by chunk, to a
    scratch folder beside them that lives as long as ``scratch`` (the fit).
    """
    sets = {}
    for name, found in data.sets.items():
        features = found.features
        moved: torch.Tensor | DiskFeatures
        with torch.no_grad():
            chunks = (
                chain.model_features(None, features[i : i + rows])
                for i in range(0, features.shape[0], rows)
            )
            if isinstance(features, DiskFeatures):
                moved = _to_disk(chunks, features, scratch)
            else:
                parts = list(chunks)
                moved = torch.cat(parts) if parts else features
        sets[name] = dataclasses.replace(found, features=moved)
    return FitData(sets, data.options)


def _to_disk(
    chunks: Iterable[torch.Tensor], like: DiskFeatures, scratch: ExitStack
) -> DiskFeatures:
    """Chunks of features into a scratch file beside ``like``, in the disk cache's own
    kind of partial folder: removed when ``scratch`` closes (the fit ends, or fails), and
    by the cache's clean-up of dead writers' folders when the run was killed."""
    cache = DiskCache(like.path.parent.parent, like.storage)
    sink = cache.new_sink("fit-features")
    scratch.callback(cache.discard, sink)
    for chunk in chunks:
        sink.append(chunk, None)
    meta = sink.writer.finish({})
    width = meta["width"] or like.width
    out = DiskFeatures(sink.writer.folder / "features.bin", meta["rows"], width, like.storage)
    return out.to(like.device)


def _refuse_logits(name: str) -> str:
    return (
        f"plugin {name} is a FEATURES-stage plugin: it is fitted before the heads, which "
        "are then trained on its features, so its fit cannot read logits (model.members, "
        "model.head_logits, model.predict_features); read model.features(...), or "
        "declare a later stage"
    )


def _fit_plugins(
    wrapped: FittableT, data: FitData, recompute: Callable[[], dict[str, FeatureSet]]
) -> FittableT:
    named = [
        (name, plugin, get_tags(plugin))
        for name, plugin in zip(wrapped.plugin_names, wrapped.plugins, strict=True)
    ]
    # FEATURES first (the list is in stage order already, unless a WrappedModel was
    # built by hand in another order), then the others in the list's order.
    first = [i for i, (_, _, tags) in enumerate(named) if tags.stage is Stage.FEATURES]
    order = first + [i for i in range(len(named)) if i not in first]
    transformed = any(transforms_features(p, t) for _, p, t in named)
    fitted: set[int] = set()

    def chain_of(indices: set[int], features_done: bool) -> Chain:
        # Tags read again: a fit may change them (a sharded KNN bank makes inference
        # collective).
        kept = [(named[i][0], named[i][1], get_tags(named[i][1])) for i in sorted(indices)]
        return Chain(
            wrapped.backbone, wrapped.head, kept, wrapped.num_features, features_done=features_done
        )

    with ExitStack() as scratch:
        moved = False
        for index in order:
            name, plugin, tags = named[index]
            if tags.stage is Stage.FEATURES:
                view = PrefixView(wrapped, chain_of(fitted, False), _refuse_logits(name))
            else:
                if transformed and not moved:

                    def moved_data(d: FitData = data) -> FitData:
                        return through_features_stage(chain_of(set(first), False), d, scratch)

                    data = distributed.agree(
                        moved_data, "passing the fit data through the FEATURES stage"
                    )
                    moved = True
                view = PrefixView(wrapped, chain_of(fitted, True))
            _fit_one(name, plugin, view, data)
            fitted.add(index)
            if tags.changes_backbone:
                data.sets = recompute()  # never beside a transform: check_composition
        # The fit data went through the FEATURES stage only if a later plugin needed it.
        _measure_operating_points(wrapped, data, chain_of(fitted, moved))
    return wrapped


def _fit_one(name: str, plugin: Plugin, view: PrefixView, data: FitData) -> None:
    plugin.fitted_ = False
    result = distributed.agree(
        lambda: named_errors(name, plugin.fit, view, data), f"fitting plugin {name}"
    )
    if result is not plugin:
        raise TypeError(f"plugin {name}: fit() must return self (the plugin)")
    plugin.fitted_ = True


def _measure_operating_points(wrapped: Fittable, data: FitData, chain: Chain) -> None:
    calibration = data.calibration
    if calibration is None or not calibration.total:
        return

    def measure() -> Any:
        whole = _gathered(calibration) if calibration.sharded else calibration
        prediction = PrefixView(wrapped, chain).predict_features(whole.features)
        rates = data.options.get("accept_rates", (ACCEPT_RATE,))
        return measure_operating_points(prediction, whole.labels, rates)

    wrapped.operating_points = distributed.agree(measure, "measuring operating points")
