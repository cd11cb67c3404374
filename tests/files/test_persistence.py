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
