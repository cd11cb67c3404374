"""Save and load: safetensors + JSON, identical outputs, clear errors, nothing lost."""

from __future__ import annotations

import json
import struct

import pytest
import timm
import torch
import torchvision
from helpers import SmallNet, sample_plugin_installed
from safetensors import safe_open

import wrapcal
from wrapcal.errors import SavedFileError
from wrapcal.files.cifar_resnets import cifar_resnet20
from wrapcal.files.format import FORMAT_VERSION, read


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
