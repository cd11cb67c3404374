"""ONNX Runtime runs an exported model and gives ``wrapped.predict``'s outputs.

Two real models: timm's resnet18 (random weights, seed 0, 10 classes) and the shared
pretrained ResNet-20, each with every plugin of ``wrapcal.plugin_registry()`` alone and
with all of them together, fitted from cached features of real CIFAR-10 images; the
export runs on 256 other CIFAR-10 test images.

What "equal" means here. The graph computes what ``predict`` computes, but ONNX Runtime's
kernels (MLAS) round differently from PyTorch's (oneDNN): the backbone features differ
by ~2e-6, about what PyTorch itself changes when it picks a channels-last convolution.
Every float output must agree to ``|ort - predict| <= 1e-5 + 1e-5 |predict|``, every
integer and boolean output exactly, on every row. A few computations magnify rounding
on a few rows, and are allowed :data:`FEW_ROWS` rows beyond the tolerance (the figures
are printed with ``pytest -s``):

* ``knn``: ``sqrt(2 - 2 cos)`` near ``cos = 1``, steep where features nearly coincide
  (the random-weight resnet18's features all point the same way);
* ``histogram_binning``: a step map, which jumps by a bin's height at its edges;
* ``isotonic``: a piecewise-linear map with steep segments, then a logarithm.

The case ``all`` stacks every calibrator on one model (eight maps in a row, steps among
them): its calibrated outputs move on ~6% of the rows under any rounding change, PyTorch's
own included (measured here: the same model run with a channels-last backbone). Its
outputs computed before the calibrators must agree on every row; its calibrated outputs
(logits, probabilities and their scores) may differ on at most twice as many rows as
PyTorch's own layout change moves (plus two), by at most twice as much; its decisions
(sets, abstain) only on rows whose calibrated probabilities moved. The case ``stages``
(every plugin, with temperature as the only calibrator) is held to the plain rule.
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
#: Rows (of 256) an ill-conditioned output may have beyond the tolerance (module doc).
FEW_ROWS = 2
#: Plugins whose math magnifies rounding on a few rows, and why.
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
#: The core outputs computed from the final (calibrated) probabilities.
CALIBRATED = ("logits", "probs", "confidence", "msp", "entropy")
N_TEST = 256


def plugin_names() -> list[str]:
    """Every registered plugin (the built-in ones and any installed)."""
    return sorted(wrapcal.plugin_registry())


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
    boolean mask."""
    assert list(got) == list(expected)
    figures = {}
    for name, value in expected.items():
        want = value.cpu().numpy()
        have = got[name]
        assert have.shape == want.shape and have.dtype == want.dtype, name
        if want.dtype.kind == "f":
            diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
            bad = diff > tol + tol * np.abs(want.astype(np.float64))
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


def calibrated_outputs(wrapped: wrapcal.WrappedModel) -> set[str]:
    """The outputs computed from the calibrated logits: the core's and those of plugins
    acting at or after the CALIBRATE stage."""
    later = {
        name
        for plugin in wrapped.plugins
        if get_tags(plugin).stage >= Stage.CALIBRATE
        for name in get_tags(plugin).outputs
    }
    return {*CALIBRATED, *later}


def layout_change(wrapped: wrapcal.WrappedModel, x: torch.Tensor) -> dict[str, tuple]:
    """How far ``predict`` moves when PyTorch runs the backbone channels-last: the
    rounding sensitivity of the model itself, per output."""
    other = copy.deepcopy(wrapped)
    other.backbone.to(memory_format=torch.channels_last)
    moved = prediction_outputs(other.predict(x.contiguous(memory_format=torch.channels_last)))
    expected = prediction_outputs(wrapped.predict(x))
    return compare({k: v.numpy() for k, v in moved.items()}, expected)


def check(model_name: str, case: str, tmp_path: Any) -> None:
    wrapped = fitted(model_name, case)
    x = fit_sets(model_name)["test"]
    expected = prediction_outputs(wrapped.predict(x))
    path = export(wrapped, tmp_path / f"{model_name}-{case}.onnx")
    figures = compare(run_onnx(path, x), expected)
    worst = max(d for d, _ in figures.values())
    print(f"\n{model_name} {case}: max |ort - predict| {worst:.2e}; {summary(figures)}")
    magnifying = any(n in ILL_CONDITIONED for n in wrapped.plugin_names)
    stacked = sum(get_tags(p).stage == Stage.CALIBRATE for p in wrapped.plugins) > 1
    calibrated = calibrated_outputs(wrapped) if stacked else set()
    if stacked:
        baseline = layout_change(wrapped, x)
        print(f"{model_name} {case}, PyTorch channels-last: {summary(baseline)}")
    for name, (diff, rows) in figures.items():
        message = f"{name}: {rows.sum()} of {len(x)} rows differ by more than {TOL} ({diff:.2e})"
        if name in CALIBRATED and name in calibrated:
            # No further from predict than predict from itself under a layout change.
            assert rows.sum() <= 2 * baseline[name][1].sum() + FEW_ROWS, message
            assert diff <= 2 * baseline[name][0] + TOL, message
        elif name in calibrated:
            # A decision from the calibrated probabilities changes only where they moved.
            assert not (rows & ~figures["probs"][1]).any(), message
        else:
            assert rows.sum() <= (FEW_ROWS if magnifying else 0), message
    # The predicted classes agree on every row, whatever the model.
    assert not figures["label"][1].any()


@pytest.mark.parametrize("case", [*plugin_names(), STAGES, ALL])
def test_resnet20_onnx_matches_predict(case: str, tmp_path) -> None:
    check("resnet20", case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", [*plugin_names(), STAGES, ALL])
def test_resnet18_onnx_matches_predict(case: str, tmp_path) -> None:
    check("resnet18", case, tmp_path)


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
