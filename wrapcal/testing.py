"""The plugin conformance kit: every rule of the plugin contract, checked on small data.

Like scikit-learn's ``check_estimator`` / ``parametrize_with_checks``, for wrapcal
plugins. One line in a plugin package's test suite::

    from wrapcal.testing import check_plugin

    def test_conformance():
        check_plugin("ash")                      # or check_plugin(ASH, percentile=95.0)

or one test per rule, with pytest::

    import pytest
    from wrapcal.testing import plugin_checks

    @pytest.mark.parametrize(("rule", "check"), plugin_checks("ash"))
    def test_conformance(rule, check):
        check()

The rules (:data:`RULES`, in the order they run; docs/plugins.md says more):

``parameters``
    ``__init__`` stores each parameter unchanged, every parameter has a declared
    constraint, the defaults pass them, they survive the JSON of a saved file, and
    values the constraints refuse (outside an ``Interval``, not in ``Options``, of the
    wrong type) are refused with a ``ValueError`` / ``TypeError`` naming the parameter.
``tags``
    ``get_tags`` passes; the stage is a ``Stage``; outputs map names to ``OutputKind``
    without taking a core output's name; ``after`` / ``before`` name installed plugins;
    the data sets are names ``fit`` can take; flags are bools; tags depend only on
    the parameters.
``attach``
    Two ``wrap`` calls build the same modules (state_dict keys, shapes, dtypes), and
    ``fit`` changes none of them but the learned tensors declared with
    ``register_learned_buffer`` (which ``load`` resizes).
``fit``
    ``fit`` returns ``self``; a plugin that requires ``fit`` raises ``NotFittedError``
    before it, one that does not works right after ``wrap``; fitting again from scratch
    gives the same outputs; ``fit`` leaves the tags as they were.
``outputs``
    Every output is declared and every declared output is produced, of its kind and
    shape (score: float ``[B]``, finite; set: bool ``[B, K]``; decision: bool ``[B]``;
    value: batch first), a row's outputs do not depend on the batch it is in, and
    ``predict`` leaves the model's parameters' gradients as they were (a plugin that
    differentiates the network, ODIN, takes its gradients with ``torch.autograd.grad``).
``order``
    Beside a companion of each other stage (:data:`COMPANIONS`: cheap built-ins and the
    kit's own feature transform :class:`KitClip`), ``[plugin, other]`` and
    ``[other, plugin]`` give the same outputs.
``fit_inputs``
    Alone and beside each companion, what the plugin received in ``fit`` for rows of
    the fit data (its data's features, ``model.features`` / ``members`` /
    ``head_logits`` / ``predict_features``, the rows it fed to ``model.head``) equals
    what it receives at inference for the same inputs (its ``features`` / ``members`` /
    ``transform_logits`` arguments, the ``OutputContext`` fields it reads, the features
    the heads read); and predicting from cached features equals predicting from inputs
    (a plugin that declares ``needs_inputs`` may leave its own outputs out when there
    are no inputs, as its documentation must say; what it gives must be equal).
``save_load``
    ``wrapped.save`` then ``wrapcal.load`` gives the same outputs, parameters and state.
``save_refuses``
    With one learned value corrupted (a NaN in a learned tensor, else a plain learned
    value its constraints refuse), ``save`` refuses and writes nothing.
``export``
    With ``exportable=True``, the ``.pt2`` and ONNX exports give ``predict``'s outputs
    (ONNX is skipped, with a warning, when onnx / onnxscript / onnxruntime are missing).

The data: scikit-learn's bundled digits of four classes (8x8 pixels, flattened), a
small MLP trained on them for a fraction of a second (``KitNet``: 64 -> 32 ReLU ->
dropout -> 4), ``train`` (300 rows), ``calibration`` (200), ``unlabeled`` (60 digits and
40 noise rows) and 60 test rows. No download, a few seconds per plugin.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from wrapcal.errors import NotFittedError, SavedFileError
from wrapcal.files.load import load
from wrapcal.model import discovery
from wrapcal.model.assemble import create_plugin, wrap
from wrapcal.model.chain import CORE_OUTPUTS
from wrapcal.model.wrapped import WrappedModel
from wrapcal.plugin.base import Plugin, get_tags
from wrapcal.plugin.constraints import Check, Interval, Options, describe, validate
from wrapcal.plugin.prediction import Prediction
from wrapcal.plugin.torch_helpers import one_cpu_thread
from wrapcal.plugin.types import ModelView, OutputContext, OutputKind, PluginTags, Stage

__all__ = [
    "COMPANIONS",
    "RULES",
    "KitData",
    "KitNet",
    "PluginCheckError",
    "check_plugin",
    "kit_data",
    "plugin_checks",
]

#: Cheap built-ins of each stage that ``order`` and ``fit_inputs`` put beside the plugin
#: (those of the plugin's own stage are left out).
COMPANIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("kit_clip", {}),  # a FEATURES-stage transform (KitClip): none of the built-ins is one
    ("mc_dropout", {"samples": 4, "p": 0.2}),
    ("react", {}),
    ("knn", {"k": 5}),
    ("temperature", {}),
    ("conformal", {"alpha": 0.1}),
)
#: The companion that is the kit's own (:class:`KitClip`), not a registered plugin.
_KIT_CLIP = "kit_clip"
#: The data sets the kit gives ``fit``; a data set a plugin requires by another name
#: gets the calibration rows.
KIT_SETS = ("train", "calibration", "unlabeled")
#: ``wrapped.fit``'s own keyword arguments: no data set can have these names.
_FIT_OPTIONS = frozenset(
    {"self", "batch_size", "progress", "seed", "cache", "cache_dir", "cache_dtype"}
)
#: Rows per data set whose fit-time inputs ``fit_inputs`` compares at inference.
_ROWS_PER_SET = 48
#: Relative tolerance of comparisons between two computations of one value (a fit-time
#: pass and an inference pass run the same operations on batches of other sizes).
_RTOL = 1e-4
#: Tolerance of an ONNX Runtime output, relative to the output's scale (its kernels
#: round differently from PyTorch's).
_ONNX_TOL = 1e-4


class PluginCheckError(AssertionError):
    """A plugin breaks a rule of the contract.

    Attributes:
        rule: The rule's name (:data:`RULES`).
        plugin: The plugin's name.
        reason: What is wrong and how to fix it.
    """

    def __init__(self, rule: str, plugin: str, reason: str) -> None:
        super().__init__(f"plugin {plugin} breaks the rule {rule!r}: {reason}")
        self.rule = rule
        self.plugin = plugin
        self.reason = reason


# --- the data and the model ----------------------------------------------------------------


class KitNet(nn.Module):
    """The kit's classifier: ``64 -> 32`` (ReLU) -> dropout -> ``Linear(32, 4)`` named ``fc``.

    Non-negative features (post-ReLU, as most detectors assume), a dropout right before
    the head (MC dropout samples it), a last ``nn.Linear`` that the core splits at.
    """

    def __init__(self, inputs: int = 64, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, width), nn.ReLU())
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.body(x)))


class KitClip(Plugin):
    """The kit's ``FEATURES``-stage companion: clips the features at the 90th percentile
    of the ``train`` (else ``calibration``) features' values, as ReAct's clip does, so
    that ``order`` and ``fit_inputs`` see the plugin beside a feature transform."""

    def __init__(self) -> None:
        super().__init__()
        self.clip_: torch.Tensor
        self.register_buffer("clip_", torch.tensor(0.0))

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.FEATURES
        tags.fit_reads = ("train", "calibration")
        tags.exportable = True
        return tags

    def fit(self, model: Any, data: Any) -> KitClip:
        source = data.train if data.train is not None else data.calibration
        values = model.features(source.features).reshape(-1).double()
        self.clip_ = torch.quantile(values, 0.9).to(self.clip_)
        return self

    def features(self, inputs: Any, inner: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        features = inner(inputs)
        return features.clamp(max=self.clip_.to(features.dtype))


@dataclass(frozen=True)
class KitData:
    """The kit's data: flattened 8x8 digits of four classes, and a trained ``KitNet``.

    Attributes:
        train: ``(X, y)``, 300 rows.
        calibration: ``(X, y)``, 200 rows.
        unlabeled: ``X``, 60 digits and 40 uniform-noise rows.
        test: ``X``, 60 digits none of the others hold.
        weights: The trained ``KitNet``'s state dict.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    calibration: tuple[torch.Tensor, torch.Tensor]
    unlabeled: torch.Tensor
    test: torch.Tensor
    weights: dict[str, torch.Tensor]

    def model(self) -> KitNet:
        """A new ``KitNet`` with the trained weights, in eval mode."""
        net = KitNet()
        net.load_state_dict(self.weights)
        return net.eval()

    def inputs(self, name: str) -> torch.Tensor:
        """The inputs of a data set the kit gives ``fit``, in the order ``fit`` reads them."""
        if name == "train":
            return self.train[0]
        if name == "unlabeled":
            return self.unlabeled
        return self.calibration[0]  # calibration, and any other labelled set

    def fit_value(self, name: str) -> Any:
        """What the kit passes as ``fit(name=...)`` (a copy: a plugin cannot change the
        kit's data for the next check)."""
        if name == "train":
            return tuple(t.clone() for t in self.train)
        if name == "unlabeled":
            return self.unlabeled.clone()
        return tuple(t.clone() for t in self.calibration)


