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
