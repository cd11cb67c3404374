"""Exports write only where the user said, and a saved file cannot steer them (issue 30).

The probes of the attack round, each reproduced: ``wrapcal export model.json --format
torch`` wrote its metadata over ``model.json``, the model it exported (and ``--out
net.pt2`` over ``net.json``); a directory or an unwritable ``--out`` ended in a
traceback after the trace; a file's allow-listed ``input_shape`` of ``[3, 1048575,
1048575]`` asked for a 26 TB example batch; threshold names in a file's
``operating_points`` (a 200 kB ``<script>`` key, ``../../etc/passwd``) were copied into
the export's metadata unchecked.

The model is the reference CIFAR ResNet-8 with random weights (a family ``load``
rebuilds), fitted with temperature scaling on 64 random 16x16 images: seconds.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_tensors

import wrapcal
from wrapcal.cli import main
from wrapcal.export import ExportError, export, read_metadata
from wrapcal.export.targets import sidecar
from wrapcal.export.trace import MAX_INPUT_VALUES
from wrapcal.files import format as saving
from wrapcal.files.cifar_resnets import cifar_resnet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def fitted() -> wrapcal.WrappedModel:
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=10).eval()  # the smallest one load rebuilds
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 10
    return wrapcal.wrap(model, ["temperature"]).fit(calibration=(x, y), progress=False)


def saved(fitted: wrapcal.WrappedModel, path: Path) -> tuple[Path, bytes]:
    """The model saved at ``path``, and its bytes (to check nothing changed them)."""
    fitted.save(path)
    return path, path.read_bytes()


def rewrite(path: Path, out: Path, mutate) -> Path:
    """What an attacker does: edit the configuration and recompute the digest (as in
    tests/files/test_trust.py)."""
    stored = saving.read(path)
    config = copy.deepcopy(stored.config)
    mutate(config)
    body = {k: v for k, v in config.items() if k != "digest"}
    config = {**body, "digest": saving.digest(body, stored.tensors)}
    out.write_bytes(save_tensors(stored.tensors, metadata={"wrapcal": json.dumps(config)}))
    return out


def one_error(capsys, command: str = "export") -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"wrapcal {command}: error: "), err
    return err


# --- writes go only where the user said -------------------------------------------------


def test_exporting_model_json_to_torch_leaves_the_model_intact(fitted, tmp_path, capsys):
    """The probe: the default --out is model.pt2, whose metadata went to model.json."""
    model, before = saved(fitted, tmp_path / "model.json")
    assert main(["export", str(model), "--format", "torch"]) == 0
    assert model.read_bytes() == before
    assert "model.pt2.json" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.json",
        "model.pt2",
        "model.pt2.json",
    ]
    meta = read_metadata(tmp_path / "model.pt2")
    assert meta["format"] == "torch.export" and meta == json.loads(
        (tmp_path / "model.pt2.json").read_text()
    )
    reloaded = wrapcal.load(model)  # the saved model still loads, and is the same model
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(reloaded.predict(x).probs, fitted.predict(x).probs)


def test_out_net_pt2_for_a_model_saved_as_net_json(fitted, tmp_path):
    model, before = saved(fitted, tmp_path / "net.json")
    assert (
        main(["export", str(model), "--format", "torch", "--out", str(tmp_path / "net.pt2")]) == 0
    )
    assert model.read_bytes() == before
    wrapcal.load(model)
    assert (tmp_path / "net.pt2.json").is_file()


def test_the_api_never_writes_over_a_saved_model(fitted, tmp_path):
    """From Python too: a target that is a saved model, or a sidecar name that is a file
    other than a previous export's metadata, is refused before the trace."""
    model, before = saved(fitted, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="is a saved wrapcal model"):
        export(fitted, model)
    with pytest.raises(ExportError, match="is a saved wrapcal model"):
        export(fitted, model, format="torch")
    assert model.read_bytes() == before
    # A sidecar name taken by a user's file (here the saved model itself) is refused.
    taken, before = saved(fitted, tmp_path / "x.pt2.json")
    with pytest.raises(ExportError, match=r"x\.pt2\.json, which exists and is not a previous"):
        export(fitted, tmp_path / "x.pt2", format="torch")
    assert taken.read_bytes() == before and not (tmp_path / "x.pt2").exists()
    # A previous export's metadata is replaced: exporting twice works.
    again = tmp_path / "again.pt2"
    export(fitted, again, format="torch")
    export(fitted, again, format="torch")
    assert read_metadata(again)["format"] == "torch.export"


