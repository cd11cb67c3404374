"""Quickstart: wrap a timm model, fit, predict, evaluate, save and load.

Runs anywhere (scikit-learn's bundled digits, no download) in about a minute:

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import wrapcal
from wrapcal.datasets import digits
from wrapcal.demo import gaussian_noise, train_small_model

data = digits()  # 3x32x32 tensors: train / calibration / test
model = train_small_model(data, epochs=5, progress=False)  # stands in for your timm model

# A copy is wrapped: `model` itself is never changed. Plugins go by stage, not list order.
wrapped = wrapcal.wrap(model, plugins=["temperature", ("mc_dropout", {"samples": 30})])
wrapped.fit(train=data.train, calibration=data.calibration, progress=False)

x_test, y_test = data.test
logits = wrapped(x_test)  # calibrated logits, same shape as model(x_test)
pred = wrapped.predict(x_test)  # probs, label, confidence, scores
print("temperature:", round(wrapped.get_plugin("temperature").temperature_, 3))
print("accuracy:", (pred.label == y_test).float().mean().item())
print("scores:", sorted(pred.scores))

report = wrapcal.evaluate(
    {"baseline": model, "wrapped": wrapped},
    test=data.test,
    ood={"noise": gaussian_noise(x_test)},
    progress=False,
)
for name, metrics in report.calibration.items():
    print(f"{name:9s} ECE {metrics['ece']:.4f}  NLL {metrics['nll']:.4f}")

with tempfile.TemporaryDirectory() as tmp:
    path = wrapped.save(Path(tmp) / "model.wrapcal")  # safetensors + JSON, nothing pickled
    loaded = wrapcal.load(path)  # timm model rebuilt by name
    assert torch.equal(loaded(x_test), logits)
    print("saved and loaded:", path.name, "- identical outputs")
