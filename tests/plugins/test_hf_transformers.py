"""Hugging Face ``transformers`` image classifiers: split, plugins, save/load, class names.

Small configs with random weights (no download): the point is that the split is exact
for each architecture's own pooled representation, that every built-in plugin works on
one of them, and that a saved file is rebuilt from its config and nothing else.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import wrapcal  # noqa: E402
from wrapcal.cli import main  # noqa: E402
from wrapcal.cli.models import model_class_names  # noqa: E402
from wrapcal.datasets import DIGITS_MEAN, DIGITS_STD, digits  # noqa: E402
from wrapcal.errors import DataError, SavedFileError, SplitError  # noqa: E402
from wrapcal.files import families as registry  # noqa: E402
from wrapcal.files import format as saving  # noqa: E402
from wrapcal.model.fitting import read_sets  # noqa: E402

AutoModel = transformers.AutoModelForImageClassification
CONFIG_MAPPING = transformers.models.auto.configuration_auto.CONFIG_MAPPING

_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8}
_LEVIT = {"hidden_sizes": [16, 24, 32], "num_attention_heads": [1, 2, 2], "depths": [1, 1, 1]}


def _tokens(h: torch.Tensor, *index: int) -> torch.Tensor:
    return torch.cat([h[:, i] for i in index], dim=-1)


# id -> (model_type, class, small config, side, what the classifier reads, written out
# from each architecture's documented forward: the independent reference of the split).
ARCHS = {
    "vit": (
        "vit",
        "ViTForImageClassification",
        {**_VIT, "intermediate_size": 64, "image_size": 32},
        32,
        lambda m, x: m.vit(x).last_hidden_state[:, 0],
    ),
    "deit": (
        "deit",
        "DeiTForImageClassification",
        {**_VIT, "intermediate_size": 64, "image_size": 32},
        32,
        lambda m, x: m.deit(x).last_hidden_state[:, 0],
    ),
    "deit-teacher": (
        "deit",
        "DeiTForImageClassificationWithTeacher",
        {**_VIT, "intermediate_size": 64, "image_size": 32},
        32,
        lambda m, x: _tokens(m.deit(x).last_hidden_state, 0, 1),
    ),
    "beit": (
        "beit",
        "BeitForImageClassification",
        {**_VIT, "intermediate_size": 64, "image_size": 32},
        32,
        lambda m, x: m.beit(x).pooler_output,
    ),
    "dinov2": (
        "dinov2",
        "Dinov2ForImageClassification",
        {**_VIT, "mlp_ratio": 2, "image_size": 32},
        32,
        lambda m, x: (lambda h: torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=-1))(
            m.dinov2(x).last_hidden_state
        ),
    ),
    "convnext": (
        "convnext",
        "ConvNextForImageClassification",
        {"num_stages": 2, "hidden_sizes": [8, 16], "depths": [1, 1]},
        32,
        lambda m, x: m.convnext(x).pooler_output,
    ),
    "swin": (
        "swin",
        "SwinForImageClassification",
        {"image_size": 32, "patch_size": 4, "embed_dim": 8, "depths": [1, 1]}
        | {"num_heads": [1, 2], "window_size": 4},
        32,
        lambda m, x: m.swin(x).pooler_output,
    ),
    "resnet": (
        "resnet",
        "ResNetForImageClassification",
        {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"},
        32,
        lambda m, x: m.resnet(x).pooler_output.flatten(1),
    ),
    "efficientnet": (
        "efficientnet",
        "EfficientNetForImageClassification",
        {"image_size": 32, "width_coefficient": 0.1, "depth_coefficient": 0.1, "hidden_dim": 128},
        32,
        lambda m, x: m.efficientnet(x).pooler_output,
    ),
    "mobilevit": (
        "mobilevit",
        "MobileViTForImageClassification",
        {"image_size": 32, "patch_size": 2, "hidden_sizes": [16, 24, 32]}
        | {"neck_hidden_sizes": [8, 8, 16, 16, 24, 24, 32], "num_attention_heads": 2},
        32,
        lambda m, x: m.mobilevit(x).pooler_output,
    ),
    "levit-teacher": (
        "levit",
        "LevitForImageClassificationWithTeacher",
        {**_LEVIT, "image_size": 64, "key_dim": [8, 8, 8]},
        64,
        lambda m, x: m.levit(x).last_hidden_state.mean(dim=1),
    ),
    "swiftformer": (
        "swiftformer",
        "SwiftFormerForImageClassification",
        {"depths": [1, 1, 1, 1], "embed_dims": [8, 16, 24, 32]},
        32,
        lambda m, x: m.norm(m.swiftformer(x).last_hidden_state).flatten(2).mean(-1),
    ),
}
ENGLISH = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def build(arch: str, num_labels: int = 5, seed: int = 0, **extra) -> torch.nn.Module:
    model_type, cls, config, _, _ = ARCHS[arch]
    kwargs = {"num_labels": num_labels, **config, **extra}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModel.from_config(CONFIG_MAPPING[model_type](architectures=[cls], **kwargs))


def pixels(side: int, n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Models this small gain nothing from threads; on a shared CPU they only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub is offline and any connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("wrapcal opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_architecture_splits_exactly_and_round_trips(arch, tmp_path, offline) -> None:
    model_type, cls, _, side, reads = ARCHS[arch]
    model = build(arch).eval()
    x = pixels(side)
    with torch.no_grad():
        own = model(pixel_values=x)
        logits = own.logits
        expected_features = reads(model, x)
    wrapped = wrapcal.wrap(model)
    with torch.no_grad():
        out = wrapped(x)
        features = wrapped.backbone(x)
        split_logits = wrapped.head(features)
    # The model's own output type, its logits in place (no plugin: the same logits).
    assert type(out) is type(own) and list(out.keys()) == list(own.keys())
    assert out.logits.shape == (4, 5)
    torch.testing.assert_close(features, expected_features, atol=1e-6, rtol=0)
    torch.testing.assert_close(split_logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    assert wrapped.num_classes == 5 and wrapped.num_features == expected_features.shape[1]
    assert wrapped.split_kind == "transformers"
    assert wrapped.source["library"] == "transformers" and wrapped.source["name"] == model_type
    assert wrapped.source["kwargs"]["architectures"] == [cls]
    # The user's model is not changed: wrap cut a copy.
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, logits)

    path = wrapped.save(tmp_path / f"{arch}.wrapcal")
    json.dumps(saving.read(path).config)  # plain JSON throughout
    loaded = wrapcal.load(path)
    assert type(loaded.backbone.model).__name__ == cls
    assert loaded.source == wrapped.source
    assert (loaded.input_shape, loaded.fixed_input_size) == (
        wrapped.input_shape,
        wrapped.fixed_input_size,
    )
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, out.logits)


def test_the_pooled_features_and_input_checks_per_architecture() -> None:
    """ViT's patch grid fixes its input size; Swin pads and takes any size."""
    vit = wrapcal.wrap(build("vit"))
    assert vit.input_shape == (3, 32, 32) and vit.fixed_input_size
    with pytest.raises(DataError, match="takes exactly"):
        vit(pixels(48))
    swin = wrapcal.wrap(build("swin"))
    assert swin.input_shape == (3, 32, 32) and not swin.fixed_input_size
    with torch.no_grad():
        assert swin(pixels(48)).logits.shape == (4, 5)
    resnet = wrapcal.wrap(build("resnet"))
    assert resnet.head_path == "classifier.1" and resnet.input_shape is None


