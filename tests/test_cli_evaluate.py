"""``wrapcal evaluate``: reports from library models, weights, npz/IDX files, plugins and
saved ``.wrapcal`` files; exit code 2 with one line on stderr for bad input."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import wrapcal
from wrapcal.cli import main
from wrapcal.datasets import DIGITS_MEAN, DIGITS_STD, NoiseImages, Normaliser, digits
from wrapcal.metrics import accuracy, ece


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture(scope="module")
def trained_timm(data, tmp_path_factory):
    """timm's resnet10t with random features and a head fitted on them (LBFGS, seconds):
    well above chance, so temperature scaling has something to fit."""
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("resnet10t", num_classes=10).eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(data.train[0]), pre_logits=True)
    head = model.get_classifier()
    opt = torch.optim.LBFGS(head.parameters(), max_iter=60, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(features), data.train[1]) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    path = tmp_path_factory.mktemp("weights") / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with torch.no_grad():
        logits = model(data.test[0])
    assert accuracy(logits.softmax(1), data.test[1]) > 0.3
    return model, path, logits


def _report(out) -> dict:
    for name in ("report.html", "report.md", "report.json"):
        assert (out / name).is_file(), name
    assert list((out / "figures").glob("*.png"))
    return json.loads((out / "report.json").read_text())


def test_timm_model_on_digits_with_gaussian_noise(tmp_path, capsys):
    out = tmp_path / "tmp"
    argv = ["evaluate", "timm:resnet10t", "--data", "digits", "--ood", "noise=gaussian"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    report = _report(out)
    assert list(report["models"]) == ["baseline"]
    assert report["data"] == {"test": {"n": 400, "num_classes": 10}, "ood": {"noise": {"n": 400}}}
    assert set(report["ood"]["baseline"]["noise"]) == {"msp", "max_logit", "entropy", "energy"}
    assert len(list((out / "figures").glob("*.png"))) == 1 + 4
    stdout = capsys.readouterr().out
    assert str(out / "report.html") in stdout and "| baseline |" in stdout


def _write_idx(path, images: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">III", *images.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())


def test_weights_plugins_npz_and_idx(tmp_path, data, trained_timm):
    _, weights, logits = trained_timm
    # The digits as pixels in [0, 1]: normalising them with --mean/--std 0.2/0.3 gives
    # back exactly what wrapcal.datasets.digits() feeds the model.
    pixels = {
        f"{split}_{kind}": (value * DIGITS_STD + DIGITS_MEAN).clamp(0, 1).numpy()
        if kind == "images"
        else value.numpy()
        for split, (x, y) in (("test", data.test), ("calibration", data.calibration))
        for kind, value in (("images", x), ("labels", y))
    }
    npz = tmp_path / "digits.npz"
    np.savez(npz, **pixels)
    idx = tmp_path / "blobs-idx3-ubyte.gz"
    _write_idx(idx, np.random.default_rng(0).integers(0, 256, (50, 28, 28)))
    out = tmp_path / "out"
    code = main(
        [
            "evaluate",
            "timm:resnet10t",
            "--weights",
            str(weights),
            "--num-classes",
            "10",
            "--data",
            str(npz),
            "--mean",
            "0.2",
            "--std",
            "0.3",
            "--ood",
            f"blobs={idx}",
            "--ood",
            "uniform",
            "--plugins",
            "temperature",
            "--calibration",
            str(npz),
            "--bootstrap",
            "0",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    report = _report(out)
    assert report["models"]["wrapped"]["plugins"] == ["temperature"]
    assert report["data"]["ood"] == {"blobs": {"n": 50}, "uniform": {"n": 400}}
    y = data.test[1]
    base, wrapped = report["calibration"]["baseline"], report["calibration"]["wrapped"]
    assert base["accuracy"] == pytest.approx(accuracy(logits.softmax(1), y), abs=1.01 / len(y))
    assert base["ece"] == pytest.approx(ece(logits.softmax(1), y), abs=2e-3)
    assert wrapped["accuracy"] == base["accuracy"]  # temperature keeps the arg-max
    assert wrapped["nll"] != pytest.approx(base["nll"], rel=1e-6)  # a fitted T != 1
    assert base["ece_ci"] is None
    assert len(list((out / "figures").glob("*.png"))) == 2 + 2 * 4


def test_saved_wrapcal_file_against_its_own_baseline(tmp_path, data, trained_timm):
    model, _, logits = trained_timm
    wrapped = wrapcal.wrap(model, ["temperature"]).fit(calibration=data.calibration, progress=False)
    path = wrapped.save(tmp_path / "model.wrapcal")
    out = tmp_path / "out"
    argv = ["evaluate", str(path), "--data", "digits", "--bootstrap", "0", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    report = _report(out)
    assert list(report["models"]) == ["baseline", "wrapped"]
    t = wrapped.get_plugin("temperature").temperature_
    y = data.test[1]
    cal = report["calibration"]
    assert cal["baseline"]["ece"] == pytest.approx(ece(logits.softmax(1), y), abs=1e-4)
    assert cal["wrapped"]["ece"] == pytest.approx(ece((logits / t).softmax(1), y), abs=1e-4)
    assert report["data"]["ood"] == {} and report["ood"] == {"baseline": {}, "wrapped": {}}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["timm:resnet10t", "--data", "{tmp}/missing.npz"], "test data not found"),
        (["timm:resnet10t", "--data", "digits", "--ood", "x={tmp}/no.npz"], "ood data not found"),
        (["{tmp}/model.wrapcal", "--data", "digits"], "model file not found"),
        (["timm:no_such_net_xyz", "--data", "digits"], "unknown timm model"),
        (["torchvision:no_such_net", "--data", "digits"], "unknown torchvision model"),
        (["wrapcal:no_such_net", "--data", "digits"], "unknown wrapcal model"),
        (["resnet18", "--data", "digits"], "unknown model 'resnet18'"),
        (["timm:resnet10t", "--data", "digits", "--plugins", "temperature,nope"], "'nope'"),
        (["timm:resnet10t", "--data", "digits", "--weights", "{tmp}/w.st"], "weights file"),
        (["timm:resnet10t", "--data", "gaussian"], "OOD set"),
        (["timm:resnet10t", "--data", "digits", "--device", "gpu"], "not a device"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["evaluate", *argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("wrapcal evaluate: error: ")
    assert message in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_noise_images_are_seeded_and_read_in_any_order():
    norm = Normaliser((0.5,), (0.25,))
    noise = NoiseImages("gaussian", 600, (3, 4, 4), norm, seed=5, chunk=256)
    forward = torch.stack([noise[i] for i in range(600)])
    again = NoiseImages("gaussian", 600, (3, 4, 4), norm, seed=5, chunk=256)
    backward = torch.stack([again[i] for i in reversed(range(600))]).flip(0)
    assert torch.equal(forward, backward)
    other = NoiseImages("gaussian", 600, (3, 4, 4), norm, seed=6)
    assert not torch.equal(forward, torch.stack(list(other)))
    pixels = forward * 0.25 + 0.5
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # N(0.5, 1) clipped to [0, 1]: symmetric about 0.5, P(|z| > 0.5) = 0.617 at the bounds.
    assert pixels.mean().item() == pytest.approx(0.5, abs=0.02)
    clipped = ((pixels < 1e-6) | (pixels > 1 - 1e-6)).double().mean().item()
    assert clipped == pytest.approx(0.617, abs=0.02)
    uniform = torch.stack(list(NoiseImages("uniform", 500, (3, 4, 4), norm))) * 0.25 + 0.5
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert uniform.var().item() == pytest.approx(1 / 12, abs=0.005)
    with pytest.raises(IndexError):
        noise[600]