def test_a_directory_target_is_refused_up_front(fitted, tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(ExportError, match=r"is a directory; give the file to write"):
        export(fitted, folder, format="torch")
    (tmp_path / "d.pt2.json").mkdir()
    with pytest.raises(ExportError, match=r"d\.pt2\.json, which is a directory"):
        export(fitted, tmp_path / "d.pt2", format="torch")
    model, before = saved(fitted, tmp_path / "m.wrapcal")
    assert main(["export", str(model), "--out", str(folder)]) == 2
    err = one_error(capsys)
    assert "--out" in err and "is a directory" in err
    assert list(folder.iterdir()) == [] and model.read_bytes() == before


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("{model}", "is the model file itself"),
        ("{link}", "is the model file itself"),  # another name for the same file
        ("{tmp}/m.pt2.json", "a torch export is a .pt2 file"),
        ("/proc/self/x.pt2", "--out /proc/self/x.pt2: cannot write in /proc/self"),
        ("{model}/x.pt2", "is a file, so nothing can be created under it"),
    ],
)
def test_bad_out_is_one_line_before_loading(fitted, tmp_path, capsys, monkeypatch, out, message):
    model, before = saved(fitted, tmp_path / "m.wrapcal")
    os.link(model, tmp_path / "hard.pt2")

    def no_load(*args, **kwargs):
        raise AssertionError("--out is checked before the model is loaded")

    monkeypatch.setattr(wrapcal, "load", no_load)
    out = out.format(model=model, link=tmp_path / "hard.pt2", tmp=tmp_path)
    assert main(["export", str(model), "--format", "torch", "--out", out]) == 2
    err = one_error(capsys)
    assert message in err and "--out" in err
    assert model.read_bytes() == before


def test_metadata_beside_the_out_may_not_be_the_model(fitted, tmp_path, capsys):
    """A model saved as ``x.pt2.json`` exported to ``--out x.pt2``: the sidecar's name is
    the model's, refused."""
    model, before = saved(fitted, tmp_path / "x.pt2.json")
    assert main(["export", str(model), "--format", "torch", "--out", str(tmp_path / "x.pt2")]) == 2
    assert "which is the model file" in one_error(capsys)
    assert model.read_bytes() == before


def test_unreadable_model_inputs_are_one_line(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.wrapcal")
    assert main(["export", str(tmp_path / "fifo.wrapcal")]) == 2
    assert "not a regular file" in one_error(capsys)
    (tmp_path / "dir.wrapcal").mkdir()
    assert main(["export", str(tmp_path / "dir.wrapcal")]) == 2
    assert "is a directory" in one_error(capsys)


# --- a saved file cannot make the export allocate what it likes ----------------------------


def test_a_huge_input_shape_is_refused_before_allocating(fitted, tmp_path, capsys):
    """The probe: an allow-listed [3, 1048575, 1048575] (each size under 2**20) is a
    26 TB example batch. ``load`` now refuses such a file; a model whose recorded shape
    says so anyway (set in Python, or a file from a reader that checks less) is refused by
    the export with a clear error, before anything is allocated or written."""
    model, _ = saved(fitted, tmp_path / "m.wrapcal")
    crafted = rewrite(model, tmp_path / "huge.wrapcal", lambda c: c.update(
        input_shape=[3, 1048575, 1048575]))  # fmt: skip
    assert main(["export", str(crafted), "--format", "torch"]) == 2
    assert "input shape [3, 1048575, 1048575]" in one_error(capsys)
    wrapped = copy.deepcopy(fitted)
    wrapped.input_shape = (3, 1048575, 1048575)

    def no_randn(*args, **kwargs):
        raise AssertionError("the example batch must not be allocated")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "randn", no_randn)
        with pytest.raises(ExportError, match=r"3,298,528,591,875 values per input") as err:
            export(wrapped, tmp_path / "huge.pt2", format="torch")
    assert "26.4 TB" in str(err.value) and "wrapped.input_shape" in str(err.value)
    assert not (tmp_path / "huge.pt2").exists() and not (tmp_path / "huge.pt2.json").exists()


