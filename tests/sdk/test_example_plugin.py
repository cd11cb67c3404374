"""The example third-party plugin package installs with pip and is used by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nci_plugin"


def test_pip_install_then_its_own_tests_pass(tmp_path) -> None:
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--target", str(target), str(EXAMPLE)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    assert any(p.name.startswith("wrapcal_nci-0.1.0.dist-info") for p in target.iterdir())
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
    }
    listed = subprocess.run(
        [sys.executable, "-m", "wrapcal.cli", "plugins"], capture_output=True, text=True, env=env
    )
    assert any(
        line.split()[:3] == ["nci", "0.1.0", "wrapcal-nci"] for line in listed.stdout.splitlines()
    )
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "2 passed" in tests.stdout  # its own test and wrapcal's conformance kit


def test_the_example_scores_as_pytorch_ood_nci() -> None:
    """The example's score against an independent implementation: pytorch-ood's NCI, on
    the same features and head (the package loaded from its source, not installed)."""
    import importlib.util

    import torch
    from pytorch_ood.detector import NCI
    from torch import nn

    import wrapcal
    from wrapcal.model.split import Split

    spec = importlib.util.spec_from_file_location(
        "wrapcal_nci", EXAMPLE / "wrapcal_nci" / "__init__.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    head = nn.Linear(12, 5)
    train, x = torch.randn(400, 12).relu(), torch.randn(80, 12).relu() * 2
    for alpha in (0.0, 0.05):
        wrapped = wrapcal.wrap(
            None, split=Split(nn.Identity(), head), plugins=[module.NCI(alpha=alpha)]
        )
        wrapped.fit(train=train, progress=False)
        reference = NCI(None, head, alpha=alpha).fit_features(train).predict_features(x)
        torch.testing.assert_close(wrapped.predict_features(x).scores["nci"], reference)
