"""ONNX Runtime runs an exported model and gives ``wrapped.predict``'s outputs.

Two real models: timm's resnet18 (random weights, seed 0, 10 classes) and the shared
pretrained ResNet-20, each with every plugin of ``wrapcal.plugin_registry()`` alone, with
every stage together (``stages``: every plugin, temperature the only calibrator) and with
every plugin together (``all``), fitted from cached features of real CIFAR-10 images; the
export runs on 256 other CIFAR-10 test images.

What "equal" means here. The graph computes what ``predict`` computes, but ONNX Runtime's
kernels (MLAS) round differently from PyTorch's (oneDNN): the ResNet-20 features differ
by up to 2.1e-6 (on values up to 4.7), about what PyTorch itself changes when it runs the
backbone channels-last (1.4e-6). Every float output must be within 1e-5 of the output's
scale (``|ort - predict| <= 1e-5 max(1, max |predict|)``, the max over the batch: a
score that is a difference of larger terms, as ``vim``, or a large one, as a squared
Mahalanobis distance, carries their rounding), every integer and boolean output exactly,
on every row.

Some models magnify rounding on some rows: those with ``knn`` (``sqrt(2 - 2 cos)`` is
steep where features nearly coincide, as the random resnet18's do), ``histogram_binning``
(a step map jumps at its edges), ``isotonic`` (steep segments, then a log), or several
calibrators stacked (``all``: eight maps in a row, steps among them; on the random
resnet18, whose calibrated probabilities nearly tie, even the predicted class moves).
For them the bound is the model's own sensitivity: predict on its backbone features
times ``1 + 1e-6 noise`` (rounding-sized, seeded) moves each output on some rows, and
ONNX Runtime may move it on at most twice as many, plus :data:`FEW_ROWS`. Every figure
is printed with ``pytest -s``.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from shared_data import (
    cifar10,
    mnist_ood,
    pretrained_resnet20,
    requires_shared_data,
    resnet20_outputs,
)

import wrapcal
from wrapcal import Stage, get_tags
from wrapcal.export import export
from wrapcal.export.module import prediction_outputs

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = [requires_shared_data, pytest.mark.filterwarnings("ignore::UserWarning")]

TOL = 1e-5
#: Rows (of 256) a sensitive model may move beyond twice its own sensitivity.
FEW_ROWS = 4
#: Relative noise on the backbone features that measures a model's own sensitivity.
NOISE = 1e-6
#: Plugins whose math magnifies rounding on some rows, and why.
ILL_CONDITIONED = {
    "knn": "sqrt(2 - 2 cos) is steep where cos is near 1",
    "histogram_binning": "a step map jumps at its bin edges",
    "isotonic": "steep piecewise-linear segments, then a log",
}
#: Parameters that keep the fits small; other plugins (new ones too) get their defaults.
FAST = {
    "mc_dropout": {"samples": 8, "p": 0.2},
    "knn": {"k": 10},
    "discrepancy": {"epochs_pretrain": 2, "epochs": 2},
    "label_smoothing": {"alpha": 0.05},
}
ALL = "all"
STAGES = "stages"
#: The one calibrator of the ``stages`` case.
CALIBRATOR = "temperature"
N_TEST = 256


def plugin_names() -> list[str]:
    """Every registered plugin that says it exports (the built-in ones and any
    installed): one whose tags say ``exportable=False`` (ODIN perturbs the inputs with
    gradients) is refused by name, which its own tests check."""
    return sorted(
        name
        for name, info in wrapcal.plugin_registry().items()
        if get_tags(info.factory(**FAST.get(name, {}))).exportable
    )


def _stage(name: str) -> Stage:
    return get_tags(wrapcal.plugin_registry()[name].factory(**FAST.get(name, {}))).stage


def specs(case: str) -> list[tuple[str, dict[str, Any]]]:
    if case == ALL:
        names = plugin_names()
    elif case == STAGES:
        names = [n for n in plugin_names() if _stage(n) != Stage.CALIBRATE or n == CALIBRATOR]
    else:
        names = [case]
    return [(name, dict(FAST.get(name, {}))) for name in names]


def _order(seed: int = 0) -> torch.Tensor:
    return torch.randperm(10_000, generator=torch.Generator().manual_seed(seed))


@functools.cache
def resnet18() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10).eval()


@functools.cache
def fit_sets(model_name: str) -> dict[str, Any]:
    """Cached backbone features of real data: train, calibration (labelled), unlabeled
    (CIFAR-10 test and MNIST mixed), and the 256 test images."""
    order = _order()
    images, labels = cifar10("test")
    test = images[order[5000 : 5000 + N_TEST]]
    if model_name == "resnet20":
        out = resnet20_outputs()
        return {
            "train": (out["train_features"][order[:2000]], out["train_labels"][order[:2000]]),
            "calibration": (out["test_features"][order[:1000]], out["test_labels"][order[:1000]]),
            "unlabeled": torch.cat(
                [out["test_features"][order[1000:1500]], out["mnist_features"][:500]]
            ),
            "test": test,
        }
    backbone = wrapcal.wrap(resnet18(), []).backbone
    train_x, train_y = cifar10("train")
    with torch.no_grad():
        train = backbone(train_x[order[:1000]])
        held = backbone(images[order[:750]])
        mnist = backbone(mnist_ood(250))
    return {
        "train": (train, train_y[order[:1000]]),
        "calibration": (held[:500], labels[order[:500]]),
        "unlabeled": torch.cat([held[500:], mnist]),
        "test": test,
    }


def fitted(model_name: str, case: str) -> wrapcal.WrappedModel:
    """A wrapped model of ``case``'s plugins, fitted from cached features."""
    model = pretrained_resnet20() if model_name == "resnet20" else resnet18()
    data = fit_sets(model_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = wrapcal.wrap(model, specs(case))
        wrapped.fit_features(
            train=data["train"],
            calibration=data["calibration"],
            unlabeled=data["unlabeled"],
            progress=False,
        )
    wrapped.input_shape = (3, 32, 32)  # fitted from features: say what the inputs are
    return wrapped


def run_onnx(path: Any, x: torch.Tensor) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x.numpy()}), strict=True))


