"""The readers of wrapcal.datasets, each checked against numpy (or scikit-learn, scipy,
PIL) written out here: npz, IDX, pixels, the digits, noise, ImageFolder, Hugging Face
datasets and the specs the command line names them by."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from helpers import SmallNet
from scipy.stats import norm as normal

import wrapcal
from wrapcal.data import iter_batches
from wrapcal.datasets import (
    DIGITS_MEAN,
    DIGITS_STD,
    ImageDirectory,
    ImageSettings,
    NoiseImages,
    Normaliser,
    NpzKeyError,
    SpecError,
    check_class_order,
    digits,
    find_npz_keys,
    load_idx,
    load_idx_images,
    load_idx_labels,
    load_npz_images,
    npz_class_names,
    read_spec,
    to_rgb32,
)
from wrapcal.datasets.idx import labels_file_for
from wrapcal.datasets.npz import npz_shapes
from wrapcal.datasets.pixels import match_channels, resize_images
from wrapcal.datasets.specs import concat_inputs
from wrapcal.errors import DataError

PLAIN = ImageSettings(Normaliser((0.0,), (1.0,)))


def bilinear_up(a: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of [..., H, W] with half-pixel centres (align_corners=False),
    written out: the source of output pixel i is (i + 0.5) * H / size - 0.5, clamped at 0."""

    def weights(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, src - low

    r0, r1, wr = weights(a.shape[-2])
    c0, c1, wc = weights(a.shape[-1])
    rows = a[..., r0, :] * (1 - wr)[:, None] + a[..., r1, :] * wr[:, None]
    return rows[..., c0] * (1 - wc) + rows[..., c1] * wc


# --- npz -------------------------------------------------------------------------------


def test_npz_layouts_against_numpy(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    grey = rng.random((4, 6, 7)).astype(np.float32)
    path = tmp_path / "a.npz"
    np.savez(path, images=nhwc, labels=np.arange(5))
    x, y = load_npz_images(path)
    np.testing.assert_array_equal(x.numpy(), nhwc.transpose(0, 3, 1, 2) / np.float32(255))
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3, 4]
    np.savez(path, grey=grey, other=nhwc)
    x, y = load_npz_images(path, "grey", mean=(0.5,), std=(0.25,))
    np.testing.assert_allclose(x.numpy(), (grey[:, None] - 0.5) / 0.25, rtol=1e-6)
    assert y is None


IMG, LAB = (3, 8, 8, 3), (3,)


@pytest.mark.parametrize(
    ("shapes", "split", "images", "labels"),
    [
        ({"x_test": IMG, "y_test": LAB, "x_train": IMG}, "test", "x_test", "y_test"),
        ({"test_x": IMG, "test_y": LAB}, "test", "test_x", "test_y"),
        ({"test_images": IMG, "test_labels": LAB, "classes": LAB}, "test", "test_images",
         "test_labels"),
        ({"x": IMG, "y": LAB}, None, "x", "y"),
        ({"pictures": IMG, "targets": LAB}, None, "pictures", "targets"),  # the only 4-D one
        ({"x_val": IMG, "y_val": LAB}, None, "x_val", "y_val"),  # labels beside the images
        ({"train_images": IMG, "train_labels": LAB}, None, "train_images", "train_labels"),
        ({"images": IMG, "labels": (3, 10)}, None, "images", None),  # one-hot is no label
    ],
)  # fmt: skip
def test_npz_key_conventions(shapes, split, images, labels):
    chosen = find_npz_keys(shapes, split=split)
    assert (chosen.images, chosen.labels) == (images, labels)


def test_npz_key_errors_carry_the_keys_and_the_names_tried():
    shapes = {"a": (4, 8, 8), "b": (4, 8, 8), "c": (4,)}
    with pytest.raises(NpzKeyError) as err:
        find_npz_keys(shapes)
    assert err.value.keys == ["a", "b", "c"] and err.value.candidates == ["a", "b"]
    assert err.value.wanted == ["images", "image", "x", "X", "data", "inputs"]
    with pytest.raises(NpzKeyError) as err:
        find_npz_keys({"train_images": (4, 8, 8)}, split="val")
    assert err.value.wanted == ["val_images", "val_x", "x_val"] and err.value.splits == ["train"]


def test_npz_shapes_come_from_the_headers(tmp_path):
    arrays = {
        "a": np.zeros((2, 3, 4), np.uint8),
        "s": np.array(["cat", "dog"]),
        "z": np.float64(1.5),
        "big": np.zeros((3, 2), ">i4"),
    }
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        with np.load(path) as loaded:
            expected = {k: loaded[k].shape for k in loaded.files}
        assert npz_shapes(path) == expected
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
        npz_shapes(tmp_path / "bad.npz")
    np.savez(tmp_path / "c.npz", classes=np.array(["b", "a"]))
    assert npz_class_names(tmp_path / "c.npz") == ["b", "a"]
    assert npz_class_names(tmp_path / "savez.npz") is None


# --- IDX -------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, type_byte: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_byte, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


@pytest.mark.parametrize("compressed", [True, False])
def test_idx_against_numpy(tmp_path, compressed):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    labels = rng.integers(-5, 1000, 7).astype(">i4")
    opener = gzip.open if compressed else open
    with opener(tmp_path / "t-images-idx3-ubyte", "wb") as f:
        f.write(_idx_bytes(images, 0x08))
    with opener(tmp_path / "t-labels-idx1-ubyte", "wb") as f:
        f.write(_idx_bytes(labels, 0x0C))
    got = load_idx_images(tmp_path / "t-images-idx3-ubyte")
    np.testing.assert_array_equal(got, images)
    got_labels = load_idx_labels(tmp_path / "t-labels-idx1-ubyte")
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_labels, labels.astype(np.int64))
    assert labels_file_for(tmp_path / "t-images-idx3-ubyte") == tmp_path / "t-labels-idx1-ubyte"
    doubles = rng.random((3, 2)).astype(">f8")
    (tmp_path / "d.idx").write_bytes(_idx_bytes(doubles, 0x0E))
    np.testing.assert_array_equal(load_idx(tmp_path / "d.idx"), doubles.astype(np.float64))


