"""Save and load: safetensors + JSON, identical outputs, clear errors, nothing lost."""

from __future__ import annotations

import copy
import json
import struct
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from helpers import SmallNet, sample_plugin_installed
from safetensors import safe_open
from safetensors.torch import save as save_tensors

import wrapcal
from wrapcal.errors import SavedFileError
from wrapcal.files.cifar_resnets import cifar_resnet20
from wrapcal.files.format import FORMAT_VERSION, digest, read


def batch(side: int = 32, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


def fitted_vector_scaling(model: torch.nn.Module, side: int) -> wrapcal.WrappedModel:
    x = batch(side, 64)
    with torch.no_grad():
        y = model.eval()(x).argmax(-1)
    y[::3] = (y[::3] + 1) % model(x[:1]).shape[-1]  # some errors, so there is something to fit
    wrapped = wrapcal.wrap(model, plugins=["sample_vector_scaling"])
    return wrapped.fit(calibration=(x, y), progress=False).eval()


@pytest.mark.parametrize(
    "make",
    [
        lambda: timm.create_model("resnet10t", num_classes=5),
        lambda: torchvision.models.mobilenet_v3_small(num_classes=5),
        lambda: cifar_resnet20(num_classes=5),
    ],
    ids=["timm", "torchvision", "wrapcal-models"],
)
def test_round_trip_rebuilds_by_name(make, tmp_path) -> None:
    with sample_plugin_installed(tmp_path):
        wrapped = fitted_vector_scaling(make(), 32)
        path = wrapped.save(tmp_path / "model.wrapcal")
        loaded = wrapcal.load(path)
        x = batch()
        with torch.no_grad():
            assert torch.equal(loaded(x), wrapped(x))
        plugin = loaded.get_plugin("sample_vector_scaling")
        assert plugin.fitted_ and torch.equal(plugin.scale_, wrapped.plugins[0].scale_)
    config = read(path).config
    assert config["format_version"] == FORMAT_VERSION
    assert config["plugins"][0]["name"] == "sample_vector_scaling"


def test_file_is_plain_safetensors_with_json(tmp_path) -> None:
    wrapped = wrapcal.wrap(SmallNet().eval())
    path = wrapped.save(tmp_path / "m.wrapcal")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["wrapcal"])
        assert "backbone.model.conv.weight" in set(f.keys())
    assert config["model"] == {} and config["split"]["kind"] == "module"


def test_custom_model_is_passed_in_and_not_changed(tmp_path) -> None:
    model = SmallNet().eval()
    wrapped = wrapcal.wrap(model)
    path = wrapped.save(tmp_path / "m.wrapcal")
    with pytest.raises(SavedFileError, match=r"wrapcal.load\(path, model=MyModel\(\)\)"):
        wrapcal.load(path)
    fresh = SmallNet()  # different random weights: they must come from the file
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = wrapcal.load(path, model=fresh)
    x = batch(8)
    assert torch.equal(loaded(x), model(x))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_mismatched_model_is_refused(tmp_path) -> None:
    path = wrapcal.wrap(SmallNet(num_classes=10).eval()).save(tmp_path / "m.wrapcal")
    with pytest.raises(SavedFileError, match="does not match the model"):
        wrapcal.load(path, model=SmallNet(num_classes=3))


def test_truncated_and_corrupt_files_fail_clearly_and_change_nothing(tmp_path) -> None:
    path = wrapcal.wrap(SmallNet().eval()).save(tmp_path / "m.wrapcal")
    data = path.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "garbage": b"not a model at all" * 10,
        "empty": b"",
        "bad header length": struct.pack("<Q", 10**12) + data[8:],
    }
    for name, content in cases.items():
        broken = tmp_path / f"{name.replace(' ', '_')}.wrapcal"
        broken.write_bytes(content)
        with pytest.raises(SavedFileError, match="wrapcal file|not a readable"):
            wrapcal.load(broken, model=SmallNet())
        assert broken.read_bytes() == content, name  # the file is left as it was
    with pytest.raises(SavedFileError, match="no saved model"):
        wrapcal.load(tmp_path / "missing.wrapcal")


