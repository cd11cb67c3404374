"""``wrapcal evaluate``: reports from library models, weights, npz/IDX/ImageFolder/Hugging
Face data, every built-in plugin with its parameters, and saved ``.wrapcal`` files; exit
code 2 with one line on stderr, in the command's own flags, for bad input."""

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

ORIGINAL_FOUR = ("temperature", "mc_dropout", "label_smoothing", "discrepancy")
#: Settings that keep each plugin's CLI run short (the defaults train for longer).
FAST = {
    "mc_dropout": ["mc_dropout.samples=4"],
    "discrepancy": ["discrepancy.epochs=1", "discrepancy.epochs_pretrain=2"],
    "label_smoothing": ["label_smoothing.max_iter=50"],
    "knn": ["knn.k=5"],
    "dirichlet": ["dirichlet.cv=2", "dirichlet.max_iter=100"],
    "matrix_scaling": ["matrix_scaling.cv=2", "matrix_scaling.max_iter=100"],
    "vector_scaling": ["vector_scaling.max_iter=100"],
}
MC_FINETUNE = ["--plugins", "mc_dropout", "--plugin-arg", "mc_dropout.finetune=true"]
ENGLISH = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


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


def _pixels(x: torch.Tensor) -> np.ndarray:
    """Normalised digits back to pixels in [0, 1]: --mean 0.2 --std 0.3 gives them back."""
    return (x * DIGITS_STD + DIGITS_MEAN).clamp(0, 1).numpy()


