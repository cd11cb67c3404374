"""Composition proven: every built-in plugin beside every other scores as it does alone,
or differs only where the other plugin's declared purpose is to change what it reads.

How a pair (A, B) is judged:

* What B changes is read from B's tags and the contract methods it overrides, never
  from a list of exceptions (:func:`changes`): ``changes_backbone`` and a
  ``FEATURES``-stage feature step change everything from the model's features on;
  ``changes_head`` the head and every logit; a sampler's feature step the features the
  heads read and everything after; ``members`` the members and everything after;
  ``transform_logits`` the final logits and probabilities.
* What A reads is measured: A alone runs with a context that records which fields of
  :class:`~wrapcal.OutputContext` (and which earlier outputs) its ``outputs`` reads
  (:func:`recorded_reads`). A's fit reads the same inputs (the composition rule this
  file tests), so the inference reads stand for both.
* A's outputs beside B must equal A's alone within ``RTOL``/``ATOL`` (relative to the
  output's scale), unless B changes a field A reads; the final logits likewise unless B
  changes the logits; the core's ``energy``/``max_logit`` (which read the single member)
  and ``msp``/``entropy`` (the final probabilities) likewise. Where a difference is
  allowed the verdict names the input and why B changes it.

Everything is fitted from small synthetic features (``fit_features``) on an identity
backbone, with small parameters, so the ~150 fits take well under a minute.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping
from functools import cache
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from shared_data import requires_shared_data, resnet20_on_features
from torch import nn

import wrapcal
from wrapcal import OutputKind, Plugin, Stage, get_tags
from wrapcal.model import fitting
from wrapcal.model.chain import CORE_OUTPUTS, overrides
from wrapcal.model.split import Split

WIDTH, CLASSES = 16, 4
#: Outputs beside another plugin equal those alone to this tolerance (relative to the
#: output's largest magnitude, at least 1): the same computation on the same inputs
#: gives the same floats; the slack covers a different order of float additions.
RTOL, ATOL = 1e-5, 1e-5

#: Small parameters, only so the whole file runs in seconds; every registered built-in
#: takes part, with its defaults where none are given here.
SMALL: dict[str, dict[str, Any]] = {
    "discrepancy": {"epochs_pretrain": 1, "epochs": 1, "batch_size": 64, "progress": False},
    "mc_dropout": {"samples": 4, "p": 0.2},
    "knn": {"k": 5},
    "label_smoothing": {"alpha": 0.05},
    "vim": {"dim": 8},
    "auto_calibration": {"cv": 2},
    # Sampled heads exercise members() beside every plugin; 8 heads keep it fast.
    "laplace": {"predictive": "samples", "samples": 8},
    "odin": {"temperature": 10.0, "eps": 0.05},
    # Named scores, so its inputs are the same in every pair (by default it combines every
    # OOD score the model has: tests/plugins/test_ood_decision.py).
    "ood": {"scores": ["msp", "entropy"], "max_reference": 200},
}

#: Every field of the context, in the order each depends on the ones before.
FIELDS = (
    "backbone_features",
    "head",
    "base_logits",
    "network",
    "features",
    "members",
    "combined",
    "logits",
    "probs",
)
#: Each field and the ones after it.
_FROM = {name: FIELDS[i:] for i, name in enumerate(FIELDS)}
#: What the core's outputs read.
CORE_READS = {"energy": "members", "max_logit": "members", "msp": "probs", "entropy": "probs"}


# --- data and models ---------------------------------------------------------------------


@cache
def data() -> dict[str, Any]:
    """Non-negative (post-ReLU-like) class blobs, far points and noise, and a head that
    classifies the blobs (nearest class mean as a linear layer)."""
    g = torch.Generator().manual_seed(0)
    means = 3 * torch.rand(CLASSES, WIDTH, generator=g)

    def blobs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, CLASSES, (n,), generator=g)
        return (means[y] + 0.8 * torch.randn(n, WIDTH, generator=g)).relu(), y

    def far(n: int) -> torch.Tensor:
        return (4 * torch.randn(n, WIDTH, generator=g)).relu() + 2 * torch.rand(n, 1, generator=g)

    train, calibration, test = blobs(600), blobs(400), blobs(100)
    return {
        "means": means,
        "train": train,
        "calibration": calibration,
        "unlabeled": torch.cat([blobs(150)[0], far(150)]),
        "queries": torch.cat([test[0], far(50), torch.rand(50, WIDTH, generator=g) * 6]),
    }


def head() -> nn.Linear:
    means = data()["means"]
    layer = nn.Linear(WIDTH, CLASSES)
    with torch.no_grad():
        layer.weight.copy_(means)
        layer.bias.copy_(-0.5 * (means * means).sum(dim=1))
    return layer


def spec(name: str) -> Any:
    return (name, dict(SMALL.get(name, {})))


def wrapped_with(plugins: list[Any], backbone: nn.Module | None = None) -> wrapcal.WrappedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mc_dropout inserts dropout the head never saw
        return wrapcal.wrap(None, split=Split(backbone or nn.Identity(), head()), plugins=plugins)


def fit(wrapped: wrapcal.WrappedModel) -> wrapcal.WrappedModel:
    d = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plugins that do not read a set say so
        return wrapped.fit_features(
            train=d["train"],
            calibration=d["calibration"],
            unlabeled=d["unlabeled"],
            progress=False,
            seed=0,
        )


def builtins() -> list[str]:
    return sorted(name for name, info in wrapcal.plugin_registry().items() if info.builtin)


# --- what B changes (from its declarations), what A reads (measured) -------------------


def changes(name: str, plugin: Plugin) -> dict[str, str]:
    """Field -> why the plugin changes it, from its tags and the methods it overrides."""
    tags = get_tags(plugin)
    out: dict[str, str] = {}

    def mark(fields: tuple[str, ...], why: str) -> None:
        for field in fields:
            out.setdefault(field, f"{name} {why}")

    if tags.changes_backbone:
        mark(FIELDS, "changes the backbone (changes_backbone)")
    if tags.stage is Stage.FEATURES and overrides(plugin, "features"):
        mark(FIELDS, "transforms the model's features (a FEATURES-stage feature step)")
    if tags.changes_head:
        mark(FIELDS[1:], "retrains the head (changes_head)")
    if overrides(plugin, "features"):
        mark(_FROM["features"], "changes the features the heads read (overrides features)")
    if overrides(plugin, "members"):
        mark(_FROM["members"], "changes the members (overrides members)")
    if overrides(plugin, "transform_logits"):
        mark(_FROM["logits"], "calibrates the final logits (overrides transform_logits)")
    return out


class _RecordingOutputs(Mapping):
    def __init__(self, inner: Mapping[str, torch.Tensor], seen: set[str]) -> None:
        self._inner, self._seen = inner, seen

    def __getitem__(self, key: str) -> torch.Tensor:
        # An earlier output counts as what it reads (the core's) or as itself.
        self._seen.add(CORE_READS.get(key, f"output {key}"))
        return self._inner[key]

    def __iter__(self):
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)


class _RecordingContext:
    """Stands in for an OutputContext and records the fields read."""

    def __init__(self, context: Any, seen: set[str]) -> None:
        self._context, self._seen = context, seen

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._context, name)
        if name == "outputs":
            return _RecordingOutputs(value, self._seen)
        self._seen.add(name)
        return value


class _RecordingModel:
    """Stands in for the ModelView ``fit`` gets and records a read of the head: a
    detector that learns from the head at ``fit`` (dice masks its weights, residual
    places its origin with it) reads it, even if ``outputs`` never does."""

    #: ModelView members that run the model's own head.
    HEAD: ClassVar[dict[str, str]] = {"head": "head", "head_logits": "head", "members": "members"}

    def __init__(self, model: Any, seen: set[str]) -> None:
        self._model, self._seen = model, seen

    def __getattr__(self, name: str) -> Any:
        if name in self.HEAD:
            self._seen.add(self.HEAD[name])
        return getattr(self._model, name)


def recorded_reads(plugin: Plugin) -> set[str]:
    """Make ``plugin.outputs`` and ``plugin.fit`` record what they read; return the
    (growing) set."""
    seen: set[str] = set()
    outputs, fit_method = plugin.outputs, plugin.fit
    # An instance attribute wins over the class's method; the chain still sees the
    # class override (it checks the type).
    plugin.outputs = lambda context: outputs(_RecordingContext(context, seen))
    plugin.fit = lambda model, data: fit_method(_RecordingModel(model, seen), data)
    return seen


@cache
def alone(name: str) -> dict[str, Any]:
    wrapped = wrapped_with([spec(name)])
    reads = recorded_reads(wrapped.get_plugin(name))
    fit(wrapped)
    # predict, not predict_features: with the identity backbone the inputs are the
    # features, and a plugin that needs the inputs (odin) gets them.
    pred = wrapped.predict(data()["queries"])
    return {"pred": pred, "reads": reads, "plugin": wrapped.get_plugin(name)}


@cache
def together(a: str, b: str) -> Any:
    return fit(wrapped_with([spec(a), spec(b)])).predict(data()["queries"])


# --- the verdict on one pair ---------------------------------------------------------------


def _value(pred: Any, key: str) -> torch.Tensor | None:
    if key == "logits":
        return pred.logits
    return pred.scores.get(key, pred.outputs.get(key))


def _equal(got: torch.Tensor, want: torch.Tensor) -> bool:
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if not want.is_floating_point():
        return bool(torch.equal(got, want))
    scale = max(1.0, float(want.abs().max()))
    return bool(torch.allclose(got, want, rtol=RTOL, atol=ATOL * scale))


def verdicts(a: str, b: str) -> list[tuple[str, str, str]]:
    """``(output, "equal" | "allowed" | "WRONG", why)`` for A's outputs beside B."""
    first, other = alone(a), alone(b)
    changed = changes(b, other["plugin"])
    pred_alone, pred_pair = first["pred"], together(*sorted((a, b)))
    checks: list[tuple[str, set[str]]] = [
        (k, first["reads"]) for k in get_tags(first["plugin"]).outputs
    ]
    # The final logits: A's contribution to the model, and the model's own.
    checks.append(("logits", {"logits"}))
    checks += [(k, {CORE_READS[k]}) for k in CORE_OUTPUTS if _value(pred_alone, k) is not None]
    out = []
    for key, reads in checks:
        moved = {field: changed[field] for field in reads if field in changed}
        want, got = _value(pred_alone, key), _value(pred_pair, key)
        if got is not None and _equal(got, want):
            out.append((key, "equal", ""))
        elif moved:
            field, why = next(iter(sorted(moved.items())))
            out.append((key, "allowed", f"reads {field}, which {why}"))
        else:
            what = "is missing" if got is None else "differs"
            out.append((key, "WRONG", f"{what} beside {b}, which changes nothing it reads"))
    return out


