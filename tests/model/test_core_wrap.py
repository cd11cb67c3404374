"""wrap(), WrappedModel, fit with one backbone pass, predict, and bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SmallNet, SoftmaxNet, sample_plugin_installed
from torch.utils.data import DataLoader, TensorDataset

import wrapcal
import wrapcal.datasets
from wrapcal import OutputKind, Plugin, Stage
from wrapcal.errors import DataError, NotFittedError, PluginNotFoundError, SplitError


def make_data(n: int = 96, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, k, (n,), generator=g)


class CountingPlugin(Plugin):
    """Records what fit received; adds a score that reads the probabilities."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.TRAIN
        tags.fit_requires = {"train": ""}
        tags.fit_reads = ("calibration", "unlabeled")
        tags.outputs = {"margin": OutputKind.UNCERTAINTY}
        return tags

    def fit(self, model, data):
        self.seen_ = {k: len(v) for k, v in data.sets.items()}
        # Retrain nothing, but prove the features are the backbone's.
        self.feature_width_ = data.train.features.shape[1]
        return self

    def outputs(self, context):
        top2 = context.probs.topk(2).values
        return {"margin": -(top2[:, 0] - top2[:, 1])}


def test_user_model_is_never_modified(tmp_path) -> None:
    model = SmallNet()
    model.train()  # the user's mode must survive too
    x, y = make_data()
    before_state = copy.deepcopy(model.state_dict())
    model.eval()
    with torch.no_grad():
        before_out = model(x)
    model.train()
    with sample_plugin_installed(tmp_path):
        wrapped = wrapcal.wrap(model, plugins=["sample_vector_scaling", CountingPlugin()])
        wrapped.fit(train=(x, y), calibration=(x, y), progress=False)
        wrapped.eval()(x)
    assert model.training
    for key, value in before_state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert isinstance(model.out, torch.nn.Linear)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before_out)


def test_wrap_without_plugins_is_the_model() -> None:
    model = SmallNet().eval()
    x, _ = make_data()
    wrapped = wrapcal.wrap(model)
    assert not wrapped.training
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))
        assert torch.equal(wrapped.head(wrapped.backbone(x)), model(x))


def test_fit_runs_the_backbone_once_per_data_set() -> None:
    model = SmallNet().eval()
    x, y = make_data(n=200)
    wrapped = wrapcal.wrap(model, plugins=[CountingPlugin()])
    batches = []
    wrapped.backbone.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    wrapped.fit(
        train=(x, y), calibration=(x[:50], y[:50]), unlabeled=x[:70], batch_size=64, progress=False
    )
    assert wrapped.backbone_passes == 3
    assert sum(batches) == 200 + 50 + 70  # every sample through the backbone exactly once
    plugin = wrapped.plugins[0]
    assert plugin.seen_ == {"train": 200, "calibration": 50, "unlabeled": 70}
    assert plugin.feature_width_ == 16


def test_forward_shape_dtype_device_and_predict() -> None:
    model = SmallNet(num_classes=4).eval()
    x, _ = make_data(k=4)
    wrapped = wrapcal.wrap(model, plugins=[CountingPlugin()])
    wrapped.fit(train=make_data(k=4), progress=False)
    out = wrapped(x)
    assert out.shape == (96, 4) and out.dtype == torch.float32 and out.device == x.device
    with torch.inference_mode():
        pred = wrapped.predict(x[:1])
    assert pred.probs.shape == (1, 4)
    assert torch.allclose(pred.probs.sum(-1), torch.ones(1))
    assert pred.label.item() == int(model(x[:1]).argmax())
    assert pred.confidence.item() == pytest.approx(pred.probs.max().item())
    assert set(pred.scores) >= {"msp", "entropy", "energy", "max_logit", "margin"}
    logits = model(x[:1]).detach()
    assert pred.scores["energy"].item() == pytest.approx(
        -torch.logsumexp(logits, -1).item(), abs=1e-5
    )
    with torch.no_grad():
        assert wrapped.predict(x).scores["msp"].shape == (96,)


