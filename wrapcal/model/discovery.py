"""Plugin discovery: the global plugin manager, entry points and name lookup.

Plugins are found through the ``wrapcal`` entry-point group, the built-in ones like
any third-party package's, but wrapcal registers its own first and always (pytest's
``builtin_plugins`` habit): the modules in the ``wrapcal`` group of wrapcal's *own*
distribution are the built-ins. ``WRAPCAL_DISABLE_PLUGIN_AUTOLOAD=1`` turns off the
entry points of every other package only. Plugins can still be registered by hand with
``get_plugin_manager().register(module_or_object)`` or passed to ``wrap`` as instances.

Names. Every entry-point module is registered with pluggy under a name qualified by
its distribution (``"wrapcal:knn"``, ``"otherpkg:knn"``), so no package's entry point
can replace or hide another's (pluggy skips a second module registered under a taken
name). The plugins a module registers are then looked up by the name it gives them:

- a name only one package registers is used as it is: ``"temperature"``;
- a name several packages register (a *clash*) is usable only qualified by the package
  (``"wrapcal:temperature"``, ``"otherpkg:temperature"``); the plain name is an error
  that names both packages and the qualified names. Nothing else is affected: ``knn``
  keeps working when some package also registers ``temperature``;
- a qualified name ``"package:name"`` is accepted for any plugin, clash or not (the
  package as its distribution spells it, ``-``, ``_`` and ``.`` alike, any case).

Saved files keep the name the plugin had in the wrapped model: the plain name when it
was unambiguous, the qualified one otherwise (:func:`plugin_name`), and since 0.3 the
package it came from. A name read from a file is looked up in that package
(:func:`find_saved_plugin`), so a package that later registers the same name, wrapcal's
own built-ins included, cannot take the saved plugin's place. A file without packages
(0.2.0's) is read as before: a plain name that has since become ambiguous means
wrapcal's built-in when wrapcal has one, since a plain name is only ever saved while
unambiguous and the built-ins are always registered (0.2.0 could not save a name two
packages registered at all).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy

import wrapcal.plugin.hookspecs as hookspecs
from wrapcal.errors import PluginNameClashError, PluginNotFoundError
from wrapcal.model.split import LinearFallbackAdapter, TimmAdapter, TorchvisionAdapter

if TYPE_CHECKING:
    from pluggy import HookImpl

    from wrapcal.plugin.base import Plugin

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "autoload_disabled",
    "clashes",
    "find_plugin",
    "find_saved_plugin",
    "get_plugin_manager",
    "installed_plugins",
    "new_manager",
    "plugin_name",
    "plugin_registry",
    "registrations_of",
    "reset",
]

ENTRY_POINT_GROUP = "wrapcal"
DISABLE_AUTOLOAD_ENV = "WRAPCAL_DISABLE_PLUGIN_AUTOLOAD"
#: The distribution whose entry points are the built-in plugins.
BUILTIN_DISTRIBUTION = "wrapcal"


@dataclass(frozen=True)
class PluginInfo:
    """One installed plugin factory.

    Attributes:
        name: The name its package registers it under (``"temperature"``).
        factory: Called with the user's keyword arguments, returns a plugin instance.
        package: The distribution that provides it (``None`` if registered by hand).
        version: That distribution's version.
        description: The first line of the factory's docstring.
        builtin: Whether wrapcal itself provides it.
        source: What qualifies the name: the distribution's name, or for a module
            registered by hand the name pluggy registered it under.
    """

    name: str
    factory: Callable[..., Plugin]
    package: str | None
    version: str | None
    description: str
    builtin: bool = False
    source: str = ""

    @property
    def qualified_name(self) -> str:
        """``"package:name"``: the name that picks this plugin whatever else is installed."""
        return f"{self.source or self.package or '?'}:{self.name}"


@dataclass(frozen=True)
class _Source:
    """Where a module registered on the manager comes from."""

    package: str | None
    version: str | None
    builtin: bool


_manager: pluggy.PluginManager | None = None
#: Registered (pluggy) name -> the distribution it was loaded from.
_sources: dict[str, _Source] = {}
#: (the manager's register-hook implementations, every registration) of the last scan.
#: The implementations themselves, not their ids: held here, none can be freed and its
#: id reused by a module registered later, which would pass for the one scanned.
_catalog: tuple[tuple[HookImpl, ...], list[PluginInfo]] | None = None


def autoload_disabled() -> bool:
    """Whether ``WRAPCAL_DISABLE_PLUGIN_AUTOLOAD`` turns third-party entry points off."""
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip() not in ("", "0")


def new_manager() -> pluggy.PluginManager:
    """A plugin manager that knows wrapcal's hooks, with nothing registered."""
    pm = pluggy.PluginManager("wrapcal")
    pm.add_hookspecs(hookspecs)
    return pm