def compare(got: dict[str, np.ndarray], expected: dict[str, torch.Tensor], tol: float = TOL):
    """Per output: ``(max |got - expected|, rows beyond the tolerance)``, the rows as a
    boolean mask; the tolerance is ``tol`` of the output's scale (module docstring)."""
    assert list(got) == list(expected)
    figures = {}
    for name, value in expected.items():
        want = value.cpu().numpy()
        have = got[name]
        assert have.shape == want.shape and have.dtype == want.dtype, name
        if want.dtype.kind == "f":
            diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
            bad = diff > tol * max(1.0, float(np.abs(want).max()))
        else:
            diff = (have != want).astype(np.float64)
            bad = diff > 0
        figures[name] = (float(diff.max()), bad.reshape(len(bad), -1).any(axis=1))
    return figures


def summary(figures: dict[str, tuple]) -> str:
    return ", ".join(
        f"{k} {d:.1e}" + (f" ({rows.sum()} rows)" if rows.any() else "")
        for k, (d, rows) in figures.items()
    )


def own_sensitivity(wrapped: wrapcal.WrappedModel, x: torch.Tensor) -> dict[str, tuple]:
    """How far ``predict`` moves when its backbone features carry rounding-sized noise
    (relative :data:`NOISE`, seeded): the model's own sensitivity, per output."""
    with torch.no_grad():
        features = wrapped.backbone(x)
    noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(1))
    moved = prediction_outputs(wrapped.predict_features(features * (1 + NOISE * noise)))
    expected = prediction_outputs(wrapped.predict(x))
    return compare({k: v.numpy() for k, v in moved.items()}, expected)


