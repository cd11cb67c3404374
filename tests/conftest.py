"""Test configuration: non-interactive plots and every test starting from the same global
random state (``tests/`` is on the import path through pyproject's ``pythonpath``)."""

import os
import random

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("TQDM_DISABLE", "1")


def _seed_all() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _seed_before_module_fixtures():
    """Module fixtures (trained models) are built before any function fixture runs:
    seed for them too, so they do not depend on the modules that ran before."""
    _seed_all()


@pytest.fixture(autouse=True)
def _seed_global_generators():
    """A test's result must not depend on which tests ran before it (or on ``-k``, or on
    hypothesis's example database): seed the global generators a test might draw from
    without meaning to, and start from an empty feature cache (backbone passes a test
    counts are its own)."""
    from wrapcal.features.memory_store import CACHE

    _seed_all()
    CACHE.clear()


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if a CLI command reads any data set: its checks of flags and paths
    must come first."""
    import wrapcal.cli.inputs as cli_inputs

    def refuse(*args, **kwargs):
        raise AssertionError("a data set was read before the command's checks failed")

    monkeypatch.setattr(cli_inputs, "read", refuse)
    monkeypatch.setattr(cli_inputs, "read_ood", refuse)
