"""wrapcal.export: the .pt2 without wrapcal, MC dropout's fixed masks, the metadata, the
refusals that name the plugin, and ``wrapcal export`` on the command line.

Models and data are those of ``test_export_onnx`` (the shared ResNet-20, fitted from
cached features of real CIFAR-10 images); the refusal tests use the small ``SmallNet``
of ``tests/helpers.py``, since they stop before or during the trace.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
import torch
from helpers import SmallNet
from shared_data import pretrained_resnet20, requires_shared_data
from test_export_onnx import fit_sets, run_onnx

import wrapcal
from wrapcal import OutputContext, OutputKind, Plugin, PluginTags, Stage
from wrapcal.cli import main
from wrapcal.export import ExportError, export, read_metadata
from wrapcal.export.module import prediction_outputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SERVING_SPECS = [
    ("temperature", {}),
    ("mc_dropout", {"samples": 8, "p": 0.2}),
    ("knn", {"k": 10}),
    ("conformal", {"alpha": 0.1, "method": "raps"}),
    # The calibrated msp, which the export carries, so a server can apply the threshold.
    ("abstain", {"risk": 0.1, "ranking": "calibrated"}),
]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def serving_model() -> wrapcal.WrappedModel:
    """The shared ResNet-20 with a calibrator, a sampler, a detector, sets and abstention."""
    data = fit_sets("resnet20")
    wrapped = wrapcal.wrap(pretrained_resnet20(), SERVING_SPECS)
    wrapped.fit_features(train=data["train"], calibration=data["calibration"], progress=False)
    wrapped.input_shape = (3, 32, 32)
    return wrapped


@pytest.fixture(scope="module")
def serving() -> wrapcal.WrappedModel:
    return serving_model()


@pytest.fixture(scope="module")
def onnx_file(serving, tmp_path_factory) -> Any:
    """The serving model exported to ONNX with its class names (one export, two tests)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    return export(serving, tmp_path_factory.mktemp("onnx") / "model.onnx", class_names=CLASSES)


# --- the torch.export format ---------------------------------------------------------------

_LOADER = textwrap.dedent(
    """
    import sys, torch
    extra = {"wrapcal.json": ""}
    program = torch.export.load(sys.argv[1], extra_files=extra)
    x = torch.load(sys.argv[2])
    with torch.no_grad():
        out = program.module()(x)
    torch.save(list(out), sys.argv[3])
    assert not any(m.split(".")[0] in ("wrapcal", "wrapcal_plugins") for m in sys.modules)
    print(len(extra["wrapcal.json"]))
    """
)