def test_idx_errors(tmp_path):
    data = _idx_bytes(np.zeros((2, 3, 3), np.uint8), 0x08)
    (tmp_path / "short-idx3").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_idx(tmp_path / "short-idx3")
    (tmp_path / "magic-idx3").write_bytes(b"\x01\x02" + data[2:])
    with pytest.raises(ValueError, match="not an IDX file"):
        load_idx(tmp_path / "magic-idx3")
    (tmp_path / "labels-idx1").write_bytes(_idx_bytes(np.zeros(3, np.uint8), 0x08))
    with pytest.raises(ValueError, match="is this a labels file"):
        load_idx_images(tmp_path / "labels-idx1")
    assert labels_file_for(tmp_path / "magic-idx3") is None


# --- pixels ----------------------------------------------------------------------------


def test_pixels_against_numpy():
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    got = to_rgb32(grey, size=32, mean=mean, std=std).numpy()
    up = np.clip(bilinear_up(grey.astype(np.float64) / 255, 32), 0, 1)
    expected = (up[:, None] - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(got, expected, atol=2e-6)
    x = torch.from_numpy(rng.random((2, 3, 5, 5)).astype(np.float32))
    np.testing.assert_allclose(
        match_channels(x, 1).numpy(), x.numpy().mean(axis=1, keepdims=True), rtol=1e-6
    )
    assert torch.equal(match_channels(x[:, :1], 3), x[:, :1].expand(-1, 3, -1, -1))
    rgba = torch.cat([x, torch.ones(2, 1, 5, 5)], dim=1)
    assert torch.equal(match_channels(rgba, 3), x)
    np.testing.assert_allclose(
        resize_images(x, 10).numpy(), bilinear_up(x.numpy().astype(np.float64), 10), atol=1e-6
    )
    assert resize_images(x, None) is x
    normalised = Normaliser((0.5,), (0.25,))(x)
    np.testing.assert_allclose(normalised.numpy(), (x.numpy() - 0.5) / 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match="convert the images to 2 channels"):
        Normaliser((0.5, 0.5), (1.0, 1.0))(x)
    with pytest.raises(ValueError, match="positive"):
        Normaliser((0.5,), (0.0,))


# --- digits ----------------------------------------------------------------------------


def test_digits_against_scikit_learn():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    idx = np.arange(len(bunch.target))
    train, rest = train_test_split(idx, train_size=1000, stratify=bunch.target, random_state=0)
    cal, test = train_test_split(rest, test_size=400, stratify=bunch.target[rest], random_state=0)
    # At the native 8x8 nothing is interpolated: pixels / 16, normalised, replicated.
    small = digits(size=8)
    pixels = (bunch.data.reshape(-1, 8, 8) / 16 - DIGITS_MEAN) / DIGITS_STD
    for (x, y), rows in ((small.train, train), (small.calibration, cal), (small.test, test)):
        rows = np.sort(rows)
        np.testing.assert_allclose(x.numpy(), np.repeat(pixels[rows, None], 3, 1), atol=1e-6)
        np.testing.assert_array_equal(y.numpy(), bunch.target[rows])
    # At 32x32: bilinear upsampling with half-pixel centres, written out above.
    big = digits()
    expected = (bilinear_up(bunch.data.reshape(-1, 8, 8) / 16, 32) - 0.2) / 0.3
    np.testing.assert_allclose(big.test[0][:, 0].numpy(), expected[np.sort(test)], atol=1e-5)
    assert [len(p[1]) for p in (big.train, big.calibration, big.test)] == [1000, 397, 400]
    np.testing.assert_array_equal(np.bincount(big.test[1].numpy()), np.bincount(bunch.target[test]))
    assert big.classes == [str(i) for i in range(10)]


# --- noise -----------------------------------------------------------------------------


def test_noise_images_are_seeded_and_read_in_any_order():
    norm = Normaliser((0.5,), (0.25,))
    noise = NoiseImages("gaussian", 600, (3, 4, 4), norm, seed=5, chunk=256)
    forward = torch.stack([noise[i] for i in range(600)])
    again = NoiseImages("gaussian", 600, (3, 4, 4), norm, seed=5, chunk=256)
    backward = torch.stack([again[i] for i in reversed(range(600))]).flip(0)
    assert torch.equal(forward, backward)
    other = NoiseImages("gaussian", 600, (3, 4, 4), norm, seed=6)
    assert not torch.equal(forward, torch.stack(list(other)))
    # The documented rule: chunk j is drawn from a generator seeded seed * 1_000_003 + j.
    chunk2 = torch.randn((600 - 512, 3, 4, 4), generator=torch.Generator().manual_seed(5_000_017))
    torch.testing.assert_close(forward[512:], norm((0.5 + chunk2).clamp(0, 1)))
    pixels = forward * 0.25 + 0.5
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # N(0.5, 1) clipped to [0, 1]: symmetric about 0.5; P(|z| > 0.5) at the bounds.
    assert pixels.mean().item() == pytest.approx(0.5, abs=0.02)
    clipped = ((pixels < 1e-6) | (pixels > 1 - 1e-6)).double().mean().item()
    assert clipped == pytest.approx(2 * normal.sf(0.5), abs=0.02)
    uniform = torch.stack(list(NoiseImages("uniform", 500, (3, 4, 4), norm))) * 0.25 + 0.5
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert uniform.var().item() == pytest.approx(1 / 12, abs=0.005)
    with pytest.raises(IndexError):
        noise[600]
    with pytest.raises(ValueError, match="unknown noise"):
        NoiseImages("pink", 3, (1, 2, 2))
    with pytest.raises(ValueError, match="positive int"):
        NoiseImages("uniform", 0, (1, 2, 2))


# --- ImageFolder -----------------------------------------------------------------------


def _folder(root, names: list[str], per_class: int = 2, seed: int = 0) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    saved = {}
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / name / f"{i}.png")
            saved[(name, i)] = image
    return saved


