"""The example third-party plugin package installs with pip and is used by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ash_plugin"


def test_pip_install_then_its_own_tests_pass(tmp_path) -> None:
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--target", str(target), str(EXAMPLE)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    assert any(p.name.startswith("wrapcal_ash-0.1.0.dist-info") for p in target.iterdir())
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
    }
    listed = subprocess.run(
        [sys.executable, "-m", "wrapcal.cli", "plugins"], capture_output=True, text=True, env=env
    )
    assert any(
        line.split()[:3] == ["ash", "0.1.0", "wrapcal-ash"] for line in listed.stdout.splitlines()
    )
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "2 passed" in tests.stdout  # its own test and wrapcal's conformance kit
