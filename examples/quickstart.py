"""Quickstart: wrap a timm model, fit, predict, evaluate, save and load.

Runs anywhere (scikit-learn's bundled digits, no download) in about a minute:

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import wrapcal
from wrapcal.cli.demo import gaussian_noise, train_small_model
from wrapcal.datasets import digits

data = digits()  # 3x32x32 tensors: train / calibration / test
model = train_small_model(data, progress=False)  # stands in for your timm model

# A copy is wrapped: `model` itself is never changed. Plugins go by stage, not list order.
wrapped = wrapcal.wrap(model, plugins=["temperature", ("mc_dropout", {"samples": 30})])
wrapped.fit(calibration=data.calibration, progress=False)  # the only set these two read

x_test, y_test = data.test
logits = wrapped(x_test)  # calibrated logits, same shape as model(x_test)
pred = wrapped.predict(x_test)  # probs, label, confidence, scores
print("temperature:", round(wrapped.get_plugin("temperature").temperature_, 3))
print("accuracy:", round((pred.label == y_test).float().mean().item(), 4))
print("scores:", sorted(pred.scores))

report = wrapcal.evaluate(
    {"baseline": model, "wrapped": wrapped},
    test=data.test,
    ood={"noise": gaussian_noise(x_test)},
    progress=False,
)
for name, m in report.calibration.items():
    low, high = m["ece_ci"]
    print(
        f"{name:9s} ECE {100 * m['ece']:.2f}% (95% interval {100 * low:.2f}-{100 * high:.2f}%)"
        f"  NLL {m['nll']:.4f}"
    )
base, calibrated = report.calibration["baseline"], report.calibration["wrapped"]
temperature = wrapped.get_plugin("temperature").temperature_
# The words follow the numbers measured above, whichever way they went.
print(
    f"-> T = {temperature:.3f}: the model was "
    + (
        "overconfident, so its probabilities are softened"
        if temperature > 1
        else "underconfident, so its probabilities are sharpened"
    )
    + f"; test ECE {100 * base['ece']:.2f}% -> {100 * calibrated['ece']:.2f}%"
    + (
        " (inside the calibrated model's 95% interval: no measurable change)"
        if calibrated["ece_ci"][0] <= base["ece"] <= calibrated["ece_ci"][1]
        else ""
    )
    + f", test NLL {base['nll']:.4f} -> {calibrated['nll']:.4f} "
    + (
        "(better)"
        if calibrated["nll"] < base["nll"]
        else "(worse: the calibration set is small and the digits easy; on a model under "
        "distribution shift, examples/retrofit_resnet20.py, temperature scaling pays)"
    )
)
auroc = report.ood["wrapped"]["noise"]["mutual_information"]["auroc"]
print(f"MC-dropout mutual information flags the noise images with AUROC {100 * auroc:.1f}%")

with tempfile.TemporaryDirectory() as tmp:
    path = wrapped.save(Path(tmp) / "model.wrapcal")  # safetensors + JSON, nothing pickled
    loaded = wrapcal.load(path)  # timm model rebuilt by name
    assert torch.equal(loaded(x_test), logits)
    print("saved and loaded:", path.name, "- identical outputs")