def test_image_directory_against_pil_and_numpy(tmp_path):
    saved = _folder(tmp_path, ["dog", "cat", "ant"])
    folder = ImageDirectory(tmp_path, None, 3, Normaliser((0.5,), (0.5,)))
    assert folder.classes == ["ant", "cat", "dog"] and folder.size == (6, 5)
    assert folder.targets == [0, 0, 1, 1, 2, 2]
    x, label = folder[3]
    expected = saved[("cat", 1)].transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(x.numpy(), (expected - 0.5) / 0.5, atol=1e-6)
    assert label == 1
    grey = ImageDirectory(tmp_path, (6, 5), 1, Normaliser((0.0,), (1.0,)))
    np.testing.assert_allclose(grey[0][0].numpy(), saved[("ant", 0)].mean(2)[None] / 255, atol=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an image directory"):
        ImageDirectory(tmp_path / "empty", None, 3, Normaliser((0.0,), (1.0,)))


def test_class_order_against_the_models_names():
    same = check_class_order(["cat", "dog"], ["cat", "dog"])
    assert same.same and same.mapping == [0, 1] and not same.warnings
    permuted = check_class_order(["eight", "five", "one"], ["zero", "one", "two", "three",
                                 "four", "five", "six", "seven", "eight", "nine"])  # fmt: skip
    assert not permuted.same and permuted.mapping == [8, 5, 1]
    assert "renumbered by class name (eight 0->8, five 1->5, one 2->1)" in permuted.warnings[0]
    unknown = check_class_order(["cat", "cow"], ["cat", "dog"])
    assert unknown.mapping is None and unknown.unknown == ["cow"]
    assert "1 class folder(s) are not among the model's 2 classes: cow" in unknown.warnings[0]
    numbered = check_class_order(sorted(str(i) for i in range(12)), None)
    assert numbered.mapping is None and "folder '10' is not class 10" in numbered.warnings[0]
    assert check_class_order([str(i) for i in range(10)], None).warnings == []


# --- specs -----------------------------------------------------------------------------


def test_specs_read_each_form(tmp_path):
    x = np.random.default_rng(3).random((30, 8, 8, 3)).astype(np.float32)
    y = np.arange(30) % 3
    np.savez(tmp_path / "d.npz", x_test=x, y_test=y, classes=np.array(["a", "b", "c"]))
    test = read_spec(str(tmp_path / "d.npz"), "test", PLAIN, split="test")
    assert test.kind == "npz" and test.shape == (3, 8, 8) and test.class_names == ["a", "b", "c"]
    np.testing.assert_allclose(test.data[0].numpy(), x.transpose(0, 3, 1, 2))
    # --limit: n rows drawn by numpy's default_rng(seed), kept in file order.
    limited = read_spec(str(tmp_path / "d.npz"), "test", ImageSettings(PLAIN.normaliser, limit=7))
    rows = np.sort(np.random.default_rng(0).choice(30, 7, replace=False))
    np.testing.assert_array_equal(limited.labels.numpy(), y[rows])
    # OOD and unlabelled sets drop labels and take the test set's size and channels.
    ood = read_spec(str(tmp_path / "d.npz"), "ood", PLAIN, like=replace_shape(test, (1, 4, 4)))
    assert isinstance(ood.data, torch.Tensor) and ood.shape == (1, 4, 4) and ood.labels is None
    noise = read_spec("uniform", "unlabeled", PLAIN, like=test)
    assert noise.n == 30 and noise.kind == "noise"
    with pytest.raises(SpecError, match="noise is an OOD set"):
        read_spec("uniform", "test", PLAIN)
    mixed = concat_inputs([ood, read_spec("gaussian", "unlabeled", PLAIN, like=ood)])
    assert len(mixed) == 60 and mixed[45].shape == (1, 4, 4)
    # A named fit set keeps its labels; a strict split must exist.
    named = read_spec(str(tmp_path / "d.npz"), "conformal", PLAIN, split="test")
    assert named.labels is not None
    with pytest.raises(SpecError, match=r"accepted names: val_images, val_x, x_val; splits"):
        read_spec(str(tmp_path / "d.npz"), "test", PLAIN, split="val", strict_split=True)
    with pytest.raises(FileNotFoundError, match="test data not found"):
        read_spec(str(tmp_path / "none.npz"), "test", PLAIN)
    relabelled = test.relabel([2, 0, 1])
    np.testing.assert_array_equal(relabelled.labels.numpy(), np.array([2, 0, 1])[y])


def replace_shape(loaded, shape):
    from dataclasses import replace

    return replace(loaded, shape=shape)


def test_specs_idx_with_its_labels_file(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (9, 6, 6), dtype=np.uint8)
    (tmp_path / "a-images-idx3-ubyte").write_bytes(_idx_bytes(images, 0x08))
    with pytest.raises(SpecError, match="expected a-labels-idx1-ubyte"):
        read_spec(str(tmp_path / "a-images-idx3-ubyte"), "test", PLAIN)
    (tmp_path / "a-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(9, dtype=np.uint8), 8))
    loaded = read_spec(str(tmp_path / "a-images-idx3-ubyte"), "test", PLAIN)
    np.testing.assert_allclose(loaded.data[0].numpy()[:, 0], images / np.float32(255))
    assert loaded.labels.tolist() == list(range(9))


# --- Hugging Face datasets -------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_images():
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(5)
    arrays = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["b", "a", "c"]),
         "note": datasets.Value("string")}
    )  # fmt: skip
    hf = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(a) for a in arrays], "label": [i % 3 for i in range(12)],
         "note": [f"n{i}" for i in range(12)]},
        features=features,
    )  # fmt: skip
    return hf, arrays