@functools.lru_cache(maxsize=1)
def kit_data() -> KitData:
    """The kit's data and trained model (made once per process, the same every time)."""
    from sklearn.datasets import load_digits

    bunch = load_digits(n_class=4)
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    x, y = x[order], y[order]
    noise = torch.rand(40, x.shape[1], generator=generator) * 4 - 1
    with torch.random.fork_rng(devices=[]), one_cpu_thread("cpu"):
        torch.manual_seed(0)
        net = KitNet()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        with torch.enable_grad():
            for _ in range(150):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(net(x[:300]), y[:300])
                loss.backward()
                optimizer.step()
    return KitData(
        train=(x[:300], y[:300]),
        calibration=(x[300:500], y[300:500]),
        unlabeled=torch.cat([x[500:560], noise]),
        test=x[560:620],
        weights={k: v.detach().clone() for k, v in net.state_dict().items()},
    )


# --- comparing outputs -----------------------------------------------------------------------


def _named(prediction: Prediction) -> dict[str, torch.Tensor]:
    return {
        "logits": prediction.logits,
        "probs": prediction.probs,
        **prediction.scores,
        **prediction.outputs,
    }


def _difference(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """How two tensors differ, or ``None`` if they are equal."""
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} vs {want.dtype}"
    if torch.equal(got, want):
        return None
    if got.is_floating_point():
        both = torch.isnan(got) & torch.isnan(want)
        if torch.equal(got[~both], want[~both]):
            return None
        gap = (got.double() - want.double()).abs().nan_to_num(nan=math.inf)
        return f"largest difference {float(gap.max()):.3g}"
    rows = (got != want).reshape(len(got), -1).any(dim=1) if got.ndim else got != want
    return f"{int(rows.sum())} of {len(got)} rows differ"


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = _RTOL) -> bool:
    """Equal up to rounding, relative to ``want``'s scale."""
    if got.shape != want.shape:
        return False
    if not got.is_floating_point():
        return bool(torch.equal(got, want))
    got, want = got.double(), want.double()
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    return bool(torch.allclose(got, want, rtol=rtol, atol=rtol * scale, equal_nan=True))


def _compare_predictions(got: Prediction, want: Prediction) -> str | None:
    """The first output in which two predictions differ, or ``None``."""
    a, b = _named(got), _named(want)
    if a.keys() != b.keys():
        return f"outputs {sorted(a)} vs {sorted(b)}"
    for name in b:
        difference = _difference(a[name], b[name])
        if difference:
            return f"{name!r}: {difference}"
    return None


# --- bad parameter values ------------------------------------------------------------------


def _accepted(forms: list[Any], value: Any) -> bool:
    try:
        validate("x", {"value": value}, {"value": forms}, "parameter")
    except ValueError:
        return False
    return True


def _interval_candidates(form: Interval) -> list[Any]:
    """Just outside the bounds, a number as a string (the wrong type), the excluded
    bounds, then a non-integer (``int``) or NaN (``float``)."""
    number: Callable[[float], Any] = int if form.type is int else float
    outside, edges = [], []
    if form.low is not None:
        outside.append(number(form.low) - 1)
        if form.closed in ("right", "neither"):
            edges.append(number(form.low))
    if form.high is not None:
        outside.append(number(form.high) + 1)
        if form.closed in ("left", "neither"):
            edges.append(number(form.high))
    inside = form.low if form.low is not None else 0
    odd = float(inside) + 1.5 if form.type is int else float("nan")
    return [*outside, "1", *edges, odd]


def bad_values(forms: list[Any]) -> list[Any]:
    """Values that none of ``forms`` accepts, derived from them: just outside each
    ``Interval``, not one of the ``Options``, of the wrong type; at most six."""
    found: list[Any] = []
    for form in forms:
        if isinstance(form, Interval):
            found += _interval_candidates(form)
        elif isinstance(form, Options):
            found += ["not-an-option" if form.type is str else -12345, 3.5, None]
        elif form is bool:
            found += ["yes", 1]
        elif isinstance(form, type):
            found += [3.5 if form is not float else "3.5"]
        elif isinstance(form, Check):
            found += ["not-valid", -1, [], {"x": 1}]
    found += [None, "not-valid", [object()]]
    unique: list[Any] = []
    for value in found:
        same = any(type(value) is type(v) and repr(value) == repr(v) for v in unique)
        if not same and not _accepted(forms, value):
            unique.append(value)
    return unique[:6]


# --- recording what a plugin receives --------------------------------------------------------


@dataclass
class _Record:
    """What a plugin received in ``fit`` and, while ``active``, at inference."""

    sets: dict[str, Any] = field(default_factory=dict)
    fit_called: bool = False
    fit_result: Any = None
    fit_calls: list[tuple[str, torch.Tensor, Any]] = field(default_factory=list)
    head_inputs: list[torch.Tensor] = field(default_factory=list)
    active: bool = False
    seen: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    read: set[str] = field(default_factory=set)

    def see(self, what: str, value: Any) -> None:
        if self.active and isinstance(value, torch.Tensor):
            self.seen.setdefault(what, []).append(value.detach())