@pytest.fixture(scope="module")
def digits_npz(data, tmp_path_factory):
    """The digits' test and calibration splits as pixels, with the class names."""
    path = tmp_path_factory.mktemp("npz") / "digits.npz"
    arrays = {"classes": np.array(ENGLISH)}
    for split, (x, y) in (("test", data.test), ("calibration", data.calibration)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _pixels(x), y.numpy()
    np.savez(path, **arrays)
    return path


def _report(out) -> dict:
    for name in ("report.html", "report.md", "report.json"):
        assert (out / name).is_file(), name
    assert list((out / "figures").glob("*.png"))
    return json.loads((out / "report.json").read_text())


def _run(argv, tmp_path, capsys, code=0):
    out = tmp_path / "out"
    assert main(["evaluate", *argv, "--out", str(out), "--no-progress"]) == code
    captured = capsys.readouterr()
    return out, captured.out, captured.err


def _one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("wrapcal evaluate: error: ")
    assert "Traceback" not in err
    # The command speaks in its flags, never in Python calls.
    assert "wrapped." not in lines[0] and "fit(" not in lines[0] and "_key=" not in lines[0]
    return lines[0]


def test_timm_model_on_digits_with_gaussian_noise(tmp_path, capsys):
    argv = ["timm:resnet10t", "--data", "digits", "--ood", "noise=gaussian"]
    out, stdout, _ = _run(argv, tmp_path, capsys)
    report = _report(out)
    assert list(report["models"]) == ["baseline"]
    test = {"n": 400, "num_classes": 10, "class_names": [str(k) for k in range(10)]}
    assert report["data"] == {"test": test, "ood": {"noise": {"n": 400}}}
    assert set(report["ood"]["baseline"]["noise"]) == {"msp", "max_logit", "entropy", "energy"}
    assert len(list((out / "figures").glob("*.png"))) == 4
    assert str(out / "report.html") in stdout and "| baseline |" in stdout
    # Plain text in the terminal, though report.md marks the best values in bold.
    assert "**" in (out / "report.md").read_text() and "**" not in stdout


def _write_idx(path, images: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">III", *images.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())


def test_weights_plugins_npz_and_idx(tmp_path, data, trained_timm, digits_npz, capsys):
    _, weights, logits = trained_timm
    idx = tmp_path / "blobs-idx3-ubyte.gz"
    _write_idx(idx, np.random.default_rng(0).integers(0, 256, (50, 28, 28)))
    argv = ["timm:resnet10t", "--weights", str(weights), "--num-classes", "10"]
    argv += ["--data", str(digits_npz), "--mean", "0.2", "--std", "0.3"]
    argv += ["--ood", f"blobs={idx}", "--ood", "uniform", "--plugins", "temperature"]
    argv += ["--calibration", str(digits_npz), "--bootstrap", "0"]
    out, _, _ = _run(argv, tmp_path, capsys)
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
    # Per model: its reliability diagram, the primary score's histogram, the best score's
    # ROC on each OOD set, and every score's ROC on each of the two OOD sets.
    expected = {
        f"{kind}_{model}{tail}.png"
        for model in ("baseline", "wrapped")
        for kind, tail in (
            ("reliability", ""),
            ("ood", "_msp_hist"),
            ("ood", "_best_roc"),
            ("roc", "_blobs"),
            ("roc", "_uniform"),
        )
    }
    assert {p.name for p in (out / "figures").glob("*.png")} == expected


def test_saved_wrapcal_file_against_its_own_baseline(tmp_path, data, trained_timm, capsys):
    model, _, logits = trained_timm
    wrapped = wrapcal.wrap(model, ["temperature"]).fit(calibration=data.calibration, progress=False)
    path = wrapped.save(tmp_path / "model.wrapcal")
    out, _, _ = _run([str(path), "--data", "digits", "--bootstrap", "0"], tmp_path, capsys)
    report = _report(out)
    assert list(report["models"]) == ["baseline", "wrapped"]
    t = wrapped.get_plugin("temperature").temperature_
    y = data.test[1]
    cal = report["calibration"]
    assert cal["baseline"]["ece"] == pytest.approx(ece(logits.softmax(1), y), abs=1e-4)
    assert cal["wrapped"]["ece"] == pytest.approx(ece((logits / t).softmax(1), y), abs=1e-4)
    assert report["data"]["ood"] == {} and report["ood"] == {"baseline": {}, "wrapped": {}}
    # A saved model has its plugins: --plugins on top of it is a mistake, said as such.
    _, _, err = _run(
        [str(path), "--data", "digits", "--plugins", "mc_dropout"], tmp_path, capsys, 2
    )
    assert "--plugins apply to FAMILY:NAME models" in _one_error(err)


def _limited(pair: tuple[torch.Tensor, torch.Tensor], n: int, seed: int = 0):
    """What ``--limit n --seed seed`` keeps of a set: n rows drawn without replacement by
    numpy's default_rng(seed), in file order (docs/cli.md)."""
    rows = np.sort(np.random.default_rng(seed).choice(len(pair[1]), n, replace=False))
    index = torch.from_numpy(rows)
    return pair[0][index], pair[1][index]


def test_the_four_plugins_from_the_cli_equal_the_python_api(tmp_path, data, trained_timm, capsys):
    """temperature, mc_dropout, label_smoothing (alpha=auto, a string parameter) and
    discrepancy (with --unlabeled given twice: the digits and uniform noise, mixed) run
    from the command line and give the numbers the Python API gives on the same data."""
    model, weights, _ = trained_timm
    n = 200
    args = [a for name in ORIGINAL_FOUR for a in FAST.get(name, [])]
    argv = ["timm:resnet10t", "--weights", str(weights), "--data", "digits", "--limit", str(n)]
    argv += ["--ood", "noise=gaussian", "--plugins", ",".join(ORIGINAL_FOUR)]
    argv += ["--plugin-arg", "label_smoothing.alpha=auto"]
    argv += [a for arg in args for a in ("--plugin-arg", arg)]
    argv += ["--unlabeled", "digits", "--unlabeled", "uniform", "--bootstrap", "0"]
    out, _, err = _run(argv, tmp_path, capsys)
    report = _report(out)
    assert report["models"]["wrapped"]["plugins"] == [
        "label_smoothing",
        "discrepancy",
        "mc_dropout",
        "temperature",
    ]
    assert report["data"]["test"]["n"] == n
    assert "--plugin-arg mc_dropout.finetune=true" in err  # its warning, in CLI terms

    norm = Normaliser((DIGITS_MEAN,), (DIGITS_STD,))
    uniform = torch.stack(list(NoiseImages("uniform", n, (3, 32, 32), norm, seed=0)))
    calibration = _limited(data.calibration, n)
    specs = [
        ("label_smoothing", {"alpha": "auto", "max_iter": 50}),
        ("discrepancy", {"epochs": 1, "epochs_pretrain": 2}),
        ("mc_dropout", {"samples": 4}),
        ("temperature", {}),
    ]
    with pytest.warns(UserWarning, match="no dropout before its head"):
        wrapped = wrapcal.wrap(model, specs)
    wrapped.fit(
        train=_limited(data.train, n),
        calibration=calibration,
        unlabeled=torch.cat([calibration[0], uniform]),
        progress=False,
        seed=0,
    )
    noise = NoiseImages("gaussian", n, (3, 32, 32), norm, seed=0)
    expected = wrapcal.evaluate(
        {"baseline": model, "wrapped": wrapped},
        _limited(data.test, n),
        {"noise": noise},
        bootstrap=0,
        progress=False,
    ).to_dict()
    for model_name in ("baseline", "wrapped"):
        for metric in ("accuracy", "ece", "nll", "brier"):
            assert report["calibration"][model_name][metric] == pytest.approx(
                expected["calibration"][model_name][metric], rel=1e-5, abs=1e-7
            ), (model_name, metric)
    for score in ("discrepancy", "mutual_information", "msp"):
        assert report["ood"]["wrapped"]["noise"][score]["auroc"] == pytest.approx(
            expected["ood"]["wrapped"]["noise"][score]["auroc"], abs=1e-6
        ), score


def _other_builtins() -> list[str]:
    return sorted(
        name
        for name, info in wrapcal.plugin_registry().items()
        if info.package == "wrapcal" and name not in ORIGINAL_FOUR
    )


def test_every_other_builtin_plugin_runs_from_the_cli(tmp_path, capsys, trained_timm):
    """Whatever else is built in runs from the command line, all together, with the data
    their tags ask for (one run: each plugin's own runs are in its tests), and their
    scores reach the report."""
    from wrapcal.model.assemble import create_plugin
    from wrapcal.model.fitting import read_sets

    names = _other_builtins()
    if not names:
        pytest.skip("no built-in plugins beyond the original four")
    _, weights, _ = trained_timm
    objects = [create_plugin(name, {}) for name in names]
    reads, _ = read_sets(type("W", (), {"plugin_names": names, "plugins": objects}))
    # No OOD set: its figures (two per score) would take most of the time.
    argv = ["timm:resnet10t", "--weights", str(weights), "--data", "digits", "--limit", "150"]
    argv += ["--plugins", ",".join(names), "--bootstrap", "0"]
    argv += ["--unlabeled", "digits"] if "unlabeled" in reads else []
    argv += [a for name in names for arg in FAST.get(name, []) for a in ("--plugin-arg", arg)]
    out, _, _ = _run(argv, tmp_path, capsys)
    report = _report(out)
    assert sorted(report["models"]["wrapped"]["plugins"]) == names
    assert report["data"]["test"]["n"] == 150
    for obj in objects:
        scores = {n for n, kind in wrapcal.get_tags(obj).outputs.items() if kind.is_score}
        assert scores <= set(report["models"]["wrapped"]["scores"])


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
        # Plugins and their parameters, checked before any data is read.
        (["--plugins", "temperature,temperature"], "--plugins: temperature is listed twice"),
        (["--plugins", "temperature", "--plugin-arg", "temperature"], "use PLUGIN.PARAMETER=V"),
        (["--plugins", "temperature", "--plugin-arg", "temperature.max_iter"], "PARAMETER=VALUE"),
        (
            ["--plugins", "temperature", "--plugin-arg", "mc_dropout.samples=3"],
            "mc_dropout is not among --plugins (temperature)",
        ),
        (
            ["--plugins", "temperature", "--plugin-arg", "temperature.maxiter=5"],
            "--plugin-arg temperature.maxiter=5: plugin temperature has no parameter 'maxiter' "
            "(did you mean 'max_iter'?)",
        ),
        (
            ["--plugins", "temperature", "--plugin-arg", "temperature.max_iter=-1"],
            "max_iter=-1 is invalid; expected an int in [1, 100000]",
        ),
        (
            ["--plugins", "label_smoothing", "--plugin-arg", "label_smoothing.alpha=often"],
            "alpha='often' is invalid",
        ),
        (
            ["--plugins", "temperature"] + ["--plugin-arg", "temperature.max_iter=5"] * 2,
            "temperature.max_iter is given twice",
        ),
        # What the plugins need, named by the flag that gives it (--data is not digits,
        # so nothing defaults, and it is never read: the check comes first).
        (["--plugins", "temperature", "--data", "{tmp}/t.npz"], "temperature needs --calibration"),
        (["--plugins", "label_smoothing", "--data", "{tmp}/t.npz"], "needs --train"),
        (["--plugins", "discrepancy"], "plugin discrepancy needs --unlabeled: unlabelled data"),
        (
            [*MC_FINETUNE, "--data", "{tmp}/t.npz"],
            "plugin mc_dropout needs --train: finetune=True retrains the head",
        ),
        (["--fit-data", "conformal"], "--fit-data 'conformal': use NAME=SPEC"),
        (["--fit-data", "calibration=x.npz"], "give the calibration data with --calibration"),
        # The model's own arguments go through the registry's allow-list.
        (["--model-arg", "checkpoint_path=/etc/passwd"], "'checkpoint_path' is not allowed"),
        (["--model-arg", "drop_rate"], "--model-arg 'drop_rate': use KEY=VALUE"),
        (["--model-arg", "drop_rate=2"], "drop_rate=2 is invalid"),
        (["--class-names", "a,,b"], "--class-names 'a,,b': give the model's class names"),
        # Numbers argparse checks: one line too, no usage block (issue 19, item 13).
        (["--size", "0"], "argument --size: must be a positive integer, got 0"),
        (["--num-classes", "-1"], "argument --num-classes: must be a positive integer, got -1"),
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
        (["--bins", "0"], "argument --bins: must be a positive integer"),
        (["--bootstrap", "-1"], "argument --bootstrap: must be at least 0, got -1"),
        (["--limit", "x"], "argument --limit: expected an integer, got 'x'"),
        (["--channels", "2"], "argument --channels: invalid choice: 2"),
        (["--std", "0"], "argument --std: must be a positive number, got 0"),
        (["--mean", "nan"], "argument --mean: must be a finite number, got nan"),
        (["--mean", "0.5", "0.5", "--std", "0.5"], "--mean has 2 values and --std 1"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if not argv[0].startswith(("timm:", "torchvision:", "wrapcal:", "resnet", str(tmp_path))):
        argv = ["timm:resnet10t", *argv]
    if "--data" not in argv:
        argv += ["--data", "digits"]
    out, _, err = _run(argv, tmp_path, capsys, code=2)
    assert message in _one_error(err)
    assert not out.exists()


def test_unknown_flag_and_missing_command_are_one_line(capsys):
    assert main(["evaluate", "timm:resnet10t", "--data", "digits", "--sise", "3"]) == 2
    assert capsys.readouterr().err.strip() == (
        "wrapcal evaluate: error: unrecognized arguments: --sise 3"
    )
    assert main([]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "wrapcal: error: the following arguments are required: command"
    ]


def test_npz_errors_list_the_keys_found_and_the_names_accepted(tmp_path, data, capsys):
    px, y = _pixels(data.test[0][:20]), data.test[1][:20].numpy()
    cases = {
        "empty.npz": ({}, "cannot find the images (keys found: none); accepted names: "),
        "zero.npz": (
            {"images": px[:0], "labels": y[:0]},
            "--data {path}: holds no images (an empty npz set)",
        ),
        "two.npz": (
            {"pics": px, "more": px, "lbl": np.zeros((3, 2))},
            "keys found: pics [20, 3, 32, 32], more [20, 3, 32, 32], lbl [3, 2]); accepted names: "
            "test_images, test_x, x_test, images, image, x, X, data, inputs, or a single "
            "3-D/4-D array; choose the split with --split NAME",
        ),
        "nolabels.npz": (
            {"images": px},
            "test data must be labelled but no labels were found for 'images' (keys found: "
            "images [20, 3, 32, 32]); accepted names: test_labels, test_y, y_test, labels, "
            "label, y, Y, targets, target",
        ),
        "text.npz": (None, "not a readable .npz archive"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / name
        if arrays is None:
            path.write_text("not a zip")
        else:
            np.savez(path, **arrays)
        _, _, err = _run(["timm:resnet10t", "--data", str(path)], tmp_path, capsys, 2)
        assert message.format(path=path) in _one_error(err), name
    # The calibration set's messages name its own flags.
    np.savez(tmp_path / "cal.npz", train_images=px, train_labels=y)
    argv = ["timm:resnet10t", "--data", "digits", "--plugins", "temperature"]
    argv += ["--calibration", str(tmp_path / "cal.npz"), "--calibration-split", "val"]
    _, _, err = _run(argv, tmp_path, capsys, 2)
    line = _one_error(err)
    assert f"--calibration {tmp_path / 'cal.npz'}: cannot find the images" in line
    assert "val_images, val_x, x_val" in line and "splits present: train" in line
    assert "choose the split with --calibration-split NAME" in line


def test_calibration_labels_covering_part_of_the_classes(tmp_path, data, capsys):
    """Refused by default (it skews the fit); fitted with --allow-partial-classes, with a
    loud warning before and after the results."""
    x, y = data.calibration
    half = y < 5
    path = tmp_path / "half.npz"
    np.savez(path, images=_pixels(x[half]), labels=y[half].numpy())
    argv = ["timm:resnet10t", "--data", "digits", "--plugins", "temperature"]
    argv += ["--calibration", str(path), "--mean", "0.2", "--std", "0.3", "--bootstrap", "0"]
    _, _, err = _run(argv, tmp_path, capsys, 2)
    line = _one_error(err)
    assert "--calibration labels cover 5 of the model's 10 classes (missing: 5, 6, 7, 8, 9)" in line
    assert "--allow-partial-classes" in line
    # Allowed: the fit runs, and the warning is repeated after the table. An unread
    # --train draws a warning of its own.
    argv += ["--allow-partial-classes", "--train", "digits", "--limit", "100"]
    out, stdout, err = _run(argv, tmp_path, capsys)
    assert err.count("wrapcal evaluate: WARNING: --calibration labels cover 5 of the model's") == 2
    assert "wrapcal evaluate: warning: no plugin reads --train (temperature); it is ignored" in err
    assert _report(out)["models"]["wrapped"]["plugins"] == ["temperature"]
    assert "| wrapped |" in stdout


def test_a_fit_error_from_the_library_is_said_in_cli_terms(tmp_path, data, capsys):
    x, y = data.calibration
    one = y == 3
    path = tmp_path / "one.npz"
    np.savez(path, images=_pixels(x[one]), labels=y[one].numpy())
    argv = ["timm:resnet10t", "--data", "digits", "--plugins", "temperature"]
    argv += ["--calibration", str(path), "--allow-partial-classes"]
    _, _, err = _run(argv, tmp_path, capsys, 2)
    error = [line for line in err.splitlines() if ": error: " in line]
    assert len(error) == 1 and "Traceback" not in err
    assert error[0].startswith("wrapcal evaluate: error: plugin temperature: ")
    assert "1 class" in error[0] and "wrapped." not in error[0]


def test_channels_and_image_size_the_model_cannot_take(tmp_path, data, capsys):
    grey = tmp_path / "grey.npz"
    x, y = data.test
    np.savez(grey, test_images=(_pixels(x[:60])[:, 0] * 255).astype(np.uint8), test_labels=y[:60])
    _, _, err = _run(["timm:resnet10t", "--data", str(grey)], tmp_path, capsys, 2)
    assert "add --channels 3 or give one --mean/--std value per channel" in _one_error(err)
    argv = ["timm:resnet10t", "--data", str(grey), "--mean", "0.2", "--std", "0.3"]
    _, _, err = _run(argv, tmp_path, capsys, 2)
    assert "--data images have 1 channel(s) but the model takes 3: add --channels 3" in (
        _one_error(err)
    )
    out, _, _ = _run([*argv, "--channels", "3", "--bootstrap", "0"], tmp_path, capsys)
    assert _report(out)["data"]["test"]["n"] == 60
    _, _, err = _run(["timm:vit_tiny_patch16_224", "--data", "digits"], tmp_path, capsys, 2)
    assert "--data images are 32x32 but the model takes exactly 224x224: add --size 224" in (
        _one_error(err)
    )


def _image_folder(root, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> np.ndarray:
    """PNG files root/<name of the class>/<i>.png; returns the pixels as saved (uint8)."""
    from PIL import Image

    pixels = np.round(_pixels(x).transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, y.tolist(), strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return pixels


def test_image_folder_class_order(tmp_path, data, trained_timm, digits_npz, capsys):
    """Folders named zero..nine get alphabetical indices (eight = 0); with the model's
    class names known they are renumbered by name, and the accuracy is the true one."""
    model, weights, _ = trained_timm
    x, y = data.test
    root = tmp_path / "folder"
    pixels = _image_folder(root, x, y, ENGLISH)
    inputs = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.2) / 0.3
    with torch.no_grad():
        predicted = model(inputs).argmax(1)
    alphabetical = torch.tensor([sorted(ENGLISH).index(ENGLISH[k]) for k in y.tolist()])
    argv = ["timm:resnet10t", "--weights", str(weights), "--data", str(root)]
    argv += ["--mean", "0.2", "--std", "0.3", "--bootstrap", "0"]

    out, _, err = _run([*argv, "--class-names", ",".join(ENGLISH)], tmp_path, capsys)
    assert "wrapcal evaluate: warning: --data: the folders' class indices" in err
    assert "labels renumbered by class name (eight 0->8, five 1->5" in err
    true_accuracy = (predicted == y).double().mean().item()
    assert _report(out)["calibration"]["baseline"]["accuracy"] == pytest.approx(
        true_accuracy, abs=1.01 / len(y)
    )
    assert true_accuracy > 0.3

    out, _, err = _run(argv, tmp_path, capsys)
    assert "wrapcal evaluate: note: --data: class indices follow alphabetical folder order " in err
    assert "(0=eight, 1=five, 2=four, 3=nine, 4=one, 5=seven, ...)" in err
    wrong_accuracy = (predicted == alphabetical).double().mean().item()
    assert _report(out)["calibration"]["baseline"]["accuracy"] == pytest.approx(
        wrong_accuracy, abs=1.01 / len(y)
    )

    # The model's classes from the --data npz's `classes` array: a calibration folder of
    # five classes is renumbered by name, so the classes it misses are 0, 6, 7, 8, 9
    # (alphabetical order would have said 5 to 9).
    few = tmp_path / "few"
    keep = (y >= 1) & (y <= 5)
    _image_folder(few, x[keep], y[keep], ENGLISH)
    argv = ["timm:resnet10t", "--data", str(digits_npz), "--plugins", "temperature"]
    argv += ["--calibration", str(few), "--mean", "0.2", "--std", "0.3"]
    _, _, err = _run(argv, tmp_path, capsys, 2)
    lines = err.strip().splitlines()
    assert lines[0].startswith("wrapcal evaluate: warning: --calibration: the folders' class")
    assert f"(the model's classes from --data {digits_npz})" in lines[0]
    assert "cover 5 of the model's 10 classes (missing: 0, 6, 7, 8, 9)" in _one_error(lines[1])


def test_a_saved_hugging_face_dataset_as_test_data(tmp_path, data, trained_timm, capsys):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    _, weights, _ = trained_timm
    x, y = data.test[0][:40], data.test[1][:40]
    pixels = np.round(_pixels(x).transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=ENGLISH)}
    )
    hf = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(p) for p in pixels], "label": y.tolist()}, features=features
    )
    datasets.DatasetDict({"test": hf}).save_to_disk(str(tmp_path / "hf"))
    argv = ["timm:resnet10t", "--weights", str(weights), "--data", str(tmp_path / "hf")]
    argv += ["--mean", "0.2", "--std", "0.3", "--bootstrap", "0", "--ood", "gaussian"]
    out, _, err = _run(argv, tmp_path, capsys)
    report = _report(out)
    # The ClassLabel names label the report's classes.
    assert report["data"]["test"] == {"n": 40, "num_classes": 10, "class_names": ENGLISH}
    assert f"10 classes ({', '.join(ENGLISH)})" in (out / "report.html").read_text()
    assert report["data"]["ood"] == {"gaussian": {"n": 40}}
    assert "warning" not in err  # ClassLabel names in label order: nothing to renumber