PAIRS = list(itertools.combinations(builtins(), 2))


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_each_builtin_scores_beside_another_as_alone_unless_its_input_changes(a, b) -> None:
    for first, second in ((a, b), (b, a)):
        wrong = [(k, why) for k, verdict, why in verdicts(first, second) if verdict == "WRONG"]
        assert not wrong, f"{first} beside {second}: {wrong}"


def test_the_verdicts_name_the_input_that_changed() -> None:
    """Spot checks that the pair test allows differences for the documented reason, and
    holds equal what must be."""
    by = {k: (v, why) for k, v, why in verdicts("vim", "label_smoothing")}
    assert by["vim"] == (
        "allowed",
        "reads base_logits, which label_smoothing retrains the head (changes_head)",
    )
    by = {k: (v, why) for k, v, why in verdicts("vim", "mc_dropout")}
    assert by["vim"][0] == "equal"  # the inverted detector
    by = {k: (v, why) for k, v, why in verdicts("knn", "discrepancy")}
    assert by["knn"][0] == "equal"  # the head changed, but knn reads only the features
    by = {k: v for k, v, _ in verdicts("conformal", "temperature")}
    assert by["sets"] in ("allowed", "equal") and by["logits"] == "allowed"
    for detector in ("vim", "knn", "mahalanobis", "abstain", "conformal"):
        by = {k: v for k, v, _ in verdicts(detector, "react")}
        assert set(by.values()) == {"equal"}, (detector, by)


