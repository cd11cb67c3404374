"""``wrapcal evaluate`` and ``demo`` check what they write and read before any work
(issue 30): an ``--out`` that is a file, under a file, unwritable or one of the inputs,
an input that is a FIFO, missing or unreadable, and ``--mlflow`` without MLflow end in
one line, exit 2, before any data is read, and nothing is written. The MLflow stores
(file store refused, unreachable server, read-only database) are in
tests/report/test_report_mlflow.py."""

from __future__ import annotations

import os
import sys
import threading

from wrapcal.cli import main

ARGV = ["evaluate", "timm:resnet10t", "--data", "digits", "--no-progress", "--bootstrap", "0"]


def one_error(capsys, command: str = "evaluate") -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"wrapcal {command}: error: "), err
    return err


def test_out_that_is_a_file_or_under_one(tmp_path, capsys, no_data):
    report = tmp_path / "report.html"
    report.write_text("mine")
    assert main([*ARGV, "--out", str(report)]) == 2
    assert f"--out {report} is a file; the report is a directory" in one_error(capsys)
    assert main([*ARGV, "--out", str(report / "sub")]) == 2
    assert "is a file, so nothing can be created under it" in one_error(capsys)
    assert report.read_text() == "mine"


def test_out_that_cannot_be_written(tmp_path, capsys, no_data):
    """/proc refuses every new name, for root too (permission bits do not stop root)."""
    assert main([*ARGV, "--out", "/proc/self/wrapcal-report"]) == 2
    err = one_error(capsys)
    assert "--out /proc/self/wrapcal-report: cannot write in /proc/self" in err


def test_out_whose_report_files_are_directories(tmp_path, capsys, no_data):
    (tmp_path / "out" / "report.json").mkdir(parents=True)
    assert main([*ARGV, "--out", str(tmp_path / "out")]) == 2
    assert "report.json is not a file" in one_error(capsys)
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "figures").write_text("")
    assert main([*ARGV, "--out", str(tmp_path / "out2")]) == 2
    assert "is a file where the figures folder goes" in one_error(capsys)


def test_out_that_is_an_input(tmp_path, capsys, no_data):
    """The report written into the ImageFolder it reads would add a 'figures' class."""
    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    assert main([*ARGV[:2], "--data", str(folder), "--out", str(folder)]) == 2
    assert "is also an input of this command" in one_error(capsys)
    assert sorted(p.name for p in folder.iterdir()) == ["cat"]


def test_a_fifo_as_data_is_refused_without_hanging(tmp_path, capsys, no_data):
    fifo = tmp_path / "test.npz"
    os.mkfifo(fifo)
    codes: list[int] = []
    worker = threading.Thread(
        target=lambda: codes.append(main([*ARGV[:2], "--data", str(fifo), "--out", "x"])),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=20)
    assert codes == [2], "the command hung on a FIFO"
    assert f"--data {fifo} is not a regular file" in one_error(capsys)


def test_missing_inputs_are_named_before_any_data_is_read(tmp_path, capsys, no_data):
    missing = tmp_path / "cal.npz"
    argv = [*ARGV, "--plugins", "temperature", "--calibration", str(missing)]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    assert f"--calibration {missing}: calibration data not found" in one_error(capsys)
    assert main([*ARGV, "--ood", f"far={missing}", "--out", str(tmp_path / "r")]) == 2
    assert f"--ood {missing}: ood data not found" in one_error(capsys)
    assert main([*ARGV, "--weights", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert f"--weights {tmp_path} is a directory; give a file" in one_error(capsys)
    assert not (tmp_path / "r").exists()


def test_mlflow_not_installed_is_one_line_before_the_evaluation(
    tmp_path, capsys, no_data, monkeypatch
):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    argv = [*ARGV, "--out", str(tmp_path / "r"), "--mlflow", "sqlite:///mlflow.db"]
    assert main(argv) == 2
    assert "--mlflow needs MLflow: pip install 'wrapcal[mlflow]'" in one_error(capsys)
    assert not (tmp_path / "r").exists()


def test_demo_checks_its_out_before_training(tmp_path, capsys, monkeypatch):
    import wrapcal.cli.demo as demo

    def no_training(*args, **kwargs):
        raise AssertionError("the demo trained before checking --out")

    monkeypatch.setattr(demo, "run_demo", no_training)
    taken = tmp_path / "demo"
    taken.write_text("")
    assert main(["demo", "--out", str(taken)]) == 2
    assert "is a file; the report is a directory" in one_error(capsys, "demo")