def test_predict_features_equals_predict() -> None:
    model = SmallNet().eval()
    x, y = make_data()
    wrapped = wrapcal.wrap(model, plugins=[CountingPlugin()]).fit(train=(x, y), progress=False)
    from_images = wrapped.predict(x)
    with torch.no_grad():
        from_features = wrapped.predict_features(wrapped.backbone(x))
    assert torch.equal(from_features.probs, from_images.probs)
    assert from_features.scores.keys() == from_images.scores.keys()
    for name, score in from_images.scores.items():
        assert torch.equal(from_features.scores[name], score), name


def test_predict_accepts_loaders_datasets_and_arrays() -> None:
    model = SmallNet().eval()
    x, y = make_data()
    wrapped = wrapcal.wrap(model)
    reference = wrapped.predict(x).probs
    for data in (
        DataLoader(TensorDataset(x, y), batch_size=17),
        TensorDataset(x, y),
        (x.numpy(), y.numpy()),
        x.numpy(),
    ):
        got = wrapped.predict(data, batch_size=17).probs
        assert torch.allclose(got, reference, atol=1e-6)


def test_single_logit_binary_model() -> None:
    model = SmallNet(num_classes=1).eval()
    x, _ = make_data()
    wrapped = wrapcal.wrap(model)
    pred = wrapped.predict(x)
    p1 = torch.sigmoid(model(x)).detach()[:, 0]
    assert torch.allclose(pred.probs[:, 1], p1, atol=1e-6)
    assert wrapped(x).shape == (96, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_runs_on_cuda_unchanged() -> None:
    model = SmallNet().eval().cuda()
    x, y = make_data()
    wrapped = wrapcal.wrap(model, plugins=[CountingPlugin()])
    wrapped.fit(train=(x, y), progress=False)
    out = wrapped(x.cuda())
    assert out.device.type == "cuda"
    assert torch.allclose(out, model(x.cuda()))


def test_unknown_plugin_lists_installed(tmp_path) -> None:
    with (
        sample_plugin_installed(tmp_path),
        pytest.raises(PluginNotFoundError, match="installed plugins: .*sample_vector_scaling"),
    ):
        wrapcal.wrap(SmallNet(), plugins=["no_such_plugin"])


def test_unfitted_plugin_says_which_call_is_missing(tmp_path) -> None:
    with sample_plugin_installed(tmp_path):
        wrapped = wrapcal.wrap(SmallNet().eval(), plugins=["sample_vector_scaling"])
        with pytest.raises(NotFittedError, match=r"sample_vector_scaling .*wrapped\.fit"):
            wrapped(make_data()[0])
        with pytest.raises(DataError, match=r"needs wrapped.fit\(calibration=...\)"):
            wrapped.fit(train=make_data(), progress=False)


def test_plugin_order_does_not_matter(tmp_path) -> None:
    x, y = make_data(n=300)
    model = SmallNet().eval()
    outs = []
    with sample_plugin_installed(tmp_path):
        for plugins in (
            ["sample_vector_scaling", CountingPlugin()],
            [CountingPlugin(), "sample_vector_scaling"],
        ):
            wrapped = wrapcal.wrap(model, plugins=plugins)
            assert [type(p).__name__ for p in wrapped.plugins] == [
                "CountingPlugin",
                "VectorScaling",
            ]
            wrapped.fit(train=(x, y), calibration=(x, y), progress=False)
            outs.append(wrapped(x))
    assert torch.equal(outs[0], outs[1])


def test_vector_scaling_sample_plugin_lowers_nll(tmp_path) -> None:
    """The sample plugin does real work: NLL on its calibration data goes down."""
    x, y = make_data(n=400)
    model = SmallNet().eval()
    with sample_plugin_installed(tmp_path):
        wrapped = wrapcal.wrap(model, plugins=["sample_vector_scaling"]).fit(
            calibration=(x, y), progress=False
        )
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
        after = F.cross_entropy(wrapped(x), y).item()
    assert after < before


def test_bad_inputs_get_clear_errors() -> None:
    model = SmallNet().eval()
    x, y = make_data()
    wrapped = wrapcal.wrap(model, plugins=[CountingPlugin()])
    with pytest.raises(DataError, match="dtype torch.uint8"):
        wrapped.fit(train=((x * 255).to(torch.uint8), y), progress=False)
    with pytest.raises(DataError, match=r"labels must be in \[0, 10\)"):
        wrapped.fit(train=(x, y + 10), progress=False)
    with pytest.raises(DataError, match="one label per input"):
        wrapped.fit(train=(x, y[:5]), progress=False)
    with pytest.raises(DataError, match="not one-hot"):
        wrapped.fit(train=(x, F.one_hot(y, 10)), progress=False)
    nan_x = x.clone()
    nan_x[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN or inf features"):
        wrapped.fit(train=(nan_x, y), progress=False)
    with pytest.raises(DataError, match="cannot read data of type str"):
        wrapped.fit(train="images/", progress=False)
    with pytest.raises(DataError, match="empty"):
        wrapped.fit(train=(x[:0], y[:0]), progress=False)
    with pytest.raises(TypeError, match="plugins must be names"):
        wrapcal.wrap(model, plugins=[42])


def test_model_that_cannot_be_split_gets_told_how() -> None:
    with pytest.raises(SplitError, match=r"SoftmaxNet.*split=wrapcal.Split"):
        wrapcal.wrap(SoftmaxNet().eval())(make_data()[0])
    conv_only = torch.nn.Sequential(torch.nn.Conv2d(3, 10, 3), torch.nn.AdaptiveAvgPool2d(1))
    with pytest.raises(SplitError, match="no nn.Linear"):
        wrapcal.wrap(conv_only)


def test_split_by_hand() -> None:
    model = SmallNet().eval()
    x, _ = make_data()
    by_name = wrapcal.wrap(model, head="out")
    assert torch.equal(by_name(x), model(x))
    features = copy.deepcopy(model)
    features.out = torch.nn.Identity()
    manual = wrapcal.wrap(model, split=wrapcal.Split(backbone=features, head=model.out))
    assert torch.equal(manual(x), model(x))
    with pytest.raises(SplitError, match=r"no submodule 'nope'.*\['hidden', 'out'\]"):
        wrapcal.wrap(model, head="nope")


def test_digits_default_split_is_fixed() -> None:
    a, b = wrapcal.datasets.digits(), wrapcal.datasets.digits()
    assert a.train[0].shape == (1000, 3, 32, 32)
    assert len(a.calibration[1]) == 397 and len(a.test[1]) == 400
    assert torch.equal(a.test[0], b.test[0]) and torch.equal(a.train[1], b.train[1])
    # Disjoint and complete: 1797 images in all, every class in every split.
    assert len(a.train[1]) + len(a.calibration[1]) + len(a.test[1]) == 1797
    for split in (a.train, a.calibration, a.test):
        assert set(np.unique(split[1].numpy())) == set(range(10))


# --- inputs (issue 30, item 6) --------------------------------------------------------------


def _fitted_small(seed: int = 0) -> tuple[wrapcal.WrappedModel, torch.Tensor]:
    x, _ = make_data(96, 10, seed)
    model = SmallNet().eval()
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::3] = (y[::3] + 1) % 10
    wrapped = wrapcal.wrap(model, ["temperature"]).fit(calibration=(x, y), progress=False)
    return wrapped, x


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_predict_features_refuses_nan_and_inf_features_as_predict_refuses_pixels(bad) -> None:
    wrapped, x = _fitted_small()
    features = wrapped.backbone(x[:6]).detach()
    features[4, 2] = bad
    with pytest.raises(DataError, match=r"features hold NaN or inf values.*row 4"):
        wrapped.predict_features(features)
    with pytest.raises(DataError, match="features hold NaN or inf"):
        wrapped.head_logits(features)
    pixels = x[:6].clone()
    pixels[4, 0, 0, 0] = bad
    with pytest.raises(DataError, match="NaN or inf"):  # what predict says of pixels
        wrapped.predict(pixels)
    # Trusted inputs: the check can be turned off, for features as for pixels.
    wrapped.check_inputs = False
    assert not torch.isfinite(wrapped.predict_features(features).probs[4]).all()
    torch.testing.assert_close(  # the other rows are what they always were
        wrapped.predict_features(features).probs[:4], wrapped.predict(x[:4]).probs
    )


def test_predict_features_says_what_shape_it_takes() -> None:
    wrapped, x = _fitted_small()
    features = wrapped.backbone(x[:3]).detach()
    with pytest.raises(DataError, match=r"one row instead of a batch.*unsqueeze\(0\)"):
        wrapped.predict_features(features[0])
    with pytest.raises(DataError, match=r"takes the backbone's features \[N, 16\]"):
        wrapped.predict_features(features[:, :8])


def test_an_empty_batch_gives_empty_outputs_of_the_right_shapes() -> None:
    fitted, x = _fitted_small()
    bare = wrapcal.wrap(SmallNet().eval(), [])  # no fit: the input shape is unknown too
    for model in (fitted, bare):
        full = model.predict(x[:3])
        for empty in (model.predict(x[:0]), model.predict(x[:0].numpy())):
            assert len(empty) == 0
            assert empty.probs.shape == (0, 10) and empty.logits.shape == (0, 10)
            assert empty.label.shape == (0,) and empty.label.dtype == full.label.dtype
            assert empty.confidence.shape == (0,)
            assert sorted(empty.scores) == sorted(full.scores)
            assert all(v.shape == (0,) for v in empty.scores.values())
        features = model.backbone(x[:0])
        assert model.predict_features(features).probs.shape == (0, 10)
        assert model.head_logits(features).shape == (0, 10)
        with torch.no_grad():
            out = model(x[:0])
        assert out.shape == (0, 10) and out.dtype == torch.float32


def test_an_empty_batch_keeps_every_plugin_output_shape(tmp_path) -> None:
    x, _ = make_data(96, 10)
    model = SmallNet().eval()
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::3] = (y[::3] + 1) % 10
    wrapped = wrapcal.wrap(model, ["temperature", "conformal"]).fit(
        calibration=(x[:48], y[:48]), conformal=(x[48:], y[48:]), progress=False
    )
    full, empty = wrapped.predict(x[:2]), wrapped.predict(x[:0])
    assert sorted(empty.outputs) == sorted(full.outputs)
    for key, value in full.outputs.items():
        assert empty.outputs[key].shape == (0, *value.shape[1:]), key
        assert empty.outputs[key].dtype == value.dtype, key


def test_one_input_without_its_batch_dimension_is_told_to_unsqueeze() -> None:
    class NoNorm(torch.nn.Module):  # a convolution takes [3, H, W] unbatched: no error there
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.out = torch.nn.Linear(4, 5)

        def forward(self, x):
            return self.out(self.conv(x).flatten(-2).mean(-1))

    x, _ = make_data(4)
    for model in (SmallNet(), NoNorm()):  # BatchNorm's ValueError; features of 3 rows
        wrapped = wrapcal.wrap(model.eval(), [])
        assert wrapped.input_shape is None  # nothing says what the model takes
        for call in (wrapped.predict, wrapped):
            with pytest.raises(DataError, match=r"one input .* x\.unsqueeze\(0\)") as caught:
                call(x[0])
            assert not isinstance(caught.value, SplitError)
        assert wrapped.predict(x[0].unsqueeze(0)).probs.shape[0] == 1
    fitted, _ = _fitted_small()  # shape known from fit: said before the backbone runs
    with pytest.raises(DataError, match=r"unsqueeze\(0\)"):
        fitted.predict(x[0])
