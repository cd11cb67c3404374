"""The conformance kit: every built-in plugin passes ``check_plugin``, and each rule catches
a plugin that breaks it.

The broken plugins are one-line changes of a correct one (``NormScore``, a small detector
with a parameter, a learned buffer, a score and an export), so that each fails its own
rule and passes the rules before it: ``check_plugin`` must name that rule.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from helpers import sample_plugin_installed

import wrapcal
from wrapcal.model import discovery
from wrapcal.plugin import (
    Interval,
    Options,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    create_plugin,
    hookimpl,
)
from wrapcal.testing import RULES, PluginCheckError, bad_values, check_plugin, plugin_checks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: Small parameters for the plugins that train (a few seconds each in the kit).
SMALL: dict[str, dict[str, Any]] = {
    "discrepancy": {"epochs_pretrain": 1, "epochs": 2},
    "label_smoothing": {"alpha": 0.05, "max_iter": 100},
    "mc_dropout": {"samples": 8, "finetune": True, "epochs": 2},
    "auto_calibration": {"cv": 2},
    "dirichlet": {"cv": 2},
    "matrix_scaling": {"cv": 2},
}
SLOW = {"discrepancy", "label_smoothing", "mc_dropout"}
#: Built-ins that break a rule today, with why; each is an xfail (strict: it must fail,
#: so that the marker goes once the plugin is fixed).
KNOWN: dict[str, str] = {}


def builtin_names() -> list[str]:
    return sorted(name for name, info in discovery.plugin_registry().items() if info.builtin)


def builtin_cases() -> Iterator[Any]:
    for name in builtin_names():
        marks = [pytest.mark.slow] if name in SLOW else []
        if name in KNOWN:
            marks.append(
                pytest.mark.xfail(reason=KNOWN[name], raises=PluginCheckError, strict=True)
            )
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(builtin_cases()))
def test_every_builtin_plugin_passes_check_plugin(name: str) -> None:
    # Every rule but the export, which tests/export/test_export_onnx.py runs for every
    # built-in on two real models (the kit's two exports per plugin cost a minute of the
    # suite's budget); the rule itself is checked on NormScore and the sample package.
    notes = {
        rule: check()
        for rule, check in plugin_checks(name, **SMALL.get(name, {}))
        if rule != "export"
    }
    assert list(notes) == [rule for rule, _ in RULES if rule != "export"]
    tags = wrapcal.get_tags(create_plugin(name, SMALL.get(name)))
    # Beside a plugin of every other stage among the kit's companions, and compared.
    expected = {"FEATURES": "kit_clip", "SAMPLE": "mc_dropout", "DETECT": "knn"}
    expected |= {"CALIBRATE": "temperature", "DECIDE": "conformal"}
    for other_stage, companion in expected.items():
        if tags.stage.name != other_stage and companion != name:
            assert f"beside {companion} (" in notes["fit_inputs"], notes["fit_inputs"]
            assert companion in notes["order"], notes["order"]
    assert notes["fit_inputs"].startswith("alone (")
    if tags.requires_fit:
        assert notes["save_refuses"].startswith("refused ")
    else:  # learns nothing (gradnorm, gen: closed forms of the features and logits)
        assert notes["save_refuses"] == "nothing learned to corrupt"


# --- a correct plugin, and one broken variant per rule ----------------------------------------


class NormScore(Plugin):
    """A detector: the features' norm over its mean on the training set, to a power."""

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "power": [Interval(float, 0, 10, closed="neither")],
        "mode": [Options(str, ("l2", "l1"))],
    }

    def __init__(self, power: float = 1.0, mode: str = "l2") -> None:
        super().__init__()
        self.power = power
        self.mode = mode
        self.register_buffer("scale_", torch.ones((), dtype=torch.float64))

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.fit_requires = {"train": "the mean norm of in-distribution features"}
        tags.outputs = {"norm": OutputKind.OOD_SCORE}
        tags.exportable = True
        return tags

    def norms(self, features: torch.Tensor) -> torch.Tensor:
        return features.norm(p=2 if self.mode == "l2" else 1, dim=-1)

    def fit(self, model: Any, data: Any) -> NormScore:
        train = data.require("train", "norm_score")
        self.scale_ = self.norms(train.features).double().mean().reshape(())
        return self

    def score(self, context: Any) -> torch.Tensor:
        norms = self.norms(context.features.mean(dim=0)).double()
        return (norms / self.scale_) ** float(self.power)

    def outputs(self, context: Any) -> dict[str, torch.Tensor]:
        return {"norm": self.score(context).to(context.probs.dtype)}

    def validate_state(self) -> None:
        super().validate_state()
        if not float(self.scale_) > 0:
            raise ValueError(f"scale_ is {float(self.scale_)}; it must be > 0")