#: The input every detector reads unless its documentation says otherwise.
DETECTOR_INPUT = {"backbone_features", "base_logits", "head", "inputs", "network"}


DETECTORS = [
    name
    for name, info in wrapcal.plugin_registry().items()
    if info.builtin and get_tags(info.factory()).stage is Stage.DETECT
]


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_builtin_detectors_read_the_documented_input(name: str) -> None:
    """A DETECT-stage plugin's outputs read the model's features and its own head, so
    nothing but a change of those moves its score (ViM read the averaged members)."""
    reads = alone(name)["reads"]
    assert reads and reads <= DETECTOR_INPUT, (name, reads)


# --- the cases -----------------------------------------------------------------------


class Probe(Plugin):
    """A TRAIN-stage plugin that retrains the head (a bias shift) and records the largest
    feature it was fitted on and the largest its head reads at inference."""

    def __init__(self) -> None:
        super().__init__()
        self.fit_max: float | None = None
        self.seen_max: list[float] = []

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.TRAIN
        tags.changes_head = True
        tags.fit_requires = {"train": "the probe's statistics"}
        return tags

    def fit(self, model, data):
        features = data.train.features
        self.fit_max = float(model.features(features).max())
        assert self.fit_max == float(features.max())  # the view and the data agree
        with torch.no_grad():
            model.head.bias += 0.1
        return self

    def members(self, features, inner):
        self.seen_max.append(float(features.max()))
        return inner(features)