def test_mc_dropout_finds_the_dropout_before_the_classifier() -> None:
    """EfficientNet applies ``dropout`` (p = dropout_rate) to the classifier's input:
    MC dropout samples that one; ViT has none, and MC dropout says so."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = wrapcal.wrap(build("efficientnet", dropout_rate=0.3), ["mc_dropout"])
    assert (wrapped.plugins[0].p_, wrapped.plugins[0].head_module_) == (0.3, "dropout")
    with pytest.warns(UserWarning, match="no dropout before its head"):
        wrapcal.wrap(build("vit"), ["mc_dropout"])


def test_cli_builds_transformers_models_through_the_allow_list(capsys) -> None:
    argv = ["evaluate", "transformers:vit", "--data", "digits", "--model-arg"]
    assert main([*argv, "trust_remote_code=true"]) == 2
    assert "'trust_remote_code' is not allowed" in capsys.readouterr().err
    assert main([*argv, "hidden_act=/tmp/evil.py"]) == 2
    assert "hidden_act='/tmp/evil.py' is invalid" in capsys.readouterr().err


def test_transformers_model_that_cannot_be_split_says_why() -> None:
    config = CONFIG_MAPPING["imagegpt"](n_embd=16, n_layer=1, n_head=2, vocab_size=17)
    config.architectures = ["ImageGPTForImageClassification"]
    with pytest.raises(SplitError, match="token ids"):
        wrapcal.wrap(AutoModel.from_config(config))
    base = transformers.ViTModel(CONFIG_MAPPING["vit"](**_VIT, intermediate_size=64))
    with pytest.raises(SplitError, match="no linear classifier"):
        wrapcal.wrap(base)
    with pytest.raises(SplitError, match="num_labels=0"):
        wrapcal.wrap(build("vit", num_labels=0))


def test_a_subclass_is_wrapped_but_loaded_only_with_the_model(tmp_path) -> None:
    class Mine(transformers.ViTForImageClassification):
        pass

    config = CONFIG_MAPPING["vit"](num_labels=3, **_VIT, intermediate_size=64, image_size=32)
    torch.manual_seed(0)
    model = Mine(config).eval()
    wrapped = wrapcal.wrap(model)
    assert wrapped.source == {}
    path = wrapped.save(tmp_path / "mine.wrapcal")
    with pytest.raises(SavedFileError, match="cannot be rebuilt by name"):
        wrapcal.load(path)
    with torch.no_grad():
        again = wrapcal.load(path, model=model)(pixels(32)).logits
        assert torch.equal(again, wrapped(pixels(32)).logits)


def test_a_model_that_changes_its_classifiers_output_is_refused() -> None:
    class Doubled(transformers.ViTForImageClassification):
        def forward(self, pixel_values):
            out = super().forward(pixel_values=pixel_values)
            out.logits = out.logits * 2
            return out

    config = CONFIG_MAPPING["vit"](num_labels=3, **_VIT, intermediate_size=64, image_size=32)
    wrapped = wrapcal.wrap(Doubled(config))
    with pytest.raises(SplitError, match="its logits are not the classifier's output"):
        wrapped(pixels(32))


# --- every built-in plugin on a ViT ---------------------------------------------------

#: Settings that keep each plugin's fit short on 1,000 digits.
FAST = {
    "discrepancy": {"epochs_pretrain": 2, "epochs": 2},
    "mc_dropout": {"samples": 4},
    "label_smoothing": {"max_iter": 50},
    "knn": {"k": 5},
    "dirichlet": {"cv": 2, "max_iter": 100},
    "matrix_scaling": {"cv": 2, "max_iter": 100},
    "vector_scaling": {"max_iter": 100},
    "auto_calibration": {"cv": 2, "candidates": ["temperature", "vector_scaling"]},
}


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture(scope="module")
def trained_vit(data):
    """A small ViT on the digits, its classifier fitted (LBFGS) on its random features,
    with the digits' class names: well above chance, so calibration has work to do."""
    wide = {"hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 1}
    model = build("vit", num_labels=10, id2label=dict(enumerate(ENGLISH)), **wide).eval()
    with torch.no_grad():
        features = model.vit(data.train[0]).last_hidden_state[:, 0]
    head = model.classifier
    opt = torch.optim.LBFGS(head.parameters(), max_iter=80, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(features), data.train[1]) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        accuracy = (model(pixel_values=data.test[0]).logits.argmax(1) == data.test[1]).float()
    assert accuracy.mean() > 0.5
    return model


def test_temperature_on_a_vit_equals_a_fit_on_its_own_logits(data, trained_vit) -> None:
    """The cached features are the classifier's input: T fitted through wrapcal equals T
    fitted (scipy, written out here) on the model's own calibration logits."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    wrapped = wrapcal.wrap(trained_vit, ["temperature"]).fit(
        calibration=data.calibration, progress=False
    )
    with torch.no_grad():
        z = trained_vit(pixel_values=data.calibration[0]).logits.double().numpy()
    y = data.calibration[1].numpy()

    def nll(t: float) -> float:
        return -log_softmax(z / t, axis=1)[np.arange(len(y)), y].mean()

    reference = minimize_scalar(nll, bounds=(0.05, 20), method="bounded").x
    assert wrapped.plugins[0].temperature_ == pytest.approx(reference, rel=1e-3)


def test_every_built_in_plugin_on_a_vit(data, trained_vit, tmp_path, offline) -> None:
    names = sorted(n for n, info in wrapcal.plugin_registry().items() if info.package == "wrapcal")
    assert len(names) >= 10
    sets = {"train": data.train, "calibration": data.calibration, "unlabeled": data.test[0]}
    x = data.test[0][:32]
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = wrapcal.wrap(trained_vit, [(name, FAST.get(name, {}))])
            reads, _ = read_sets(wrapped)
            wrapped.fit(**{k: v for k, v in sets.items() if k in reads}, progress=False)
        prediction = wrapped.predict(x)
        assert prediction.probs.shape == (32, 10), name
        assert torch.isfinite(prediction.probs).all(), name
        assert all(torch.isfinite(s).all() for s in prediction.scores.values()), name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # load repeats the plugins' attach warnings
            loaded = wrapcal.load(wrapped.save(tmp_path / f"{name}.wrapcal"))
        again = loaded.predict(x)
        assert torch.equal(again.probs, prediction.probs), name
        for score, values in prediction.scores.items():
            assert torch.equal(again.scores[score], values), (name, score)
        assert model_class_names(loaded) == ENGLISH, name


# --- the model's interface ---------------------------------------------------------


def test_a_wrapped_classifier_answers_like_the_model_with_calibrated_logits(
    data, trained_vit, tmp_path
) -> None:
    """``wrapped(x).logits`` is what ``model(x).logits`` was, calibrated: the model's
    logits over the fitted temperature (written out), equal to ``predict``'s logits;
    an empty batch keeps the type; the .pt2 export (which runs the chain, not
    ``forward``) still gives ``predict``'s logits."""
    wrapped = wrapcal.wrap(trained_vit, ["temperature"])
    wrapped.fit(calibration=data.calibration, progress=False)
    x = data.test[0][:8]
    with torch.no_grad():
        own = trained_vit(pixel_values=x)
        out = wrapped(x)
    t = float(wrapped.get_plugin("temperature").temperature)
    assert type(out) is transformers.modeling_outputs.ImageClassifierOutput
    assert abs(t - 1.0) > 0.05  # calibration changed something to check
    torch.testing.assert_close(out.logits, own.logits / t, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.logits, wrapped.predict(x).logits)
    assert out[0] is out.logits  # a ModelOutput indexes its fields too
    empty = wrapped(x[:0])
    assert type(empty) is type(out) and empty.logits.shape == (0, 10)
    path = wrapcal.export(wrapped, tmp_path / "vit.pt2", format="torch")
    with torch.no_grad():
        exported = torch.export.load(str(path)).module()(x)
    torch.testing.assert_close(exported[0], out.logits, atol=1e-5, rtol=1e-5)


def test_a_model_returning_tuples_gets_a_tuple_with_the_calibrated_logits() -> None:
    """``return_dict=False`` (a ResNet, whose forward honours it): ``(logits, hidden
    states)`` in, the same tuple out, the logits replaced, the rest the model's own."""
    model = build("resnet", return_dict=False, output_hidden_states=True).eval()
    x = pixels(32)
    with torch.no_grad():
        own = model(pixel_values=x)
    assert isinstance(own, tuple) and len(own) == 2
    wrapped = wrapcal.wrap(model, [wrapcal_temperature(2.0)])
    with torch.no_grad():
        out = wrapped(x)
    assert type(out) is tuple and len(out) == 2
    torch.testing.assert_close(out[0], own[0] / 2.0, atol=1e-5, rtol=1e-5)
    assert len(out[1]) == len(own[1])
    for got, want in zip(out[1], own[1], strict=True):
        torch.testing.assert_close(got, want)
    assert torch.equal(out[0], wrapped.predict(x).logits)


def wrapcal_temperature(value: float) -> wrapcal.Plugin:
    """A temperature plugin set by hand (no data needed)."""
    from wrapcal_plugins.calibration.temperature import TemperatureScaler

    plugin = TemperatureScaler()
    plugin.temperature.fill_(value)
    plugin.fitted_ = True
    return plugin


def test_an_image_processor_gives_the_preprocessing_record(tmp_path) -> None:
    """A ViT image processor (built offline, its defaults): mean, std, size, rescale,
    resampling; saved with the model and back."""
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    wrapped = wrapcal.wrap(build("vit"), preprocess=processor)
    record = wrapped.preprocess
    assert record.mean == tuple(processor.image_mean) and record.std == tuple(processor.image_std)
    assert record.size == (32, 32) and record.value_range == (0.0, 1.0)
    assert record.interpolation == "bilinear"  # PIL.Image.BILINEAR, the processor's resample
    loaded = wrapcal.load(wrapped.save(tmp_path / "vit.wrapcal"))
    assert loaded.preprocess == record
    with pytest.raises(ValueError, match="the model takes only"):
        wrapcal.wrap(build("vit"), preprocess=transformers.ViTImageProcessor())  # 224 != 32


# --- class names ---------------------------------------------------------------------


def test_class_names_come_from_id2label_unless_they_are_placeholders(tmp_path, trained_vit):
    assert model_class_names(trained_vit) == ENGLISH
    wrapped = wrapcal.wrap(trained_vit)
    assert model_class_names(wrapped) == ENGLISH
    assert wrapped.source["kwargs"]["id2label"] == {str(i): n for i, n in enumerate(ENGLISH)}
    loaded = wrapcal.load(wrapped.save(tmp_path / "named.wrapcal"))
    assert model_class_names(loaded) == ENGLISH
    assert model_class_names(wrapcal.wrap(build("vit"))) is None  # LABEL_0 ... LABEL_4
    twelve = {i: f"c{i}" for i in range(12)}  # '10' sorts before '2' as text, not as a number
    assert model_class_names(build("vit", num_labels=12, id2label=twelve)) == list(twelve.values())


def _image_folder(root: Path, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PNG files root/<class name>/<i>.png; returns the images as the CLI will read them."""
    from PIL import Image

    pixels_01 = (x * DIGITS_STD + DIGITS_MEAN).clamp(0, 1)
    images = np.round(pixels_01.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    for i, (image, label) in enumerate(zip(images, y.tolist(), strict=True)):
        folder = root / ENGLISH[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.2) / 0.3


def test_cli_renumbers_an_image_folder_by_the_models_id2label(
    data, trained_vit, tmp_path, capsys
) -> None:
    """Folders zero..nine are alphabetical (eight = 0); the saved model's id2label maps
    them back, so the report's accuracy is the model's true one."""
    x, y = data.test[0][:120], data.test[1][:120]
    inputs = _image_folder(tmp_path / "folder", x, y)
    with torch.no_grad():
        predicted = trained_vit(pixel_values=inputs).logits.argmax(1)
    path = wrapcal.wrap(trained_vit).save(tmp_path / "vit.wrapcal")
    out = tmp_path / "out"
    argv = ["evaluate", str(path), "--data", str(tmp_path / "folder"), "--mean", "0.2"]
    argv += ["--std", "0.3", "--bootstrap", "0", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "--data: the folders' class indices (alphabetical order) differ" in err
    assert "(the model's classes from the model)" in err
    report = json.loads((out / "report.json").read_text())
    true_accuracy = (predicted == y).double().mean().item()
    alphabetical = torch.tensor([sorted(ENGLISH).index(ENGLISH[k]) for k in y.tolist()])
    wrong_accuracy = (predicted == alphabetical).double().mean().item()
    assert true_accuracy - wrong_accuracy > 0.3
    assert report["calibration"]["baseline"]["accuracy"] == pytest.approx(true_accuracy, abs=1e-9)


# --- building by name, and hostile files ------------------------------------------------


def test_the_family_builds_on_the_meta_device_and_by_cli_name(monkeypatch) -> None:
    kwargs = {**_VIT, "intermediate_size": 64, "image_size": 32}
    with torch.device("meta"):
        model = registry.build_model("transformers", "vit", num_classes=3, **kwargs)
    assert all(p.is_meta for p in model.parameters())
    assert model.config.num_labels == 3 and type(model).__name__ == "ViTForImageClassification"
    shapes = registry.model_shapes("transformers", "vit", {**kwargs, "num_classes": 3})
    assert shapes["classifier.weight"] == (3, 32)
    with pytest.raises(ValueError, match="has no config key 'layer_type'"):
        registry.build_model("transformers", "vit", layer_type="basic")
    with pytest.raises(ValueError, match="'trust_remote_code' is not allowed"):
        registry.build_model("transformers", "vit", trust_remote_code=True)
    # A depth no file could hold stops while it is built (the budget made small: fast).
    from wrapcal_plugins import hf_transformers

    assert hf_transformers.MAX_MODULES == 20_000
    monkeypatch.setattr(hf_transformers, "MAX_MODULES", 300)
    with pytest.raises(ValueError, match="more than 300 modules"), torch.device("meta"):
        registry.build_model("transformers", "vit", **{**kwargs, "num_hidden_layers": 10**5})


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory) -> Path:
    model = build("vit", num_labels=4).eval()
    return wrapcal.wrap(model).save(tmp_path_factory.mktemp("vit") / "vit.wrapcal")


def rewrite(path: Path, out: Path, mutate) -> Path:
    """What an attacker does: edit the configuration and recompute the digest."""
    from safetensors.torch import save as save_tensors

    stored = saving.read(path)
    config = json.loads(json.dumps(stored.config))
    mutate(config)
    config["digest"] = saving.digest(config, stored.tensors)
    out.write_bytes(save_tensors(stored.tensors, metadata={"wrapcal": json.dumps(config)}))
    return out


def _kwargs(**changes):
    return lambda c: c["model"]["kwargs"].update(changes)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_kwargs(trust_remote_code=True), "'trust_remote_code' is not allowed"),
        (
            _kwargs(auto_map={"AutoModelForImageClassification": "evil/repo--modeling.Evil"}),
            "'auto_map' is not allowed",
        ),
        (_kwargs(_name_or_path="/home/user/checkpoints/vit"), "'_name_or_path' is not allowed"),
        (_kwargs(attn_implementation="kernels-community/flash-attn"), "not allowed"),
        (_kwargs(hidden_act="../../etc/passwd"), "hidden_act"),
        (_kwargs(architectures=["TimmWrapperForImageClassification"]), "architectures"),
        (lambda c: c["model"].update(name="no_such_model_type"), "unknown transformers model"),
        (lambda c: c["model"].update(name="timm_wrapper"), "unknown transformers model"),
        (lambda c: c["model"].update(name="hf-hub:google/vit-base"), "not a plain name"),
        (_kwargs(hidden_size=1 << 20), "does not match the model"),
        (_kwargs(image_size=8192), "does not match the model"),
    ],
)
def test_a_hostile_config_is_refused(saved_vit, tmp_path, offline, edit, message) -> None:
    before = _peak_rss_mb()
    with pytest.raises(SavedFileError, match=message):
        wrapcal.load(rewrite(saved_vit, tmp_path / "crafted.wrapcal", edit))
    assert _peak_rss_mb() - before < 500  # a 2**20-wide ViT would take gigabytes


def _peak_rss_mb() -> float:
    status = Path("/proc/self/status")
    if not status.exists():
        return 0.0
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_wrapcal_imports_transformers_only_for_its_models(tmp_path) -> None:
    code = (
        "import sys, torch, wrapcal\n"
        "from wrapcal.files.cifar_resnets import cifar_resnet20\n"
        "w = wrapcal.wrap(cifar_resnet20())\n"
        f"w.save({str(tmp_path / 'r.wrapcal')!r}); wrapcal.load({str(tmp_path / 'r.wrapcal')!r})\n"
        "wrapcal.plugin_registry(); wrapcal.files.families.families()\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_every_known_model_type_wraps_and_rebuilds_on_the_meta_device() -> None:
    """Each image-classification model type the family knows, at its default size, on
    the meta device (no memory): it splits, its config passes the allow-list and rebuilds
    the same tensors, and the size check matches what the model takes."""
    from wrapcal_plugins import _hf_config, hf_transformers

    for model_type in _hf_config.known_types():
        config = CONFIG_MAPPING[model_type](num_labels=3)
        config.architectures = [_hf_config.class_names_of(model_type)[0]]
        with torch.device("meta"):
            model = AutoModel.from_config(config).eval()
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        wrapped = wrapcal.wrap(model)
        source = wrapped.source
        assert source["name"] == model_type, model_type
        assert registry.model_shapes("transformers", model_type, source["kwargs"]) == shapes
        side = wrapped.input_shape[1] if wrapped.input_shape else 224
        try:
            with torch.no_grad():
                wrapped.backbone(torch.empty(1, 3, side + 32, side + 32, device="meta"))
            other_size = True
        except (ValueError, RuntimeError):
            other_size = False
        assert (model_type in hf_transformers.FIXED_SIZE) == (not other_size), model_type


def test_a_config_asking_for_tuples_loads_and_predicts_as_saved(saved_vit, tmp_path, offline):
    """``return_dict: false`` changes only the output format (and breaks ViT's own forward
    in transformers 5): the model is built returning dicts, with the same outputs."""
    crafted = rewrite(saved_vit, tmp_path / "tuples.wrapcal", _kwargs(return_dict=False))
    loaded, saved = wrapcal.load(crafted), wrapcal.load(saved_vit)
    x = pixels(32)
    with torch.no_grad():
        assert torch.equal(loaded.predict(x).probs, saved.predict(x).probs)