@pytest.mark.filterwarnings("ignore:fitting the temperature on 12 samples")
def test_hugging_face_dataset_where_a_dataset_is(hf_images):
    hf, arrays = hf_images

    def transform(batch):
        pixels = [torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)
                  for im in batch["img"]]  # fmt: skip
        return {"pixel_values": pixels, "label": batch["label"], "note": batch["note"]}

    batches = list(iter_batches(hf.with_transform(transform), batch_size=5))
    x = torch.cat([b[0] for b in batches])
    np.testing.assert_allclose(x.numpy(), arrays.transpose(0, 3, 1, 2) / 255, atol=1e-7)
    assert torch.cat([b[1] for b in batches]).tolist() == [i % 3 for i in range(12)]
    with pytest.raises(DataError, match=r"column 'img' holds PIL images.*with_transform"):
        next(iter_batches(hf, batch_size=4))
    # fit and evaluate take it as they take a Dataset.
    torch.manual_seed(0)
    model = SmallNet(num_classes=3).eval()
    wrapped = wrapcal.wrap(model, ["temperature"])
    wrapped.fit(calibration=hf.with_transform(transform), progress=False)
    direct = wrapcal.wrap(model, ["temperature"]).fit(
        calibration=(torch.from_numpy(arrays.transpose(0, 3, 1, 2) / np.float32(255)),
                     torch.arange(12) % 3),
        progress=False,
    )  # fmt: skip
    # The same images (checked above); the two paths batch them differently, and some
    # CPUs' convolutions round with the batch size (T moved by 2.6e-6 on one).
    assert wrapped.get_plugin("temperature").temperature_ == pytest.approx(
        direct.get_plugin("temperature").temperature_, rel=2e-5
    )


def test_hugging_face_directory_as_a_spec(tmp_path, hf_images):
    datasets = pytest.importorskip("datasets")
    hf, arrays = hf_images
    datasets.DatasetDict({"train": hf}).save_to_disk(str(tmp_path / "dd"))
    loaded = read_spec(str(tmp_path / "dd"), "test", PLAIN)  # its only split
    assert loaded.kind == "hf" and loaded.class_names == ["b", "a", "c"]
    assert loaded.labels.tolist() == [i % 3 for i in range(12)]
    x, label = loaded.data[4]
    np.testing.assert_allclose(x.numpy(), arrays[4].transpose(2, 0, 1) / 255, atol=1e-6)
    assert label == 1
    with pytest.raises(SpecError, match="has no split 'test'; it has train"):
        read_spec(str(tmp_path / "dd"), "test", PLAIN, split="test", strict_split=True)