def test_docs_cli_md_describes_every_flag():
    """docs/cli.md is the reference: every flag of every command is in it."""
    from pathlib import Path

    from wrapcal.cli import build_parser

    text = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    flags = {
        option
        for command in commands.values()
        for action in command._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    assert len(flags) > 25
    assert sorted(f for f in flags if f"`{f}" not in text) == []


def test_model_arguments_the_architecture_does_not_take(tmp_path, capsys):
    argv = ["timm:resnet10t", "--model-arg", "img_size=32", "--data", "digits"]
    _, _, err = _run(argv, tmp_path, capsys, 2)
    assert "timm:resnet10t cannot be built with img_size=32, num_classes=10" in _one_error(err)


def test_plugins_command_lists_parameters(capsys):
    assert main(["plugins", "--params"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "max_iter=100" in rows["temperature"]
    assert "samples=30" in rows["mc_dropout"] and "finetune=False" in rows["mc_dropout"]


@pytest.mark.slow
def test_the_shared_resnet20_on_cifar10_from_the_cli(tmp_path, capsys):
    """The README's command on real data: the third-party ResNet-20, the CIFAR-10 JPEG
    test set and MNIST as OOD, temperature fitted on CIFAR-10 train images, each set cut
    to 1000 images by --limit. Every number equals one computed from the cached logits
    of the same images (tests/shared_data.py) with numpy and scikit-learn."""
    shared = pytest.importorskip("shared_data")
    if not shared.HAVE_SHARED_DATA:
        pytest.skip("shared data absent")
    from sklearn.metrics import roc_auc_score

    from wrapcal.logits.temperature import fit_temperature
    from wrapcal.metrics import ece as ece_of

    n = 1000
    argv = ["wrapcal:cifar_resnet20", "--weights", str(shared.RESNET20_WEIGHTS)]
    argv += ["--data", str(shared.CIFAR_NPZ), "--ood", f"mnist={shared.MNIST_IMAGES}"]
    argv += ["--plugins", "temperature", "--calibration", str(shared.CIFAR_NPZ)]
    argv += ["--calibration-split", "train", "--limit", str(n), "--bootstrap", "0"]
    out, _, err = _run(argv, tmp_path, capsys)
    assert "warning" not in err.lower()
    report = _report(out)
    # CIFAR-10's names, from the npz's classes array, label the report's classes.
    classes = np.load(shared.CIFAR_NPZ)["classes"].tolist()
    assert report["data"]["test"]["class_names"] == classes and classes[0] == "airplane"

    outputs = shared.resnet20_outputs()
    rows = {
        name: torch.from_numpy(np.sort(np.random.default_rng(0).choice(10000, n, replace=False)))
        for name in ("test", "train", "mnist")
    }
    test_logits = outputs["test_logits"][rows["test"]].double()
    labels = outputs["test_labels"][rows["test"]]
    t = fit_temperature(
        outputs["train_logits"][rows["train"]], outputs["train_labels"][rows["train"]]
    )
    cal = report["calibration"]
    assert cal["baseline"]["ece"] == pytest.approx(ece_of(test_logits.softmax(1), labels), abs=1e-4)
    assert cal["wrapped"]["ece"] == pytest.approx(
        ece_of((test_logits / t).softmax(1), labels), abs=1e-4
    )
    assert 0.05 < cal["baseline"]["ece"] < 0.25 and cal["wrapped"]["ece"] < cal["baseline"]["ece"]
    msp_in = test_logits.softmax(1).max(1).values
    msp_out = outputs["mnist_logits"][rows["mnist"]].double().softmax(1).max(1).values
    # Scores are "higher = more OOD": the negated MSP.
    y_ood = np.r_[np.zeros(n), np.ones(n)]
    auroc = roc_auc_score(y_ood, -np.r_[msp_in.numpy(), msp_out.numpy()])
    assert report["ood"]["baseline"]["mnist"]["msp"]["auroc"] == pytest.approx(auroc, abs=2e-3)