def test_a_large_input_shape_from_a_file_is_refused_by_the_cli(fitted, tmp_path, capsys):
    """A shape ``load`` lets through (under its own bound) but over the export's: one
    line naming --input-shape, nothing written."""
    model, _ = saved(fitted, tmp_path / "m.wrapcal")
    crafted = rewrite(model, tmp_path / "big.wrapcal", lambda c: c.update(
        input_shape=[3, 4096, 4096]))  # fmt: skip
    assert wrapcal.load(crafted).input_shape == (3, 4096, 4096)
    assert main(["export", str(crafted), "--format", "torch"]) == 2
    err = one_error(capsys)
    assert "input shape [3, 4096, 4096]" in err and f"limit of {MAX_INPUT_VALUES:,}" in err
    assert "--input-shape C,H,W" in err and "input_shape=" not in err
    assert not (tmp_path / "big.pt2").exists()
    # The same limit for a shape the user gives.
    assert main(["export", str(model), "--input-shape", "3,5000,5000"]) == 2
    assert "(given)" in one_error(capsys)


# --- names from a file are checked before they reach the metadata ---------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("<script>" + "x" * 200_000 + "</script>", "not a plain name"),
        ("../../etc/passwd", "not a plain name"),
        ("msp\nmsp", "not a plain name"),
        ("not_an_output", "not one of the exported outputs"),
    ],
)
def test_hostile_threshold_names_are_refused(fitted, tmp_path, capsys, name, message):
    model, _ = saved(fitted, tmp_path / "m.wrapcal")

    def hostile(config):
        config["operating_points"]["thresholds"][name] = 0.5

    crafted = rewrite(model, tmp_path / "crafted.wrapcal", hostile)
    wrapped = wrapcal.load(crafted)  # load keeps them (strings and numbers); export may not
    assert name in wrapped.operating_points["thresholds"]
    with pytest.MonkeyPatch.context() as patch:
        if message == "not a plain name":  # refused before the trace: no trace at all
            patch.setattr(torch.export, "export", None)
        with pytest.raises(ExportError, match=message) as err:
            export(wrapped, tmp_path / "m.pt2", format="torch")
    assert len(str(err.value)) < 600  # the 200 kB name is not repeated in the message
    assert not (tmp_path / "m.pt2").exists() and not (tmp_path / "m.pt2.json").exists()
    assert main(["export", str(crafted), "--format", "torch"]) == 2
    err_line = one_error(capsys)
    assert "fit and save the model again" in err_line and "wrapped." not in err_line


def test_a_hostile_metric_name_is_refused_too(fitted, tmp_path):
    wrapped = copy.deepcopy(fitted)
    points = copy.deepcopy(wrapped.operating_points)
    points["metrics"]["<img src=x onerror=alert(1)>"] = 0.1
    wrapped.operating_points = points
    with pytest.raises(ExportError, match="name a metric '<img src=x onerror=alert"):
        export(wrapped, tmp_path / "m.pt2", format="torch")
    wrapped.operating_points = None  # the documented way out: export without them
    assert read_metadata(export(wrapped, tmp_path / "m.pt2", "torch"))["operating_points"] is None


def test_plain_operating_points_are_exported_as_measured(fitted, tmp_path):
    meta = read_metadata(export(fitted, tmp_path / "ok.pt2", format="torch"))
    assert meta["operating_points"] == fitted.operating_points
    assert set(meta["operating_points"]["thresholds"]) <= {o["name"] for o in meta["outputs"]}


def test_read_metadata_reads_earlier_sidecars_and_the_archive(fitted, tmp_path):
    """Exports before this change wrote model.json; read_metadata still reads it when it
    is export metadata (never a saved model of that name), else the copy inside."""
    path = export(fitted, tmp_path / "model.pt2", format="torch")
    meta = read_metadata(path)
    sidecar(path).rename(tmp_path / "model.json")
    assert read_metadata(path) == meta
    saved(fitted, tmp_path / "model.json")  # a saved model of that name: not metadata
    assert read_metadata(path) == meta  # from inside the archive
