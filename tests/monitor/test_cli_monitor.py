"""``wrapcal monitor`` end to end: a saved model, windows given in order, a reference
saved and reused, alerts as an exit code, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import wrapcal
from wrapcal.cli import main
from wrapcal.datasets import digits


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """timm's tiny ``test_resnet`` with random features and a head fitted on 500 digits
    (LBFGS, a second), wrapped with temperature, saved."""
    import timm

    data = digits()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=10).eval()
    with torch.no_grad():
        x, y = data.train[0][:500], data.train[1][:500]
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    head = model.get_classifier()
    opt = torch.optim.LBFGS(head.parameters(), max_iter=60, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(features), y) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    wrapped = wrapcal.wrap(model, ["temperature"])
    wrapped.fit(calibration=data.calibration, progress=False)
    return wrapped.save(tmp_path_factory.mktemp("cli") / "model.wrapcal"), data


def test_monitor_command_end_to_end(tmp_path, saved_model, capsys):
    path, data = saved_model
    out, ref = tmp_path / "report", tmp_path / "ref.json"
    windows = ["--traffic", "day1=digits", "--traffic", "day2=digits", "--labels"]
    refs = ["--reference", "digits", "--save-reference", str(ref)]
    code = main(["monitor", str(path), *windows, *refs, "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads((out / "monitor.json").read_text())
    assert [w["name"] for w in report["windows"]] == ["day1", "day2"]
    assert (out / "monitor.html").is_file() and (out / "monitor.md").is_file()
    assert "report written to" in printed and "day1" in printed
    # The same numbers as the library on the same model and data.
    api = wrapcal.monitor(wrapcal.load(path), [data.test], reference=str(ref))
    first = report["windows"][0]
    assert first["estimated_accuracy"] == pytest.approx(api.windows[0].estimated_accuracy)
    assert first["accuracy"] == pytest.approx(api.windows[0].accuracy)
    assert first["ood"]["output"] == "msp" and first["drift"].keys() == api.windows[0].drift.keys()
    assert first["drift"]["msp"]["pvalue"] == pytest.approx(api.windows[0].drift["msp"]["pvalue"])
    assert report["reference"]["n"] == len(data.calibration[1])
    # The saved reference is reused; one stream cut into windows; alerts as exit code 1.
    stream = ["--traffic", "digits", "--window-size", "150", "--reference", str(ref)]
    rules = ["--min-accuracy", "0.999", "--fail-on-alert"]
    code = main(["monitor", str(path), *stream, *rules, "--out", str(tmp_path / "r2")])
    printed = capsys.readouterr().out
    assert code == 1 and printed.count("ALERT") >= 3
    report = json.loads((tmp_path / "r2" / "monitor.json").read_text())
    assert [w["n"] for w in report["windows"]] == [150, 150, 97]  # the calibration split
    assert all(w["accuracy"] is None for w in report["windows"])  # no --labels


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/none.wrapcal", "--traffic", "digits"], "model file not found"),
        (["{model}", "--traffic", "digits", "--ood-alpha", "2"], "must be in (0, 1) or off"),
        (["{model}", "--traffic", "digits", "--reference", "{tmp}/no.json"], "file not found"),
        (["{model}", "--traffic", "digits", "--save-reference", "r.json"], "needs --reference"),
    ],
)
def test_monitor_command_errors_are_one_line(tmp_path, saved_model, capsys, args, message):
    path, _ = saved_model
    argv = [a.format(tmp=tmp_path, model=path) for a in args]
    assert main(["monitor", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("wrapcal monitor")
