"""``wrapcal fit`` and ``wrapcal evaluate --save``: a team that never writes Python fits
plugins on held-out data, saves the model, exports it and serves the ONNX file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import wrapcal
from wrapcal.cli import main
from wrapcal.datasets import DIGITS_MEAN, DIGITS_STD, digits
from wrapcal.files import families
from wrapcal.metrics import accuracy


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture(scope="module")
def weights(data, tmp_path_factory):
    """wrapcal's CIFAR ResNet-20 (small: fast to run and export) with random features and
    a head fitted on 200 images of the digits' training split (LBFGS): above chance."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = families.build_model("wrapcal", "cifar_resnet20", num_classes=10).eval()
    head = model.linear if hasattr(model, "linear") else model.fc
    with torch.no_grad():
        features = []

        def keep(_module, args):
            features.append(args[0])

        hook = head.register_forward_pre_hook(keep)
        model(data.train[0][:200])
        hook.remove()
    features = features[0]
    opt = torch.optim.LBFGS(head.parameters(), max_iter=60, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(features), data.train[1][:200])
        loss = loss + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        assert accuracy(model(data.calibration[0]).softmax(1), data.calibration[1]) > 0.3
    path = tmp_path_factory.mktemp("weights") / "resnet20.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _one_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"wrapcal {command}: error: ") and "Traceback" not in err
    return lines[0]


def test_fit_save_export_and_serve_the_onnx_from_the_command_line(tmp_path, data, weights, capsys):
    """The docs/cli.md session: fit temperature and conformal sets on the held-out
    calibration split, save, export to ONNX with the preprocessing built in, and ONNX
    Runtime on raw uint8 test images gives what wrapcal.load(...).predict gives on the
    normalised tensor."""
    ort = pytest.importorskip("onnxruntime")
    saved, onnx = tmp_path / "model.wrapcal", tmp_path / "model.onnx"
    argv = ["fit", "wrapcal:cifar_resnet20", "--weights", str(weights)]
    argv += ["--plugins", "temperature,conformal", "--calibration", "digits", "--save", str(saved)]
    assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("fitted temperature, conformal on --calibration digits (397 images)")
    assert out[1] == (
        f"saved {saved}: 10 classes, input 3x32x32; serve it with: wrapcal export {saved} "
        f"--out {onnx}"
    )

    # The saved model is the one the Python API fits on the same splits.
    loaded = wrapcal.load(saved)
    assert loaded.plugin_names == ["temperature", "conformal"]
    model = families.build_model("wrapcal", "cifar_resnet20", num_classes=10)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(weights))
    by_hand = wrapcal.wrap(model.eval(), ["temperature", "conformal"])
    by_hand.fit(calibration=data.calibration, progress=False)
    t = loaded.get_plugin("temperature").temperature_
    assert float(t) == pytest.approx(float(by_hand.get_plugin("temperature").temperature_), 1e-4)

    # The file records how the images were prepared (digits: mean 0.2, std 0.3, 32x32),
    # so the export takes raw uint8 images [N, H, W, C] and normalises them itself.
    assert loaded.preprocess.mean == (DIGITS_MEAN,) * 3 and loaded.preprocess.size == (32, 32)
    export = ["export", str(saved), "--out", str(onnx), "--include-preprocessing"]
    assert main(export) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == (
        f"wrote {onnx}: input [batch, ...], outputs logits, probs, label, confidence, msp, "
        "entropy, max_logit, energy, set_size, sets"
    )
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    pixels = ((data.test[0][:64] * DIGITS_STD + DIGITS_MEAN).clamp(0, 1) * 255).round()
    raw = pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # as a decoder gives them
    got = session.run(None, {session.get_inputs()[0].name: raw.numpy()})
    outputs = dict(zip([o.name for o in session.get_outputs()], got, strict=True))
    expected = loaded.predict((pixels / 255 - DIGITS_MEAN) / DIGITS_STD)
    np.testing.assert_allclose(outputs["probs"], expected.probs.numpy(), atol=1e-5)
    np.testing.assert_array_equal(outputs["label"], expected.label.numpy())
    np.testing.assert_array_equal(outputs["sets"], expected.outputs["sets"].numpy())
    np.testing.assert_array_equal(outputs["set_size"], expected.scores["set_size"].numpy())
    assert expected.scores["set_size"].float().mean() < 10  # the sets do exclude classes


def test_evaluate_save_writes_the_wrapped_variant(tmp_path, data, weights, capsys):
    saved = tmp_path / "m.wrapcal"
    argv = ["evaluate", "wrapcal:cifar_resnet20", "--weights", str(weights), "--data", "digits"]
    argv += ["--plugins", "temperature", "--save", str(saved), "--bootstrap", "0"]
    argv += ["--limit", "100"]
    argv += ["--out", str(tmp_path / "report"), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"saved the wrapped model to {saved}" in capsys.readouterr().out
    loaded = wrapcal.load(saved)
    assert loaded.plugin_names == ["temperature"]
    import json

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = np.sort(np.random.default_rng(0).choice(400, 100, replace=False))  # --limit 100
    x, y = data.test[0][rows], data.test[1][rows]
    from wrapcal.metrics import ece

    assert report["calibration"]["wrapped"]["ece"] == pytest.approx(
        ece(loaded.predict(x).probs, y), abs=1e-4
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "wrapcal:cifar_resnet20", "--plugins", "temperature", "--save", "m.wrapcal"],
         "plugin temperature needs --calibration"),
        (["fit", "wrapcal:cifar_resnet20", "--calibration", "digits", "--save", "m.wrapcal"],
         "the following arguments are required: --plugins"),
        (["fit", "x.wrapcal", "--plugins", "temperature", "--save", "m.wrapcal"],
         "wrapcal fit takes FAMILY:NAME"),
        (["evaluate", "wrapcal:cifar_resnet20", "--data", "digits", "--save", "m.wrapcal"],
         "--save writes the fitted wrapped model and there is none without --plugins"),
    ],
)  # fmt: skip
def test_bad_fit_flags_exit_2_with_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in _one_error(capsys.readouterr().err, argv[0])
    assert not (tmp_path / "m.wrapcal").exists()