class _RecordingView:
    """The model view a plugin gets in ``fit``, recording the cached rows it passes."""

    def __init__(self, view: Any, record: _Record) -> None:
        object.__setattr__(self, "_view", view)
        object.__setattr__(self, "_record", record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._view, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._view, name, value)  # backbone_passes += 1

    def _call(self, what: str, cached: Any, *args: Any, **kwargs: Any) -> Any:
        out = getattr(self._view, what)(cached, *args, **kwargs)
        if isinstance(cached, torch.Tensor):
            self._record.fit_calls.append((what, cached.detach(), out))
        return out

    def features(self, cached: Any, *args: Any, **kwargs: Any) -> Any:
        return self._call("features", cached, *args, **kwargs)

    def members(self, cached: Any, *args: Any, **kwargs: Any) -> Any:
        return self._call("members", cached, *args, **kwargs)

    def head_logits(self, cached: Any, *args: Any, **kwargs: Any) -> Any:
        return self._call("head_logits", cached, *args, **kwargs)

    def predict_features(self, cached: Any, *args: Any, **kwargs: Any) -> Any:
        return self._call("predict_features", cached, *args, **kwargs)


class _RecordingContext:
    """An ``OutputContext`` that notes which of its fields the plugin reads."""

    def __init__(self, context: Any, record: _Record) -> None:
        self._context = context
        self._record = record

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._context, name)
        self._record.read.add(name)
        return value


def _instrument(plugin: Plugin) -> _Record:
    """Wrap the plugin's ``fit`` and inference methods (on the instance) to record what
    it receives. The core decides which methods to call from the plugin's class, so
    the wrappers change nothing about which steps run."""
    record = _Record()
    fit, features, members = plugin.fit, plugin.features, plugin.members
    transform, outputs = plugin.transform_logits, plugin.outputs

    def recording_fit(model: Any, data: Any) -> Any:
        record.sets, record.fit_called = dict(data.sets), True
        view = _RecordingView(model, record)

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor) and len(record.head_inputs) < 64:
                record.head_inputs.append(args[0].detach())

        handle = model.head.register_forward_pre_hook(hook)
        try:
            # The proxy forwards every attribute to the real view: a ModelView to the plugin.
            record.fit_result = fit(cast(ModelView, view), data)
        finally:
            handle.remove()
        return record.fit_result

    def recording_features(inputs: Any, inner: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        def recording_inner(x: Any) -> torch.Tensor:
            out = inner(x)
            if x is inputs:
                record.see("features", out)
            return out

        return features(inputs, recording_inner)

    def recording_members(
        given: torch.Tensor, inner: Callable[[Any], torch.Tensor]
    ) -> torch.Tensor:
        record.see("features", given)

        def recording_inner(x: torch.Tensor) -> torch.Tensor:
            out = inner(x)
            if x is given:
                record.see("members", out)
            return out

        return members(given, recording_inner)

    def recording_transform(logits: torch.Tensor) -> torch.Tensor:
        record.see("logits", logits)
        return transform(logits)

    def recording_outputs(context: Any) -> Any:
        if not record.active:
            return outputs(context)
        proxy = _RecordingContext(context, record)
        found = outputs(cast(OutputContext, proxy))  # forwards every field it is asked for
        own_features = get_tags(plugin).stage == Stage.FEATURES  # they include its step
        if "features" in record.read and not own_features:
            record.see("features", context.features)
        if "backbone_features" in record.read and not own_features:
            record.see("features", context.backbone_features.unsqueeze(0))
        if "members" in record.read:
            record.see("members", context.members)
        for name in ("combined", "logits", "base_logits"):
            if name in record.read:
                record.see("logits", getattr(context, name))
        if "probs" in record.read:
            record.see("probs", context.probs)
        if "outputs" in record.read:
            for key, value in context.outputs.items():
                record.see(f"output:{key}", value)
        return found

    object.__setattr__(plugin, "fit", recording_fit)
    object.__setattr__(plugin, "features", recording_features)
    object.__setattr__(plugin, "members", recording_members)
    object.__setattr__(plugin, "transform_logits", recording_transform)
    object.__setattr__(plugin, "outputs", recording_outputs)
    return record


# --- the kit ---------------------------------------------------------------------------------


@dataclass
class _Fitted:
    """A wrapped model the kit fitted (or the error fitting it raised)."""

    wrapped: WrappedModel | None
    plugin: Plugin | None
    record: _Record | None
    error: BaseException | None = None


class _Kit:
    """One plugin under test: how to make it, and the models fitted so far (shared by the
    rules, so a fit several rules need runs once)."""

    def __init__(self, spec: Any, params: dict[str, Any]) -> None:
        if isinstance(spec, Plugin):
            raise TypeError(
                "check_plugin takes a plugin's registered name or its class (a factory), with "
                "its parameters as keywords, not an instance: the kit creates fresh instances "
                f"(check_plugin({type(spec).__name__}, **params))"
            )
        if not (isinstance(spec, str) or callable(spec)):
            raise TypeError(
                f"check_plugin takes a plugin name or a factory, not {type(spec).__name__}"
            )
        self.spec = spec
        self.params = dict(params)
        self.name = spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))
        self.cache: dict[Any, Any] = {}

    # --- making and fitting -----------------------------------------------------------------

    def make(self, params: Mapping[str, Any] | None = None) -> Plugin:
        """A new instance, created and checked the way ``wrap`` creates it."""
        params = self.params if params is None else dict(params)
        if isinstance(self.spec, str):
            return create_plugin(self.spec, dict(params))
        plugin = self.spec(**params)
        if not isinstance(plugin, Plugin):
            raise TypeError(f"the factory returned a {type(plugin).__name__}, not a wrapcal.Plugin")
        plugin.validate_params(f"plugin {self.name}")
        return plugin

    def item(self) -> Any:
        """What the kit lists in ``wrap``: the name with parameters, or an instance."""
        return (self.spec, dict(self.params)) if isinstance(self.spec, str) else self.make()

    def tags(self) -> PluginTags:
        return get_tags(self.make())

    def wrapped(
        self, companion: tuple[str, dict[str, Any]] | None = None, first: bool = True
    ) -> WrappedModel:
        """A new wrapped model of the kit's net, with the plugin (and a companion)."""
        items = [self.item()]
        if companion is not None:
            other = _companion_item(companion)
            items = [*items, other] if first else [other, *items]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the kit's net, not the user's
            return wrap(kit_data().model(), items)

    def under_test(self, wrapped: WrappedModel) -> Plugin:
        """The plugin under test inside ``wrapped`` (the one that is not a companion)."""
        names = {name for name, _ in COMPANIONS}
        kind = type(self.make())
        for name, plugin in zip(wrapped.plugin_names, wrapped.plugins, strict=True):
            if type(plugin) is kind and (name not in names or name == self.name):
                return plugin
        raise LookupError(f"no {kind.__name__} among {wrapped.plugin_names}")

    def fit(self, wrapped: WrappedModel) -> WrappedModel:
        """Fit on the kit's data sets that the model's plugins read."""
        data = kit_data()
        wanted: list[str] = []
        for plugin in wrapped.plugins:
            tags = get_tags(plugin)
            for name in (*tags.fit_requires, *tags.fit_reads):
                if name not in wanted and (name in KIT_SETS or name in tags.fit_requires):
                    wanted.append(name)
        sets = {name: data.fit_value(name) for name in wanted}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return wrapped.fit(**sets, progress=False, seed=0)

    def fitted(
        self, key: Any, companion: Any = None, first: bool = True, record: bool = False
    ) -> _Fitted:
        """A fitted model, made once per key; a failure is kept and reported by each
        rule that needs the model."""
        if key not in self.cache:
            wrapped = plugin = recorded = None
            try:
                wrapped = self.wrapped(companion, first)
                plugin = self.under_test(wrapped)
                recorded = _instrument(plugin) if record else None
                self.fit(wrapped)
                self.cache[key] = _Fitted(wrapped, plugin, recorded)
            except Exception as err:
                self.cache[key] = _Fitted(wrapped, plugin, recorded, err)
        return self.cache[key]

    def alone(self) -> WrappedModel:
        """The plugin alone, fitted (the model most rules use); raises what fit raised."""
        fitted = self.fitted("alone")
        if fitted.error is not None:
            raise self.fail("fit", f"wrap and fit raised {_said(fitted.error)}", fitted.error)
        assert fitted.wrapped is not None
        return fitted.wrapped

    def companions(self) -> list[tuple[str, dict[str, Any]]]:
        """The companions of other stages than the plugin's, registered here."""
        stage = self.tags().stage
        registry = discovery.plugin_registry()
        found = []
        for name, params in COMPANIONS:
            if name == self.name or (name != _KIT_CLIP and name not in registry):
                continue
            item = _companion_item((name, params))
            other = item if isinstance(item, Plugin) else create_plugin(*item)
            if get_tags(other).stage != stage:
                found.append((name, params))
        return found

    def fail(self, rule: str, reason: str, cause: BaseException | None = None) -> PluginCheckError:
        error = PluginCheckError(rule, self.name, reason)
        error.__cause__ = cause
        return error


