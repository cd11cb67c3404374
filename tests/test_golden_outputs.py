"""Every built-in plugin and combination gives, bit for bit, the outputs recorded before
the plugin contract v2 rewrite (``tests/golden/record.py``, run on the old core)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from shared_data import requires_shared_data

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))

from configs import CONFIGS, golden_data, run_config  # noqa: E402


@pytest.fixture(scope="module")
def recorded() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "resnet20_outputs.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def data():
    return golden_data()


@requires_shared_data
@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_are_bit_identical_to_the_recording(name, recorded, data) -> None:
    got = run_config(CONFIGS[name], data)
    expected = {k.split("/", 1)[1]: v for k, v in recorded.items() if k.startswith(f"{name}/")}
    assert set(got) == set(expected), name
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert np.array_equal(got[key], value), f"{name}: {key} moved"