def _normalize(package: str) -> str:
    """A distribution name as PEP 503 compares them (``My_Pkg.x`` -> ``my-pkg-x``)."""
    return re.sub(r"[-_.]+", "-", package).lower()


def _load(
    pm: pluggy.PluginManager,
    dist: importlib.metadata.Distribution,
    ep: importlib.metadata.EntryPoint,
    builtin: bool,
) -> None:
    """Register one entry point's module under ``"distribution:entry point"``."""
    package = dist.metadata["Name"] or "?"
    registered = f"{package}:{ep.name}"
    if pm.has_plugin(registered) or pm.is_blocked(registered):
        return
    try:
        plugin = ep.load()
    except Exception as err:
        fix = (
            f"it is one of wrapcal's built-in plugins: reinstall {package}"
            if builtin
            else f"fix or uninstall {package}, or set {DISABLE_AUTOLOAD_ENV}=1 to load the "
            "built-in plugins only"
        )
        raise ImportError(
            f"the wrapcal plugin package {package} {dist.version} failed to import its "
            f"entry point {ep.name} = {ep.value}: {type(err).__name__}: {err}; {fix}"
        ) from err
    if pm.is_registered(plugin):
        # The same module under a second entry point (another package pointing at a
        # built-in module): registering it again would register its plugins twice.
        return
    pm.register(plugin, name=registered)
    _sources[registered] = _Source(package, dist.version, builtin)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """The built-ins, always; then, unless autoload is off, every other package's."""
    try:
        own = importlib.metadata.distribution(BUILTIN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # a source tree nobody installed
        own = None
    if own is not None:
        for ep in own.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                _load(pm, own, ep, builtin=True)
    if autoload_disabled():
        return
    seen = {_normalize(BUILTIN_DISTRIBUTION)}
    for dist in list(importlib.metadata.distributions()):
        name = _normalize(dist.metadata["Name"] or "")
        if name in seen:  # sys.path order: the first copy of a distribution is the one used
            continue
        seen.add(name)
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                _load(pm, dist, ep, builtin=False)


def get_plugin_manager() -> pluggy.PluginManager:
    """The global manager: core split adapters, the built-ins, then other packages.

    pluggy calls the most recently registered implementation first, so a third-party
    split adapter gets a model before the built-in ones.
    """
    global _manager
    if _manager is None:
        _sources.clear()
        pm = new_manager()
        # The core's own features are ordinary plugins, registered here, not by entry
        # point, so wrapcal can split models whatever is installed.
        for adapter in (TimmAdapter(), TorchvisionAdapter(), LinearFallbackAdapter()):
            pm.register(adapter, name=f"wrapcal.model.split.{type(adapter).__name__}")
        _load_entry_points(pm)
        _manager = pm
    return _manager


def reset() -> None:
    """Forget the global manager and registry (they are rebuilt on next use).

    Useful after installing a plugin package in a running process, and in tests.
    """
    global _manager, _catalog
    _manager = None
    _catalog = None
    _sources.clear()


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _registrar(registered: str, found: list[PluginInfo]) -> Callable[..., None]:
    """The ``register`` callback of the module pluggy registered as ``registered``."""
    source = _sources.get(registered, _Source(None, None, False))
    where = source.package or f"the module {registered}"

    def register(name: str, factory: Callable[..., Plugin]) -> None:
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(
                f"{where} registers a plugin under {name!r}: a plugin name is a non-empty "
                "string without ':' (':' separates the package in a qualified name)"
            )
        if not callable(factory):
            raise TypeError(f"{where} registers plugin {name!r} with a non-callable factory")
        found.append(
            PluginInfo(
                name=name,
                factory=factory,
                package=source.package,
                version=source.version,
                description=_first_line(factory),
                builtin=source.builtin,
                source=source.package or registered,
            )
        )

    return register


def _same_scan(impls: tuple[HookImpl, ...]) -> bool:
    """Whether the last scan was of exactly these hook implementations."""
    return (
        _catalog is not None
        and len(_catalog[0]) == len(impls)
        and all(a is b for a, b in zip(_catalog[0], impls, strict=True))
    )


def installed_plugins() -> list[PluginInfo]:
    """Every plugin registration, clashing names included: built-ins first, then the
    other packages by name (a module registered by hand by the name pluggy has it
    under), each package's in the order it registered them."""
    global _catalog
    pm = get_plugin_manager()
    impls = tuple(pm.hook.wrapcal_register_plugins.get_hookimpls())
    # Rescanned when a module is registered (or unregistered) by hand after first use.
    if _same_scan(impls):
        assert _catalog is not None
        return list(_catalog[1])
    found: list[PluginInfo] = []
    for impl in impls:
        impl.function(register=_registrar(impl.plugin_name, found))
    # Stable: each package's plugins stay in the order it registered them.
    found.sort(key=lambda info: (not info.builtin, _normalize(info.source)))
    _catalog = (impls, found)
    return list(found)


def clashes() -> dict[str, list[PluginInfo]]:
    """Plain names registered by more than one package, with every registration."""
    by_name: dict[str, list[PluginInfo]] = {}
    for info in installed_plugins():
        by_name.setdefault(info.name, []).append(info)
    return {name: infos for name, infos in by_name.items() if len(infos) > 1}


def plugin_registry() -> dict[str, PluginInfo]:
    """Every installed plugin by the name ``wrap`` takes for it.

    A name one package registers is the key as it is; a name several packages register
    appears once per package, qualified (``"wrapcal:temperature"``,
    ``"otherpkg:temperature"``), since the plain name picks none of them.
    """
    shared = clashes()
    registry: dict[str, PluginInfo] = {}
    for info in installed_plugins():
        registry[info.qualified_name if info.name in shared else info.name] = info
    return registry


def _installed_hint() -> str:
    installed = ", ".join(sorted(plugin_registry())) or "none"
    off = (
        f" (third-party entry points are off: {DISABLE_AUTOLOAD_ENV} is set)"
        if autoload_disabled()
        else ""
    )
    return f"installed plugins: {installed}{off}"


def _clash_message(name: str, infos: list[PluginInfo]) -> str:
    def who(info: PluginInfo) -> str:
        if info.builtin:
            return f"{info.package} (built in)"
        if info.package:
            return f"{info.package} {info.version}"
        return f"the module {info.source}, registered by hand"

    packages = ", ".join(who(info) for info in infos)
    choices = " or ".join(repr(info.qualified_name) for info in infos)
    return (
        f"plugin name {name!r} is registered by {len(infos)} packages: {packages}; pick one "
        f"by its qualified name 'package:name': {choices}"
    )


def _not_found(name: object) -> PluginNotFoundError:
    return PluginNotFoundError(
        f"no plugin named {name!r}; {_installed_hint()}. Install the package that "
        f"provides it (plugins register in the {ENTRY_POINT_GROUP!r} entry-point group) "
        "or pass a plugin instance"
    )


def find_plugin(name: str) -> PluginInfo:
    """The installed plugin that ``name`` picks: a plain name or ``"package:name"``.

    Raises:
        PluginNotFoundError: No installed plugin has that name (the message lists
            them), or several packages register the plain name (the message names
            them and the qualified names that pick each).
    """
    if not isinstance(name, str):
        raise _not_found(name)
    infos = installed_plugins()
    if ":" in name:
        package, _, plain = name.rpartition(":")
        wanted = _normalize(package)
        matches = [
            info for info in infos if info.name == plain and _normalize(info.source) == wanted
        ]
        if len(matches) > 1:
            raise PluginNotFoundError(
                f"package {matches[0].source} registers plugin {plain!r} {len(matches)} "
                f"times ({', '.join(info.factory.__qualname__ for info in matches)}); "
                f"uninstall or fix {matches[0].source}"
            )
        if not matches:
            others = [info.qualified_name for info in infos if info.name == plain]
            if others:
                raise PluginNotFoundError(
                    f"no package {package!r} registers plugin {plain!r}; it is registered "
                    f"as {' and '.join(map(repr, others))}"
                )
            raise _not_found(name)
        return matches[0]
    matches = [info for info in infos if info.name == name]
    if len(matches) > 1:
        raise PluginNameClashError(_clash_message(name, matches))
    if not matches:
        raise _not_found(name)
    return matches[0]


def find_saved_plugin(name: str, package: str | None = None) -> PluginInfo:
    """The plugin a name read from a saved file picks.

    Args:
        name: The name the file holds (plain, or ``"package:name"``).
        package: The distribution the file says the plugin came from (files of 0.3 on);
            ``None`` for a file that does not say (0.2.0's).

    With ``package``: that package's plugin of that plain name, whatever else registers
    the name now. Without: like :func:`find_plugin`, except for a plain name that
    several packages register now: wrapcal's built-in of that name, if it has one (with
    a warning naming the others). A plain name is only saved while unambiguous, and the
    built-ins are always registered, so a plain name saved while wrapcal had that
    built-in named it.

    Raises:
        PluginNotFoundError: As :func:`find_plugin`; for a plain name several
            third-party packages register; for a ``package`` that is not installed or
            does not register the name (the message says which package to install).
    """
    if isinstance(name, str) and isinstance(package, str):
        return _find_in_package(name, package)
    if isinstance(name, str) and ":" not in name:
        matches = [info for info in installed_plugins() if info.name == name]
        builtin = [info for info in matches if info.builtin]
        if len(matches) > 1 and len(builtin) == 1:
            others = ", ".join(info.package or info.source for info in matches if not info.builtin)
            warnings.warn(
                f"the saved plugin name {name!r} is now also registered by {others}; "
                f"loading wrapcal's built-in {name} (the plugin a plain name in a file "
                "names). A third-party plugin with a shared name is saved as "
                "'package:name'",
                UserWarning,
                stacklevel=3,
            )
            return builtin[0]
    return find_plugin(name)


def _find_in_package(name: str, package: str) -> PluginInfo:
    """The plugin ``package`` registers under ``name``'s plain name (see
    :func:`find_saved_plugin`)."""
    plain = name.rpartition(":")[2]
    wanted = _normalize(package)
    named = [info for info in installed_plugins() if info.name == plain]
    matches = [info for info in named if _normalize(info.package or "") == wanted]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise PluginNotFoundError(
            f"package {package} registers plugin {plain!r} {len(matches)} times "
            f"({', '.join(info.factory.__qualname__ for info in matches)}); uninstall or "
            f"fix {package}"
        )
    others = (
        f"; {plain!r} is registered by {', '.join(info.qualified_name for info in named)}, "
        "which the file does not name"
        if named
        else ""
    )
    raise PluginNotFoundError(
        f"the saved plugin {name!r} comes from the package {package}, which is not "
        f"installed or does not register {plain!r}{others}. Install {package} (the "
        "version the model was saved with)"
    )


def registrations_of(plugin: Plugin) -> list[PluginInfo]:
    """Every registration whose factory is the plugin's own class (usually one; a
    package may register one class under several names)."""
    return [info for info in installed_plugins() if info.factory is type(plugin)]


def plugin_name(plugin: Plugin) -> str | None:
    """The name ``wrap`` takes for a plugin instance's class (qualified when its plain
    name is shared; the first of its names if it has several), if the class is
    registered."""
    found = registrations_of(plugin)
    if not found:
        return None
    return found[0].qualified_name if found[0].name in clashes() else found[0].name
