"""Images as they come: channels-last arrays and tensors ``[N, H, W, C]`` and ``uint8``
images given to ``fit``, ``predict`` and ``evaluate`` get wrapcal's error naming the fix
(the permute, the division by 255), never a PyTorch error from inside the network; and
an input the model takes is never refused."""

from __future__ import annotations

import traceback

import numpy as np
import pytest
import torch
from torch import nn

import wrapcal
from wrapcal.data import check_inputs, model_channels
from wrapcal.errors import DataError

PERMUTE = "pass x.permute(0, 3, 1, 2) (a numpy array: x.transpose(0, 3, 1, 2))"


def _net(channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 4),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(24, 3, 8, 8), torch.arange(24) % 4


@pytest.fixture(scope="module")
def fitted(images):
    return wrapcal.wrap(_net(), [("knn", {"k": 3})]).fit(train=images, progress=False)


def _layouts(x: torch.Tensor) -> list[tuple[str, object]]:
    last = x.permute(0, 2, 3, 1)
    return [("torch", last), ("numpy", last.numpy())]


def _raised(call) -> DataError:
    with pytest.raises(DataError) as info:
        call()
    frames = traceback.extract_tb(info.value.__traceback__)
    # wrapcal's own error, raised before the network: no torch frame in the traceback.
    assert not any("torch/nn" in f.filename for f in frames), [f.filename for f in frames]
    assert info.value.__suppress_context__ or info.value.__context__ is None
    return info.value


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_fit_refuses_channels_last_images_naming_the_permute(images, kind):
    x, y = images
    last = dict(_layouts(x))[kind]
    err = _raised(lambda: wrapcal.wrap(_net(), ["knn"]).fit(train=(last, y), progress=False))
    assert str(err) == (
        "the train data: got images of shape (N, 8, 8, 3): channels last? The model takes "
        f"[N, 3, H, W] (channels first): {PERMUTE}"
    )


def test_fit_refuses_uint8_images_and_says_both_fixes(images):
    x, y = images
    pixels = (x * 255).round().to(torch.uint8)
    err = _raised(lambda: wrapcal.wrap(_net(), ["knn"]).fit(train=(pixels, y), progress=False))
    assert "dtype torch.uint8: images of shape (N, 3, 8, 8) with pixels 0..255?" in str(err)
    assert "divide by 255 and normalise as the model expects" in str(err)
    assert "permute" not in str(err)  # channels first already
    last = pixels.permute(0, 2, 3, 1).numpy()  # as PIL gives them
    err = _raised(lambda: wrapcal.wrap(_net(), ["knn"]).fit(train=(last, y), progress=False))
    assert "divide by 255" in str(err) and "also channels last" in str(err)
    assert "x.permute(0, 3, 1, 2)" in str(err)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_predict_refuses_channels_last_images_naming_the_permute(fitted, images, kind):
    last = dict(_layouts(images[0]))[kind]
    for batch in (last[:5], last):  # one batch, and data read batch by batch
        err = _raised(lambda b=batch: fitted.predict(b, batch_size=8))
        assert str(err) == (
            "got images of shape (N, 8, 8, 3): channels last? The model takes [N, 3, H, W] "
            f"(channels first): {PERMUTE}"
        )


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_evaluate_refuses_channels_last_images_for_a_bare_model_and_a_wrapped_one(
    fitted, images, kind
):
    x, y = images
    last = dict(_layouts(x))[kind]
    for models in ({"baseline": _net()}, {"wrapped": fitted}):
        err = _raised(lambda m=models: wrapcal.evaluate(m, (last, y), progress=False, bootstrap=0))
        assert PERMUTE in str(err) and "(N, 8, 8, 3)" in str(err)
    pixels = (x * 255).to(torch.uint8)
    err = _raised(lambda: wrapcal.evaluate(_net(), (pixels, y), progress=False, bootstrap=0))
    assert "divide by 255" in str(err)


def test_inputs_the_model_takes_are_never_refused(images):
    """The last dim 1 or 3 alone proves nothing: a 3-channel model on images 3 wide, an
    8-channel model on images 3 wide, a model without convolutions on [N, 5, 3]."""
    x, y = images
    wrapped = wrapcal.wrap(_net(), [("knn", {"k": 3})]).fit(train=(x, y), progress=False)
    narrow = x[:, :, :, :3].contiguous()  # [N, 3, 8, 3]: channels first, 3 wide
    assert wrapped.predict(narrow).probs.shape == (24, 4)
    eight = torch.rand(24, 8, 8, 3)  # [N, 8, 8, 3] for an 8-channel model
    wide = wrapcal.wrap(_net(8), [("knn", {"k": 3})]).fit(train=(eight, y), progress=False)
    assert wide.predict(eight).probs.shape == (24, 4)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(15, 6), nn.ReLU(), nn.Linear(6, 4)).eval()
    flat = torch.rand(24, 5, 3)
    assert model_channels(mlp) is None
    assert check_inputs(flat, mlp) is flat
    report = wrapcal.evaluate(mlp, (flat, y), progress=False, bootstrap=0)
    assert report.to_dict()["data"]["test"]["n"] == 24


def test_model_channels_reads_the_wrapped_model_then_the_first_convolution(fitted):
    assert model_channels(fitted) == 3 == fitted.input_shape[0]
    assert model_channels(_net(1)) == 1
    one = torch.rand(4, 8, 8, 1)
    with pytest.raises(DataError, match=r"\(N, 8, 8, 1\): channels last\? The model takes \[N, 1"):
        check_inputs(one, _net(1))
    assert check_inputs(one, None) is one  # the model unknown: nothing to compare with
    assert np.array_equal(check_inputs(one.permute(0, 3, 1, 2), _net(1)), one.permute(0, 3, 1, 2))
