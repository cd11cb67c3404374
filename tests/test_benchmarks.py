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


#: One row of a per-set table of ``calibration_zoo.py``: method [notes] then five cells,
#: each ``mean ±half-range``.
ZOO_ROW = re.compile(
    r"^\| (?P<method>\w+)(?: \[[^\]]*\])? \| "
    + r" \| ".join(rf"(?P<{m}>\d+\.\d+) ±\d+\.\d+" for m in ("acc", "ece", "cw", "nll", "brier"))
    + r" \|$"
)
ZOO_CLAIM = re.compile(
    r"^(?P<group>CIFAR-10|CIFAR-100|all): (?P<a>\w+) beats (?P<b>\w+) on "
    r"(?P<metric>held-out NLL|class-wise ECE) on (?P<sets>\d+) of (?P<of>\d+) sets "
    r"\((?P<splits>\d+) of (?P<nsplits>\d+) splits\)$"
)
ZOO_SETS = ["cifar10_resnet20", "zoo_cifar100_vgg11_bn"]
ZOO_ARGV = [
    "--sets", *ZOO_SETS, "--n", "200", "--seeds", "0", "1",
    "--methods", "temperature", "vector_scaling", "matrix_scaling", "dirichlet",
]  # fmt: skip


def _zoo_tables(out: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{set: {method: {column: printed mean}}}`` from the per-set tables."""
    tables: dict[str, dict[str, dict[str, float]]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("### ") and "mean over" not in line:
            current = line.split()[1]
            tables[current] = {}
        elif line.startswith("### "):
            current = None  # a family table: its cells have no ±
        elif current and (m := ZOO_ROW.match(line)):
            tables[current][m["method"]] = {
                k: float(v) for k, v in m.groupdict().items() if k != "method"
            }
    return tables


@requires_shared_data
def test_calibration_zoo_counts_match_its_tables(capsys: pytest.CaptureFixture) -> None:
    zoo = bench("calibration_zoo")
    if not all((zoo.LOGITS_DIR / f"{s}.npz").is_file() for s in ZOO_SETS):
        pytest.skip(f"the logit sets {ZOO_SETS} are not in {zoo.LOGITS_DIR}")
    assert zoo.main(ZOO_ARGV) == 0  # wrapcal's T equals scipy's root on every split
    out = capsys.readouterr().out
    for s in ZOO_SETS:
        for seed in (0, 1):
            assert f"[ok] {s} seed {seed}: temperature vs scipy brentq: same T" in out
    tables = _zoo_tables(out)
    methods = ["uncalibrated", "temperature", "vector_scaling", "matrix_scaling", "dirichlet"]
    assert list(tables) == ZOO_SETS and all(list(t) == methods for t in tables.values()), out
    for rows in tables.values():
        # Temperature scaling keeps every prediction; it fits the calibration half's NLL,
        # which on these overconfident models lowers the held-out NLL too.
        assert rows["temperature"]["acc"] == rows["uncalibrated"]["acc"]
        assert rows["temperature"]["nll"] < rows["uncalibrated"]["nll"]
    claims = [m.groupdict() for m in map(ZOO_CLAIM.match, out.splitlines()) if m]
    # 3 challengers x 2 metrics x (CIFAR-10, CIFAR-100, all).
    assert len(claims) == 18, out
    column = {"held-out NLL": "nll", "class-wise ECE": "cw"}
    for c in claims:
        names = [s for s in ZOO_SETS if c["group"] in ("all", zoo.family(s))]
        assert int(c["of"]) == len(names) and int(c["nsplits"]) == 2 * len(names), c
        assert int(c["splits"]) <= int(c["nsplits"])
        # The set count is the number of sets whose mean is lower: it agrees with the
        # printed means (within their rounding: equal printed figures may go either way).
        a = [tables[s][c["a"]][column[c["metric"]]] for s in names]
        b = [tables[s][c["b"]][column[c["metric"]]] for s in names]
        lower = sum(x < y for x, y in zip(a, b, strict=True))
        tied = sum(x == y for x, y in zip(a, b, strict=True))
        assert lower <= int(c["sets"]) <= lower + tied, (c, a, b)


@requires_shared_data
def test_calibration_zoo_fails_when_temperature_disagrees(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    zoo = bench("calibration_zoo")
    if not (zoo.LOGITS_DIR / "cifar10_resnet20.npz").is_file():
        pytest.skip(f"cifar10_resnet20.npz is not in {zoo.LOGITS_DIR}")
    real = zoo.scipy_temperature
    monkeypatch.setattr(zoo, "scipy_temperature", lambda z, y: real(z, y) * (1 + 1e-3))
    argv = ["--sets", "cifar10_resnet20", "--n", "200", "--seeds", "0"]
    assert zoo.main([*argv, "--methods", "temperature"]) == 1
    assert "[FAIL] cifar10_resnet20 seed 0: temperature vs scipy brentq" in capsys.readouterr().out


def test_calibration_zoo_without_shared_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    zoo = bench("calibration_zoo")
    monkeypatch.setattr(zoo, "LOGITS_DIR", tmp_path / "absent")
    assert zoo.main([]) == 0
    assert "needs the shared data" in capsys.readouterr().out


def test_uncertainty_ensemble_fast(capsys: pytest.CaptureFixture) -> None:
    main = bench("uncertainty_ensemble").main
    assert main(["--members", "2", "--epochs", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "[ok] probabilities = mean of members'" in out
    assert "[ok] one pass per member per batch" in out
