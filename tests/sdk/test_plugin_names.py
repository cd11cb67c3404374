"""Plugin names: clashes between packages, qualified names, and declarations checked at wrap.

A fake third-party distribution ``otherpkg`` (real ``.dist-info`` metadata on
``sys.path``) registers a plugin named ``temperature``, like wrapcal's built-in, from
an entry point named ``knn``, like a built-in's entry point.
"""

from __future__ import annotations

import ast
import copy
import gc
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import SmallNet, installed_distribution
from safetensors.torch import save as save_tensors

import wrapcal
from wrapcal import NotFittedError, OutputKind, Plugin, PluginNotFoundError, Stage
from wrapcal.errors import SavedFileError
from wrapcal.files.format import digest, read
from wrapcal.model import discovery
from wrapcal.model.assemble import resolve_plugins
from wrapcal.plugin.calibrator import Calibrator
from wrapcal.plugin.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parents[2]

OTHER_SOURCE = '''
"""otherpkg: a third-party package whose plugin name is taken by a built-in."""

import wrapcal
from wrapcal.plugin import Plugin, PluginTags, Stage, hookimpl


class HalfLogits(Plugin):
    """Another package's temperature: halves the logits."""

    def __init__(self, divisor: float = 2.0) -> None:
        super().__init__()
        self.divisor = divisor

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.CALIBRATE
        tags.requires_fit = False
        return tags

    def transform_logits(self, logits):
        return logits / self.divisor


@hookimpl
def wrapcal_register_plugins(register) -> None:
    register("temperature", HalfLogits)
    register("other_only", HalfLogits)
'''


@contextmanager
def otherpkg_installed(tmp_path: Path) -> Iterator[Path]:
    """``otherpkg`` 1.4: its entry point is named ``knn`` (a built-in's entry-point
    name) and its module registers ``temperature`` (a built-in's plugin name)."""
    with installed_distribution(
        tmp_path, "otherpkg", "1.4", {"knn": "otherpkg_plugins"}, {"otherpkg_plugins": OTHER_SOURCE}
    ) as path:
        yield path