def test_a_train_plugin_beside_react_reads_at_inference_what_it_was_fitted_on() -> None:
    d = data()
    probe = Probe()
    wrapped = fit(wrapped_with([probe, "react"]))
    probe.seen_max.clear()  # the fit's own predictions (operating points) ran it too
    wrapped.predict_features(d["train"][0])
    assert probe.fit_max == pytest.approx(float(d["train"][0].max()))
    assert probe.seen_max == [probe.fit_max]  # the issue: 2.90 at fit, 0.77 at inference
    # And the model a TRAIN plugin retrains is the same beside react.
    alone_logits = alone("label_smoothing")["pred"].logits
    assert torch.equal(together("label_smoothing", "react").logits, alone_logits)


def test_react_is_a_detector_whose_score_is_not_energy() -> None:
    d = data()
    pred = alone("react")["pred"]
    clip = float(alone("react")["plugin"].clip_)
    q = d["queries"]
    with torch.no_grad():
        want = -torch.logsumexp(head()(q.clamp(max=clip)), dim=-1)
    torch.testing.assert_close(pred.scores["react"], want)
    differs = ~torch.isclose(pred.scores["react"], pred.scores["energy"])
    assert float(differs.float().mean()) > 0.5
    # Beside react, the model and the core's scores are those of the bare model.
    bare = fit(wrapped_with([])).predict_features(q)
    for key in ("energy", "max_logit", "msp", "entropy"):
        assert torch.equal(pred.scores[key], bare.scores[key]), key
    assert torch.equal(pred.logits, bare.logits)
    for other in ("vim", "knn", "mahalanobis"):
        assert torch.equal(
            together(*sorted((other, "react"))).scores[other], alone(other)["pred"].scores[other]
        ), other


class Sampler(nn.Module):
    """A backbone with dropout (sampled by mc_dropout scope='all')."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, WIDTH), nn.ReLU(), nn.Dropout(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_detectors_read_the_deterministic_features_beside_a_backbone_sampler() -> None:
    """MC dropout with scope='all' samples the backbone; vim and knn still read the
    model's features (one more, plain, backbone pass) and score as alone."""
    torch.manual_seed(0)
    backbone = Sampler().eval()
    x = torch.randn(300, 6)
    with torch.no_grad():
        features = backbone(x)
    y = head()(features).argmax(-1)
    scores = {}
    for plugins in (["vim", "knn"], ["vim", "knn", ("mc_dropout", {"samples": 3, "scope": "all"})]):
        wrapped = wrapped_with([spec(p) if isinstance(p, str) else p for p in plugins], backbone)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped.fit_features(train=(features, y), progress=False)
        calls = []
        hook = wrapped.backbone.register_forward_hook(
            lambda m, i, o, calls=calls: calls.append(len(i[0]))
        )
        scores[len(plugins)] = wrapped.predict(x[:40]).scores
        hook.remove()
        assert sum(calls) == (40 if len(plugins) == 2 else 3 * 40 + 40)
    for name in ("vim", "knn"):
        torch.testing.assert_close(scores[3][name], scores[2][name], rtol=1e-6, atol=1e-6)


