"""The configurations whose outputs must not move, and the data they are measured on.

Every built-in plugin alone and in combinations, fitted on the pretrained ResNet-20's
cached features (``fit_features``, no backbone pass) and predicted from cached features
(``predict_features``); two configurations also predict from images, through the
backbone. The data are fixed slices of the shared CIFAR-10 JPEG and MNIST sets.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from shared_data import cifar10, pretrained_resnet20, resnet20_outputs

import wrapcal

# margin 1.2 was the default when the outputs were recorded (it is 2.0 now).
SMALL_DISCREPANCY = {"epochs_pretrain": 2, "epochs": 2, "margin": 1.2}
SMALL_MC = {"samples": 8, "p": 0.1}

#: name -> (plugins, predict from images as well)
CONFIGS: dict[str, tuple[list[Any], bool]] = {
    "bare": ([], True),
    "temperature": ([("temperature", {})], True),
    "mc_dropout": ([("mc_dropout", SMALL_MC)], False),
    "mc_dropout_finetune": ([("mc_dropout", {**SMALL_MC, "finetune": True, "epochs": 2})], False),
    "mc_dropout_all": ([("mc_dropout", {"samples": 4, "p": 0.1, "scope": "all"})], True),
    "label_smoothing": ([("label_smoothing", {"alpha": 0.05})], False),
    "label_smoothing_auto": ([("label_smoothing", {"alpha": "auto"})], False),
    "discrepancy": ([("discrepancy", SMALL_DISCREPANCY)], False),
    "mc_dropout+temperature": ([("mc_dropout", SMALL_MC), ("temperature", {})], False),
    "discrepancy+temperature": ([("discrepancy", SMALL_DISCREPANCY), ("temperature", {})], False),
    "discrepancy+mc_dropout": (
        [("discrepancy", SMALL_DISCREPANCY), ("mc_dropout", SMALL_MC)],
        False,
    ),
    "all_four": (
        [
            ("temperature", {}),
            ("mc_dropout", SMALL_MC),
            ("label_smoothing", {"alpha": 0.05}),
            ("discrepancy", SMALL_DISCREPANCY),
        ],
        True,
    ),
}


def golden_data() -> dict[str, Any]:
    """Cached features for fitting and evaluation, and 64 test images."""
    out = resnet20_outputs()
    test_f, test_y = out["test_features"], out["test_labels"]
    mnist_f = out["mnist_features"]
    images, image_labels = cifar10("test")
    return {
        "train": (out["train_features"][:4000], out["train_labels"][:4000]),
        "calibration": (test_f[:2000], test_y[:2000]),
        "unlabeled": torch.cat([test_f[2000:3000], mnist_f[:1000]]),
        "eval": torch.cat([test_f[5000:5192], mnist_f[5000:5064]]),
        "images": images[6000:6064],
        "image_labels": image_labels[6000:6064],
    }


def _state(wrapped: Any) -> dict[str, np.ndarray]:
    state = {}
    for plugin in wrapped.plugins:
        name = type(plugin).__name__
        if hasattr(plugin, "temperature") and name == "TemperatureScaler":
            state["temperature"] = np.asarray(float(plugin.temperature_))
        if name == "LabelSmoothing":
            state["alpha"] = np.asarray(float(plugin.alpha_))
    return state


def run_config(spec: tuple[list[Any], bool], data: dict[str, Any]) -> dict[str, np.ndarray]:
    """Wrap, fit from cached features, predict; every output as a numpy array."""
    plugins, from_images = spec
    model = pretrained_resnet20()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mc_dropout warns that it inserts dropout
        wrapped = wrapcal.wrap(model, plugins=[(n, dict(p)) for n, p in plugins])
    wrapped.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plugins that do not read a set say so
        wrapped.fit_features(
            train=data["train"],
            calibration=data["calibration"],
            unlabeled=data["unlabeled"],
            progress=False,
            seed=0,
        )
    result = {}
    pred = wrapped.predict_features(data["eval"])
    result["logits"] = pred.logits.numpy()
    result["probs"] = pred.probs.numpy()
    for score, values in pred.scores.items():
        result[f"score.{score}"] = values.numpy()
    with torch.no_grad():
        result["head_logits"] = wrapped.head_logits(data["eval"]).numpy()
    if from_images:
        image_pred = wrapped.predict(data["images"])
        result["image_logits"] = image_pred.logits.numpy()
        for score, values in image_pred.scores.items():
            result[f"image_score.{score}"] = values.numpy()
        with torch.no_grad():
            result["forward"] = wrapped(data["images"]).numpy()
    for key, value in _state(wrapped).items():
        result[f"state.{key}"] = value
    return result