def data(n: int = 120, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs, and labels that ``small_net`` gets right two times in three (so a
    temperature has something to fit)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = small_net()(x).argmax(-1)
    y[::3] = torch.arange(len(y[::3])) % k  # every class present
    return x, y


def small_net() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet().eval()


def run_cli(*args: str, pythonpath: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "wrapcal.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=120,
    )


# --- clashes -------------------------------------------------------------------------------


def test_a_taken_name_breaks_nothing_else(tmp_path) -> None:
    with otherpkg_installed(tmp_path):
        wrapped = wrapcal.wrap(small_net(), ["knn"])
        assert type(wrapped.plugins[0]).__module__ == "wrapcal_plugins.ood.knn"
        assert wrapcal.wrap(small_net(), ["other_only"]).plugin_names == ["other_only"]
        with pytest.raises(PluginNotFoundError) as caught:
            wrapcal.wrap(small_net(), ["temperature"])
    message = str(caught.value)
    assert "'temperature' is registered by 2 packages" in message
    assert "wrapcal (built in)" in message and "otherpkg 1.4" in message
    assert "'wrapcal:temperature'" in message and "'otherpkg:temperature'" in message


def test_a_qualified_name_picks_each_package(tmp_path) -> None:
    x, y = data()
    with otherpkg_installed(tmp_path):
        ours = wrapcal.wrap(small_net(), ["wrapcal:temperature"])
        theirs = wrapcal.wrap(small_net(), [("otherpkg:temperature", {"divisor": 4.0})])
        assert type(ours.plugins[0]).__module__ == "wrapcal_plugins.calibration.temperature"
        assert type(theirs.plugins[0]).__name__ == "HalfLogits"
        assert theirs.plugins[0].divisor == 4.0
        with torch.no_grad():
            bare = small_net()(x)
            assert torch.allclose(theirs(x), bare / 4.0)
        # The package is matched as pip matches it: case, "-", "_" and "." alike.
        assert type(wrapcal.wrap(small_net(), ["OtherPkg:temperature"]).plugins[0]) is type(
            theirs.plugins[0]
        )
        # fit_calibrator takes qualified names too.
        calibrator = wrapcal.fit_calibrator(bare, y, method="wrapcal:temperature")
        assert isinstance(calibrator, Calibrator)
        with pytest.raises(PluginNotFoundError, match="no package 'nopkg' registers"):
            wrapcal.wrap(small_net(), ["nopkg:temperature"])
        # An instance gets the qualified name, so a saved file names it unambiguously.
        scaler = type(ours.plugins[0])()
        assert wrapcal.wrap(small_net(), [scaler]).plugin_names == ["wrapcal:temperature"]
        registry = wrapcal.plugin_registry()
        assert "temperature" not in registry
        assert registry["wrapcal:temperature"].builtin
        assert registry["otherpkg:temperature"].package == "otherpkg"
    # Uninstalled: the plain name is one package's again, the qualified one still works.
    assert wrapcal.wrap(small_net(), ["temperature"]).plugin_names == ["temperature"]
    assert wrapcal.wrap(small_net(), ["wrapcal:temperature"]).plugin_names == [
        "wrapcal:temperature"
    ]


def test_one_plugin_under_two_names_is_listed_twice(tmp_path) -> None:
    with pytest.raises(ValueError, match="wrapcal:knn is listed twice"):
        wrapcal.wrap(small_net(), ["knn", "wrapcal:knn"])


def test_an_entry_point_named_like_a_builtin_neither_replaces_nor_removes_it(tmp_path) -> None:
    """pluggy registers entry points by entry-point name: otherpkg's ``knn`` used to hide
    wrapcal's ``knn`` module (or be hidden by it), depending on sys.path order."""
    builtins_alone = {
        name: info.factory for name, info in wrapcal.plugin_registry().items() if info.builtin
    }
    with otherpkg_installed(tmp_path):  # first on sys.path
        pm = wrapcal.get_plugin_manager()
        assert pm.has_plugin("wrapcal:knn") and pm.has_plugin("otherpkg:knn")
        registry = wrapcal.plugin_registry()
        for name, factory in builtins_alone.items():
            key = "wrapcal:temperature" if name == "temperature" else name
            assert registry[key].factory is factory and registry[key].builtin, name
        assert registry["other_only"].package == "otherpkg"


def test_autoload_off_keeps_every_builtin_and_drops_the_third_party(tmp_path, monkeypatch):
    with otherpkg_installed(tmp_path):
        assert "otherpkg:temperature" in wrapcal.plugin_registry()
        monkeypatch.setenv(discovery.DISABLE_AUTOLOAD_ENV, "1")
        discovery.reset()
        registry = wrapcal.plugin_registry()
        monkeypatch.delenv(discovery.DISABLE_AUTOLOAD_ENV)
        discovery.reset()
    own = [
        ep.name
        for ep in importlib.metadata.distribution("wrapcal").entry_points
        if ep.group == "wrapcal"
    ]
    assert own, "wrapcal's distribution has no 'wrapcal' entry points"
    assert all(info.builtin and info.package == "wrapcal" for info in registry.values())
    assert "other_only" not in registry and "temperature" in registry  # no clash now
    assert {"temperature", "knn", "mc_dropout", "conformal", "vim"} <= set(registry)


def test_cli_lists_both_and_marks_the_clash(tmp_path) -> None:
    with otherpkg_installed(tmp_path) as path:
        result = run_cli("plugins", pythonpath=path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "version", "package", "description"]
    rows = {line.split()[0]: line for line in lines[1:] if line.strip()}
    assert rows["wrapcal:temperature"].split()[2:4] == ["wrapcal", "[clash]"]
    assert rows["otherpkg:temperature"].split()[1:4] == ["1.4", "otherpkg", "[clash]"]
    assert "temperature" not in rows  # the plain name picks neither
    assert rows["knn"].split()[2] == "wrapcal" and "[clash]" not in rows["knn"]
    assert rows["other_only"].split()[1:3] == ["1.4", "otherpkg"]
    note = next(line for line in lines if line.startswith("[clash] temperature"))
    assert "wrapcal, otherpkg" in note
    assert "use wrapcal:temperature or otherpkg:temperature" in note


def test_cli_takes_qualified_names_in_plugins_and_plugin_args(tmp_path) -> None:
    from wrapcal.cli.plugin_args import create_plugins

    with otherpkg_installed(tmp_path):
        created = create_plugins(
            "otherpkg:temperature,knn", ["otherpkg:temperature.divisor=3", "knn.k=5"]
        )
        assert [name for name, _ in created] == ["otherpkg:temperature", "knn"]
        assert created[0][1].divisor == 3 and created[1][1].k == 5
        # The plain name in --plugin-arg is enough when one listed plugin has it.
        created = create_plugins("otherpkg:temperature", ["temperature.divisor=5"])
        assert created[0][1].divisor == 5


# --- saved files ---------------------------------------------------------------------------


def test_a_saved_name_loads_the_plugin_it_was_saved_from(tmp_path) -> None:
    x, y = data()
    with otherpkg_installed(tmp_path / "pkg"):
        theirs = wrapcal.wrap(small_net(), [("otherpkg:temperature", {"divisor": 3.0})])
        ours = wrapcal.wrap(small_net(), ["wrapcal:temperature"])
        ours.fit(calibration=(x, y), progress=False)
        theirs_path = theirs.save(tmp_path / "theirs.wrapcal")
        ours_path = ours.save(tmp_path / "ours.wrapcal")
        loaded_theirs, loaded_ours = (
            wrapcal.load(theirs_path, model=small_net()),
            wrapcal.load(ours_path, model=small_net()),
        )
        assert type(loaded_theirs.plugins[0]).__name__ == "HalfLogits"
        assert loaded_theirs.plugin_names == ["otherpkg:temperature"]
        assert type(loaded_ours.plugins[0]) is type(ours.plugins[0])
        with torch.no_grad():
            assert torch.equal(loaded_ours(x), ours(x))
            assert torch.equal(loaded_theirs(x), theirs(x))


def test_a_plain_name_saved_without_a_clash_loads_without_one(tmp_path) -> None:
    x, y = data()
    wrapped = wrapcal.wrap(small_net(), ["temperature"]).fit(calibration=(x, y), progress=False)
    path = wrapped.save(tmp_path / "plain.wrapcal")  # as 0.2.0 files name it
    loaded = wrapcal.load(path, model=small_net())
    assert loaded.plugin_names == ["temperature"]
    with torch.no_grad():
        assert torch.equal(loaded(x), wrapped(x))


def test_a_plain_saved_name_that_became_shared_means_the_builtin(tmp_path) -> None:
    """The rule for files (``find_saved_plugin``): a plain name is only saved while
    unambiguous and the built-ins are always there, so it names wrapcal's built-in."""
    builtin = type(wrapcal.wrap(small_net(), ["temperature"]).plugins[0])
    with otherpkg_installed(tmp_path):
        with pytest.warns(UserWarning, match="now also registered by otherpkg.*built-in"):
            [(name, plugin)] = resolve_plugins([("temperature", {})], saved=True)
        assert name == "temperature" and type(plugin) is builtin
        with pytest.raises(PluginNotFoundError, match="registered by 2 packages"):
            resolve_plugins([("temperature", {})])  # at wrap the user must choose


def as_saved_by_0_2_0(path: Path) -> Path:
    """The file as wrapcal 0.2.0 wrote it: no wrapcal version, no package per plugin."""
    stored = read(path)
    config = copy.deepcopy(stored.config)
    del config["wrapcal_version"]
    for entry in config["plugins"]:
        entry.pop("package", None)
    config["digest"] = digest(config, stored.tensors)
    old = path.with_name(f"{path.stem}-0.2.0.wrapcal")
    old.write_bytes(save_tensors(stored.tensors, metadata={"wrapcal": json.dumps(config)}))
    return old


def test_load_reads_a_plain_saved_name_that_became_shared_as_the_builtin(tmp_path) -> None:
    x, y = data()
    wrapped = wrapcal.wrap(small_net(), ["temperature"]).fit(calibration=(x, y), progress=False)
    # A file that does not say which package its plugin came from (0.2.0's).
    path = as_saved_by_0_2_0(wrapped.save(tmp_path / "plain.wrapcal"))
    with otherpkg_installed(tmp_path / "pkg"):
        with pytest.warns(UserWarning, match="'temperature' is now also registered by otherpkg"):
            loaded = wrapcal.load(path, model=small_net())
        assert type(loaded.plugins[0]) is type(wrapped.plugins[0])
        assert loaded.plugin_names == ["temperature"]
        with torch.no_grad():
            assert torch.equal(loaded(x), wrapped(x))


def test_a_file_saved_now_says_the_package_so_the_shared_name_needs_no_guess(tmp_path) -> None:
    x, y = data()
    wrapped = wrapcal.wrap(small_net(), ["temperature"]).fit(calibration=(x, y), progress=False)
    path = wrapped.save(tmp_path / "plain.wrapcal")
    assert read(path).config["plugins"][0]["package"] == "wrapcal"
    with otherpkg_installed(tmp_path / "pkg"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no guess to warn about
        loaded = wrapcal.load(path, model=small_net())
        assert type(loaded.plugins[0]) is type(wrapped.plugins[0])
        assert loaded.plugin_names == ["temperature"]


@contextmanager
def later_builtin(name: str) -> Iterator[type[Plugin]]:
    """What a later wrapcal that adds a built-in plugin ``name`` looks like to discovery:
    a module registered under wrapcal's distribution, marked built in."""

    class LaterBuiltin(Plugin):
        """A built-in of a later wrapcal: zeroes the logits (a ``divisor`` it ignores)."""

        def __init__(self, divisor: float = 1.0) -> None:
            super().__init__()
            self.divisor = divisor

        def __wrapcal_tags__(self):
            tags = super().__wrapcal_tags__()
            tags.stage, tags.requires_fit = Stage.CALIBRATE, False
            return tags

        def transform_logits(self, logits):
            return logits * 0

    @hookimpl
    def wrapcal_register_plugins(register) -> None:
        register(name, LaterBuiltin)

    module = types.SimpleNamespace(wrapcal_register_plugins=wrapcal_register_plugins)
    registered = f"wrapcal:{name}_module"
    wrapcal.get_plugin_manager().register(module, name=registered)
    discovery._sources[registered] = discovery._Source("wrapcal", wrapcal.__version__, True)
    try:
        yield LaterBuiltin
    finally:
        wrapcal.get_plugin_manager().unregister(name=registered)
        discovery._sources.pop(registered, None)


def test_a_later_builtin_of_the_same_name_never_takes_a_saved_plugins_place(tmp_path) -> None:
    """``find_saved_plugin`` guessed "the built-in" for a plain name that became shared:
    wrong once a later wrapcal adds a built-in named like the third-party plugin that
    the file holds. Files name the package now, and load looks there."""
    x, _ = data(8)
    with otherpkg_installed(tmp_path / "pkg"):
        wrapped = wrapcal.wrap(small_net(), [("other_only", {"divisor": 3.0})])
        path = wrapped.save(tmp_path / "other.wrapcal")
        assert read(path).config["plugins"][0]["package"] == "otherpkg"
        old = as_saved_by_0_2_0(path)
        with later_builtin("other_only") as builtin:
            with pytest.raises(PluginNotFoundError, match="registered by 2 packages"):
                wrapcal.wrap(small_net(), ["other_only"])  # shared now: at wrap, choose
            loaded = wrapcal.load(path, model=small_net())
            assert type(loaded.plugins[0]) is type(wrapped.plugins[0])
            assert loaded.plugin_names == ["other_only"] and loaded.plugins[0].divisor == 3.0
            with torch.no_grad():
                assert torch.equal(loaded(x), wrapped(x))
            # A file that does not say keeps 0.2.0's rule (the built-in), and says so.
            with pytest.warns(UserWarning, match="'other_only' is now also registered by"):
                assert type(wrapcal.load(old, model=small_net()).plugins[0]) is builtin
    # The package it names is gone: load says which one to install, and picks no other.
    with later_builtin("other_only"), pytest.raises(SavedFileError) as caught:
        wrapcal.load(path, model=small_net())
    message = str(caught.value)
    assert "comes from the package otherpkg, which is not installed" in message
    assert "Install otherpkg" in message and "wrapcal:other_only" in message


def test_the_catalog_follows_modules_registered_and_unregistered_by_hand() -> None:
    """The scan of registrations was cached under the ids of the hook implementations:
    a module registered after another was unregistered could get a freed one's id and
    pass for it (27 of 30 rounds here returned the old module's plugins; 10 rounds keep
    the check and a third of its cost, gc.collect being slow beside torch's objects)."""
    pm = wrapcal.get_plugin_manager()

    def module_registering(name: str) -> types.SimpleNamespace:
        @hookimpl
        def wrapcal_register_plugins(register) -> None:
            register(name, Plugin)

        return types.SimpleNamespace(wrapcal_register_plugins=wrapcal_register_plugins)

    try:
        for round_ in range(10):
            pm.register(module_registering(f"by_hand_{round_}"), name="by-hand")
            names = {info.name for info in discovery.installed_plugins()}
            assert f"by_hand_{round_}" in names and f"by_hand_{round_ - 1}" not in names
            pm.unregister(name="by-hand")
            gc.collect()  # frees the hook implementation: its id is free to be reused
    finally:
        discovery.reset()


def test_installed_plugins_lists_builtins_then_packages_by_name(tmp_path) -> None:
    with otherpkg_installed(tmp_path / "pkg"):
        pm = wrapcal.get_plugin_manager()
        module = types.SimpleNamespace(wrapcal_register_plugins=hookimpl(lambda register: None))
        pm.register(module, name="aaa-by-hand")  # registered last, sorts first of the others
        infos = discovery.installed_plugins()
    builtins = [info.builtin for info in infos]
    assert builtins == sorted(builtins, reverse=True)  # built-ins first
    others = [discovery._normalize(info.source) for info in infos if not info.builtin]
    assert others == sorted(others) and "otherpkg" in others


# --- order -----------------------------------------------------------------------------------


def test_installing_a_package_that_shares_a_name_never_reorders_a_wrap(tmp_path) -> None:
    """An instance's name is qualified while another package shares its plain name
    (``wrapcal:temperature``); the order inside a stage must not follow: it did, and
    ``wrapcal:temperature`` sorted after ``vector_scaling`` where ``temperature`` sorted
    before, so installing an unrelated package changed what a user's model computes."""
    x, y = data()
    registry = wrapcal.plugin_registry()
    vector, temperature = registry["vector_scaling"].factory, registry["temperature"].factory
    alone = wrapcal.wrap(small_net(), [vector(), temperature()])
    assert alone.plugin_names == ["temperature", "vector_scaling"]
    alone.fit(calibration=(x, y), progress=False)
    with otherpkg_installed(tmp_path):
        beside = wrapcal.wrap(small_net(), [vector(), temperature()])
        assert beside.plugin_names == ["wrapcal:temperature", "vector_scaling"]
        named = wrapcal.wrap(small_net(), ["vector_scaling", "wrapcal:temperature"])
        assert named.plugin_names == ["wrapcal:temperature", "vector_scaling"]
        beside.fit(calibration=(x, y), progress=False)
    with torch.no_grad():
        assert torch.equal(beside(x), alone(x))


# --- declarations checked at wrap ----------------------------------------------------------


class Ordered(Plugin):
    """A calibrate-stage plugin whose order and outputs come from its parameters."""

    def __init__(self, after=(), before=(), declares=None) -> None:
        super().__init__()
        self.after, self.before, self.declares = after, before, declares or {}

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.CALIBRATE
        tags.requires_fit = False
        tags.after, tags.before, tags.outputs = self.after, self.before, dict(self.declares)
        return tags

    def outputs(self, context):
        return {name: context.probs.amax(-1) for name in self.declares}


def test_unknown_after_before_names_are_refused_at_wrap() -> None:
    with pytest.raises(ValueError) as caught:
        wrapcal.wrap(small_net(), [Ordered(after=("temprature",))])
    message = str(caught.value)
    assert "plugin Ordered: tags.after names 'temprature'" in message
    assert "did you mean 'temperature'?" in message
    assert "installed plugins: " in message and "knn" in message
    with pytest.raises(ValueError, match="tags.before names 'no_such_plugin'"):
        wrapcal.wrap(small_net(), [Ordered(before=("no_such_plugin",))])
    with pytest.raises(ValueError, match="tags.after names 'nopkg:temperature'"):
        wrapcal.wrap(small_net(), [Ordered(after=("nopkg:temperature",))])
    with pytest.raises(TypeError, match="tags.after must be a tuple of plugin names"):
        wrapcal.wrap(small_net(), [Ordered(after="temperature")])


def test_installed_names_absent_from_the_wrap_are_fine_and_order_when_present() -> None:
    # "mahalanobis" is installed but not wrapped: ordering against it is vacuous.
    wrapcal.wrap(small_net(), [Ordered(after=("mahalanobis", "wrapcal:mahalanobis"))])
    # "temperature" is wrapped: the declarations beat the name order, plain or qualified.
    first, last = type("aaa", (Ordered,), {}), type("zzz", (Ordered,), {})
    wrapped = wrapcal.wrap(small_net(), [first(after=("wrapcal:temperature",)), "temperature"])
    assert wrapped.plugin_names == ["temperature", "aaa"]
    wrapped = wrapcal.wrap(small_net(), ["temperature", last(before=("temperature",))])
    assert wrapped.plugin_names == ["zzz", "temperature"]


def test_declared_outputs_are_checked_at_wrap() -> None:
    score = {"score": OutputKind.OOD_SCORE}
    twin = type("Twin", (Ordered,), {})
    with pytest.raises(ValueError) as caught:
        wrapcal.wrap(small_net(), [Ordered(declares=score), twin(declares=score)])
    message = str(caught.value)
    assert "plugins Ordered and Twin both declare the output 'score'" in message
    with pytest.raises(ValueError, match="declares the output 'energy', which the core"):
        wrapcal.wrap(small_net(), [Ordered(declares={"energy": OutputKind.OOD_SCORE})])
    with pytest.raises(TypeError, match="output 'score' has kind 'ood_score', not an OutputKind"):
        wrapcal.wrap(small_net(), [Ordered(declares={"score": "ood_score"})])
    # A set output beside conformal's "sets" is the same clash, with a built-in.
    with pytest.raises(ValueError, match="plugins conformal and Ordered both declare.*'sets'"):
        wrapcal.wrap(small_net(), ["conformal", Ordered(declares={"sets": OutputKind.SET})])
    wrapped = wrapcal.wrap(small_net(), [Ordered(declares=score)])
    x, _ = data(8)
    assert wrapped.predict(x).score.shape == (8,)


# --- NotFittedError and the declared contract ----------------------------------------------


def test_not_fitted_names_only_the_data_the_plugin_reads() -> None:
    wrapped = wrapcal.wrap(small_net(), ["temperature", "knn"])
    with pytest.raises(NotFittedError) as caught:
        wrapped.get_plugin("temperature").check_is_fitted()
    message = str(caught.value)
    assert "wrapped.fit(calibration=...)" in message
    assert "train=" not in message and "unlabeled=" not in message
    with pytest.raises(NotFittedError) as caught:
        wrapped.get_plugin("knn").check_is_fitted()
    assert "wrapped.fit(train=...) or wrapped.fit(calibration=...)" in str(caught.value)
    assert "unlabeled" not in str(caught.value)


def test_predicting_unfitted_names_only_the_data_the_plugins_read() -> None:
    wrapped = wrapcal.wrap(small_net(), ["temperature"])
    with pytest.raises(NotFittedError) as caught:
        wrapped(data(4)[0])
    assert "calibration=" in str(caught.value) and "train=" not in str(caught.value)


def test_unshard_is_a_declared_documented_method() -> None:
    doc = inspect.getdoc(Plugin.unshard)
    assert doc and "torch.distributed" in doc and "wrapcal.distributed.unshard" in doc
    assert Plugin().unshard() is None  # the default gathers nothing
    knn = type(wrapcal.wrap(small_net(), ["knn"]).plugins[0])
    assert knn.unshard is not Plugin.unshard
    # Overrides keep the declared parameters (the core calls plugin.unshard()).
    assert list(inspect.signature(knn.unshard).parameters) == ["self"]


def test_the_core_calls_only_declared_plugin_methods() -> None:
    """Every ``plugin.<name>`` the core (outside the SDK) uses is declared on Plugin or,
    in the logits tools, on Calibrator: nothing a plugin must guess it should define."""
    # Instances, so that what __init__ declares (fitted_) counts.
    declared = set(dir(Plugin())) | set(dir(Calibrator()))
    undeclared = []
    for path in sorted((ROOT / "wrapcal").rglob("*.py")):
        if "plugin" in path.relative_to(ROOT / "wrapcal").parts[:1]:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "plugin"
                and node.attr not in declared
            ):
                undeclared.append(f"{path.relative_to(ROOT)}:{node.lineno} plugin.{node.attr}")
    assert not undeclared, undeclared