def _companion_item(companion: tuple[str, dict[str, Any]]) -> Any:
    """What the kit lists in ``wrap`` for a companion."""
    name, params = companion
    return KitClip() if name == _KIT_CLIP else (name, dict(params))


def _said(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


# --- the rules -------------------------------------------------------------------------------


def _check_parameters(kit: _Kit) -> str:
    rule = "parameters"
    try:
        plugin = kit.make()
    except (TypeError, ValueError) as err:
        raise kit.fail(rule, f"the parameters {kit.params} are refused: {_said(err)}") from err
    signature = inspect.signature(type(plugin).__init__)
    names = [
        name
        for name, p in signature.parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    constraints = plugin._parameter_constraints
    for name in constraints:
        if name not in names:
            raise kit.fail(
                rule,
                f"_parameter_constraints has {name!r}, which is not a parameter of __init__ "
                f"({', '.join(names) or 'none'}): a misspelt constraint checks nothing",
            )
    missing = [name for name in names if name not in constraints]
    if missing:
        raise kit.fail(
            rule,
            f"parameter{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"{'have' if len(missing) > 1 else 'has'} no constraint: a saved file could carry "
            "any value for it; declare its accepted forms in _parameter_constraints",
        )
    try:
        stored = plugin.get_params()
    except AttributeError as err:
        raise kit.fail(
            rule, f"__init__ must store each parameter under its own name: {err}"
        ) from err
    for name in names:
        default = signature.parameters[name].default
        given = kit.params.get(name, default)
        if given is inspect.Parameter.empty:
            continue
        if type(stored[name]) is not type(given) or stored[name] != given:
            raise kit.fail(
                rule,
                f"__init__ stored {name}={stored[name]!r} for {given!r}: store parameters "
                "unchanged (check and convert them in fit), so get_params gives back what "
                "was passed",
            )
    try:
        text = json.dumps(stored, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise kit.fail(
            rule, f"the parameters are not JSON ({err}), so the model cannot be saved"
        ) from err
    try:
        validate(f"plugin {kit.name}", json.loads(text), constraints, "parameter")
    except ValueError as err:
        raise kit.fail(
            rule,
            f"the parameters as a saved file gives them back (JSON: tuples become lists) are "
            f"refused, so a saved model would not load: {err}",
        ) from err
    for name in names:
        for bad in bad_values(constraints[name]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    kit.make({**kit.params, name: bad})
                except (TypeError, ValueError) as err:
                    if name not in str(err):
                        raise kit.fail(
                            rule,
                            f"{name}={bad!r} is refused with a message that does not name "
                            f"the parameter: {_said(err)}",
                        ) from err
                    continue
                except Exception as err:
                    raise kit.fail(
                        rule,
                        f"{name}={bad!r} raised {_said(err)}; refuse bad values with a "
                        "ValueError or TypeError naming the parameter (declare them in "
                        "_parameter_constraints)",
                    ) from err
            raise kit.fail(
                rule,
                f"{name}={bad!r} is accepted, though its constraints "
                f"({describe(constraints[name])}) refuse it: __init__ must store the value "
                "as given, so that the core checks it",
            )
    return ""


def _check_tags(kit: _Kit) -> str:
    rule = "tags"
    plugin = kit.make()
    try:
        tags = get_tags(plugin)
    except (TypeError, ValueError) as err:
        raise kit.fail(rule, str(err)) from err
    for flag in (
        "requires_fit",
        "changes_backbone",
        "changes_head",
        "needs_inputs",
        "streams_data",
        "exportable",
        "fits_from_shards",
        "collective_outputs",
    ):
        if not isinstance(getattr(tags, flag), bool):
            raise kit.fail(rule, f"tags.{flag} is {getattr(tags, flag)!r}, not a bool")
    if not isinstance(tags.export_refusal, str):
        raise kit.fail(rule, f"tags.export_refusal is {tags.export_refusal!r}, not a str")
    if tags.exportable and tags.export_refusal:
        raise kit.fail(
            rule,
            "tags.export_refusal says why the plugin cannot be exported, but tags.exportable "
            "is True: set one or the other",
        )
    for name, kind in tags.outputs.items():
        if not isinstance(kind, OutputKind):
            raise kit.fail(rule, f"output {name!r} has kind {kind!r}, not an OutputKind")
        if name in CORE_OUTPUTS:
            raise kit.fail(
                rule,
                f"output {name!r} has the name of a core output ({', '.join(CORE_OUTPUTS)}); "
                "name it after the plugin",
            )
    installed = set(discovery.plugin_registry())
    installed |= {name.rpartition(":")[2] for name in installed}
    for attribute in ("after", "before"):
        names = getattr(tags, attribute)
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise kit.fail(rule, f"tags.{attribute} must be a tuple of names, not {names!r}")
        for name in names:
            if name not in installed:
                raise kit.fail(
                    rule,
                    f"tags.{attribute} names {name!r}, which no installed plugin has (a typo "
                    "is otherwise ignored)",
                )
    if not isinstance(tags.fit_requires, dict) or not all(
        isinstance(v, str) for v in tags.fit_requires.values()
    ):
        raise kit.fail(rule, "tags.fit_requires must be a dict: data set -> why it is needed")
    if isinstance(tags.fit_reads, str):
        raise kit.fail(rule, f"tags.fit_reads must be a tuple of names, not {tags.fit_reads!r}")
    for name in (*tags.fit_requires, *tags.fit_reads):
        if not isinstance(name, str) or not name.isidentifier() or name in _FIT_OPTIONS:
            raise kit.fail(
                rule,
                f"data set {name!r} is not a name wrapped.fit can take (an identifier other "
                f"than {', '.join(sorted(_FIT_OPTIONS - {'self'}))}); the usual ones are "
                f"{', '.join(KIT_SETS)}",
            )
    again = get_tags(kit.make())
    if _tag_values(again) != _tag_values(tags):
        raise kit.fail(
            rule,
            "two instances with the same parameters have different tags: tags must follow "
            "from the parameters alone",
        )
    return ""


def _tag_values(tags: PluginTags) -> dict[str, Any]:
    return {f.name: getattr(tags, f.name) for f in fields(tags)}


def _structure(module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def _check_attach(kit: _Kit) -> str:
    rule = "attach"
    try:
        first, second = kit.wrapped(), kit.wrapped()
    except Exception as err:
        raise kit.fail(rule, f"wrap raised {_said(err)}") from err
    a, b = _structure(kit.under_test(first)), _structure(kit.under_test(second))
    if a != b:
        changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise kit.fail(
            rule,
            f"two wraps built different modules ({changed[:5]}): attach must build the same "
            "modules every time (load calls it again, then loads the saved tensors)",
        )
    if kit.fitted("alone").error is not None:
        return "attach checked; fit fails (the rule 'fit' says why)"
    fitted = kit.under_test(kit.alone())
    after = _structure(fitted)
    learned = fitted.learned_tensor_specs()
    for key in sorted(a.keys() | after.keys()):
        if key not in after or key not in a:
            where = "attach builds it, fit removes it" if key in a else "fit adds it"
            raise kit.fail(
                rule,
                f"{key}: {where}, so load (which attaches, then loads the file) cannot restore "
                "it; create every module and buffer in attach (or __init__)",
            )
        (shape, dtype), (new_shape, new_dtype) = a[key], after[key]
        same_kind = dtype == new_dtype or (dtype.is_floating_point and new_dtype.is_floating_point)
        if key in learned:
            continue
        if shape != new_shape or not same_kind:
            raise kit.fail(
                rule,
                f"{key} is {shape} {dtype} after attach but {new_shape} {new_dtype} after fit; "
                "load would refuse the file: register a tensor whose size depends on the data "
                "with register_learned_buffer(name, shape)",
            )
    return ""


def _check_fit(kit: _Kit) -> str:
    rule = "fit"
    tags = kit.tags()
    fresh = kit.wrapped()
    plugin = kit.under_test(fresh)
    data = kit_data()
    if tags.requires_fit:
        for what, call in (
            ("plugin.check_is_fitted()", plugin.check_is_fitted),
            ("wrapped.predict(x)", lambda: fresh.predict(data.test)),
        ):
            try:
                call()
            except NotFittedError:
                continue
            except Exception as err:
                raise kit.fail(
                    rule, f"before fit, {what} raised {_said(err)}, not NotFittedError"
                ) from err
            raise kit.fail(
                rule,
                f"before fit, {what} works though tags.requires_fit is True; set "
                "requires_fit=False if the plugin works without fit",
            )
    else:
        try:
            fresh.predict(data.test)
        except Exception as err:
            raise kit.fail(
                rule,
                f"tags.requires_fit is False, but predict before fit raised {_said(err)}",
            ) from err
    recorded = kit.fitted("recorded", record=True)
    if (
        recorded.record is not None
        and recorded.record.fit_called
        and (recorded.record.fit_result is not recorded.plugin)
    ):
        result = recorded.record.fit_result
        raise kit.fail(
            rule, f"fit returned {type(result).__name__} {result!r:.60}, not self (the plugin)"
        )
    if recorded.error is not None:
        raise kit.fail(rule, f"wrap and fit raised {_said(recorded.error)}", recorded.error)
    assert recorded.wrapped is not None  # a fit that raised nothing made the model
    alone = kit.alone()
    if _tag_values(get_tags(kit.under_test(alone))) != _tag_values(tags):
        raise kit.fail(rule, "fit changed the tags: they must follow from the parameters alone")
    try:
        first, second = alone.predict(data.test), recorded.wrapped.predict(data.test)
    except Exception:
        return "fitted; predict fails (the rule 'outputs' says why)"
    difference = _compare_predictions(first, second)
    if difference:
        raise kit.fail(
            rule,
            f"two fits from scratch, on the same data with the same seed, give different "
            f"outputs ({difference}): draw random numbers from a generator seeded with "
            "data.seed (or a seed parameter)",
        )
    return ""


_KIND_RULES = {
    OutputKind.OOD_SCORE: "a float tensor [B]",
    OutputKind.UNCERTAINTY: "a float tensor [B]",
    OutputKind.SET: "a bool tensor [B, K]",
    OutputKind.DECISION: "a bool tensor [B]",
    OutputKind.VALUE: "a tensor with the batch first",
}


def _output_problem(value: Any, kind: OutputKind, batch: int, classes: int) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__}"
    if kind.is_score:
        if value.shape != (batch,) or not value.is_floating_point():
            return f"is {value.dtype} {tuple(value.shape)}"
        if not bool(torch.isfinite(value).all()):
            return "holds NaN or inf values"
    elif kind is OutputKind.SET:
        if value.shape != (batch, classes) or value.dtype != torch.bool:
            return f"is {value.dtype} {tuple(value.shape)}"
    elif kind is OutputKind.DECISION:
        if value.shape != (batch,) or value.dtype != torch.bool:
            return f"is {value.dtype} {tuple(value.shape)}"
    elif value.ndim < 1 or value.shape[0] != batch:
        return f"has shape {tuple(value.shape)}"
    return None


def _check_outputs(kit: _Kit) -> str:
    rule = "outputs"
    tags = kit.tags()
    wrapped = kit.alone()
    plugin = kit.under_test(wrapped)
    x = kit_data().test
    raw: list[Any] = []
    outputs = plugin.outputs

    def keeping_outputs(context: Any) -> Any:
        raw.append(outputs(context))
        return raw[-1]

    object.__setattr__(plugin, "outputs", keeping_outputs)
    grads_before = _parameter_grads(wrapped)
    try:
        prediction = wrapped.predict(x)
    except Exception as err:
        prediction = None
        failure: BaseException | None = err
    else:
        failure = None
    finally:
        del plugin.__dict__["outputs"]
    touched = _changed_grads(grads_before, _parameter_grads(wrapped))
    if touched:
        raise kit.fail(
            rule,
            f"predict changed the gradients of the model's parameters ({', '.join(touched[:3])}"
            f"{', ...' if len(touched) > 3 else ''}): take a gradient an output needs with "
            "torch.autograd.grad(loss, inputs), not loss.backward(), which leaves gradients "
            "in the user's model",
        )
    overrides = type(plugin).outputs is not Plugin.outputs
    if overrides and raw:
        found = raw[0]
        if not isinstance(found, dict):
            raise kit.fail(rule, f"outputs() returned a {type(found).__name__}, not a dict")
        undeclared = sorted(set(found) - set(tags.outputs))
        if undeclared:
            raise kit.fail(
                rule,
                f"outputs {undeclared} are not declared: add them to __wrapcal_tags__().outputs "
                "with their OutputKind",
            )
        for name, kind in tags.outputs.items():
            if name not in found:
                raise kit.fail(rule, f"declared output {name!r} is not produced")
            problem = _output_problem(found[name], kind, len(x), wrapped.num_classes_out)
            if problem:
                raise kit.fail(
                    rule,
                    f"output {name!r} ({kind.value}) {problem}; it must be {_KIND_RULES[kind]}",
                )
    elif tags.outputs and not overrides:
        raise kit.fail(
            rule, f"outputs {sorted(tags.outputs)} are declared, but outputs() is not overridden"
        )
    if failure is not None:
        raise kit.fail(rule, f"predict raised {_said(failure)}") from failure
    assert prediction is not None
    half = len(x) // 3
    parts = Prediction.cat([wrapped.predict(x[:half]), wrapped.predict(x[half:])])
    split = _named(parts)
    for name, value in _named(prediction).items():
        if not _close(split[name], value, rtol=1e-5):
            raise kit.fail(
                rule,
                f"output {name!r} of a row depends on the other rows of its batch (predict on "
                f"the whole batch and on two parts differ: {_difference(split[name], value)})",
            )
    return ""


def _parameter_grads(wrapped: WrappedModel) -> dict[str, torch.Tensor | None]:
    """Each parameter's gradient (a copy), by name."""
    return {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in wrapped.named_parameters()
    }


def _changed_grads(
    before: dict[str, torch.Tensor | None], after: dict[str, torch.Tensor | None]
) -> list[str]:
    """The parameters whose gradient ``after`` differs from ``before``."""
    changed = []
    for name, grad in after.items():
        old = before.get(name)
        if (grad is None) != (old is None) or (
            grad is not None and old is not None and not torch.equal(grad, old)
        ):
            changed.append(name)
    return changed


def _check_order(kit: _Kit) -> str:
    rule = "order"
    x = kit_data().test
    checked = []
    for companion in kit.companions():
        name = companion[0]
        pair = [
            kit.fitted(("pair", name, first), companion, first, record=first)
            for first in (True, False)
        ]
        for fitted in pair:
            if fitted.error is not None:
                raise kit.fail(
                    rule, f"beside {name}, wrap and fit raised {_said(fitted.error)}", fitted.error
                )
        a, b = (fitted.wrapped for fitted in pair)
        assert a is not None and b is not None
        if a.plugin_names != b.plugin_names:
            raise kit.fail(
                rule,
                f"listed with {name} in two orders, it acts in the orders "
                f"{a.plugin_names} and {b.plugin_names}",
            )
        difference = _compare_predictions(a.predict(x), b.predict(x))
        if difference:
            raise kit.fail(
                rule,
                f"[{kit.name}, {name}] and [{name}, {kit.name}] give different outputs "
                f"({difference})",
            )
        checked.append(name)
    return f"beside {', '.join(checked)}" if checked else "no companion of another stage"


def _rows_of(sets: Mapping[str, Any], wrapped: WrappedModel) -> dict[bytes, tuple[str, int]]:
    """Each row of the fit data sets' features, by its bytes: as ``fit`` gave them (after
    any feature transform) and as the backbone gives them."""
    rows: dict[bytes, tuple[str, int]] = {}
    for name, feature_set in sets.items():
        features = getattr(feature_set, "features", None)
        if not isinstance(features, torch.Tensor):
            continue
        inputs = kit_data().inputs(name).to(wrapped.device)
        with torch.no_grad():  # in fit's batches, so that the rows match to the bit
            raw = torch.cat(
                [wrapped.backbone(inputs[i : i + 256]) for i in range(0, len(inputs), 256)]
            )
        for table in (features, raw):
            flat = table.detach().cpu().contiguous()
            for index in range(flat.shape[0]):
                rows.setdefault(flat[index].numpy().tobytes(), (name, index))
    return rows


def _fit_observations(
    record: _Record, wrapped: WrappedModel
) -> dict[str, dict[tuple[str, int], Any]]:
    """What the plugin received in fit, by kind and by fit row ``(set, index)``."""
    rows = _rows_of(record.sets, wrapped)
    seen: dict[str, dict[tuple[str, int], Any]] = {}

    def keep(what: str, where: tuple[str, int], value: Any) -> None:
        table = seen.setdefault(what, {})
        per_set = sum(1 for key in table if key[0] == where[0])
        if where not in table and per_set < _ROWS_PER_SET:
            table[where] = value

    for what, cached, out in record.fit_calls:
        if cached.ndim != 2:
            continue
        flat = cached.cpu().contiguous()
        for position in range(flat.shape[0]):
            where = rows.get(flat[position].numpy().tobytes())
            if where is None:
                continue
            if what in ("features", "members") and isinstance(out, torch.Tensor):
                keep(what, where, out[:, position])
            elif what == "head_logits" and isinstance(out, torch.Tensor):
                keep("logits", where, out[position])
            elif what == "predict_features" and isinstance(out, Prediction):
                keep("logits", where, out.logits[position])
                keep("probs", where, out.probs[position])
                for key, value in {**out.scores, **out.outputs}.items():
                    keep(f"output:{key}", where, value[position])
    for name, feature_set in record.sets.items():
        features = getattr(feature_set, "features", None)
        if isinstance(features, torch.Tensor):
            for index in range(min(len(features), _ROWS_PER_SET)):
                keep("data", (name, index), features[index].unsqueeze(0))
    for inputs in record.head_inputs:
        flat = inputs.reshape(-1, inputs.shape[-1]).cpu().contiguous()
        for position in range(flat.shape[0]):
            where = rows.get(flat[position].numpy().tobytes())
            if where is not None:
                keep("head_input", where, flat[position])
    return seen


_MEANING = {
    "data": "the features fit's data holds and those the plugin receives at inference "
    "(features()/members()/context.features/context.backbone_features)",
    "features": "the features (model.features in fit; features()/members()/context.features)",
    "members": "the member logits (model.members in fit; members()'s inner/context.members)",
    "logits": "the logits (model.head_logits or predict_features in fit; transform_logits() "
    "or context.combined/context.logits)",
    "probs": "the probabilities (predict_features in fit; context.probs)",
    "head_input": "the features model.head was given in fit (the rows of a fit set it trained "
    "on) and the features the heads read at inference",
}


#: For each kind of fit-time observation: the inference records it is compared with, and
#: whether it must equal all of them (what the plugin receives) or one (the logits: a
#: plugin reads one of the combined, final or base logits).
_AGAINST = {
    "data": ("features", all),
    "features": ("features", all),
    "members": ("members", all),
    "logits": ("logits", any),
    "probs": ("probs", all),
    "head_input": ("head_input", any),  # any sample of the features the heads read
}
#: Observations whose first axis holds samples (or members), the batch second.
_SAMPLED = ("data", "features", "members", "head_input")


def _mismatch(what: str, value: torch.Tensor, at_inference: list[torch.Tensor]) -> bool:
    """Whether a fit-time value differs from the inference values it is compared with."""
    if what == "head_input":
        return not any(_close(value, row) for row in at_inference[0])
    comparable = [
        c for c in at_inference if what not in _SAMPLED or c.shape[0] == value.shape[0]
    ]  # a sampler's samples against one deterministic row: not the same quantity
    if not comparable:
        return False
    rule = _AGAINST.get(what, (what, all))[1]
    return not rule(_close(value, c) for c in comparable)


def _fit_input_problem(fitted: _Fitted) -> tuple[str | None, int]:
    """Where what the plugin received in fit differs from what it receives at inference,
    and how many values were compared."""
    record, wrapped = fitted.record, fitted.wrapped
    assert record is not None and wrapped is not None and fitted.plugin is not None
    observed = _fit_observations(record, wrapped)
    tags = get_tags(fitted.plugin)
    if tags.changes_head or tags.changes_backbone:
        # Its own fit changes what the view's members and logits are, after it read them.
        observed = {k: v for k, v in observed.items() if k in ("data", "features", "head_input")}
    compared = 0
    by_set: dict[str, list[int]] = {}
    for table in observed.values():
        for name, index in table:
            by_set.setdefault(name, [])
            if index not in by_set[name]:
                by_set[name].append(index)
    for set_name, indices in by_set.items():
        indices.sort()
        x = kit_data().inputs(set_name)[torch.tensor(indices)].to(wrapped.device)
        record.seen, record.read, record.active = {}, set(), True
        try:
            with torch.no_grad():
                wrapped.predict(x)
                record.seen["head_input"] = [wrapped.chain().features(x)]
        finally:
            record.active = False
        for what, table in observed.items():
            candidates = record.seen.get(_AGAINST.get(what, (what, all))[0], [])
            for (name, index), value in table.items():
                if name != set_name or not candidates:
                    continue
                position = indices.index(index)
                at_inference = [
                    c[:, position] if what in _SAMPLED else c[position] for c in candidates
                ]
                compared += 1
                if _mismatch(what, value, at_inference):
                    got = at_inference[0][0] if what == "head_input" else at_inference[0]
                    meaning = _MEANING.get(what, f"the output {what.split(':', 1)[-1]!r}")
                    return (
                        f"{meaning} differ for row {index} of the {set_name!r} set: fit "
                        f"{_summary(value)}, inference {_summary(got)} "
                        f"({_difference(got, value)})"
                    ), compared
    return None, compared


def _cached_problem(wrapped: WrappedModel) -> str | None:
    """Whether predicting from cached backbone features (what ``fit`` and evaluation
    work from) differs from predicting from the inputs. The outputs of a plugin that
    declares ``needs_inputs`` may be absent from cached features (ODIN perturbs the
    inputs themselves); an output that is there must be equal."""
    x = kit_data().test.to(wrapped.device)
    with torch.no_grad():
        from_inputs = wrapped.predict(x)
        from_cache = wrapped.predict_features(wrapped.backbone(x))
    named = _named(from_cache)
    need_inputs = {
        output
        for plugin in wrapped.plugins
        if get_tags(plugin).needs_inputs
        for output in get_tags(plugin).outputs
    }
    for name, value in _named(from_inputs).items():
        if name not in named and name in need_inputs:
            continue
        if name not in named or not _close(named[name], value):
            detail = _difference(named[name], value) if name in named else "missing"
            return (
                f"predict from cached backbone features (what fit and the plugins fitted after "
                f"it see) and predict from the inputs differ in {name!r} ({detail}): a "
                "features() step must do the same with inputs=None (cached features) as with "
                "inputs, or declare tags.needs_inputs"
            )
    return None


def _summary(value: torch.Tensor) -> str:
    if value.is_floating_point() and value.numel():
        return f"{tuple(value.shape)} max {float(value.max()):.3g}"
    return f"{tuple(value.shape)} {value.dtype}"


def _check_fit_inputs(kit: _Kit) -> str:
    rule = "fit_inputs"
    runs: list[tuple[str, _Fitted]] = [("alone", kit.fitted("recorded", record=True))]
    for companion in kit.companions():
        name = companion[0]
        runs.append((f"beside {name}", kit.fitted(("pair", name, True), companion, record=True)))
    compared = []
    for where, fitted in runs:
        if fitted.error is not None:
            raise kit.fail(
                rule, f"{where}, wrap and fit raised {_said(fitted.error)}", fitted.error
            )
        wrapped = fitted.wrapped
        assert wrapped is not None  # a fit that raised nothing made the model
        if any(get_tags(p).needs_inputs for p in wrapped.plugins if p is not fitted.plugin):
            continue  # a backbone sampler: cached features cannot stand in for inputs
        problem, count = _fit_input_problem(fitted)
        problem = _cached_problem(wrapped) or problem
        if problem:
            raise kit.fail(
                rule,
                f"{where}: {problem}. Every plugin must be fitted on what it receives at "
                "inference: read the fit data, the model view fit is given and the "
                "OutputContext as documented (if it does, the core or the companion breaks "
                "the guarantee)",
            )
        compared.append(f"{where} ({count} values)")
    return ", ".join(compared)


def _check_save_load(kit: _Kit) -> str:
    rule = "save_load"
    wrapped = kit.alone()
    x = kit_data().test
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kit.wrapcal"
        try:
            wrapped.save(path)
        except Exception as err:
            raise kit.fail(rule, f"save raised {_said(err)}") from err
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                loaded = load(path, model=kit_data().model())
        except Exception as err:
            raise kit.fail(rule, f"load of a file save wrote raised {_said(err)}") from err
    plugin, again = kit.under_test(wrapped), kit.under_test(loaded)
    if _json(again.get_params()) != _json(plugin.get_params()):
        raise kit.fail(rule, f"parameters {plugin.get_params()} came back as {again.get_params()}")
    if _json(again.get_state()) != _json(plugin.get_state()):
        raise kit.fail(
            rule, f"learned values {plugin.get_state()} came back as {again.get_state()}"
        )
    difference = _compare_predictions(loaded.predict(x), wrapped.predict(x))
    if difference:
        raise kit.fail(
            rule,
            f"the loaded model's outputs differ ({difference}): keep every learned value in a "
            "buffer or in get_state/set_state (a plain attribute is not saved)",
        )
    return ""


def _json(value: Any) -> str:
    """``value`` as a saved file holds it (tuples and lists alike)."""
    return json.dumps(value, sort_keys=True, default=repr)


def _corruptions(plugin: Plugin) -> Iterator[tuple[str, Callable[[], Callable[[], None]]]]:
    """Ways to corrupt one learned value, each returning how to undo it."""
    for name, buffer in plugin.named_buffers():
        if buffer.is_floating_point() and buffer.numel():

            def nan(buffer: torch.Tensor = buffer) -> Callable[[], None]:
                first = (0,) * buffer.ndim
                old = buffer[first].clone()
                with torch.no_grad():
                    buffer[first] = float("nan")
                return lambda: buffer.__setitem__(first, old)

            yield f"a NaN in the learned tensor {name}", nan
            return
    for name, forms in plugin._state_constraints.items():
        for bad in bad_values(forms)[:1]:

            def plain(name: str = name, bad: Any = bad) -> Callable[[], None]:
                old = plugin.__dict__.get(name)
                object.__setattr__(plugin, name, bad)
                return lambda: object.__setattr__(plugin, name, old)

            yield f"the learned value {name}={bad!r}", plain
            return


def _check_save_refuses(kit: _Kit) -> str:
    rule = "save_refuses"
    wrapped = copy.deepcopy(kit.alone())
    plugin = kit.under_test(wrapped)
    for what, corrupt in _corruptions(plugin):
        undo = corrupt()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "corrupt.wrapcal"
            try:
                wrapped.save(path)
            except SavedFileError:
                if path.exists():
                    raise kit.fail(rule, f"with {what}, save refused but left a file") from None
                undo()
                return f"refused {what}"
            except Exception as err:
                raise kit.fail(
                    rule, f"with {what}, save raised {_said(err)}, not a SavedFileError"
                ) from err
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    load(path, model=kit_data().model())
            except SavedFileError as err:
                raise kit.fail(
                    rule, f"with {what}, save wrote a file that load refuses: {err}"
                ) from err
        raise kit.fail(
            rule,
            f"with {what}, save and load both accept the model: validate_state (or the "
            "learned value's constraint) must refuse values fit cannot produce",
        )
    return "nothing learned to corrupt"


def _export_problem(
    outputs: list[torch.Tensor], expected: dict[str, torch.Tensor], tol: float
) -> str | None:
    if len(outputs) != len(expected):
        return f"{len(outputs)} outputs, predict gives {len(expected)}"
    for (name, want), got in zip(expected.items(), outputs, strict=True):
        got = torch.as_tensor(got)
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"{name!r} is {got.dtype} {tuple(got.shape)}, predict's {want.dtype} " + str(
                tuple(want.shape)
            )
        if not _close(got, want, rtol=tol):
            return f"{name!r}: {_difference(got, want)}"
    return None


def _check_export(kit: _Kit) -> str:
    rule = "export"
    if not kit.tags().exportable:
        return "not exportable (tags.exportable is False): nothing to check"
    from wrapcal.export import export
    from wrapcal.export.module import prediction_outputs

    wrapped = kit.alone()
    x = kit_data().test
    shape = tuple(x.shape[1:])  # a plugin that reads no data leaves the input shape unknown
    expected = prediction_outputs(wrapped.predict(x))
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = export(wrapped, Path(tmp) / "kit.pt2", format="torch", input_shape=shape)
            with torch.no_grad():
                got = list(torch.export.load(str(path)).module()(x))
        except Exception as err:
            raise kit.fail(
                rule, f"tags.exportable is True, but the .pt2 export raised {_said(err)}"
            ) from err
        problem = _export_problem(got, expected, 1e-6)
        if problem:
            raise kit.fail(rule, f"the .pt2 export differs from predict: {problem}")
        try:
            import onnxruntime
            import onnxscript  # noqa: F401  (the exporter needs it)
        except ImportError:
            message = (
                f"check_plugin({kit.name!r}): the ONNX export was not checked: onnx, onnxscript "
                "and onnxruntime are not installed (pip install 'wrapcal[export]')"
            )
            warnings.warn(message, UserWarning, stacklevel=3)
            return "the ONNX part was skipped: onnx, onnxscript or onnxruntime is missing"
        try:
            path = export(wrapped, Path(tmp) / "kit.onnx", input_shape=shape)
            session = onnxruntime.InferenceSession(str(path))
            got = [torch.as_tensor(v) for v in session.run(None, {"input": x.numpy()})]
        except Exception as err:
            raise kit.fail(
                rule, f"tags.exportable is True, but the ONNX export raised {_said(err)}"
            ) from err
        problem = _export_problem(got, expected, _ONNX_TOL)
        if problem:
            raise kit.fail(rule, f"the ONNX export differs from predict: {problem}")
        notes.append("pt2 and ONNX")
    return ", ".join(notes)


#: Every rule, in the order :func:`check_plugin` runs them.
RULES: tuple[tuple[str, Callable[[_Kit], str]], ...] = (
    ("parameters", _check_parameters),
    ("tags", _check_tags),
    ("attach", _check_attach),
    ("fit", _check_fit),
    ("outputs", _check_outputs),
    ("order", _check_order),
    ("fit_inputs", _check_fit_inputs),
    ("save_load", _check_save_load),
    ("save_refuses", _check_save_refuses),
    ("export", _check_export),
)


def _run(kit: _Kit, rule: str, check: Callable[[_Kit], str]) -> str:
    try:
        return check(kit)
    except PluginCheckError:
        raise
    except Exception as err:
        raise kit.fail(rule, f"the check raised {_said(err)}") from err


def plugin_checks(plugin: Any, /, **params: Any) -> list[tuple[str, Callable[[], str]]]:
    """``(rule, check)`` for every rule of the contract, to parametrize a test suite.

    The checks share one kit: a model several rules need is fitted once, when the first
    of them runs. Each ``check()`` raises :class:`PluginCheckError` if the plugin breaks
    its rule, and returns a note (what it compared, or why there was nothing to check).

    Args:
        plugin: A registered plugin name, or the plugin's class (any factory).
        **params: The plugin's parameters.

    Returns:
        The pairs, in the order of :data:`RULES`.

    Example::

        @pytest.mark.parametrize(("rule", "check"), plugin_checks("ash"))
        def test_conformance(rule, check):
            check()
    """
    kit = _Kit(plugin, params)
    return [(rule, functools.partial(_run, kit, rule, check)) for rule, check in RULES]


def check_plugin(plugin: Any, /, **params: Any) -> dict[str, str]:
    """Run every rule of the plugin contract on small data; raise at the first it breaks.

    Args:
        plugin: A registered plugin name (``"ash"``), or the plugin's class (any factory
            returning a :class:`~wrapcal.Plugin`).
        **params: The plugin's parameters (small ones make the check fast).

    Returns:
        Each rule's note: what it compared, or why it had nothing to check.

    Raises:
        PluginCheckError: The first rule the plugin breaks, naming the rule, the plugin
            and why (an ``AssertionError``, so pytest shows it as a failure).
        TypeError: ``plugin`` is neither a name nor a factory.
    """
    return {rule: check() for rule, check in plugin_checks(plugin, **params)}
