"""Tests of the wrapcal-nci plugin, run after `pip install ./examples/nci_plugin`."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import torch
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


def np_nci(train: np.ndarray, queries: np.ndarray, weight: np.ndarray, bias: np.ndarray,
           alpha: float) -> np.ndarray:  # fmt: skip
    """The paper's score, row by row: cosine-like alignment of the centred feature with
    the predicted class's weights, plus alpha times the L1 norm; negated."""
    mean = train.mean(axis=0)
    out = np.empty(len(queries))
    for i, f in enumerate(queries):
        c = int(np.argmax(weight @ f + bias))
        z = f - mean
        out[i] = -(z @ weight[c]) / np.linalg.norm(z) - alpha * np.abs(f).sum()
    return out


def test_installed_and_used_by_name() -> None:
    info = wrapcal.plugin_registry()["nci"]
    assert info.package == "wrapcal-nci"
    assert info.version == importlib.metadata.version("wrapcal-nci")
    torch.manual_seed(0)
    model = Net().eval()
    x_train, x = torch.randn(300, 6), torch.randn(50, 6)
    wrapped = wrapcal.wrap(model, plugins=[("nci", {"alpha": 0.01})])
    wrapped.fit(train=x_train, progress=False)
    with torch.no_grad():
        train = model.body(x_train).double().numpy()
        features = model.body(x).double().numpy()
        pred = wrapped.predict(x)
        logits = model(x)
    weight = model.fc.weight.detach().double().numpy()
    bias = model.fc.bias.detach().double().numpy()
    want = np_nci(train, features, weight, bias, 0.01)
    np.testing.assert_allclose(pred.scores["nci"].double().numpy(), want, rtol=1e-5, atol=1e-6)
    # A detector: the model's logits are its own.
    torch.testing.assert_close(wrapped(x), logits)


def test_conformance() -> None:
    """Every rule of the wrapcal plugin contract, on small data (wrapcal.testing)."""
    check_plugin("nci")