@requires_shared_data
def test_vim_beside_mc_dropout_scores_as_alone_on_the_resnet20() -> None:
    """The issue's case on real data: ResNet-20 CIFAR-10 features vs Gaussian noise and
    MNIST. Alone ViM's AUROC is ~0.9996 on noise; before this change, beside MC dropout it
    read the averaged member output as logits and fell to ~0.003."""
    from plugins.test_plugin_feature_ood import scenario  # tests/ is on the path
    from sklearn.metrics import roc_auc_score

    s = scenario()

    def auroc(wrapped: wrapcal.WrappedModel, kind: str) -> float:
        inside = wrapped.predict_features(s["test"]).scores["vim"].numpy()
        outside = wrapped.predict_features(s[kind]).scores["vim"].numpy()
        truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
        return float(roc_auc_score(truth, np.r_[inside, outside]))

    def fitted(plugins: list) -> wrapcal.WrappedModel:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = resnet20_on_features(plugins)
        return wrapped.fit(train=(s["train"], s["train_labels"]), progress=False)

    single = fitted(["vim"])
    beside = fitted(["vim", ("mc_dropout", {"samples": 30, "p": 0.2})])
    for kind in ("noise", "MNIST"):
        assert auroc(beside, kind) == pytest.approx(auroc(single, kind), abs=1e-9), kind
    assert auroc(single, "noise") > 0.99


# --- the general mechanism: FEATURES-stage transforms ---------------------------------------


class Shape(Plugin):
    """A third party's FEATURES-stage transform (ASH-like): keep each row's top half."""

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.FEATURES
        tags.requires_fit = False
        return tags

    def features(self, inputs, inner):
        f = inner(inputs)
        kept = f >= f.median(dim=-1, keepdim=True).values
        return f * kept * 2


def shaped(features: torch.Tensor) -> torch.Tensor:
    kept = features >= features.median(dim=-1, keepdim=True).values
    return features * kept * 2


