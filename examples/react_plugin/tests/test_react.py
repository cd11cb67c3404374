"""Tests of the wrapcal-react plugin, run after `pip install ./examples/react_plugin`."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import torch
from torch import nn

import wrapcal


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 32), nn.ReLU())
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_installed_and_used_by_name() -> None:
    info = wrapcal.plugin_registry()["react"]
    assert info.package == "wrapcal-react"
    assert info.version == importlib.metadata.version("wrapcal-react")
    torch.manual_seed(0)
    model = Net().eval()
    x_train, y_train = torch.randn(500, 6), torch.randint(0, 4, (500,))
    wrapped = wrapcal.wrap(model, plugins=["react"]).fit(train=(x_train, y_train), progress=False)

    features = model.body(x_train).detach()
    clip = np.percentile(features.numpy().ravel(), 90)  # the paper's percentile, numpy's way
    assert abs(wrapped.plugins[0].clip_.item() - clip) <= 1e-5 * abs(clip)

    x = 5 * torch.randn(50, 6)  # large inputs: features beyond the clip value
    with torch.no_grad():
        clipped_logits = model.fc(model.body(x).clamp(max=clip))
        pred = wrapped.predict(x)
    assert torch.allclose(wrapped(x), clipped_logits, atol=1e-5)
    energy = -torch.logsumexp(clipped_logits, dim=-1)
    assert torch.allclose(pred.scores["react_energy"], energy, atol=1e-5)
    # Clipping changed something: the bare model's energies differ.
    assert not torch.allclose(-torch.logsumexp(model(x), dim=-1), energy, atol=1e-3)