@requires_shared_data
def test_pt2_loads_and_runs_without_wrapcal(serving, tmp_path) -> None:
    """A process that never imports wrapcal loads the .pt2 and gives predict's outputs,
    bit for bit (the same ATen kernels run both)."""
    x = fit_sets("resnet20")["test"][:64]
    path = export(serving, tmp_path / "model.pt2", format="torch")
    assert (tmp_path / "model.pt2.json").is_file()
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run(
        [sys.executable, "-c", _LOADER, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # The metadata inside the archive is the JSON beside it.
    assert int(done.stdout.split()[-1]) == len((tmp_path / "model.pt2.json").read_text().strip())
    got = torch.load(tmp_path / "y.pt")
    expected = prediction_outputs(serving.predict(x))
    names = [o["name"] for o in read_metadata(path)["outputs"]]
    assert names == list(expected)
    for name, value in zip(names, got, strict=True):
        assert torch.equal(value, expected[name]), name


@requires_shared_data
def test_mc_dropout_masks_are_fixed_in_every_copy(serving, tmp_path) -> None:
    """predict, a reloaded .wrapcal and the exported program use the same T masks: the
    three agree exactly, and the masks in the metadata are the plugin's buffer."""
    x = fit_sets("resnet20")["test"][:32]
    first = prediction_outputs(serving.predict(x))
    again = prediction_outputs(serving.predict(x))
    serving.save(tmp_path / "m.wrapcal")
    reloaded = prediction_outputs(wrapcal.load(tmp_path / "m.wrapcal").predict(x))
    # The spelling: wrapcal.export is the package and the function.
    path = wrapcal.export(serving, tmp_path / "m.pt2", format="torch")
    with torch.no_grad():
        exported = torch.export.load(str(path)).module()(x)
    for i, name in enumerate(first):
        assert torch.equal(first[name], again[name]), name
        assert torch.equal(first[name], reloaded[name]), name
        assert torch.equal(first[name], exported[i]), name
    # The masks are data: a different seed gives other scores.
    keep = serving.get_plugin("mc_dropout").keep_
    assert read_metadata(path)["plugins"]["mc_dropout"]["learned"]["keep_"] == keep.tolist()
    assert keep.shape == (8, 64) and 0.7 < keep.float().mean() < 0.9


# --- the metadata --------------------------------------------------------------------------


@requires_shared_data
def test_onnx_metadata_holds_the_operating_points(serving, onnx_file) -> None:
    import onnxruntime as ort

    path = onnx_file
    meta = read_metadata(path)
    # ONNX Runtime reads the same entries.
    session = ort.InferenceSession(str(path))
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["class_names"]) == CLASSES
    assert meta["format"] == "onnx" and meta["wrapcal_version"] == wrapcal.__version__
    assert meta["input"] == {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32"}
    names = [o["name"] for o in meta["outputs"]]
    assert names == [o.name for o in session.get_outputs()]
    assert names[:4] == ["logits", "probs", "label", "confidence"]
    kinds = {o["name"]: o["kind"] for o in meta["outputs"]}
    assert kinds["knn"] == "ood_score" and kinds["sets"] == "set" and kinds["abstain"] == "decision"
    assert [o["dtype"] for o in meta["outputs"] if o["name"] in ("label", "sets")] == [
        "int64",
        "bool",
    ]
    # Every plugin with its parameters, in the order they act.
    assert list(meta["plugins"]) == serving.plugin_names
    for name, plugin in zip(serving.plugin_names, serving.plugins, strict=True):
        assert meta["plugins"][name]["params"] == json.loads(json.dumps(plugin.get_params()))
    # The conformal quantiles, the abstention threshold and its target risk.
    conformal = serving.get_plugin("conformal")
    assert meta["plugins"]["conformal"]["learned"]["thresholds"] == conformal.thresholds.tolist()
    assert meta["plugins"]["conformal"]["params"]["alpha"] == 0.1
    abstain = meta["plugins"]["abstain"]
    assert abstain["state"]["threshold_"] == serving.get_plugin("abstain").threshold_
    assert abstain["learned"]["threshold"] == abstain["state"]["threshold_"]
    assert abstain["params"]["risk"] == 0.1
    assert meta["plugins"]["temperature"]["learned"]["temperature"] > 0
    # The operating points measured at fit, checked against numpy: the threshold of
    # each score is the ceil(0.95 n)-th smallest calibration score.
    points = meta["operating_points"]
    assert points == json.loads(json.dumps(serving.operating_points))
    calibration = serving.predict_features(fit_sets("resnet20")["calibration"][0])
    n = len(calibration)
    assert points["n"] == n and set(points["thresholds"]) == set(calibration.scores)
    for name, threshold in points["thresholds"].items():
        scores = np.sort(calibration.scores[name].double().numpy())
        assert threshold == scores[math.ceil(0.95 * n) - 1], name
        assert np.mean(scores <= threshold) >= 0.95
    probs = calibration.probs.double().numpy()
    labels = fit_sets("resnet20")["calibration"][1].numpy()
    assert points["metrics"]["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))
    assert points["metrics"]["nll"] == pytest.approx(
        -np.mean(np.log(probs[np.arange(n), labels])), rel=1e-6
    )


@requires_shared_data
def test_served_decisions_use_the_metadata(serving, onnx_file) -> None:
    """A server with ONNX Runtime and the metadata only: the abstain output is
    ``msp > threshold`` and the knn threshold accepts what predict accepts."""
    path = onnx_file
    meta = read_metadata(path)
    x = fit_sets("resnet20")["test"]
    out = run_onnx(path, x)
    threshold = meta["plugins"]["abstain"]["learned"]["threshold"]
    assert np.array_equal(out["abstain"], out["msp"].astype(np.float64) > threshold)
    knn = meta["operating_points"]["thresholds"]["knn"]
    accepted = serving.predict(x).scores["knn"].double().numpy() <= knn
    assert np.array_equal(out["knn"].astype(np.float64) <= knn, accepted)


# --- refusals ------------------------------------------------------------------------------


class _Unexportable(Plugin):
    """A third-party plugin that does not say it exports."""

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.requires_fit = False
        tags.outputs = {"odd": OutputKind.OOD_SCORE}
        return tags

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        return {"odd": context.probs[:, 0]}


class _ReadsValues(_Unexportable):
    """Says it exports, but branches on a tensor's value."""

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.exportable = True
        return tags

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        top = context.probs[:, 0]
        return {"odd": top if float(top.max()) > 0.5 else -top}


class _LoopsOverRows(_Unexportable):
    """Says it exports, but loops over the rows of the batch."""

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.exportable = True
        return tags

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        rows = [context.probs[i, 0] for i in range(context.probs.shape[0])]
        return {"odd": torch.stack(rows)}


def small(plugins: list[Any]) -> wrapcal.WrappedModel:
    torch.manual_seed(0)
    return wrapcal.wrap(SmallNet(dropout=0.2).eval(), plugins)


def test_refuses_mc_dropout_over_the_whole_network(tmp_path) -> None:
    wrapped = small([("mc_dropout", {"scope": "all", "samples": 4}), "temperature"])
    wrapped.get_plugin("temperature").fit_logits(torch.randn(64, 10), torch.arange(64) % 10)
    with pytest.raises(ExportError, match=r"plugin mc_dropout \(.*scope='all'.*needs_inputs"):
        export(wrapped, tmp_path / "m.onnx", input_shape=(3, 8, 8))
    assert not (tmp_path / "m.onnx").exists()


def test_refuses_a_plugin_that_does_not_declare_it(tmp_path) -> None:
    wrapped = small([_Unexportable()])
    with pytest.raises(ExportError, match=r"_Unexportable.*tags\.exportable = True.*export\.md"):
        export(wrapped, tmp_path / "m.pt2", format="torch", input_shape=(3, 8, 8))


@pytest.mark.parametrize("plugin", [_ReadsValues, _LoopsOverRows])
def test_a_failing_trace_names_the_plugin(plugin, tmp_path) -> None:
    wrapped = small([("temperature", {}), plugin()])
    wrapped.get_plugin("temperature").fit_logits(torch.randn(64, 10), torch.arange(64) % 10)
    name = wrapped.plugin_names[[type(p) for p in wrapped.plugins].index(plugin)]
    with pytest.raises(ExportError, match=rf"^plugin {name}: its inference cannot be exp") as err:
        export(wrapped, tmp_path / "m.pt2", format="torch", input_shape=(3, 8, 8))
    assert "temperature" not in str(err.value)


def test_bad_calls(tmp_path) -> None:
    wrapped = small(["temperature"])
    with pytest.raises(wrapcal.NotFittedError, match="temperature"):
        export(wrapped, tmp_path / "m.pt2", format="torch", input_shape=(3, 8, 8))
    wrapped.get_plugin("temperature").fit_logits(torch.randn(64, 10), torch.arange(64) % 10)
    with pytest.raises(ExportError, match="input_shape"):
        export(wrapped, tmp_path / "m.pt2", format="torch")
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(wrapped, tmp_path / "m.tflite", format="tflite", input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="10 classes"):
        export(wrapped, tmp_path / "m.pt2", "torch", class_names=["a"], input_shape=(3, 8, 8))


# --- the command line ----------------------------------------------------------------------


@requires_shared_data
def test_cli_export(serving, tmp_path, capsys) -> None:
    saved = serving.save(tmp_path / "model.wrapcal")
    assert (
        main(["export", str(saved), "--format", "torch", "--class-names", ",".join(CLASSES)]) == 0
    )
    printed = capsys.readouterr().out
    assert "model.pt2" in printed and "sets" in printed
    meta = json.loads((tmp_path / "model.pt2.json").read_text())
    assert meta["class_names"] == CLASSES and meta["format"] == "torch.export"
    x = fit_sets("resnet20")["test"][:8]
    with torch.no_grad():
        out = torch.export.load(str(tmp_path / "model.pt2")).module()(x)
    assert torch.equal(out[1], serving.predict(x).probs)


@requires_shared_data
def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    missing = tmp_path / "missing.wrapcal"
    assert main(["export", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"wrapcal export: error: model file not found: {missing} (give a .wrapcal file)\n"
    )
    assert main(["export", "x.wrapcal", "--input-shape", "3,a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--input-shape" in err and "3,224,224" in err
    # A saved model whose sampler runs the whole network: refused, naming the plugin.
    wrapped = wrapcal.wrap(pretrained_resnet20(), [("mc_dropout", {"scope": "all", "p": 0.1})])
    wrapped.input_shape = (3, 32, 32)
    saved = wrapped.save(tmp_path / "sampled.wrapcal")
    assert main(["export", str(saved)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wrapcal export: error: cannot export this model: plugin mc_dropout (")
    assert err.count("\n") == 1 and "scope='all'" in err
    assert not (tmp_path / "sampled.onnx").exists()


def test_wrapcal_export_is_callable_after_a_plain_import_wrapcal() -> None:
    """The README's ``import wrapcal; wrapcal.export(wrapped, path)``, in a fresh process
    that never imported ``wrapcal.export`` itself (the exporter loads on first use)."""
    code = textwrap.dedent(
        """
        import sys
        import wrapcal
        assert "wrapcal.export" not in sys.modules
        assert callable(wrapcal.export) and wrapcal.export.read_metadata
        print(wrapcal.export.__name__)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "wrapcal.export"


def test_every_accept_rate_travels_in_the_metadata(tmp_path) -> None:
    """``fit(accept_rates=(0.95, 0.99))``: the export's metadata holds both tables, as
    measured; a name in a rate's table is checked like the others."""
    torch.manual_seed(0)
    model = SmallNet(dropout=0.2).eval()
    x = torch.randn(120, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(-1)
    wrapped = wrapcal.wrap(model, ["temperature"])
    y[::3] = torch.arange(len(y[::3])) % 10
    wrapped.fit(calibration=(x, y), progress=False, accept_rates=(0.95, 0.99))
    meta = read_metadata(export(wrapped, tmp_path / "m.pt2", "torch"))
    points = meta["operating_points"]
    assert points == json.loads(json.dumps(wrapped.operating_points))
    assert points["accept_rates"] == [0.95, 0.99] and set(points["thresholds_at"]) == {
        "0.95",
        "0.99",
    }
    for name, high in points["thresholds_at"]["0.99"].items():
        assert high >= points["thresholds_at"]["0.95"][name], name  # accepts more
    hostile = copy.deepcopy(wrapped.operating_points)
    hostile["thresholds_at"]["0.99"]["../x"] = 0.5
    wrapped.operating_points = hostile
    with pytest.raises(ExportError, match=r"name a threshold at 0\.99 '\.\./x'"):
        export(wrapped, tmp_path / "bad.pt2", "torch")
