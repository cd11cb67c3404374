"""The benchmarks of item 7 run end to end in a fast mode, and their agreement checks pass.

Each benchmark's ``main`` returns 1 when wrapcal and its baseline disagree (a T that
differs from the peers', a predictive mean off the exact one, a retrained head worse
than the user's loop), so these runs check the comparisons themselves on tiny sizes.
The slow-importing peers (netcal, torch-uncertainty) are left out here; the full runs in
``docs/benchmarks.md`` include them.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import shared_data
import torch
from shared_data import requires_shared_data

from wrapcal_plugins.retrain.label_smoothing import DEFAULT_GRID

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _restore_process_settings() -> Iterator[None]:
    """The scripts set torch's thread count and the root log level for their process."""
    threads, level = torch.get_num_threads(), logging.getLogger().level
    yield
    torch.set_num_threads(threads)
    logging.getLogger().setLevel(level)


def bench(name: str):
    """Import ``benchmarks/<name>.py`` as the scripts run (``benchmarks/`` is on the import
    path through pyproject's ``pythonpath``, as the scripts' own folder is when run)."""
    return importlib.import_module(name)


def test_bench_temperature_agrees_with_torch_and_sklearn(capsys: pytest.CaptureFixture) -> None:
    main = bench("bench_temperature").main
    assert main(["--repeats", "1", "--skip", "guo,netcal,torch-uncertainty"]) == 0
    out = capsys.readouterr().out
    assert "[ok] torch L-BFGS on log T: same T" in out
    assert "[ok] sklearn CalibratedClassifierCV: same T" in out


def test_bench_core_fits_with_one_backbone_pass_per_set(capsys: pytest.CaptureFixture) -> None:
    main = bench("bench_core").main
    assert main(["--batch", "2", "--side", "32", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "backbone passes 3 for 3 data sets" in out
    assert "images through the backbone 600 for 600 images" in out


@requires_shared_data
def test_bench_mc_dropout_fast(capsys: pytest.CaptureFixture) -> None:
    main = bench("bench_mc_dropout").main
    argv = ["--n", "40", "--samples", "8", "--batch", "80", "--skip", "torch-uncertainty"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[ok] wrapcal head = T masked heads on one pass" in out
    assert "[ok] wrapcal all vs user loop: mean confidence" in out


@requires_shared_data
def test_bench_label_smoothing_fast(capsys: pytest.CaptureFixture) -> None:
    main = bench("bench_label_smoothing").main
    argv = ["--train", "300", "--cal", "100", "--eval", "500", "--epochs", "2"]
    main([*argv, "--full-epochs", "0", "--no-auto"])
    out = capsys.readouterr().out
    # Two epochs of the user's SGD are far from the optimum at this size (the accuracy and
    # NLL checks hold at the default sizes): the checks that hold at any size must pass.
    assert "[ok] wrapcal's head solves the objective (scipy's optimum)" in out
    assert "[ok] wrapcal's and scipy's probabilities on the evaluation images" in out
    assert "[ok] wrapcal's head reaches the user's objective or lower" in out


#: One printed row of ``label_smoothing_table.py``: name, T, accuracy, ECE (interval), NLL,
#: mean confidence. Only non-negative decimals match, so a negative figure fails the parse.
TABLE_ROW = re.compile(
    r"^\| (?P<name>[^|]+) \| (?P<t>\d+\.\d{3}) \| (?P<acc>\d+\.\d{2})% \| "
    r"(?P<ece>\d+\.\d{2})% \((?P<low>\d+\.\d)-(?P<high>\d+\.\d)\) \| (?P<nll>\d+\.\d{4}) \| "
    r"(?P<conf>\d+\.\d{2})% \|$"
)


@requires_shared_data
def test_label_smoothing_table_fast(capsys: pytest.CaptureFixture) -> None:
    main = bench("label_smoothing_table").main
    argv = ["--train", "500", "--cal", "300", "--eval", "300", "--resamples", "50"]
    assert main(argv) == 0  # the temperature and alpha="auto" agreement checks passed
    out = capsys.readouterr().out
    rows = [m.groupdict() for m in map(TABLE_ROW.match, out.splitlines()) if m]
    names = [r["name"] for r in rows]
    auto = next((n for n in names if "auto" in n), "")
    chosen = re.fullmatch(r"retrained head, alpha=auto -> (\S+)", auto)
    assert chosen and float(chosen[1]) in DEFAULT_GRID, names
    expected = [
        "baseline (pretrained head)",
        "baseline + temperature scaling",
        *(
            f"retrained head, alpha={a}{s}"
            for a in ("0 (new data only)", "0.05", "0.1", f"auto -> {chosen[1]}")
            for s in ("", " + temperature")
        ),
    ]
    assert names == expected, out
    figures = [{k: float(v) for k, v in r.items() if k != "name"} for r in rows]
    for raw, scaled in zip(figures[::2], figures[1::2], strict=True):
        # Temperature scaling leaves the arg max, so the accuracy, alone; raw rows have T = 1.
        assert raw["t"] == 1.0 and scaled["t"] > 0 and scaled["acc"] == raw["acc"]
    for r in figures:
        assert 0 <= r["acc"] <= 100 and 0 <= r["ece"] <= 100 and r["nll"] > 0
        assert 0 <= r["low"] <= r["high"] <= 100
        assert 10 <= r["conf"] <= 100  # the mean top probability is at least 1/K
    # The pretrained head is overconfident (ECE about 12%); temperature scaling fixes it.
    assert figures[0]["conf"] > figures[0]["acc"] and figures[1]["ece"] < figures[0]["ece"]
    assert "head retrained on 500 train features; evaluation on 300 test images" in out
    assert '[ok] alpha="auto" kept the grid point with the lowest calibration NLL' in out
    assert "FAIL" not in out


def test_label_smoothing_table_without_shared_data(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    main = bench("label_smoothing_table").main
    monkeypatch.setattr(shared_data, "HAVE_SHARED_DATA", False)
    assert main(["--resamples", "10"]) == 0
    assert "needs the shared data" in capsys.readouterr().out


@requires_shared_data
def test_bench_discrepancy_fast(capsys: pytest.CaptureFixture) -> None:
    main = bench("bench_discrepancy").main
    assert main(["--train", "256", "--unlabeled", "128", "--eval", "1000", "--epochs", "3"]) == 0
    assert "[ok] auroc: wrapcal vs the user loop" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_sharded_fit_agrees_across_one_process_and_two_ranks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # Three launches (one process, two gloo ranks gathered, two sharded) on tiny sizes:
    # the script exits 1 unless they fitted the same state.
    monkeypatch.setattr(sys, "argv", ["bench_sharded_fit.py", "--rows", "6000", "--width", "32"])
    with pytest.raises(SystemExit) as done:
        bench("bench_sharded_fit").main()
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert "fitted state: the same in every run" in out
    # The sharded run split the bank over its two ranks; the others hold every row.
    assert " 3,000" in out and " 6,000" in out
