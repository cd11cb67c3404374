"""The features/head split reproduces the logits of timm, torchvision and custom models."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from helpers import SmallNet

import wrapcal
from wrapcal import hookimpl
from wrapcal.errors import SplitError
from wrapcal.model.split import Split

# (name, create kwargs, input side). Small variants, small inputs: the point is the
# split, not the accuracy. Together: CNNs, ViT/DeiT, ConvNeXt, Swin, MobileNet,
# EfficientNet, RegNet, DenseNet, MLP-Mixer, a hybrid and two distilled models.
TIMM_MODELS = [
    ("resnet18", {}, 32),
    ("resnet10t", {}, 32),
    ("efficientnet_b0", {}, 32),
    ("mobilenetv3_small_100", {}, 32),
    ("mobilenetv2_050", {}, 32),
    ("convnext_atto", {}, 32),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32),
    ("deit_tiny_patch16_224", {"img_size": 32}, 32),
    ("swin_tiny_patch4_window7_224", {"img_size": 56, "window_size": 7}, 56),
    ("regnetx_002", {}, 32),
    ("densenet121", {}, 32),
    ("mixer_s16_224", {"img_size": 32}, 32),
    ("edgenext_xx_small", {}, 64),
    ("ghostnet_100", {}, 32),
    # Distilled: two heads averaged in eval mode (DeiT: two tokens; LeViT: one pooling).
    ("deit_tiny_distilled_patch16_224", {"img_size": 32}, 32),
    ("levit_128s", {}, 224),
]

TORCHVISION_MODELS = [
    ("resnet18", 32, {}),
    ("vgg11_bn", 32, {}),
    ("densenet121", 32, {}),
    ("mobilenet_v3_small", 32, {}),
    ("efficientnet_b0", 32, {}),
    ("convnext_tiny", 32, {}),
    ("vit_b_16", 32, {"image_size": 32}),
    ("swin_t", 32, {}),
    ("regnet_y_400mf", 32, {}),
    ("shufflenet_v2_x0_5", 32, {}),
    ("mnasnet0_5", 32, {}),
    ("googlenet", 32, {"aux_logits": False, "init_weights": True}),
]


def check_exact_split(model: torch.nn.Module, side: int) -> wrapcal.WrappedModel:
    model.eval()
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        wrapped = wrapcal.wrap(model, plugins=[])
        torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=1e-5)
        features = wrapped.backbone(x)
        assert features.shape == (2, wrapped.num_features)
        torch.testing.assert_close(wrapped.head(features), expected, rtol=0, atol=1e-5)
        # The user's model still has its head.
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    return wrapped


@pytest.mark.parametrize(("name", "kwargs", "side"), TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS])
def test_timm_split_is_exact(name: str, kwargs: dict, side: int) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=7, **kwargs)
    wrapped = check_exact_split(model, side)
    assert wrapped.split_kind == "timm"
    assert wrapped.num_classes == 7
    assert wrapped.source["name"] == model.pretrained_cfg["architecture"]


@pytest.mark.parametrize(
    ("name", "kwargs", "side"),
    [("deit_tiny_distilled_patch16_224", {"img_size": 32}, 32), ("levit_128s", {}, 224)],
)
def test_distilled_models_take_plugins_on_the_averaged_logits(name, kwargs, side, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    x = torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(1))
    wrapped = wrapcal.wrap(
        model, ["temperature", ("discrepancy", {"epochs_pretrain": 1, "epochs": 1})]
    )
    features = torch.randn(200, wrapped.num_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        labels = wrapped.head(features).argmax(-1)
    wrapped.fit_features(
        train=(features, labels), calibration=(features, labels), unlabeled=features, progress=False
    )
    with torch.no_grad():
        members = wrapped.members(x)
        # Head 1 is the model's own averaged pair of heads: the plugins act on what the
        # model outputs, not on one of its heads.
        torch.testing.assert_close(members[0], wrapped.head(wrapped.backbone(x)))
    loaded = wrapcal.load(wrapped.save(tmp_path / "m.wrapcal"))
    with torch.no_grad():
        assert torch.equal(loaded(x), wrapped(x))


@pytest.mark.parametrize(
    ("name", "side", "kwargs"), TORCHVISION_MODELS, ids=[m[0] for m in TORCHVISION_MODELS]
)
def test_torchvision_split_is_exact(name: str, side: int, kwargs: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet's init-weights notice
        model = torchvision.models.get_model(name, weights=None, num_classes=7, **kwargs)
    wrapped = check_exact_split(model, side)
    assert wrapped.split_kind == "torchvision"
    assert isinstance(wrapped.head, torch.nn.Linear) and wrapped.head.out_features == 7


def test_hand_written_module_uses_the_linear_fallback() -> None:
    wrapped = check_exact_split(SmallNet(num_classes=5), 8)
    assert wrapped.split_kind == "module" and wrapped.head_path == "out"
    assert wrapped.num_features == 16


def test_convolutional_head_is_refused_with_the_fix() -> None:
    model = torchvision.models.squeezenet1_0(weights=None, num_classes=7)
    with pytest.raises(SplitError, match=r"SqueezeNet.*wrapcal.Split\(backbone="):
        wrapcal.wrap(model)


def test_third_party_adapter_takes_precedence() -> None:
    """A new model family is taught to wrapcal by registering an adapter plugin."""

    class TwoPart(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
            self.classify = torch.nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classify(torch.tanh(self.body(x)))

    class TwoPartAdapter:
        @hookimpl(tryfirst=True)
        def wrapcal_split_model(self, model):
            if not isinstance(model, TwoPart):
                return None
            backbone = torch.nn.Sequential(model.body, torch.nn.Tanh())
            return Split(backbone, model.classify, kind="manual")

    pm = wrapcal.get_plugin_manager()
    adapter = TwoPartAdapter()
    pm.register(adapter)
    try:
        model = TwoPart().eval()
        wrapped = wrapcal.wrap(model)
        assert wrapped.split_kind == "manual"
        assert isinstance(wrapped.backbone[1], torch.nn.Tanh)
        x = torch.randn(4, 3, 2, 2)
        torch.testing.assert_close(wrapped(x), model(x), rtol=0, atol=0)
    finally:
        pm.unregister(adapter)


def test_a_bare_linear_model_is_its_own_head(tmp_path) -> None:
    """Logistic regression on given features: identity backbone, the model as head."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x = torch.randn(80, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::3] = (y[::3] + 1) % 3
    wrapped = wrapcal.wrap(model, ["temperature"]).fit(calibration=(x, y), progress=False)
    assert wrapped.split_kind == "linear" and isinstance(wrapped.backbone, torch.nn.Identity)
    with torch.no_grad():
        t = wrapped.get_plugin("temperature").temperature_
        torch.testing.assert_close(wrapped(x), model(x) / t)
    report = wrapcal.evaluate(model, (x, y), progress=False, bootstrap=0)
    assert report.calibration["model"]["accuracy"] == pytest.approx(
        (model(x).argmax(-1) == y).float().mean().item()
    )
    loaded = wrapcal.load(wrapped.save(tmp_path / "lin.wrapcal"), model=torch.nn.Linear(5, 3))
    assert torch.equal(loaded(x), wrapped(x))