def test_a_features_stage_transform_is_fitted_first_and_every_head_trains_on_its_output():
    d = data()
    probe = Probe()
    wrapped = fit(wrapped_with([probe, Shape(), spec("vim"), spec("label_smoothing")]))
    assert wrapped.plugin_names[0] == "Shape"  # the first stage, whatever the list order
    probe.seen_max.clear()
    wrapped.predict_features(d["train"][0])
    assert probe.fit_max == pytest.approx(float(shaped(d["train"][0]).max()))
    assert probe.seen_max == [probe.fit_max]
    # Label smoothing retrained the head on the shaped features: the same head as one
    # retrained on features shaped beforehand, without the transform in the model.
    ref = wrapped_with([Probe(), spec("vim"), spec("label_smoothing")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.fit_features(
            train=(shaped(d["train"][0]), d["train"][1]),
            calibration=(shaped(d["calibration"][0]), d["calibration"][1]),
            progress=False,
        )
    torch.testing.assert_close(wrapped.head.weight, ref.head.weight)
    q = d["queries"]
    got, want = wrapped.predict_features(q), ref.predict_features(shaped(q))
    torch.testing.assert_close(got.logits, want.logits)
    # vim reads the model's features: the shaped ones, at fit and at inference.
    torch.testing.assert_close(got.scores["vim"], want.scores["vim"])


def test_compositions_that_cannot_keep_the_rule_are_refused_before_fitting() -> None:
    class Peeker(Shape):
        def __wrapcal_tags__(self):
            tags = super().__wrapcal_tags__()
            tags.requires_fit = True
            tags.fit_reads = ("train",)
            return tags

        def fit(self, model, data):
            model.members(data.train.features)
            return self

    with pytest.raises(
        ValueError,
        match=r"plugin Peeker is a FEATURES-stage plugin.*cannot "
        "read logits",
    ):
        fit(wrapped_with([Peeker()]))

    class LateHead(Plugin):
        def __wrapcal_tags__(self):
            tags = super().__wrapcal_tags__()
            tags.stage = Stage.CALIBRATE
            tags.changes_head = True
            tags.requires_fit = False
            return tags

    with pytest.raises(ValueError, match=r"LateHead changes the head at stage CALIBRATE.*TRAIN"):
        fit(wrapped_with([LateHead()]))

    class Tuner(LateHead):
        def __wrapcal_tags__(self):
            tags = super().__wrapcal_tags__()
            tags.stage = Stage.TRAIN
            tags.changes_backbone = True
            return tags

    with pytest.raises(
        ValueError,
        match=r"Tuner fine-tunes the backbone.*past the "
        r"FEATURES-stage plugin Shape",
    ):
        fit(wrapped_with([Tuner(), Shape()]))


# --- output kinds ------------------------------------------------------------------------


def _declaring(kind: OutputKind, value):
    class Declares(Plugin):
        def __wrapcal_tags__(self):
            tags = super().__wrapcal_tags__()
            tags.stage = Stage.DECIDE
            tags.requires_fit = False
            tags.outputs = {"out": kind}
            return tags

        def outputs(self, context):
            return {"out": value(context)}

    return Declares()


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        (
            OutputKind.SET,
            lambda c: c.probs,
            r"Declares: output 'out' is declared OutputKind.SET, "
            r"so it must be a bool tensor \[B, K\] = \[8, 4\].*got a float32 tensor \(8, 4\)",
        ),
        (
            OutputKind.SET,
            lambda c: c.probs[:, :2] > 0.1,
            r"\[B, K\] = \[8, 4\].*bool tensor \(8, 2\)",
        ),
        (
            OutputKind.DECISION,
            lambda c: c.probs[:, 0],
            r"Declares: output 'out' is declared "
            r"OutputKind.DECISION, so it must be a bool tensor \[B\] = \[8\]; got a float32",
        ),
        (
            OutputKind.OOD_SCORE,
            lambda c: c.probs[:, 0] > 0.5,
            r"score 'out' must be a float "
            r"tensor \[B\] \(declared OutputKind.OOD_SCORE\); got a bool tensor",
        ),
    ],
)
def test_outputs_must_be_of_their_declared_kind(kind, value, message) -> None:
    wrapped = wrapped_with([_declaring(kind, value)])
    with pytest.raises(ValueError, match=message):
        wrapped.predict_features(data()["queries"][:8])


def test_outputs_of_their_declared_kind_pass() -> None:
    sets = _declaring(OutputKind.SET, lambda c: c.probs > 0.2)
    pred = wrapped_with([sets]).predict_features(data()["queries"][:8])
    assert pred.outputs["out"].shape == (8, CLASSES)


def test_a_features_stage_plugin_must_not_sample() -> None:
    class Twice(Shape):
        def features(self, inputs, inner):
            f = inner(inputs)
            return torch.cat([f, f])

    with pytest.raises(ValueError, match=r"Twice: a FEATURES-stage plugin must return one set"):
        wrapped_with([Twice()]).predict_features(data()["queries"][:8])


def test_a_features_stage_transform_with_the_features_on_disk(tmp_path, monkeypatch) -> None:
    """Fit sets cached on disk go through the transform chunk by chunk into a scratch
    folder that the fit removes; the model equals one fitted in memory."""
    written = []
    to_disk = fitting._to_disk
    monkeypatch.setattr(fitting, "_to_disk", lambda *a: written.append(a[1]) or to_disk(*a))
    d = data()
    sets = {"train": d["train"], "calibration": d["calibration"], "progress": False}

    def model() -> wrapcal.WrappedModel:
        return wrapped_with([Shape(), spec("vim"), spec("label_smoothing")])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_disk = model().fit(**sets, cache_dir=tmp_path / "cache")
        in_memory = model().fit(**sets, cache=False)
    assert len(written) == 2  # train and calibration, from their disk cache
    owned = tmp_path / "cache" / "wrapcal-features-v2"
    entries = sorted(p.name for p in owned.iterdir() if p.is_dir())
    assert len(entries) == 2 and not any(name.startswith("tmp") for name in entries), entries
    q = d["queries"]
    got, want = on_disk.predict_features(q), in_memory.predict_features(q)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.scores["vim"], want.scores["vim"])


