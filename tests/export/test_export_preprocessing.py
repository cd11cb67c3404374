"""The preprocessing travels with the export: metadata, and uint8 images into the graph.

The shared pretrained ResNet-20 (temperature and conformal sets, fitted from its cached
features) is exported once to ONNX and once to ``.pt2`` with
``include_preprocessing=True``. Each takes the raw CIFAR-10 test images as they are stored
(``uint8`` ``[N, 32, 32, 3]``) and must give what ``predict`` gives on the normalised
tensor of the shared loader (``tests/shared_data.cifar10``, normalised by
``wrapcal.datasets``, not by the graph's code): labels and conformal sets exactly, float
outputs within 1e-5 of their scale (ONNX Runtime's kernels round otherwise than
PyTorch's, as in test_export_onnx.py). The differences are printed with ``pytest -s``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shared_data import CIFAR_NPZ, cifar10, pretrained_resnet20, requires_shared_data
from shared_data import resnet20_outputs as cached_outputs

import wrapcal
from wrapcal.export import ExportError, read_metadata
from wrapcal.export.metadata import build_metadata
from wrapcal.export.module import PixelInput, output_specs, prediction_outputs
from wrapcal.files.cifar_resnets import CIFAR_MEAN, CIFAR_STD

N_TEST = 256
TOL = 1e-5


def _order() -> torch.Tensor:
    return torch.randperm(10_000, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fitted() -> wrapcal.WrappedModel:
    """ResNet-20 with temperature and conformal sets, fitted from the cached features of
    1000 test images (the 256 exported rows are others)."""
    out = cached_outputs()
    order = _order()
    wrapped = wrapcal.wrap(pretrained_resnet20(), ["temperature", "conformal"])
    wrapped.fit_features(
        calibration=(out["test_features"][order[:1000]], out["test_labels"][order[:1000]]),
        progress=False,
    )
    return wrapped


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, torch.Tensor]:
    """``N_TEST`` held-out test images: as stored (uint8 NHWC), and as the loader
    normalises them (float NCHW)."""
    rows = _order()[5000 : 5000 + N_TEST]
    raw = np.load(CIFAR_NPZ)["test_images"][rows.numpy()]
    return raw, cifar10("test")[0][rows]


@pytest.fixture(scope="module")
def onnx_file(fitted, tmp_path_factory):
    path = tmp_path_factory.mktemp("pre") / "model.onnx"
    return wrapcal.export(fitted, path, include_preprocessing=True)


def _compare(got: dict[str, np.ndarray], want: dict[str, torch.Tensor], what: str) -> None:
    assert list(got) == list(want)
    for name, expected in want.items():
        expected = expected.numpy()
        value = got[name]
        assert value.shape == expected.shape and value.dtype == expected.dtype, name
        if expected.dtype.kind == "f":
            diff = float(np.abs(value - expected).max())
            scale = max(1.0, float(np.abs(expected).max()))
            print(f"{what} {name}: max |diff| {diff:.2e} on {len(value)} rows")
            assert diff <= TOL * scale, (name, diff)
        else:
            same = (value == expected).all(axis=tuple(range(1, value.ndim)))
            print(f"{what} {name}: equal on {int(same.sum())} of {len(value)} rows")
            assert same.all(), name


@requires_shared_data
def test_the_onnx_metadata_holds_mean_std_and_what_the_graph_takes(onnx_file) -> None:
    meta = read_metadata(onnx_file)
    pre = meta["preprocessing"]
    assert pre["mean"] == list(CIFAR_MEAN) and pre["std"] == list(CIFAR_STD)
    assert pre["size"] == [32, 32] and pre["channel_order"] == "RGB"
    assert pre["value_range"] == [0.0, 1.0] and pre["in_graph"] is True
    assert meta["input"] == {
        "name": "input",
        "shape": ["batch", 32, 32, 3],
        "dtype": "uint8",
        "layout": "NHWC",
        "channel_order": "RGB",
    }


@requires_shared_data
def test_onnx_on_uint8_images_equals_predict_on_the_normalised_tensor(
    fitted, images, onnx_file
) -> None:
    ort = pytest.importorskip("onnxruntime")
    raw, normalised = images
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert given.type == "tensor(uint8)" and given.shape == ["batch", 32, 32, 3]
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"input": raw}), strict=True))
    want = prediction_outputs(fitted.predict(normalised))
    assert "sets" in want
    _compare(got, want, "onnx")


@requires_shared_data
def test_pt2_on_uint8_images_equals_predict_and_says_its_preprocessing(
    fitted, images, tmp_path
) -> None:
    raw, normalised = images
    path = wrapcal.export(
        fitted, tmp_path / "model.pt2", format="torch", include_preprocessing=True
    )
    meta = read_metadata(path)
    assert meta["preprocessing"]["mean"] == list(CIFAR_MEAN)
    assert meta["input"]["dtype"] == "uint8" and meta["input"]["layout"] == "NHWC"
    program = torch.export.load(str(path)).module()
    with torch.no_grad():
        outputs = program(torch.from_numpy(raw))
    names = [o["name"] for o in meta["outputs"]]
    got = {n: v.numpy() for n, v in zip(names, outputs, strict=True)}
    _compare(got, prediction_outputs(fitted.predict(normalised)), "pt2")


def test_the_pixel_step_is_the_formula_for_bgr_and_other_value_ranges() -> None:
    """Written out in numpy: reorder RGB to BGR, map 0..255 to (low, high), normalise."""
    record = wrapcal.Preprocess(
        mean=(100.0, 110.0, 120.0),
        std=(50.0, 60.0, 70.0),
        channel_order="BGR",
        value_range=(0, 255),
    )
    u8 = np.random.default_rng(0).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    out = PixelInput(record, torch.float64)(torch.from_numpy(u8))
    bgr = u8[..., ::-1].astype(np.float64).transpose(0, 3, 1, 2)
    mean = np.array([100.0, 110.0, 120.0]).reshape(1, 3, 1, 1)
    std = np.array([50.0, 60.0, 70.0]).reshape(1, 3, 1, 1)
    assert out.dtype == torch.float64 and out.shape == (3, 3, 5, 4)
    np.testing.assert_allclose(out.numpy(), (bgr - mean) / std, rtol=1e-6)
    # (-1, 1): pixel 0 is -1 and 255 is 1, then (x - 0) / 1.
    grey = wrapcal.Preprocess(mean=0.0, std=1.0, channel_order="L", value_range=(-1, 1))
    edges = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2, 1)
    assert PixelInput(grey, torch.float32)(edges).flatten().tolist() == [-1.0, 1.0]


def test_export_with_preprocessing_needs_a_record_and_its_size(tmp_path) -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )
    wrapped = wrapcal.wrap(model)
    assert wrapped.preprocess is None  # the model says nothing
    with pytest.raises(ExportError, match="no preprocessing record.*preprocess=wrapcal"):
        wrapcal.export(wrapped, tmp_path / "m.onnx", include_preprocessing=True)
    wrapped.preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "size": 8}
    with pytest.raises(ExportError, match="contradicts the recorded size"):
        wrapcal.export(
            wrapped, tmp_path / "m.onnx", include_preprocessing=True, input_shape=(3, 9, 9)
        )


@requires_shared_data
def test_a_plain_export_says_its_inputs_are_already_preprocessed(fitted) -> None:
    """Without ``include_preprocessing`` the metadata still holds the record (the graph
    takes normalised float inputs): built as any export builds it."""
    example = torch.zeros(2, 3, 32, 32)
    meta = build_metadata(fitted, output_specs(fitted, example), example, "onnx", None)
    assert meta["preprocessing"]["mean"] == list(CIFAR_MEAN)
    assert meta["preprocessing"]["std"] == list(CIFAR_STD)
    assert meta["preprocessing"]["in_graph"] is False
    assert meta["input"] == {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32"}
