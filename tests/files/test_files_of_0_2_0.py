"""Files written by the real wrapcal 0.2.0 load in this release with the same outputs.

``written_by_0_2_0/`` holds three ``.wrapcal`` files that wrapcal 0.2.0 itself wrote
(see ``make.py`` there: the calibrators, the feature-space detectors, conformal sets and
abstention; MC dropout with temperature; label smoothing with vector scaling), the
small model they wrap, and the predictions 0.2.0 made with them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import wrapcal

HERE = Path(__file__).parent / "written_by_0_2_0"


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    model.load_state_dict(load_file(HERE / "model.safetensors"))
    return model


def _inputs() -> torch.Tensor:
    # make.py's data(50, seed=3)
    generator = torch.Generator().manual_seed(3)
    y = torch.randint(0, 4, (50,), generator=generator)
    x = torch.randn(50, 12, generator=generator)
    return x + 1.5 * nn.functional.one_hot(y, 12)[:, :12].float() * 2


@pytest.mark.parametrize("name", ["calib", "dropout", "smooth"])
def test_a_file_written_by_0_2_0_loads_and_predicts_as_0_2_0_did(name: str) -> None:
    expected = np.load(HERE / "outputs.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about the file...
        # ...but mc_dropout's, as in 0.2.0, that it inserts dropout before the head.
        warnings.filterwarnings("ignore", message="mc_dropout: .* inserting dropout")
        loaded = wrapcal.load(HERE / f"{name}.wrapcal", model=_model())
    prediction = loaded.predict(_inputs())
    probs = expected[f"{name}/probs"]
    # To float32 rounding: 0.2.0 recorded these on another CPU, and a matrix product's
    # last bit depends on the CPU's kernels (on an AMD EPYC they differ by 9e-8).
    _same(prediction.probs.numpy(), probs, "probs")
    np.testing.assert_array_equal(prediction.probs.numpy().argmax(1), probs.argmax(1))
    scores = [key for key in expected.files if key.startswith(f"{name}/score/")]
    assert len(scores) >= 4
    for key in scores:
        score = key.rpartition("/")[2]
        _same(prediction.scores[score].numpy(), expected[key], key)


def _same(actual: np.ndarray, desired: np.ndarray, what: str) -> None:
    """Equal, to float32 rounding for floating outputs (exactly otherwise)."""
    if np.issubdtype(desired.dtype, np.floating):
        np.testing.assert_allclose(actual, desired, rtol=2e-6, atol=1e-6, err_msg=what)
    else:
        np.testing.assert_array_equal(actual, desired, what)