def test_newer_format_and_foreign_safetensors_are_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(SavedFileError, match="not a wrapcal one"):
        wrapcal.load(foreign)
    future = tmp_path / "future.wrapcal"
    config = {"format": "wrapcal", "format_version": FORMAT_VERSION + 1}
    save_file({"w": torch.zeros(2)}, str(future), metadata={"wrapcal": json.dumps(config)})
    with pytest.raises(SavedFileError, match="Upgrade wrapcal"):
        wrapcal.load(future)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = wrapcal.wrap(SmallNet().eval()).save(tmp_path / "m.wrapcal")
    original = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("wrapcal.files.format.save_tensors", broken_save)
    with pytest.raises(OSError, match="disk full"):
        wrapcal.wrap(SmallNet(num_classes=3).eval()).save(path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["m.wrapcal"]  # no temporary left behind


def test_plugin_warnings_point_at_the_users_wrap_and_load_calls(tmp_path) -> None:
    """A plugin warns from inside the core's frames; the user must see their own line."""
    model = SmallNet().eval()  # no dropout: mc_dropout warns that it inserts one
    with pytest.warns(UserWarning, match="not trained with") as at_wrap:
        wrapped = wrapcal.wrap(model, ["mc_dropout"])
    path = tmp_path / "mc.safetensors"
    wrapped.save(path)
    with pytest.warns(UserWarning, match="not trained with") as at_load:
        wrapcal.load(path, model=model)
    for record in (*at_wrap, *at_load):
        assert record.filename == __file__, record.filename


# --- files of wrapcal 0.2.0 -------------------------------------------------------------------


def as_saved_by_0_2_0(path: Path, order: list[str] | None = None) -> Path:
    """The file as wrapcal 0.2.0 wrote it: no wrapcal version, no package per plugin, and
    the plugins in ``order`` (0.2.0's acting order), their tensors renumbered to match."""
    stored = read(path)
    config = copy.deepcopy(stored.config)
    del config["wrapcal_version"]
    names = [entry["name"] for entry in config["plugins"]]
    order = order or names
    new_index = {str(names.index(name)): str(i) for i, name in enumerate(order)}
    config["plugins"] = [config["plugins"][names.index(name)] for name in order]
    for entry in config["plugins"]:
        entry.pop("package")
    tensors = {}
    for key, tensor in stored.tensors.items():
        parts = key.split(".")
        if parts[0] == "plugins":
            parts[1] = new_index[parts[1]]
        tensors[".".join(parts)] = tensor
    config["digest"] = digest(config, tensors)
    old = path.with_name(f"{path.stem}-0.2.0.wrapcal")
    old.write_bytes(save_tensors(tensors, metadata={"wrapcal": json.dumps(config)}))
    return old


def fitted_small(
    plugins: list[str], train: bool = True
) -> tuple[wrapcal.WrappedModel, torch.Tensor]:
    """A small model with ``plugins`` fitted, and inputs to compare outputs on."""
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(200, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::3] = torch.arange(len(y[::3])) % 10
    wrapped = wrapcal.wrap(model, plugins)
    sets = {"train": (x[:100], y[:100])} if train else {}
    wrapped.fit(**sets, calibration=(x[100:], y[100:]), progress=False)
    return wrapped, x[:16]


def test_a_file_says_which_wrapcal_wrote_it_and_where_each_plugin_came_from(tmp_path) -> None:
    wrapped, _ = fitted_small(["temperature"], train=False)
    config = read(wrapped.save(tmp_path / "m.wrapcal")).config
    assert config["wrapcal_version"] == wrapcal.__version__
    assert config["plugins"][0]["package"] == "wrapcal"


def test_a_0_2_0_file_with_react_loads_and_warns_what_changed(tmp_path) -> None:
    """0.2.0's ``react`` clipped the model's features for everything after it; it is a
    detector now, so such a file loads into a model whose logits differ from the saved
    one's, and whose later plugins were fitted on the clipped model. Load says so, names
    them and the fix. (0.2.0 ran react before the detectors: the file's order differs
    from today's, and the state still goes to the right plugin.)"""
    wrapped, x = fitted_small(["react", "knn", "temperature"])
    assert wrapped.plugin_names == ["knn", "react", "temperature"]
    path = wrapped.save(tmp_path / "m.wrapcal")
    old = as_saved_by_0_2_0(path, order=["react", "knn", "temperature"])
    with pytest.warns(UserWarning) as caught:
        loaded = wrapcal.load(old, model=SmallNet())
    [message] = [str(w.message) for w in caught if "react" in str(w.message)]
    assert "saved by wrapcal 0.2.0 or older and holds plugin react" in message
    assert "react clipped the model's features" in message
    assert "logits and probabilities are the unclipped model's" in message
    assert "plugins knn, temperature and the operating points were fitted or measured" in message
    assert all(w.filename == __file__ for w in caught)  # points at the user's load call
    assert "Fit the model again" in message
    assert loaded.plugin_names == ["knn", "react", "temperature"]
    now, then = wrapped.predict(x), loaded.predict(x)
    assert torch.equal(then.probs, now.probs)
    for score in ("knn", "react"):
        assert torch.equal(then.scores[score], now.scores[score]), score
    # The file saved now, and a 0.2.0 file without react, load without a word.
    calibrated, _ = fitted_small(["temperature"], train=False)
    plain = as_saved_by_0_2_0(calibrated.save(tmp_path / "t.wrapcal"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapcal.load(path, model=SmallNet())
        wrapcal.load(plain, model=SmallNet())


def test_a_0_2_0_file_with_react_alone_says_the_logits_changed(tmp_path) -> None:
    wrapped, _ = fitted_small(["react"])
    old = as_saved_by_0_2_0(wrapped.save(tmp_path / "m.wrapcal"))
    with pytest.warns(UserWarning, match="holds plugin react") as caught:
        wrapcal.load(old, model=SmallNet())
    message = next(str(w.message) for w in caught if "react" in str(w.message))
    assert "the operating points were fitted or measured" in message  # at fit, clipped


# --- save targets and tied weights (issue 30) ---------------------------------------------------


@pytest.mark.parametrize("target", ["", ".", "..", "DIR", "DIR/sub/.."])
def test_save_to_a_directory_is_a_clear_error_that_writes_nothing(
    tmp_path, monkeypatch, target
) -> None:
    (tmp_path / "DIR" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "DIR" / "sub")  # '..' is DIR, '.' is DIR/sub
    target = target.replace("DIR", str(tmp_path / "DIR"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SavedFileError, match="it is a directory, not a file name") as caught:
        wrapcal.wrap(SmallNet().eval()).save(target)
    assert repr(target) in str(caught.value)  # names the target the user gave
    assert "wrapcal-tmp" not in str(caught.value)  # never a temporary file's name
    assert "model.wrapcal" in str(caught.value)  # and says what to give instead
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_target_that_cannot_be_written_is_a_clear_error_and_the_old_file_stays(
    tmp_path, monkeypatch
) -> None:
    path = wrapcal.wrap(SmallNet().eval()).save(tmp_path / "m.wrapcal")
    original = path.read_bytes()
    under_a_file = tmp_path / "m.wrapcal" / "inner.wrapcal"  # its parent is a file
    with pytest.raises(SavedFileError, match=r"cannot save to .*inner\.wrapcal") as caught:
        wrapcal.wrap(SmallNet().eval()).save(under_a_file)
    assert "wrapcal-tmp" not in str(caught.value)

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("wrapcal.files.format.os.replace", no_room)
    with pytest.raises(SavedFileError, match=r"m\.wrapcal.*No space left on device") as caught:
        wrapcal.wrap(SmallNet(num_classes=3).eval()).save(path)
    assert "wrapcal-tmp" not in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)  # the system's error stays attached
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["m.wrapcal"]  # no temporary left behind


class TiedNet(torch.nn.Module):
    """A classifier whose head shares its weight with an earlier layer (weight tying, as
    language models tie their output layer to the embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.embed = torch.nn.Linear(6, 8, bias=False)  # weight [8, 6]
        self.mix = torch.nn.Linear(8, 6)
        self.out = torch.nn.Linear(6, 8, bias=False)
        self.out.weight = self.embed.weight  # tied: one parameter, two layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.out(torch.tanh(self.mix(self.embed(h))))


def test_tied_weights_save_once_and_load_tied_with_the_same_predictions(tmp_path) -> None:
    torch.manual_seed(0)
    model = TiedNet().eval()
    x = batch(8, 64)
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::3] = (y[::3] + 1) % 8
    wrapped = wrapcal.wrap(model, ["temperature"]).fit(calibration=(x, y), progress=False)
    assert wrapped.head.weight is wrapped.backbone.model.embed.weight
    path = wrapped.save(tmp_path / "tied.wrapcal")
    with safe_open(str(path), "pt") as f:  # stored once
        assert "head.weight" not in f.keys()  # noqa: SIM118 (safe_open is no dict)
        assert "backbone.model.embed.weight" in f.keys()  # noqa: SIM118
    loaded = wrapcal.load(path, model=TiedNet())
    assert loaded.head.weight is loaded.backbone.model.embed.weight  # tied again
    assert torch.equal(loaded.predict(x).probs, wrapped.predict(x).probs)
    assert len(list(loaded.parameters())) == len(list(wrapped.parameters()))
    with torch.no_grad():  # one parameter: a change reaches both layers, as before saving
        loaded.backbone.model.embed.weight.mul_(2)
    assert torch.equal(loaded.head.weight, loaded.backbone.model.embed.weight)


def test_a_tie_in_a_file_cannot_alias_what_it_likes(tmp_path) -> None:
    torch.manual_seed(0)
    path = wrapcal.wrap(TiedNet().eval()).save(tmp_path / "tied.wrapcal")
    stored = read(path)
    mix, embed = "backbone.model.mix.weight", "backbone.model.embed.weight"
    assert stored.config["tied"] == {"head.weight": embed}
    for ties, message in [
        ({"head.weight": "backbone.model.conv.weight"}, r"stored weight is \(6, 3"),
        ({"head.weight": embed, mix: embed}, r"does not match the model.*mix\.weight is \(8, 6\)"),
        ({"head.weight": "no.such.tensor"}, "ties to no tensor"),
        ({"head.weight": embed, "backbone.model.mix.bias": embed}, "tied name"),
        (["head.weight"], "tied tensors are not names"),
    ]:
        config = {k: v for k, v in stored.config.items() if k != "tied"}
        config["tied"] = ties
        tensors = {k: v for k, v in stored.tensors.items() if k not in ("head.weight", mix)}
        if "backbone.model.mix.bias" in ties:  # a name the file also stores
            tensors[mix] = stored.tensors[mix]
        config["digest"] = digest(config, tensors)
        crafted = tmp_path / "crafted.wrapcal"
        crafted.write_bytes(save_tensors(tensors, metadata={"wrapcal": json.dumps(config)}))
        with pytest.raises(SavedFileError, match=message):
            wrapcal.load(crafted, model=TiedNet())


# --- operating points at the acceptance rates the user chose --------------------------------


def test_accept_rates_are_measured_saved_and_loaded(tmp_path) -> None:
    """``fit(accept_rates=(0.9, 0.99))``: one threshold per score and rate, each the
    ``ceil(rate n)``-th smallest calibration score; the first rate's table is
    ``thresholds`` (what files of one rate hold); the file keeps them all."""
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(200, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(-1)
    wrapped = wrapcal.wrap(model, ["temperature"])
    wrapped.fit(calibration=(x, y), progress=False, accept_rates=(0.9, 0.99))
    points = wrapped.operating_points
    assert points["accept_rate"] == 0.9 and points["accept_rates"] == [0.9, 0.99]
    assert points["thresholds"] == points["thresholds_at"]["0.9"]
    scores = wrapped.predict(x).scores
    for rate, table in points["thresholds_at"].items():
        for name, threshold in table.items():
            ranked = scores[name].double().sort().values
            k = int(torch.ceil(torch.tensor(float(rate) * len(ranked)).round(decimals=6)))
            assert threshold == float(ranked[k - 1]), (rate, name)
    loaded = wrapcal.load(wrapped.save(tmp_path / "m.wrapcal"), model=SmallNet())
    assert loaded.operating_points == json.loads(json.dumps(points))
    # One rate: the form every earlier file holds, no new keys.
    wrapped.fit(calibration=(x, y), progress=False, accept_rates=0.99)
    assert set(wrapped.operating_points) == {"data", "n", "accept_rate", "thresholds", "metrics"}
    assert wrapped.operating_points["accept_rate"] == 0.99


@pytest.mark.parametrize("rates", [(), (0,), (1.5,), (0.9, 0.9), ("0.9",), (True,), None])
def test_bad_accept_rates_are_refused_before_any_work(rates) -> None:
    wrapped = wrapcal.wrap(SmallNet().eval(), ["temperature"])
    with pytest.raises(ValueError, match=r"accept_rates .* e\.g\. accept_rates=\(0\.95, 0\.99\)"):
        wrapped.fit(calibration=object(), accept_rates=rates)  # the data is never read
    assert wrapped.backbone_passes == 0


def test_a_file_whose_rate_tables_disagree_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(100, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::3] = torch.arange(len(y[::3])) % 10  # every class present, the model still right
    wrapped = wrapcal.wrap(model, ["temperature"])
    wrapped.fit(calibration=(x, y), progress=False, accept_rates=(0.95, 0.99))
    config = copy.deepcopy(wrapped.operating_points)
    config["thresholds_at"]["0.95"]["msp"] = 0.5  # no longer the first rate's thresholds
    wrapped.operating_points = config
    with pytest.raises(SavedFileError, match="operating points"):
        wrapcal.load(wrapped.save(tmp_path / "bad.wrapcal"), model=SmallNet())


# --- the preprocessing record -----------------------------------------------------------------


def _with_preprocess(path: Path, out: Path, record) -> Path:
    """``path`` with its preprocessing record replaced (``...``: removed, as files written
    before records were saved), the digest recomputed: what an attacker or an old wrapcal
    writes."""
    stored = read(path)
    config = copy.deepcopy(stored.config)
    if record is ...:
        del config["preprocess"]
    else:
        config["preprocess"] = record
    config["digest"] = digest(config, stored.tensors)
    out.write_bytes(save_tensors(stored.tensors, metadata={"wrapcal": json.dumps(config)}))
    return out


def test_the_preprocessing_record_comes_from_the_model_and_round_trips(tmp_path) -> None:
    """wrapcal's CIFAR ResNet and timm say what their inputs are; the user's record wins;
    the file keeps it; a file without one (written before 0.3) takes the model's."""
    from wrapcal.files.cifar_resnets import CIFAR_MEAN, CIFAR_STD

    wrapped = wrapcal.wrap(cifar_resnet20())
    assert wrapped.preprocess == wrapcal.Preprocess(
        mean=CIFAR_MEAN, std=CIFAR_STD, size=(32, 32), channel_order="RGB"
    )
    path = wrapped.save(tmp_path / "cifar.wrapcal")
    assert read(path).config["preprocess"]["mean"] == list(CIFAR_MEAN)
    assert wrapcal.load(path).preprocess == wrapped.preprocess
    old = _with_preprocess(path, tmp_path / "old.wrapcal", ...)
    assert wrapcal.load(old).preprocess == wrapped.preprocess
    none = _with_preprocess(path, tmp_path / "none.wrapcal", None)
    assert wrapcal.load(none).preprocess is None

    timm_model = timm.create_model("resnet10t", num_classes=5)
    config = timm.data.resolve_data_config({}, model=timm_model)
    record = wrapcal.wrap(timm_model).preprocess
    assert record.mean == tuple(config["mean"]) and record.std == tuple(config["std"])
    assert record.size == tuple(config["input_size"][1:])
    assert record.interpolation == config["interpolation"]

    mine = {"mean": 0.5, "std": [0.2, 0.3, 0.4], "channel_order": "BGR", "value_range": [0, 255]}
    wrapped = wrapcal.wrap(cifar_resnet20(), preprocess=mine)
    assert wrapped.preprocess.mean == (0.5, 0.5, 0.5) and wrapped.preprocess.size is None
    assert wrapcal.load(wrapped.save(tmp_path / "mine.wrapcal")).preprocess == wrapped.preprocess


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"mean": [0.5] * 3, "std": [0.5, 0.5, 0.0]}, "std values must be positive"),
        ({"mean": [0.5] * 2, "std": [0.5] * 3}, "has 2 values; channel_order 'RGB' has 3"),
        ({"mean": [0.5] * 3, "std": [0.5] * 3, "size": [0, 32]}, "size must be"),
        ({"mean": [0.5] * 3, "std": [0.5] * 3, "channel_order": "CMYK"}, "channel_order"),
        ({"mean": [0.5] * 3, "std": [0.5] * 3, "value_range": [1, 0]}, "low < high"),
        ({"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "magic"}, "interpolation"),
        ({"mean": ["0.5"] * 3, "std": [0.5] * 3}, "must hold numbers"),
        ({"std": [0.5] * 3}, "needs mean and std"),
        ({"mean": [0.5], "std": [0.5], "channel_order": "L", "code": "x"}, "unknown keys"),
        ({"mean": [0.5] * 3, "std": [0.5] * 3, "size": [32, 32, 3]}, "size must be"),
    ],
)
def test_a_bad_preprocessing_record_is_refused_by_wrap_and_by_load(
    record, message, tmp_path
) -> None:
    with pytest.raises(ValueError, match=message):
        wrapcal.wrap(cifar_resnet20(), preprocess=record)
    path = wrapcal.wrap(cifar_resnet20()).save(tmp_path / "good.wrapcal")
    with pytest.raises(SavedFileError, match="preprocessing record is not valid"):
        wrapcal.load(_with_preprocess(path, tmp_path / "bad.wrapcal", record))


def test_a_hostile_record_cannot_hold_nan_or_huge_lists_nor_contradict_the_model(
    tmp_path,
) -> None:
    wrapped = wrapcal.wrap(cifar_resnet20())
    wrapped.input_shape = (3, 32, 32)  # as fit records it
    path = wrapped.save(tmp_path / "good.wrapcal")
    for record in (
        {"mean": [float("nan")] * 3, "std": [1.0] * 3},
        {"mean": [0.0] * 3, "std": [float("inf")] * 3},
        {"mean": [0.0] * 10_000, "std": [1.0] * 10_000},
        ["mean", "std"],
    ):
        with pytest.raises(SavedFileError, match="preprocessing record is not valid"):
            wrapcal.load(_with_preprocess(path, tmp_path / "bad.wrapcal", record))
    grey = {"mean": [0.5], "std": [0.5], "channel_order": "L"}  # the model takes 3 channels
    with pytest.raises(SavedFileError, match="describes 1 channel"):
        wrapcal.load(_with_preprocess(path, tmp_path / "grey.wrapcal", grey))
    with pytest.raises(TypeError, match="preprocess must be a wrapcal.Preprocess"):
        wrapcal.wrap(cifar_resnet20(), preprocess=[0.5, 0.5])