class _TupleNet(torch.nn.Module):
    """Returns ``(logits, aux)``, as many research models do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(x))
        return self.fc(h), h.sum(1)


class _DictNet(_TupleNet):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        h = torch.relu(self.body(x))
        return {"logits": self.fc(h), "aux": h.mean(1)}


class _ScaledTupleNet(_TupleNet):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(x))
        return self.fc(h) * 2, h  # changes the last layer's output: no split there


@pytest.mark.parametrize("net", [_TupleNet, _DictNet])
def test_a_model_returning_a_tuple_or_dict_keeps_it_with_calibrated_logits(net) -> None:
    """#28: code that called the model keeps working: ``wrapped(x)`` returns the model's
    own structure, the calibrated logits in the logits' place, the rest unchanged."""
    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = model(x)
    logits = own[0] if isinstance(own, tuple) else own["logits"]
    y = logits.argmax(-1)
    y[::4] = (y[::4] + 1) % 3
    wrapped = wrapcal.wrap(model, ["temperature"]).fit(calibration=(x, y), progress=False)
    t = wrapped.get_plugin("temperature").temperature_
    with torch.no_grad():
        out = wrapped(x)
    assert type(out) is type(own)
    if isinstance(own, tuple):
        torch.testing.assert_close(out[0], own[0] / t)
        assert torch.equal(out[1], own[1])
    else:
        assert list(out) == list(own)
        torch.testing.assert_close(out["logits"], own["logits"] / t)
        assert torch.equal(out["aux"], own["aux"])
    torch.testing.assert_close(wrapped.predict(x).logits, logits / t)


def test_a_model_that_changes_its_last_layers_output_in_a_tuple_is_refused() -> None:
    with pytest.raises(SplitError, match="changes that layer's output"):
        wrapcal.wrap(_ScaledTupleNet().eval())(torch.randn(2, 6))
