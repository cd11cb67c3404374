"""A small, exactly known world for the monitor's tests: Gaussian classes in 8
dimensions, a linear classifier fitted to them and made overconfident (so temperature
has work to do), and as many fresh windows as a test asks for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wrapcal

D, K = 8, 4


class World:
    """Class-conditional Gaussians ``N(mu_y, I)``; draws are seeded."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.means = 1.6 * torch.randn(K, D, generator=g)

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + seed)
        y = torch.randint(0, K, (n,), generator=g)
        return self.means[y] + torch.randn(n, D, generator=g), y

    def far(self, n: int, seed: int) -> torch.Tensor:
        """OOD inputs: in the directions no class mean takes (KNN compares directions,
        its features normalised), as far out as the classes."""
        g = torch.Generator().manual_seed(5000 + seed)
        q, _ = torch.linalg.qr(self.means.T, mode="complete")  # [D, D]; first K: the means
        other = q[:, K:]
        return 3.0 * torch.randn(n, D - K, generator=g) @ other.T


def linear_model(world: World) -> nn.Module:
    """``Linear(D, D)`` (the identity: the backbone) then the Bayes classifier of the
    world (logits ``mu_k . x - |mu_k|^2 / 2``) times 2.5: overconfident."""
    model = nn.Sequential(nn.Linear(D, D), nn.Linear(D, K))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(D))
        model[0].bias.zero_()
        model[1].weight.copy_(2.5 * world.means)
        model[1].bias.copy_(-2.5 * world.means.square().sum(dim=1) / 2)
    return model.eval()


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def calibration(world):
    return world.sample(2000, seed=1)


@pytest.fixture(scope="module")
def wrapped(world, calibration):
    """Temperature and KNN (an OOD score with an operating point)."""
    return wrapcal.wrap(linear_model(world), ["temperature", ("knn", {"k": 10})]).fit(
        train=world.sample(2000, seed=2), calibration=calibration, progress=False
    )


@pytest.fixture(scope="module")
def calibrated(world, calibration):
    """Temperature alone: the cheapest calibrated model, for tests over many windows."""
    return wrapcal.wrap(linear_model(world), ["temperature"]).fit(
        calibration=calibration, progress=False
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny batches: on a shared machine, the synchronisation of a
    second torch thread costs more than each operation (measured: 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def make_wrapped(world, calibration):
    """The world's model wrapped with any plugins, fitted on the calibration set."""

    def make(plugins: list) -> wrapcal.WrappedModel:
        return wrapcal.wrap(linear_model(world), plugins).fit(
            calibration=calibration, progress=False
        )

    return make
