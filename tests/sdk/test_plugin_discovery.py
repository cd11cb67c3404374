"""Plugins are found through entry points, built-in and third-party alike."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SAMPLE_PLUGIN_DIR, SmallNet, sample_plugin_installed

import wrapcal
from wrapcal.model import discovery as manager
from wrapcal.plugin import hookspecs

BUILT_IN = {"temperature", "mc_dropout", "label_smoothing", "discrepancy"}
README = Path(__file__).resolve().parents[2] / "README.md"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wrapcal.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_built_in_plugins_come_from_the_entry_point_group() -> None:
    registry = wrapcal.plugin_registry()
    assert set(registry) >= BUILT_IN
    for name in BUILT_IN:
        info = registry[name]
        assert info.package == "wrapcal", name  # registered by the installed distribution
        assert info.description, f"{name} has no one-line description"


def test_wrapcal_registers_its_own_entry_points_as_the_built_ins() -> None:
    """pytest's builtin_plugins habit: the modules of wrapcal's own distribution's
    ``wrapcal`` group, registered by wrapcal under ``wrapcal:<entry point>``, are the
    built-ins; the core names none of them in code."""
    own = [
        ep
        for ep in importlib.metadata.distribution("wrapcal").entry_points
        if ep.group == manager.ENTRY_POINT_GROUP
    ]
    assert len(own) >= 10
    pm = wrapcal.get_plugin_manager()
    modules = set()
    for ep in own:
        assert pm.get_plugin(f"wrapcal:{ep.name}") is importlib.import_module(ep.value), ep.name
        modules.add(ep.value)
    for name, info in wrapcal.plugin_registry().items():
        assert info.builtin == (info.factory.__module__ in modules), name
    assert "wrapcal_plugins" not in Path(manager.__file__).read_text()
    core = Path(manager.__file__).parents[1]
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            assert not any(n.startswith("wrapcal_plugins") for n in names), path


def test_sample_third_party_plugin_is_used_by_name(tmp_path) -> None:
    with sample_plugin_installed(tmp_path):
        info = wrapcal.plugin_registry()["sample_vector_scaling"]
        assert (info.package, info.version) == ("wrapcal-vector-scaling", "0.3.1")
        wrapped = wrapcal.wrap(SmallNet(), plugins=["sample_vector_scaling"])
        assert type(wrapped.plugins[0]).__name__ == "VectorScaling"
    assert "sample_vector_scaling" not in wrapcal.plugin_registry()  # uninstalled: gone


def test_cli_lists_name_version_package_description(tmp_path) -> None:
    dist = tmp_path / "wrapcal_vector_scaling-0.3.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: wrapcal-vector-scaling\nVersion: 0.3.1\n"
    )
    (dist / "entry_points.txt").write_text("[wrapcal]\nvector_scaling = wrapcal_vector_scaling\n")
    path = os.pathsep.join(
        [str(tmp_path), str(SAMPLE_PLUGIN_DIR), os.environ.get("PYTHONPATH", "")]
    )
    result = run_cli("plugins", env={"PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert result.stdout.splitlines()[0].split() == ["name", "version", "package", "description"]
    assert lines["sample_vector_scaling"].split()[1:3] == ["0.3.1", "wrapcal-vector-scaling"]
    assert "Per-class scale and bias" in lines["sample_vector_scaling"]
    for name in BUILT_IN:
        assert lines[name].split()[1:3] == [wrapcal.__version__, "wrapcal"]


def test_autoload_switch_turns_off_third_party_packages_only(tmp_path, monkeypatch) -> None:
    """Issue 23 changed this: the switch used to remove the built-ins too ("no plugins
    installed"); now wrapcal registers its built-ins itself, as pytest keeps its own."""
    with sample_plugin_installed(tmp_path):
        everything = manager.plugin_registry()
        built_in = {name for name, info in everything.items() if info.builtin}
        assert built_in >= BUILT_IN and "sample_vector_scaling" in everything
        monkeypatch.setenv("WRAPCAL_DISABLE_PLUGIN_AUTOLOAD", "1")
        manager.reset()
        try:
            assert set(manager.plugin_registry()) == built_in  # every built-in, nothing else
            with pytest.raises(
                wrapcal.PluginNotFoundError, match="third-party entry points are off"
            ):
                wrapcal.wrap(SmallNet(), plugins=["sample_vector_scaling"])
            assert wrapcal.wrap(SmallNet(), plugins=["temperature"]).plugin_names == ["temperature"]
            # The core's own split adapters are not entry points either.
            assert wrapcal.wrap(SmallNet(), plugins=[]).split_kind == "module"
            path = os.pathsep.join([str(tmp_path), str(SAMPLE_PLUGIN_DIR)])
            result = run_cli("plugins", env={"PYTHONPATH": path})
        finally:
            monkeypatch.delenv("WRAPCAL_DISABLE_PLUGIN_AUTOLOAD")
            manager.reset()
    assert result.returncode == 0, result.stderr
    names = {line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()}
    assert built_in <= names and "sample_vector_scaling" not in names
    assert "third-party plugins are not loaded: WRAPCAL_DISABLE_PLUGIN_AUTOLOAD is set" in (
        result.stdout
    )


def hook_specs() -> list[str]:
    return [
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("wrapcal_")
    ]


def call_form(name: str, fn) -> str:
    """``name(a, b)``: the parameter names as the README writes them."""
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    return f"{name}({', '.join(params)})"


#: The per-model contract: the methods of wrapcal.Plugin a plugin overrides.
CONTRACT = (
    "__wrapcal_tags__",
    "attach",
    "fit",
    "features",
    "members",
    "transform_logits",
    "outputs",
    "report_metrics",
    "unshard",
)


def test_every_hook_is_documented_with_its_signature() -> None:
    readme = README.read_text()
    assert set(hook_specs()) == {
        "wrapcal_register_plugins",
        "wrapcal_split_model",
        "wrapcal_register_models",
    }
    for name in hook_specs():
        fn = getattr(hookspecs, name)
        doc = inspect.getdoc(fn)
        assert doc and len(doc) > 40, f"hook {name} has no real docstring"
        assert f"`{call_form(name, fn)}`" in readme, f"{call_form(name, fn)} not in the README"


def test_every_contract_method_is_documented_with_its_signature() -> None:
    readme = README.read_text()
    for name in CONTRACT:
        fn = getattr(wrapcal.Plugin, name)
        doc = inspect.getdoc(fn)
        assert doc and len(doc) > 40, f"Plugin.{name} has no real docstring"
        assert f"`{call_form(name, fn)}`" in readme, f"{call_form(name, fn)} not in the README"


def _plugin_classes() -> list[type]:
    import wrapcal_vector_scaling

    nci = Path(__file__).resolve().parents[2] / "examples" / "nci_plugin" / "wrapcal_nci"
    spec = importlib.util.spec_from_file_location("wrapcal_nci", nci / "__init__.py")
    wrapcal_nci = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapcal_nci)
    classes = [info.factory for info in wrapcal.plugin_registry().values()]
    classes += [
        wrapcal_vector_scaling.VectorScaling,
        wrapcal_vector_scaling.Mahalanobis,
        wrapcal_nci.NCI,
    ]
    return [c for c in classes if isinstance(c, type)]


def test_plugins_implement_the_contract_with_its_exact_signatures(tmp_path) -> None:
    """datasette's check: every override has the base method's parameter names, and no
    plugin defines a method that looks like the old hooks."""
    with sample_plugin_installed(tmp_path):
        classes = _plugin_classes()
    assert len(classes) >= 7
    for cls in classes:
        for name in CONTRACT:
            mine, base = getattr(cls, name), getattr(wrapcal.Plugin, name)
            if mine is base:
                continue
            assert call_form(name, mine) == call_form(name, base), f"{cls.__name__}.{name}"
        stale = [n for n in vars(cls) if n.startswith("wrapcal_")]
        assert not stale, f"{cls.__name__} still implements old hooks {stale}"