class NoConstraint(NormScore):
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {"mode": [Options(str, ("l2", "l1"))]}


class MisspeltConstraint(NormScore):
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **NormScore._parameter_constraints,
        "powr": [Interval(float, 0, 10)],
    }


class ConvertsParameters(NormScore):
    def __init__(self, power: float = 1.0, mode: str = "l2") -> None:
        super().__init__(float(power), mode)  # "1" becomes 1.0: never checked


class RefusesSilently(NormScore):
    def __init__(self, power: float = 1.0, mode: str = "l2") -> None:
        if not isinstance(power, float) or not 0 < power < 10:
            raise ValueError("bad value")  # names nothing
        super().__init__(power, mode)


class MisspeltAfter(NormScore):
    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.after = ("mahalanobiss",)
        return tags


class ReadsAnOption(NormScore):
    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.fit_reads = ("seed",)  # wrapped.fit(seed=...) is fit's own option
        return tags


class AttachDiffers(NormScore):
    built = 0

    def attach(self, model: Any) -> None:
        AttachDiffers.built += 1
        self.register_buffer("projection", torch.zeros(AttachDiffers.built))


class FitAddsABuffer(NormScore):
    def fit(self, model: Any, data: Any) -> NormScore:
        super().fit(model, data)
        self.register_buffer("extra_", torch.ones(3))
        return self


class FitReturnsNone(NormScore):
    def fit(self, model: Any, data: Any) -> Any:
        super().fit(model, data)
        return None


class NeedsFitButSaysNot(NormScore):
    def __init__(self, power: float = 1.0, mode: str = "l2") -> None:
        Plugin.__init__(self)  # no scale_ until fit sets it
        self.power = power
        self.mode = mode

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.requires_fit = False
        return tags


class Unseeded(NormScore):
    def fit(self, model: Any, data: Any) -> NormScore:
        super().fit(model, data)
        self.scale_ = self.scale_ * (1 + torch.rand((), dtype=torch.float64))
        return self


class UndeclaredOutput(NormScore):
    def outputs(self, context: Any) -> dict[str, torch.Tensor]:
        return {**super().outputs(context), "norm_squared": self.score(context) ** 2}


class FloatSet(NormScore):
    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.outputs = {**tags.outputs, "likely": OutputKind.SET}
        return tags

    def outputs(self, context: Any) -> dict[str, torch.Tensor]:
        return {**super().outputs(context), "likely": context.probs}  # floats, not a mask


class MissingOutput(NormScore):
    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.outputs = {**tags.outputs, "reject": OutputKind.DECISION}
        return tags


class BatchDependent(NormScore):
    def outputs(self, context: Any) -> dict[str, torch.Tensor]:
        score = self.score(context)
        return {"norm": (score - score.mean()).to(context.probs.dtype)}


class CountsInstances(NormScore):
    made = 0

    def __init__(self, power: float = 1.0, mode: str = "l2") -> None:
        super().__init__(power, mode)
        CountsInstances.made += 1
        self.offset = CountsInstances.made  # global state: the second model differs

    def outputs(self, context: Any) -> dict[str, torch.Tensor]:
        return {"norm": (self.score(context) + self.offset).to(context.probs.dtype)}


class TransformsOnlyInputs(Plugin):
    """A feature transform that forgets cached features: fit sees other features."""

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.FEATURES
        tags.requires_fit = False
        tags.exportable = True
        return tags

    def features(self, inputs: Any, inner: Any) -> torch.Tensor:
        features = inner(inputs)
        return features if inputs is None else features * 0.5


