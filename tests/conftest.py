"""Test configuration: tests/ on sys.path (for shared_data), non-interactive plots, and
every test starting from the same global random state."""

import os
import random
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed_global_generators():
    """A test's result must not depend on which tests ran before it (or on ``-k``):
    seed the global generators a test might draw from without meaning to."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
