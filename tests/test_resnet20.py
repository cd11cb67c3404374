"""The CIFAR ResNet-20, the third-party weights, and the image-file readers."""

from __future__ import annotations

import gzip
import itertools

import numpy as np
import pytest
import torch
from shared_data import (
    MNIST_IMAGES,
    MNIST_LABELS,
    RESNET20_WEIGHTS,
    cifar10,
    pretrained_resnet20,
    requires_shared_data,
    resnet20_outputs,
)
from torch import nn

from wrapcal.datasets import (
    load_idx,
    load_idx_images,
    load_idx_labels,
    load_npz_images,
    to_rgb32,
)
from wrapcal.files.cifar_resnets import CIFAR_MEAN, CIFAR_STD, cifar_resnet, cifar_resnet20


def ece_top_label(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label L1 ECE over 15 equal-width bins on (0, 1], weighted by bin mass."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


# --- (a) architecture --------------------------------------------------------------


def test_resnet20_shapes_and_parameter_count():
    model = cifar_resnet20().eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 269_722  # "0.27M" in He et al. 2016, Table 6
    with torch.no_grad():
        assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert isinstance(model.linear, nn.Linear)
    assert (model.linear.in_features, model.linear.out_features) == (64, 10)
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1] is model.linear
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert cifar_resnet20(num_classes=100).linear.out_features == 100


def test_option_a_shortcut_pads_channels_on_both_sides():
    block = cifar_resnet20().layer2[0]
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert not list(block.shortcut.parameters())


@pytest.mark.parametrize(("depth", "blocks"), [(8, 1), (20, 3), (32, 5), (56, 9)])
def test_cifar_resnet_depths(depth, blocks):
    model = cifar_resnet(depth)
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == blocks
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert convs + 1 == depth  # weighted layers: convs + the linear head


@pytest.mark.parametrize("depth", [0, 19, 21, 2])
def test_cifar_resnet_rejects_bad_depth(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(depth)


@requires_shared_data
def test_safetensors_keys_match_strictly():
    from safetensors.torch import load_file

    state = load_file(RESNET20_WEIGHTS)
    model = cifar_resnet20()
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(state) == expected
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.linear.weight, state["linear.weight"])


# --- (b) accuracy and calibration of the pretrained model ---------------------------


@pytest.mark.slow
@requires_shared_data
def test_pretrained_accuracy_and_ece_on_cifar10_jpeg():
    out = resnet20_outputs()
    logits, labels = out["test_logits"], out["test_labels"]
    # The cache comes from this model: check a fresh forward pass agrees with it.
    images, _ = cifar10("test")
    with torch.no_grad():
        fresh = pretrained_resnet20()(images[:500])
    torch.testing.assert_close(fresh, logits[:500], atol=1e-4, rtol=1e-4)

    probs = torch.softmax(logits.double(), dim=1).numpy()
    accuracy = float((probs.argmax(1) == labels.numpy()).mean())
    ece = ece_top_label(probs, labels.numpy())
    assert accuracy == pytest.approx(0.810, abs=0.005)
    assert 0.11 <= ece <= 0.14


def test_ece_helper_on_known_values():
    # Two bins in use: conf 0.9 (all right) and 0.6 (half right) -> ECE = .5*.1 + .5*.1
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 0, 0, 1])
    assert ece_top_label(probs, labels) == pytest.approx(0.1)


# --- (c) the cached features reproduce the logits ------------------------------------


@requires_shared_data
def test_cached_features_reproduce_logits():
    out = resnet20_outputs()
    w, b = out["weight"].double(), out["bias"].double()
    for split in ("train", "test", "mnist"):
        features, logits = out[f"{split}_features"], out[f"{split}_logits"]
        assert features.shape == (10000, 64) and logits.shape == (10000, 10)
        assert features.dtype == logits.dtype == torch.float32
        assert (features >= 0).all()  # after ReLU and average pooling
        torch.testing.assert_close(features.double() @ w.T + b, logits.double(), atol=1e-4, rtol=0)
    model = pretrained_resnet20()
    assert torch.equal(out["weight"], model.linear.weight.detach())
    assert torch.equal(out["bias"], model.linear.bias.detach())
    assert torch.equal(out["test_labels"], cifar10("test")[1])


# --- (d) IDX files --------------------------------------------------------------------