class PlainAttribute(NormScore):
    def fit(self, model: Any, data: Any) -> NormScore:
        super().fit(model, data)
        self.mean_norm = float(self.scale_)  # neither a buffer nor declared state: not saved
        self.scale_ = torch.ones((), dtype=torch.float64)
        return self

    def score(self, context: Any) -> torch.Tensor:
        norms = self.norms(context.features.mean(dim=0)).double()
        return (norms / getattr(self, "mean_norm", 1.0)) ** float(self.power)


class AcceptsAnyState(NormScore):
    def validate_state(self) -> None:
        pass  # a NaN scale_ loads, and scores NaN


class ExportDiffers(NormScore):
    def outputs(self, context: Any) -> dict[str, torch.Tensor]:
        score = self.score(context)
        if torch.compiler.is_exporting():
            score = score + 1
        return {"norm": score.to(context.probs.dtype)}


TEST_PLUGINS = [
    NormScore,
    NoConstraint,
    MisspeltConstraint,
    ConvertsParameters,
    RefusesSilently,
    MisspeltAfter,
    ReadsAnOption,
    AttachDiffers,
    FitAddsABuffer,
    FitReturnsNone,
    NeedsFitButSaysNot,
    Unseeded,
    UndeclaredOutput,
    FloatSet,
    MissingOutput,
    BatchDependent,
    CountsInstances,
    TransformsOnlyInputs,
    PlainAttribute,
    AcceptsAnyState,
    ExportDiffers,
]


class _Registration:
    """Registers the test plugins by hand, as a package's entry point would."""

    @hookimpl
    def wrapcal_register_plugins(self, register: Any) -> None:
        for plugin in TEST_PLUGINS:
            register(f"conformance_{plugin.__name__.lower()}", plugin)


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    """Each test runs with the test plugins registered (a test that rebuilds the plugin
    manager, as installing the sample package does, leaves the next one unaffected)."""
    manager = discovery.get_plugin_manager()
    registration = _Registration()
    manager.register(registration, name="conformance-test-plugins")
    try:
        yield
    finally:
        manager.unregister(registration)


@pytest.mark.parametrize(("rule", "check"), plugin_checks(NormScore), ids=[r for r, _ in RULES])
def test_a_correct_plugin_passes_every_rule_one_test_each(rule: str, check: Any) -> None:
    note = check()
    if rule == "save_refuses":
        assert note == "refused a NaN in the learned tensor scale_"
    if rule == "export":
        assert note == "pt2 and ONNX"


