"""Tests of the wrapcal-ash plugin, run after `pip install ./examples/ash_plugin`."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import torch
from scipy.special import logsumexp
from torch import nn

import wrapcal
from wrapcal.testing import check_plugin


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 40), nn.ReLU())
        self.fc = nn.Linear(40, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def np_ash_s(features: np.ndarray, percentile: float) -> np.ndarray:
    """The paper's ASH-S, row by row: zero what lies below the row's top 100 - p percent,
    multiply the rest by exp(sum before / sum after)."""
    out = np.zeros_like(features)
    keep = features.shape[1] - round(features.shape[1] * percentile / 100)
    for i, row in enumerate(features):
        top = np.argsort(-row, kind="stable")[:keep]
        out[i, top] = row[top]
        out[i] *= np.exp(row.sum() / out[i].sum())
    return out


def test_installed_and_used_by_name() -> None:
    info = wrapcal.plugin_registry()["ash"]
    assert info.package == "wrapcal-ash"
    assert info.version == importlib.metadata.version("wrapcal-ash")
    torch.manual_seed(0)
    model = Net().eval()
    wrapped = wrapcal.wrap(model, plugins=["ash"])  # nothing to fit
    x = torch.randn(50, 6)
    with torch.no_grad():
        features = model.body(x).double().numpy()
        pred = wrapped.predict(x)
    weight = model.fc.weight.detach().double().numpy()
    bias = model.fc.bias.detach().double().numpy()
    logits = np_ash_s(features, 90) @ weight.T + bias
    np.testing.assert_allclose(wrapped(x).detach().double().numpy(), logits, rtol=1e-4)
    energy = -logsumexp(logits, axis=1)
    np.testing.assert_allclose(pred.scores["ash"].double().numpy(), energy, rtol=1e-4)
    # Shaping changed something: the bare model's logits differ.
    assert not torch.allclose(model(x), wrapped(x), atol=1e-2)


def test_conformance() -> None:
    """Every rule of the wrapcal plugin contract, on small data (wrapcal.testing)."""
    check_plugin("ash")