@requires_shared_data
def test_load_idx_mnist_test_set():
    images = load_idx_images(MNIST_IMAGES)
    labels = load_idx_labels(MNIST_LABELS)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))
    assert int((labels == 1).sum()) == 1135  # official count of ones in t10k
    assert images.max() == 255 and images.min() == 0


@requires_shared_data
def test_load_idx_truncated_files_raise_clear_errors(tmp_path):
    raw = gzip.decompress(MNIST_LABELS.read_bytes())
    cut_raw = tmp_path / "labels-raw-truncated"
    cut_raw.write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_idx_labels(cut_raw)

    cut_gz = tmp_path / "images-truncated.gz"
    cut_gz.write_bytes(MNIST_IMAGES.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated"):
        load_idx_images(cut_gz)

    full_raw = tmp_path / "labels-raw"
    full_raw.write_bytes(raw)
    assert (load_idx_labels(full_raw) == load_idx_labels(MNIST_LABELS)).all()
    with pytest.raises(ValueError, match="labels file"):
        load_idx_images(full_raw)


def test_load_idx_round_trip_and_bad_magic(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=">i4").reshape(2, 3, 4)
    header = bytes([0, 0, 0x0C, 3]) + np.array(data.shape, ">u4").tobytes()
    path = tmp_path / "ints.idx"
    path.write_bytes(header + data.tobytes())
    loaded = load_idx(path)
    assert loaded.dtype == np.int32 and loaded.dtype.isnative
    assert (loaded == data).all()

    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        load_idx(bad)


def test_to_rgb32_shapes_and_normalisation():
    grey = np.full((5, 28, 28), 255, np.uint8)
    out = to_rgb32(grey)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones_like(out))
    normed = to_rgb32(torch.zeros(5, 1, 28, 28), mean=CIFAR_MEAN, std=CIFAR_STD)
    expected = -torch.tensor(CIFAR_MEAN) / torch.tensor(CIFAR_STD)
    torch.testing.assert_close(normed[0, :, 0, 0], expected)
    with pytest.raises(ValueError, match="shape"):
        to_rgb32(np.zeros((5, 2, 28, 28), np.uint8))


# --- (e) npz images ---------------------------------------------------------------


def test_load_npz_images_layouts(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, train_images=nhwc, train_labels=np.arange(6), nchw=nhwc.transpose(0, 3, 1, 2))
    x, y = load_npz_images(path, split="train")
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255)
    assert y.tolist() == list(range(6))
    x2, y2 = load_npz_images(path, "nchw", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(x2, x * 2 - 1)
    assert y2 is None  # no labels for this key
    x3, _ = load_npz_images(path, "train_images")  # labels found from the key's prefix
    assert torch.equal(x3, x)


def test_load_npz_images_errors(tmp_path):
    path = tmp_path / "d.npz"
    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(path, train_images=imgs, test_images=imgs, test_labels=np.arange(3), flat=imgs[0])

    with pytest.raises(ValueError, match=r"cannot tell which array.*train_images, test_images"):
        load_npz_images(path)
    with pytest.raises(ValueError, match=r"no array 'val_images'.*keys: .*splits present"):
        load_npz_images(path, split="val")
    with pytest.raises(ValueError, match=r"no array 'y'.*keys: train_images"):
        load_npz_images(path, "train_images", "y")
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        load_npz_images(path, split="test")
    with pytest.raises(ValueError, match=r"3 \(N, H, W\) or 4"):
        load_npz_images(path, images_key="test_labels")
    with pytest.raises(ValueError, match="channel axis"):
        np.savez(path, images=np.zeros((2, 5, 5, 5), np.uint8))
        load_npz_images(path)
    with pytest.raises(ValueError, match="divide by 255"):
        np.savez(path, images=np.full((2, 8, 8, 3), 200.0, np.float32))
        load_npz_images(path)
    with pytest.raises(ValueError, match="one value per channel"):
        np.savez(path, images=imgs)
        load_npz_images(path, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="both mean and std"):
        load_npz_images(path, mean=CIFAR_MEAN)


@requires_shared_data
def test_load_npz_images_on_cifar10_jpeg():
    images, labels = cifar10("test")
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.float32
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert float(images.min()) > -2.2 and float(images.max()) < 2.7