def test_save_target_is_checked_before_any_data_is_read(tmp_path, capsys):
    """A directory, the --weights file itself, or a file under a file: refused up front
    (check_output_file's rules), so no fit is lost at the end."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not read")
    (tmp_path / "blocker").write_text("a file")
    base = ["fit", "wrapcal:cifar_resnet20", "--weights", str(weights), "--plugins", "temperature"]
    base += ["--calibration", "digits", "--save"]
    for target, message in [
        (tmp_path, "is a directory; give the file to write, e.g. model.wrapcal"),
        (weights, "is also an input of this command"),
        (tmp_path / "blocker" / "m.wrapcal", "nothing can be created under it"),
    ]:
        assert main([*base, str(target)]) == 2
        assert message in _one_error(capsys.readouterr().err, "fit")
    assert weights.read_bytes() == b"not read"


def test_weights_that_do_not_fit_name_the_first_key_of_each_kind(tmp_path, weights, capsys):
    from safetensors.torch import load_file

    state = load_file(weights)
    state["linear.weight"] = torch.zeros(5, 64)
    state["extra"] = torch.zeros(1)
    del state["bn1.bias"]
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    argv = ["fit", "wrapcal:cifar_resnet20", "--weights", str(bad), "--plugins", "temperature"]
    argv += ["--calibration", "digits", "--save", str(tmp_path / "m.wrapcal"), "--no-progress"]
    assert main(argv) == 2
    assert _one_error(capsys.readouterr().err, "fit").endswith(
        f"--weights: {bad} does not fit the model (1 key(s) of the model missing from the "
        "file, first bn1.bias; 1 key(s) in the file the model does not have, first extra; "
        "1 tensor(s) of another shape, first linear.weight: [5, 64] in the file, [10, 64] "
        "in the model); check the model name, --num-classes and --model-arg"
    )


def test_a_saved_models_recorded_preprocessing_reads_its_images(tmp_path, weights):
    """Without --mean/--std, a saved model's images are normalised as its record says
    (on the readers' [0, 1] scale), not with ImageNet's numbers: a model fitted on
    mean 0.2 / std 0.3 inputs and monitored with ImageNet's flagged every image as OOD."""
    import argparse

    from safetensors.torch import load_file

    from wrapcal.cli.options import image_settings
    from wrapcal.datasets import IMAGENET_MEAN

    model = families.build_model("wrapcal", "cifar_resnet20", num_classes=10)
    model.load_state_dict(load_file(str(weights)))
    record = {"mean": [51.0, 76.5, 102.0], "std": [76.5] * 3, "size": [32, 32]}
    record["value_range"] = [0, 255]  # a model that takes raw pixel values
    saved = tmp_path / "m.wrapcal"
    wrapcal.wrap(model, plugins=[], preprocess=record).save(saved)

    def settings(model_spec: str, **flags):
        args = {"mean": None, "std": None, "size": None, "channels": None} | flags
        return image_settings(argparse.Namespace(model=model_spec, **args))

    got = settings(str(saved))
    assert got.normaliser.mean == pytest.approx((0.2, 0.3, 0.4))  # 51 / 255, ...
    assert got.normaliser.std == pytest.approx((0.3,) * 3)
    assert got.size is None  # the images' own size unless --size (timm records 224)
    pixels = torch.rand(2, 3, 32, 32)  # what the readers give, in [0, 1]
    as_recorded = (pixels * 255 - torch.tensor(record["mean"])[:, None, None]) / 76.5
    torch.testing.assert_close(got.normaliser(pixels), as_recorded, rtol=1e-5, atol=1e-5)
    # The flags still win; a model built by name keeps ImageNet's default.
    assert settings(str(saved), mean=[0.5], std=[0.5]).normaliser.mean == (0.5,)
    assert settings("wrapcal:cifar_resnet20").normaliser.mean == tuple(IMAGENET_MEAN)
    # The record is read from the header alone, the same configuration load checks; a
    # truncated file is wrapcal's error, not a struct or JSON one.
    from wrapcal.errors import SavedFileError
    from wrapcal.files.format import read, read_config

    config = read_config(saved)
    assert config.pop("digest") and config == read(saved).config
    cut = tmp_path / "cut.wrapcal"
    cut.write_bytes(saved.read_bytes()[:100])
    with pytest.raises(SavedFileError, match="truncated or corrupt"):
        read_config(cut)
