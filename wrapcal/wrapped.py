"""``wrap`` and ``WrappedModel``: a split backbone with plugins on top."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import nn
from tqdm.auto import tqdm

from wrapcal import manager
from wrapcal.cache import FeatureSet, FitData
from wrapcal.data import check_labels, iter_batches, num_samples
from wrapcal.errors import DataError, NotFittedError, SplitError
from wrapcal.hookspecs import hookimpl
from wrapcal.plugin import Plugin
from wrapcal.prediction import Prediction
from wrapcal.probs import combine_members, entropy, logits_to_probs
from wrapcal.split import HOW_TO_SPLIT_BY_HAND, Split, split_at


class _CoreHooks:
    """The core's own answers to the model hooks; plugins come before them."""

    @hookimpl(trylast=True)
    def wrapcal_features(self, wrapped: WrappedModel, inputs: torch.Tensor) -> torch.Tensor:
        features = wrapped.backbone(inputs)
        if features.ndim != 2:
            raise SplitError(
                f"the backbone returned features of shape {tuple(features.shape)}, expected "
                f"[batch, features]; {HOW_TO_SPLIT_BY_HAND}"
            )
        return features.unsqueeze(0)

    @hookimpl(trylast=True)
    def wrapcal_head_members(self, wrapped: WrappedModel, features: torch.Tensor) -> torch.Tensor:
        return wrapped.head(features).unsqueeze(0)

    @hookimpl(trylast=True)
    def wrapcal_transform_logits(self, wrapped: WrappedModel, logits: torch.Tensor) -> torch.Tensor:
        return logits

    @hookimpl(trylast=True)
    def wrapcal_scores(
        self, wrapped: WrappedModel, members: torch.Tensor, probs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        scores = {"msp": 1 - probs.amax(dim=-1), "entropy": entropy(probs)}
        if members.shape[0] == 1 and members.shape[-1] > 1:
            # Logit-based baselines only mean something for a single set of logits.
            scores["max_logit"] = -members[0].amax(dim=-1)
            scores["energy"] = -torch.logsumexp(members[0], dim=-1)
        return scores


class WrappedModel(nn.Module):
    """A classifier split into backbone and head, with plugins applied.

    ``wrapped(x)`` returns calibrated logits with the model's shape, dtype and device,
    so it drops into code that used the model. ``predict`` adds probabilities and
    uncertainty scores; ``fit`` runs the backbone once per data set and lets every
    plugin learn from the cached features.

    Create it with :func:`wrap`; load a saved one with :func:`wrapcal.load`.
    """

    def __init__(self, split: Split, plugins: Sequence[Plugin], names: Sequence[str | None]):
        super().__init__()
        self.backbone = split.backbone
        self.head = split.head
        order = sorted(range(len(plugins)), key=lambda i: int(plugins[i].stage))
        self.plugins = nn.ModuleList([plugins[i] for i in order])
        self.plugin_names = [names[i] for i in order]
        self.split_kind = split.kind
        self.source = dict(split.source)
        self.head_path = split.head_path
        self.num_classes = split.num_classes
        self.num_features = split.num_features
        self.backbone_passes = 0
        self._active = {id(p) for p in self.plugins if not p.requires_fit}
        self._pm: pluggy.PluginManager | None = None
        self.plugin_manager.hook.wrapcal_attach(wrapped=self)

    # --- plugin plumbing ---------------------------------------------------------------

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """This model's own plugin manager: the core hooks and the plugin instances."""
        if self._pm is None:
            pm = manager.new_manager()
            pm.register(_CoreHooks(), name="wrapcal.core")
            # Ascending stage: pluggy calls the last registered first, so samplers
            # wrap head builders, which wrap the core's head.
            for plugin in self.plugins:
                pm.register(plugin)
            self._pm = pm
            self._callers: dict[str, Any] = {}
        return self._pm

    def __getstate__(self) -> dict[str, Any]:
        # A plugin manager holds references, not state: copies build their own.
        state = self.__dict__.copy()
        state["_pm"] = None
        state.pop("_callers", None)
        return state

    def _inactive(self) -> list[Plugin]:
        return [p for p in self.plugins if id(p) not in self._active]

    def _hook(self, name: str) -> Any:
        pm = self.plugin_manager
        if name not in self._callers:
            self._callers[name] = pm.subset_hook_caller(name, remove_plugins=self._inactive())
        return self._callers[name]

    def _set_active(self, active: set[int]) -> None:
        self._active = active
        self._callers = {}

    def call_inner(self, hook_name: str, plugin: Any, **kwargs: Any) -> Any:
        """Call the implementations of ``hook_name`` that come after ``plugin``.

        A plugin that wraps the head (MC dropout around the discrepancy heads, say)
        calls this from its ``firstresult`` implementation to reach the inner ones.
        """
        pm = self.plugin_manager
        in_call_order = [
            impl.plugin for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls())
        ]
        outer = in_call_order[: in_call_order.index(plugin) + 1]
        caller = pm.subset_hook_caller(hook_name, remove_plugins=outer + self._inactive())
        return caller(**kwargs)

    def get_plugin(self, name_or_type: str | type) -> Plugin:
        """The plugin registered under a name, or the first of a type."""
        for plugin, name in zip(self.plugins, self.plugin_names, strict=True):
            if name == name_or_type or (
                isinstance(name_or_type, type) and isinstance(plugin, name_or_type)
            ):
                return plugin
        raise KeyError(f"no plugin {name_or_type!r} in this model; it has {self.plugin_names}")

    def _check_fitted(self) -> None:
        missing = [
            f"{name or type(p).__name__}"
            for p, name in zip(self.plugins, self.plugin_names, strict=True)
            if p.requires_fit and id(p) not in self._active
        ]
        if missing:
            raise NotFittedError(
                f"plugins {', '.join(missing)} are not fitted: call wrapped.fit(train=..., "
                "calibration=..., unlabeled=...) with the data they need before predicting"
            )

    # --- inference ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    def _prepare(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if not torch.is_floating_point(x):
            raise DataError(
                f"inputs have dtype {x.dtype}; the model takes float tensors normalised "
                "as it expects"
            )
        param = next(self.parameters(), None)
        if param is not None and (x.device != param.device or x.dtype != param.dtype):
            x = x.to(device=param.device, dtype=param.dtype)
        return x

    def members(self, x: torch.Tensor) -> torch.Tensor:
        """Member logits ``[M, B, K]`` of a batch (``M = 1`` without sampling plugins)."""
        self._check_fitted()
        features = self._hook("wrapcal_features")(wrapped=self, inputs=self._prepare(x))
        return self.head_members(features, from_inputs=True)

    def head_members(self, features: torch.Tensor, from_inputs: bool = False) -> torch.Tensor:
        """Member logits ``[M, B, K]`` from features ``[B, D]`` or ``[S, B, D]``.

        ``from_inputs`` says whether the features come from ``wrapcal_features`` on
        inputs just now (True) or from the cache (False); see the hook's documentation.
        """
        if features.ndim == 2:
            features = features.unsqueeze(0)
        samples, batch, width = features.shape
        members = self._hook("wrapcal_head_members")(
            wrapped=self, features=features.reshape(samples * batch, width), from_inputs=from_inputs
        )
        if samples == 1:
            return members
        m = members.shape[0]
        # Feature samples are the outer loop: [M, S*B, K] -> [S*M, B, K].
        return (
            members.reshape(m, samples, batch, -1).transpose(0, 1).reshape(samples * m, batch, -1)
        )

    def finish(self, members: torch.Tensor) -> torch.Tensor:
        """Combine member logits and apply the logit transforms (temperature)."""
        return self._hook("wrapcal_transform_logits")(wrapped=self, logits=combine_members(members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated logits with the model's shape, dtype and device."""
        return self.finish(self.members(x))

    def _predict_batch(self, x: torch.Tensor) -> Prediction:
        return self._prediction(self.members(x))

    def _prediction(self, members: torch.Tensor) -> Prediction:
        logits = self.finish(members)
        probs = logits_to_probs(logits)
        scores: dict[str, torch.Tensor] = {}
        for found in self._hook("wrapcal_scores")(wrapped=self, members=members, probs=probs):
            scores.update(found or {})
        return Prediction.from_probs(logits, probs, scores)

    def predict(self, x: Any, batch_size: int = 256, progress: bool = False) -> Prediction:
        """Predict with probabilities, labels, confidences and uncertainty scores.

        Args:
            x: A batch (tensor or array) or any data ``wrapcal.data`` reads.
            batch_size: Batch size when ``x`` is a data set.
            progress: Show a progress bar over batches.

        Returns:
            A :class:`~wrapcal.prediction.Prediction` on the model's device.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                if isinstance(x, torch.Tensor) and x.shape[0] <= batch_size:
                    return self._predict_batch(x)
                batches = iter_batches(x, batch_size)
                total = num_samples(x)
                bar = tqdm(total=total, desc="predict", unit="img", disable=not progress)
                parts = []
                for xb, _ in batches:
                    parts.append(self._predict_batch(xb))
                    bar.update(xb.shape[0])
                bar.close()
                return Prediction.cat(parts)
        finally:
            self.train(was_training)

    def predict_features(self, features: torch.Tensor) -> Prediction:
        """Predict, with every plugin's scores, from features computed earlier.

        ``features`` are ``wrapped.backbone`` outputs ``[N, D]`` (the ``fit`` cache, or
        features a user stored); no backbone pass is made.
        """
        self._check_fitted()
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self._prediction(self.head_members(features, from_inputs=False))
        finally:
            self.train(was_training)

    def head_logits(self, features: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """Final logits from cached features, through the plugins active so far.

        Plugins use this during ``fit``: a calibrator fitted after a retraining plugin
        sees the retrained head's outputs.
        """
        with torch.no_grad():
            return torch.cat(
                [
                    self.finish(self.head_members(features[i : i + batch_size]))
                    for i in range(0, features.shape[0], batch_size)
                ]
            )

    # --- fitting -----------------------------------------------------------------------

    def extract_features(
        self, data: Any, name: str, batch_size: int = 256, progress: bool = True
    ) -> FeatureSet:
        """Run the backbone once over ``data`` (eval mode, no gradients)."""
        was_training = self.backbone.training
        self.backbone.eval()
        feats, labels = [], []
        bar = tqdm(
            total=num_samples(data), desc=f"features: {name}", unit="img", disable=not progress
        )
        try:
            with torch.no_grad():
                for x, y in iter_batches(data, batch_size):
                    f = self.backbone(self._prepare(x))
                    if f.ndim != 2:
                        raise SplitError(
                            f"the backbone returned features of shape {tuple(f.shape)}, "
                            f"expected [batch, features]; {HOW_TO_SPLIT_BY_HAND}"
                        )
                    feats.append(f)
                    labels.append(y)
                    bar.update(x.shape[0])
        finally:
            bar.close()
            self.backbone.train(was_training)
        self.backbone_passes += 1
        if not feats:
            raise DataError(f"the {name!r} data set is empty")
        features = torch.cat(feats)
        if any(y is None for y in labels):
            y_all = None
        else:
            y_all = check_labels(torch.cat(labels), features.shape[0], self.num_classes_out)
            y_all = y_all.to(features.device)
        if not torch.isfinite(features).all():
            raise DataError(
                f"the backbone produced NaN or inf features on the {name!r} data; check the "
                "inputs (NaN pixels?) and the model's weights"
            )
        return FeatureSet(name, features, y_all, data)

    @property
    def num_classes_out(self) -> int:
        """Number of classes of the predictions (2 for a single-logit binary model)."""
        return max(self.num_classes, 2)

    def fit(
        self,
        train: Any = None,
        calibration: Any = None,
        unlabeled: Any = None,
        *,
        batch_size: int = 256,
        progress: bool = True,
        seed: int = 0,
        **more: Any,
    ) -> WrappedModel:
        """Fit every plugin, in stage order, from one backbone pass per data set.

        Args:
            train: Labelled data to retrain on (label smoothing, discrepancy heads).
            calibration: Labelled held-out data for post-hoc calibration.
            unlabeled: Unlabelled data (production traffic) for the discrepancy heads.
            batch_size: Batch size of the backbone pass.
            progress: Show progress bars.
            seed: Seed of every random choice the plugins make.
            **more: Further named data sets a third-party plugin asks for.

        Returns:
            self
        """
        given = {"train": train, "calibration": calibration, "unlabeled": unlabeled, **more}
        given = {k: v for k, v in given.items() if v is not None}
        options = {"batch_size": batch_size, "progress": progress, "seed": seed}

        def extract() -> dict[str, FeatureSet]:
            return {k: self.extract_features(v, k, batch_size, progress) for k, v in given.items()}

        return self._fit_cached(FitData(extract(), options), extract)

    def fit_features(
        self,
        train: Any = None,
        calibration: Any = None,
        unlabeled: Any = None,
        *,
        progress: bool = True,
        seed: int = 0,
        **more: Any,
    ) -> WrappedModel:
        """Fit from features the user already computed with ``wrapped.backbone``.

        Each argument is ``(features, labels)`` or bare ``features`` (``[N, D]``).
        Plugins that change the backbone cannot be fitted this way.
        """
        given = {"train": train, "calibration": calibration, "unlabeled": unlabeled, **more}
        sets = {}
        for name, value in given.items():
            if value is None:
                continue
            feats, labels = value if isinstance(value, (tuple, list)) else (value, None)
            feats = torch.as_tensor(feats).to(self.device)
            if feats.ndim != 2 or feats.shape[1] != self.num_features:
                raise DataError(
                    f"{name} features have shape {tuple(feats.shape)}; expected "
                    f"[N, {self.num_features}], the output of wrapped.backbone"
                )
            if labels is not None:
                labels = check_labels(torch.as_tensor(labels), len(feats), self.num_classes_out)
                labels = labels.to(self.device)
            sets[name] = FeatureSet(name, feats, labels, None)

        def refuse() -> dict[str, FeatureSet]:
            raise DataError("a plugin changed the backbone: call fit(...) with the data instead")

        return self._fit_cached(FitData(sets, {"progress": progress, "seed": seed}), refuse)

    def _fit_cached(self, data: FitData, recompute: Any) -> WrappedModel:
        done: set[int] = set()
        self._set_active(done)
        try:
            for plugin in self.plugins:
                only = [p for p in self.plugins if p is not plugin]
                self.plugin_manager.subset_hook_caller("wrapcal_fit", remove_plugins=only)(
                    wrapped=self, data=data
                )
                plugin.fitted_ = True
                done.add(id(plugin))
                self._set_active(done)
                if plugin.changes_backbone:
                    data.sets = recompute()
        except BaseException:
            self._set_active({id(p) for p in self.plugins if not p.requires_fit or p.fitted_})
            raise
        return self

    def save(self, path: str | Path) -> Path:
        """Save weights (safetensors) and configuration (JSON) in one file."""
        from wrapcal.persistence import save

        return save(self, path)


def resolve_plugins(plugins: Sequence[Any]) -> tuple[list[Plugin], list[str | None]]:
    """Turn names, ``(name, params)`` pairs and instances into plugin instances."""
    instances, names = [], []
    for item in plugins:
        if isinstance(item, str):
            instance = manager.create_plugin(item)
            name: str | None = item
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            instance = manager.create_plugin(item[0], **item[1])
            name = item[0]
        elif isinstance(item, Plugin):
            instance, name = item, manager.plugin_name(item)
        else:
            raise TypeError(
                f"plugins must be names, (name, params) pairs or wrapcal.Plugin instances; "
                f"got {type(item).__name__}"
            )
        if any(instance is p for p in instances):
            raise ValueError(f"plugin {name or type(instance).__name__} is listed twice")
        instances.append(instance)
        names.append(name)
    return instances, names


def build_wrapped(
    split: Split, instances: list[Plugin], names: list[str | None], stacklevel: int
) -> WrappedModel:
    """``WrappedModel(split, instances, names)``, with the plugins' attach warnings
    pointing at the caller ``stacklevel - 1`` frames up.

    Plugins warn from inside pluggy's frames, where a warning helps no one and the
    default filter would show only the first of its kind.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = WrappedModel(split, instances, names)
    for warning in caught:
        warnings.warn(warning.message, warning.category, stacklevel=stacklevel)
    return wrapped


def find_split(model: nn.Module) -> Split:
    """Split ``model`` (modified in place) with the first adapter that knows it."""
    split = manager.get_plugin_manager().hook.wrapcal_split_model(model=model)
    if split is None:
        raise SplitError(f"no adapter could split {type(model).__name__}; {HOW_TO_SPLIT_BY_HAND}")
    return split


def wrap(
    model: nn.Module,
    plugins: Sequence[Any] = (),
    *,
    inplace: bool = False,
    head: str | None = None,
    split: Split | None = None,
) -> WrappedModel:
    """Wrap a classifier with plugins.

    Args:
        model: A timm or torchvision model, or any ``nn.Module`` that maps inputs to
            logits and ends in an ``nn.Linear``.
        plugins: Plugin names (``"temperature"``), ``(name, params)`` pairs or plugin
            instances. They are applied by stage, not in list order.
        inplace: Use ``model`` itself instead of a copy. The copy is the default: the
            user's model is never changed.
        head: The dotted name of the final linear layer, to split there by hand.
        split: A complete :class:`~wrapcal.split.Split`, to skip the adapters.

    Returns:
        The :class:`WrappedModel`, in the model's train/eval mode.
    """
    if not isinstance(model, nn.Module) and split is None:
        raise TypeError(f"wrap takes an nn.Module, got {type(model).__name__}")
    instances, names = resolve_plugins(plugins)
    if split is None:
        target = model if inplace else copy.deepcopy(model)
        split = split_at(target, head) if head is not None else find_split(target)
    wrapped = build_wrapped(split, instances, names, stacklevel=3)
    wrapped.train(model.training if isinstance(model, nn.Module) else False)
    return wrapped