#: Outputs of the ``ood`` plugin: step functions of every other score (counts of
#: reference values), so rounding anywhere upstream moves whole steps on some rows.
#: They are checked against the plugin's own formula applied to the export's scores.
OOD_DECISION = ("ood", "ood_pvalue", "is_ood")


def check_ood_decision(wrapped: wrapcal.WrappedModel, got: dict[str, np.ndarray]) -> None:
    """The export's ``ood``, ``ood_pvalue`` and ``is_ood`` are, bit for bit, the plugin's
    statistic, p-value and decision of the scores the export itself output."""
    from wrapcal_plugins.decide.ood_decision import (
        combine_counts,
        conformal_pvalues,
        reference_counts,
    )

    plugin = wrapped.get_plugin("ood")
    table = torch.stack([torch.from_numpy(got[n]).double() for n in plugin.scores_], dim=1)
    counts = reference_counts(plugin.reference, table)
    statistic = combine_counts(counts, plugin.contribution, plugin.combination)
    pvalue = conformal_pvalues(plugin.calibration_statistics, statistic)
    np.testing.assert_array_equal(got["ood"], statistic.float().numpy())
    np.testing.assert_array_equal(got["ood_pvalue"], pvalue.float().numpy())
    np.testing.assert_array_equal(got["is_ood"], (pvalue <= plugin.alpha).numpy())


def check(model_name: str, case: str, tmp_path: Any) -> None:
    wrapped = fitted(model_name, case)
    x = fit_sets(model_name)["test"]
    expected = prediction_outputs(wrapped.predict(x))
    path = export(wrapped, tmp_path / f"{model_name}-{case}.onnx")
    got = run_onnx(path, x)
    figures = compare(got, expected)
    if "ood" in wrapped.plugin_names:
        check_ood_decision(wrapped, got)
        for name in OOD_DECISION:
            figures.pop(name)
    stacked = sum(get_tags(p).stage == Stage.CALIBRATE for p in wrapped.plugins) > 1
    sensitive = stacked or any(n in ILL_CONDITIONED for n in wrapped.plugin_names)
    if sensitive:
        own = own_sensitivity(wrapped, x)
    for name, (diff, rows) in figures.items():
        allowed = 2 * int(own[name][1].sum()) + FEW_ROWS if sensitive else 0
        assert rows.sum() <= allowed, (
            f"{name}: {rows.sum()} of {len(x)} rows beyond {TOL} of its scale (max "
            f"{diff:.2e}; allowed {allowed})"
        )


@pytest.mark.parametrize("model_name", ["resnet20", "resnet18"])
@pytest.mark.parametrize("case", [STAGES, ALL])
def test_every_plugin_together(model_name: str, case: str, tmp_path) -> None:
    check(model_name, case, tmp_path)


def alone_cases() -> list[str]:
    """The plugins exported alone: every one but the detectors, whose scores read the
    model's own features and head and change nothing else (test_every_plugin_together
    exports each of them on both models, beside every other plugin; the composition test
    holds that a detector scores the same alone and beside others)."""
    return [name for name in plugin_names() if _stage(name) is not Stage.DETECT]


@pytest.mark.slow
# One model per plugin: test_every_plugin_together runs every plugin on both families
# (a second family here cost a minute of the suite's 20-minute budget).
@pytest.mark.parametrize("model_name", ["resnet20"])
@pytest.mark.parametrize("case", alone_cases())
def test_each_plugin_alone(model_name: str, case: str, tmp_path) -> None:
    check(model_name, case, tmp_path)