def test_operating_points_are_measured_on_the_model_features() -> None:
    """With only FEATURES-stage plugins, the operating points are those of the shaped
    model too (measured on calibration features through the transform)."""

    class Reading(Shape):
        def __wrapcal_tags__(self):
            tags = super().__wrapcal_tags__()
            tags.fit_reads = ("calibration",)
            return tags

    class Passing(Reading):
        def features(self, inputs, inner):
            return inner(inputs)

    d = data()
    x, y = d["calibration"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = wrapped_with([Reading()]).fit_features(calibration=(x, y), progress=False)
        want = wrapped_with([Passing()]).fit_features(calibration=(shaped(x), y), progress=False)
        plain = wrapped_with([Passing()]).fit_features(calibration=(x, y), progress=False)
    assert got.operating_points == want.operating_points
    assert got.operating_points != plain.operating_points  # the transform matters here


# --- the model's features are decided from the tags, not from what a sampler passes ---------


class DropoutSampler(Plugin):
    """A third party's sampler: calls ``inner(inputs)`` three times with the backbone's
    dropout switched on (train mode, the global generator), as a naive MC dropout would.
    ``declares`` says whether its tags declare ``needs_inputs``."""

    def __init__(self, declares: bool = True) -> None:
        super().__init__()
        self.declares = declares
        self.samples: list[torch.Tensor] = []

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.SAMPLE
        tags.requires_fit = False
        tags.needs_inputs = self.declares
        return tags

    def attach(self, model) -> None:
        self.dropouts = [m for m in model.backbone.modules() if isinstance(m, nn.Dropout)]

    def features(self, inputs, inner):
        if inputs is None:
            return inner(None)
        for module in self.dropouts:
            module.train()
        try:
            self.samples = [inner(inputs) for _ in range(3)]
        finally:
            for module in self.dropouts:
                module.eval()
        return torch.cat(self.samples)


@pytest.mark.parametrize("declares", [True, False], ids=["needs_inputs", "undeclared"])
def test_detectors_beside_a_sampler_that_calls_inner_with_dropout_on_score_as_alone(
    declares: bool,
) -> None:
    """Before, the first ``inner(inputs)`` call was taken for the model's features: knn
    read a dropout sample at inference (fitted on deterministic features) and scored
    unlike alone. With ``needs_inputs`` the sampler samples and knn reads one more plain
    pass; without it the model's features are computed once, and its ``inner`` returns
    them (it declared that cached features stand in for inputs)."""
    torch.manual_seed(0)
    backbone = Sampler().eval()
    x = torch.randn(300, 6)
    with torch.no_grad():
        features = backbone(x)
    y = head()(features).argmax(-1)
    scores = {}
    for with_sampler in (False, True):
        sampler = DropoutSampler(declares)
        plugins = [spec("knn"), sampler] if with_sampler else [spec("knn")]
        wrapped = wrapped_with(plugins, backbone)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped.fit_features(train=(features, y), progress=False)
        scores[with_sampler] = wrapped.predict(x[:40]).scores["knn"]
    torch.testing.assert_close(scores[True], scores[False], rtol=1e-6, atol=1e-6)
    first, *others = sampler.samples
    drawn = any(not torch.equal(first, other) for other in others)
    # Declared, it samples the backbone; undeclared, it gets the model's features.
    assert drawn is declares
    if not declares:
        torch.testing.assert_close(first[0], features[:40])


def test_a_model_without_samplers_runs_its_head_once_per_batch() -> None:
    """base_logits reuse the one member when no plugin changes the features the heads
    read nor the members: the same rows through the same head, bit for bit."""
    wrapped = fit(wrapped_with([spec("vim")]))
    calls: list[int] = []
    hook = wrapped.head.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    q = data()["queries"]
    pred = wrapped.predict_features(q)
    hook.remove()
    assert calls == [len(q)]
    torch.testing.assert_close(pred.scores["vim"], alone("vim")["pred"].scores["vim"])


# --- composition rules about heads and streamed data ---------------------------------------


def test_a_head_change_after_the_discrepancy_heads_is_refused() -> None:
    """mc_dropout(finetune=True) at SAMPLE would retrain the head that discrepancy (HEADS)
    trained its second head beside."""
    finetuned = ("mc_dropout", {**SMALL["mc_dropout"], "finetune": True, "epochs": 1})
    wrapped = wrapped_with([spec("discrepancy"), finetuned])
    with pytest.raises(
        ValueError,
        match=r"plugin mc_dropout changes the head at stage SAMPLE, after plugin discrepancy "
        r"\(stage HEADS\).*Fit the model with mc_dropout alone first",
    ):
        fit(wrapped)
    # What stays allowed: a retrained head before the discrepancy heads, a retraining
    # sampler beside a retraining TRAIN plugin, and plain MC dropout around the heads.
    for plugins in (
        [spec("label_smoothing"), spec("discrepancy")],
        [spec("label_smoothing"), finetuned],
        [spec("discrepancy"), spec("mc_dropout")],
    ):
        fitting.check_composition(wrapped_with(plugins))


def test_a_plugin_streaming_data_beside_a_features_transform_is_refused() -> None:
    """Streaming inputs through the backbone (to train the head on them) bypasses the
    transform, even when the backbone's weights do not change."""

    class Streamer(Plugin):
        def __wrapcal_tags__(self):
            tags = super().__wrapcal_tags__()
            tags.stage = Stage.TRAIN
            tags.streams_data = True
            tags.changes_head = True
            tags.requires_fit = False
            return tags

    with pytest.raises(
        ValueError,
        match=r"Streamer trains on inputs streamed through the backbone \(streams_data\), "
        r"past the FEATURES-stage plugin Shape",
    ):
        fitting.check_composition(wrapped_with([Streamer(), Shape()]))
    fitting.check_composition(wrapped_with([Streamer()]))


def test_the_features_stage_pass_of_fit_runs_inside_distributed_agree(monkeypatch) -> None:
    """So a rank failing there fails every rank, instead of leaving them waiting."""
    steps: list[str] = []
    agree = fitting.distributed.agree

    def recording(step, what):
        steps.append(what)
        return agree(step, what)

    monkeypatch.setattr(fitting.distributed, "agree", recording)
    fit(wrapped_with([Shape(), spec("vim")]))
    assert "passing the fit data through the FEATURES stage" in steps
    assert steps.index("passing the fit data through the FEATURES stage") < steps.index(
        "fitting plugin vim"
    )


def test_the_features_stage_scratch_on_disk_is_a_partial_folder_the_cache_cleans(
    tmp_path, monkeypatch
) -> None:
    """The scratch copy is named as the disk cache's own partial entries: removed at the
    end of the fit, and by the cache when a killed run left it behind."""
    import os

    from wrapcal.features.disk_store import DiskCache

    folders = []
    to_disk = fitting._to_disk

    def recording(*args):
        out = to_disk(*args)
        folders.append(out.path.parent)
        assert out.path.exists()
        return out

    monkeypatch.setattr(fitting, "_to_disk", recording)
    d = data()
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped_with([Shape(), spec("vim")]).fit(train=d["train"], progress=False, cache_dir=cache)
    assert len(folders) == 1 and folders[0].parent == cache / "wrapcal-features-v2"
    assert f".partial-{os.getpid()}-" in folders[0].name
    assert not folders[0].exists()  # the fit removed it
    # A killed run's leftover (its writer's process gone) is removed by the cache.
    left = (
        cache / "wrapcal-features-v2" / folders[0].name.replace(f"-{os.getpid()}-", "-999999999-")
    )
    left.mkdir()
    (left / "features.bin").write_bytes(b"\0" * 64)
    DiskCache(cache)
    assert not left.exists()


def test_vim_keeps_its_learned_values_on_the_model_device(monkeypatch) -> None:
    """alpha_ is created on the model's device, beside origin_ and the basis (a CUDA model
    then works unchanged); here a stand-in device that is not the CPU."""
    from wrapcal.model.chain import PrefixView

    monkeypatch.setattr(PrefixView, "device", property(lambda self: torch.device("meta")))
    d = data()
    wrapped = wrapped_with([spec("vim")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped.fit_features(train=d["train"], progress=False)
    assert wrapped.get_plugin("vim").alpha_.device == torch.device("meta")
