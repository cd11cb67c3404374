"""Small real models and a real entry-point registration shared by the core tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from wrapcal.model import discovery as manager

SAMPLE_PLUGIN_DIR = Path(__file__).parent / "sample_plugin"


class SmallNet(nn.Module):
    """A hand-written classifier: conv features, then a final ``nn.Linear`` named ``out``."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(dropout)
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.out(self.drop(torch.relu(self.hidden(h))))


class SoftmaxNet(SmallNet):
    """Returns probabilities: its last Linear's output is changed before it is returned."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(super().forward(x), dim=-1)


@contextmanager
def sample_plugin_installed(tmp_path: Path) -> Iterator[None]:
    """Make the sample plugin package visible through real entry-point metadata.

    A ``.dist-info`` directory on ``sys.path`` is what pip writes for an installed
    package; ``importlib.metadata`` (and so pluggy) finds it the same way.
    """
    dist = tmp_path / "wrapcal_vector_scaling-0.3.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: wrapcal-vector-scaling\nVersion: 0.3.1\n"
        "Summary: A sample third-party wrapcal plugin\n"
    )
    (dist / "entry_points.txt").write_text("[wrapcal]\nvector_scaling = wrapcal_vector_scaling\n")
    sys.path[:0] = [str(tmp_path), str(SAMPLE_PLUGIN_DIR)]
    manager.reset()
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        sys.path.remove(str(SAMPLE_PLUGIN_DIR))
        sys.modules.pop("wrapcal_vector_scaling", None)
        manager.reset()