@pytest.mark.parametrize(
    ("plugin", "rule", "message"),
    [
        (NoConstraint, "parameters", "power has no constraint"),
        (MisspeltConstraint, "parameters", "'powr', which is not a parameter"),
        (ConvertsParameters, "parameters", r"power='1' is accepted, though its constraints"),
        (RefusesSilently, "parameters", "does not name the parameter"),
        (MisspeltAfter, "tags", "names 'mahalanobiss', which no installed plugin has"),
        (ReadsAnOption, "tags", "data set 'seed' is not a name wrapped.fit can take"),
        (AttachDiffers, "attach", "two wraps built different modules"),
        (FitAddsABuffer, "attach", "extra_: fit adds it"),
        (FitReturnsNone, "fit", "fit returned NoneType None, not self"),
        (NeedsFitButSaysNot, "fit", "requires_fit is False, but predict before fit raised"),
        (Unseeded, "fit", "two fits from scratch"),
        (UndeclaredOutput, "outputs", r"outputs \['norm_squared'\] are not declared"),
        (FloatSet, "outputs", r"'likely' \(set\) is torch.float32 \(60, 4\); it must be a bool"),
        (MissingOutput, "outputs", "declared output 'reject' is not produced"),
        (BatchDependent, "outputs", "depends on the other rows of its batch"),
        (TransformsOnlyInputs, "fit_inputs", "predict from cached backbone features"),
        (PlainAttribute, "save_load", "the loaded model's outputs differ"),
        (AcceptsAnyState, "save_refuses", "save and load both accept the model"),
        (ExportDiffers, "export", "the .pt2 export differs from predict: 'norm'"),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else "",
)
def test_check_plugin_names_the_rule_a_broken_plugin_breaks(plugin, rule, message) -> None:
    with pytest.raises(PluginCheckError, match=message) as caught:
        check_plugin(plugin)
    assert caught.value.rule == rule  # and every rule before it passed
    assert caught.value.plugin == plugin.__name__
    assert str(caught.value).startswith(f"plugin {plugin.__name__} breaks the rule {rule!r}: ")


def test_order_catches_outputs_that_depend_on_more_than_the_plugins() -> None:
    """The core orders plugins by stage and name, so only hidden state (here a count of
    instances) can make [plugin, other] and [other, plugin] differ."""
    order = dict(plugin_checks(CountsInstances))["order"]
    with pytest.raises(PluginCheckError, match=r"\[CountsInstances, kit_clip\] and \[kit_clip"):
        order()


def test_fit_inputs_catches_a_plugin_fitted_on_features_it_does_not_get(monkeypatch) -> None:
    """The issue's composition bug, put back: fit data that skips the feature transforms
    (0.2.0 fitted every plugin on the backbone's features, ReAct clipped them only at
    inference). A detector beside a feature transform then fits on other features."""
    monkeypatch.setattr(
        "wrapcal.model.fitting.through_features_stage", lambda chain, data, *args, **kw: data
    )
    fit_inputs = dict(plugin_checks(NormScore))["fit_inputs"]
    with pytest.raises(PluginCheckError, match="beside kit_clip: the features fit's data holds"):
        fit_inputs()


def test_export_without_onnx_checks_the_pt2_and_says_so(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails: not installed
    export = dict(plugin_checks(NormScore))["export"]
    with pytest.warns(UserWarning, match="the ONNX export was not checked"):
        note = export()
    assert note.startswith("the ONNX part was skipped")


def test_the_sample_third_party_package_passes(tmp_path) -> None:
    with sample_plugin_installed(tmp_path):
        notes = check_plugin("sample_vector_scaling", max_iter=50)
        assert notes["save_refuses"] == "refused a NaN in the learned tensor scale_"
        notes = check_plugin("mahalanobis_sample")
        assert notes["export"].startswith("not exportable")


def test_an_instance_or_a_non_plugin_is_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"not an instance.*check_plugin\(NormScore, \*\*params\)"):
        check_plugin(NormScore())
    with pytest.raises(PluginCheckError, match="the factory returned a int"):
        check_plugin(lambda: 3)


def test_bad_values_are_derived_from_the_constraints() -> None:
    interval = bad_values([Interval(int, 1, 10)])
    assert {0, 11} <= set(interval) and 2.5 in interval
    assert bad_values([Interval(float, 0, 1, closed="neither")])[:5] == [-1.0, 2.0, "1", 0.0, 1.0]
    assert "not-an-option" in bad_values([Options(str, ("a", "b"))])
    assert None not in bad_values([None, Interval(float, 0, None)])
    assert all(not isinstance(v, bool) for v in bad_values([bool]))


def test_the_plugin_guides_example_passes_and_its_error_example_is_real() -> None:
    """docs/plugins.md's complete plugin keeps the contract, and the error the guide
    shows is the one the kit gives for an output of the wrong shape."""
    guide = (Path(__file__).parents[2] / "docs" / "plugins.md").read_text()
    source = next(b for b in re.findall(r"```python\n(.*?)```", guide, re.S) if "class " in b)
    namespace: dict[str, Any] = {}
    exec(compile(source, "docs/plugins.md", "exec"), namespace)
    example = namespace["ClassMeanDistance"]
    package = types.SimpleNamespace(wrapcal_register_plugins=namespace["wrapcal_register_plugins"])
    manager = discovery.get_plugin_manager()
    manager.register(package, name="the-guides-example")  # as its entry point would
    try:
        notes = check_plugin("class_distance")
    finally:
        manager.unregister(package)
    assert notes["export"] == "pt2 and ONNX"

    class WrongShape(example):
        def outputs(self, context: Any) -> dict[str, torch.Tensor]:
            gaps = context.backbone_features[:, None, :] - self.means_[None]
            return {"class_distance": gaps.norm(dim=-1)}  # [B, K]: every class, not the nearest

    WrongShape.__name__ = "ClassMeanDistance"
    shown = re.search(r"PluginCheckError: (plugin .*?)\n```", guide, re.S)
    assert shown is not None
    with pytest.raises(PluginCheckError) as caught:
        check_plugin(WrongShape)
    assert str(caught.value) == " ".join(shown.group(1).split())
