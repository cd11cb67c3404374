"""The README's headline command and the examples run, and say what they show."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from shared_data import SHARED_DATA, requires_shared_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs_and_explains_what_it_prints():
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "saved and loaded: model.wrapcal - identical outputs" in out
    eces = dict(re.findall(r"^(\w+)\s+ECE ([\d.]+)%", out, re.M))
    assert set(eces) == {"baseline", "wrapped"}
    # The words follow the numbers printed above them (#28: "little to fix, T close to 1"
    # printed beside T = 0.348 and a worse NLL).
    temperature = float(re.search(r"^temperature: ([\d.]+)$", out, re.M).group(1))
    verdict = re.search(r"^-> T = ([\d.]+): .*$", out, re.M)
    assert verdict and abs(float(verdict.group(1)) - temperature) < 1e-3
    line = verdict.group(0)
    assert ("overconfident" in line) == (temperature > 1)
    assert ("underconfident" in line) == (temperature <= 1)
    nlls = dict(re.findall(r"^(\w+)\s+ECE .*NLL ([\d.]+)$", out, re.M))
    assert ("(better)" in line) == (float(nlls["wrapped"]) < float(nlls["baseline"]))
    assert f"test ECE {eces['baseline']}% -> {eces['wrapped']}%" in line


@pytest.mark.slow
@requires_shared_data
def test_retrofit_example_fast_mode_reproduces_the_readme_findings(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "retrofit_resnet20", ROOT / "examples" / "retrofit_resnet20.py"
    )
    retrofit_resnet20 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(retrofit_resnet20)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = retrofit_resnet20.main(
            [
                "--fast",
                "--no-progress",
                "--out",
                str(tmp_path / "r20"),
                "--shared",
                str(SHARED_DATA),
            ]
        )
    data = report.to_dict()
    cal, ood = data["calibration"], data["ood"]
    assert 0.78 < cal["baseline"]["accuracy"] < 0.84  # the JPEG shift: about 81%
    assert cal["temperature"]["ece"] < cal["baseline"]["ece"] / 4
    assert ood["knn"]["MNIST"]["knn"]["auroc"] > 0.97
    assert ood["discrepancy"]["MNIST"]["discrepancy"]["auroc"] > 0.97  # seen in the traffic
    assert "| baseline | `msp` |" in printed.getvalue()
    conformal = data["plugin_metrics"]["all"]["conformal"]
    assert 0.85 <= conformal["coverage"]["value"] <= 0.95
