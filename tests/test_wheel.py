"""The sdist and the wheel work outside the repository.

The built-in plugins are a second top-level package (``wrapcal_plugins``) and the report
and monitor read templates shipped as package data: exactly what a wheel drops without a
test noticing, since every other test imports the editable checkout. Here the sdist and
the wheel are built from a copy of the sources (``python -m build``; the wheel is built
from the sdist, so both are checked), the wheel is installed into a fresh virtual
environment in a temporary directory, and wrapcal runs from there, from a working
directory outside the repository.

The fresh environment gets its dependencies (torch...) from the test environment
without reinstalling them: a ``.pth`` file names the test environment's site-packages.
A plain path line in a ``.pth`` file does not process that directory's own ``.pth``
files, so the checkout's editable-install finder stays out, and the test checks that
``wrapcal`` and ``wrapcal_plugins`` are imported from the fresh environment.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import assert_demo_is_honest

pytest.importorskip("build", reason="the test extra's `build` is not installed")
tomllib = pytest.importorskip("tomllib")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wrapcal", "wrapcal_plugins")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
ENTRY_POINTS = PYPROJECT["project"]["entry-points"]["wrapcal"]


def _version() -> str:
    # Read the one source of the version as text, not by importing the checkout.
    text = (ROOT / "wrapcal" / "_version.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    assert match, "wrapcal/_version.py has no __version__ line"
    return match.group(1)


def _sources() -> set[str]:
    """Every file of the two packages in the checkout, as a path inside the wheel."""
    return {
        p.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for p in (ROOT / package).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def _run(args: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 300):
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist, the wheel and a fresh venv with the wheel installed, all under tmp."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy, so the build writes no egg-info or build/ into the checkout.
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    dist = tmp / "dist"
    # --no-isolation: build with the test environment's setuptools (no index needed).
    _run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src],
        tmp,
        dict(os.environ),
    )
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, dict(os.environ))
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            tmp,
            dict(os.environ),
        ).stdout.strip()
    )
    # Install before the .pth exists: pip then sees no other wrapcal to replace (it must
    # never touch the test environment's editable install).
    pip = [sys.executable, "-m", "pip", "--python", python]
    _run([*pip, "install", "--no-deps", "--no-index", wheel], tmp, dict(os.environ))
    deps = sysconfig.get_paths()["purelib"]
    (site / "_wrapcal_test_dependencies.pth").write_text(deps + "\n", encoding="utf-8")
    # Outside the repository, without the test run's PYTHONPATH or user site.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return {"sdist": sdist, "wheel": wheel, "venv": venv, "site": site, "cwd": cwd, "env": env}


def test_sdist_and_wheel_hold_both_packages_and_their_data(built) -> None:
    version = _version()
    assert built["wheel"].name == f"wrapcal-{version}-py3-none-any.whl"
    assert built["sdist"].name == f"wrapcal-{version}.tar.gz"
    sources = _sources()
    # The templates are package data, not modules: the case a wheel drops silently.
    for data in (
        "wrapcal/report/templates/report.html",
        "wrapcal/monitoring/templates/monitor.html",
        "wrapcal/py.typed",  # PEP 561: type checkers read the packages' annotations
        "wrapcal_plugins/py.typed",
    ):
        assert data in sources
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = set(whl.namelist())
        dist_info = f"wrapcal-{version}.dist-info"
        entry_points = whl.read(f"{dist_info}/entry_points.txt").decode()
        metadata = whl.read(f"{dist_info}/METADATA").decode()
    missing = sorted(sources - names)
    assert not missing, f"the wheel lacks {missing}"
    with tarfile.open(built["sdist"]) as sdist:
        in_sdist = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    missing = sorted(sources - in_sdist)
    assert not missing, f"the sdist lacks {missing}"
    # The wheel's entry points are pyproject's, every one (a module it names is shipped).
    parser = configparser.ConfigParser()
    parser.optionxform = str  # entry-point names are case-sensitive
    parser.read_string(entry_points)
    shipped = dict(parser["wrapcal"])
    assert shipped == ENTRY_POINTS
    for module in ENTRY_POINTS.values():
        assert module.replace(".", "/") + ".py" in names, module
    assert f"Version: {version}" in metadata
    for extra in PYPROJECT["project"]["optional-dependencies"]:
        assert f"Provides-Extra: {extra}" in metadata


def test_installed_wheel_is_the_one_imported(built) -> None:
    probe = (
        "import importlib.metadata as md, json, wrapcal, wrapcal_plugins; "
        "print(json.dumps([wrapcal.__file__, wrapcal_plugins.__file__, wrapcal.__version__, "
        "md.version('wrapcal'), str(md.distribution('wrapcal').locate_file(''))]))"
    )
    python = built["venv"] / "bin" / "python"
    out = _run([python, "-c", probe], built["cwd"], built["env"]).stdout
    core, plugins, version, dist_version, dist_root = json.loads(out.strip().splitlines()[-1])
    for path in (core, plugins, dist_root):
        assert Path(path).resolve().is_relative_to(built["site"].resolve()), path
        assert not Path(path).resolve().is_relative_to(ROOT), path
    # One source of the version: the package, the installed metadata and _version.py agree.
    assert version == dist_version == _version()


def test_wrapcal_plugins_lists_every_builtin(built) -> None:
    out = _run([built["venv"] / "bin" / "wrapcal", "plugins"], built["cwd"], built["env"]).stdout
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    listed = {row[0]: row for row in rows}
    # The built-ins as the checkout registers them, in this process (the editable
    # install): the wheel must list the same names, each from package wrapcal.
    from wrapcal.model.discovery import plugin_registry

    expected = {name for name, info in plugin_registry().items() if info.package == "wrapcal"}
    assert len(expected) >= len(ENTRY_POINTS) - 1  # one entry point is a model adapter
    assert expected <= set(listed), f"the wheel's `wrapcal plugins` lacks {expected - set(listed)}"
    for name in expected:
        assert listed[name][1:3] == [_version(), "wrapcal"], listed[name]


def test_every_extra_imports(built) -> None:
    # Each extra's wrapcal module, and the packages the extra declares (imported lazily
    # by those modules, so imported here by name).
    code = (
        "import wrapcal_plugins.adapters.hf_transformers, wrapcal.export.onnx, "
        "wrapcal.report.tracking, wrapcal.integrations.lightning\n"
        "import transformers, onnx, onnxscript, onnxruntime, mlflow, lightning\n"
        "print('ok')"
    )
    out = _run([built["venv"] / "bin" / "python", "-c", code], built["cwd"], built["env"]).stdout
    assert out.strip().endswith("ok")


def test_pip_check_is_clean(built) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", built["venv"] / "bin" / "python", "check"],
        cwd=built["cwd"],
        env=built["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_demo_runs_from_the_wheel_and_its_table_is_honest(built, tmp_path: Path) -> None:
    """The README's headline command, from the installed wheel (the suite's one demo
    run): its templates come from the wheel, and its table says what its report shows."""
    out = tmp_path / "demo"
    done = _run(
        [built["venv"] / "bin" / "wrapcal", "demo", "--no-progress", "--out", out],
        built["cwd"],
        built["env"],
        timeout=600,
    )
    # The report's templates came from the wheel: the rendered files exist and say so.
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<html" in html.lower()
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert_demo_is_honest(done.stdout, report, out)