def test_dynamic_batch_and_named_axes(tmp_path) -> None:
    """One file takes batches of 1 and 3 as well as 256; its axes say ``batch``."""
    wrapped = fitted("resnet20", "conformal")
    x = fit_sets("resnet20")["test"]
    path = export(wrapped, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path))
    assert session.get_inputs()[0].name == "input"
    assert session.get_inputs()[0].shape == ["batch", 3, 32, 32]
    assert all(o.shape[0] == "batch" for o in session.get_outputs())
    for rows in (1, 3):
        expected = prediction_outputs(wrapped.predict(x[:rows]))
        figures = compare(run_onnx(path, x[:rows]), expected)
        assert not any(bad.any() for _, bad in figures.values()), summary(figures)


def test_float16_model_agrees_to_float16_precision(tmp_path) -> None:
    """A float16 model exports and runs in float16: ONNX Runtime's outputs are predict's
    to within float16's own rounding (1e-4 is finer than float16 resolves: its step at
    0.5 is 4.9e-4). Bound: twice how far predict in float16 is from predict in float32,
    output by output (probabilities: ~4e-3 on these images)."""
    wrapped = fitted("resnet20", "temperature")
    x = fit_sets("resnet20")["test"][:64]
    full = prediction_outputs(wrapped.predict(x))
    half = copy.deepcopy(wrapped).half()
    expected = prediction_outputs(half.predict(x.half()))
    path = export(half, tmp_path / "half.onnx")
    got = run_onnx(path, x.half())
    assert got["probs"].dtype == np.float16 and got["confidence"].dtype == np.float16
    figures = compare(got, expected, tol=1e-4)
    assert not figures["label"][1].any()
    for name, (diff, _) in figures.items():
        own = float((expected[name].double() - full[name].double()).abs().max())
        assert diff <= 2 * own + 1e-3, f"{name}: {diff:.2e} vs float16's own {own:.2e}"


# --- conformal sets: ONNX Runtime's equal predict's on every row (issue 24, item 3) ----


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="aps-default"),
        pytest.param(
            {"method": "raps", "alpha": 0.05, "allow_empty": False},
            id="raps-nonempty",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_conformal_sets_equal_predict_on_every_row(options, tmp_path) -> None:
    """The shared ResNet-20 with ``conformal`` exported, run by ONNX Runtime on the 5000
    CIFAR-10 test images it was not calibrated on: the sets equal ``predict``'s on every
    row. ONNX Runtime's logits differ from PyTorch's by rounding (module docstring); the
    randomisation ``U`` is drawn so that this rounding does not flip a set (version 2 of
    the hash, ``wrapcal.logits.conformal.HASH_VERSION``: with version 1, ``frac``'s jump
    moved a set on 1 row of 5000 in one run)."""
    out = resnet20_outputs()
    order = _order(seed=5)
    cal, test = order[:5000], order[5000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = wrapcal.wrap(pretrained_resnet20(), [("conformal", options)])
        wrapped.fit_features(
            calibration=(out["test_features"][cal], out["test_labels"][cal]), progress=False
        )
    wrapped.input_shape = (3, 32, 32)
    assert wrapped.get_plugin("conformal").hash_version_ == 2
    images, labels = cifar10("test")
    x = images[test]
    expected = prediction_outputs(wrapped.predict(x))
    got = run_onnx(export(wrapped, tmp_path / "conformal.onnx"), x)
    differ = (got["sets"] != expected["sets"].numpy()).any(axis=1)
    assert not differ.any(), f"sets differ on rows {np.flatnonzero(differ)[:10]}"
    np.testing.assert_array_equal(got["set_size"], expected["set_size"].numpy())
    # The rounding is there: the sets agree because U does not magnify it.
    assert float(np.abs(got["logits"] - expected["logits"].numpy()).max()) > 0
    alpha = options.get("alpha", 0.1)
    sets = expected["sets"]
    coverage = float(sets[torch.arange(len(test)), labels[test]].double().mean())
    assert coverage >= 1 - alpha - 4 * (alpha * (1 - alpha) / len(test)) ** 0.5
    if options.get("allow_empty") is False:
        assert int((sets.sum(1) == 0).sum()) == 0 and int((sets.sum(1) > 1).sum()) > 0
