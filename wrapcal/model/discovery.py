"""Plugin discovery: the global plugin manager, entry points and name lookup.

Plugins are found through the ``wrapcal`` entry-point group, the built-in ones like
any third-party package's. ``WRAPCAL_DISABLE_PLUGIN_AUTOLOAD=1`` turns entry-point
loading off; plugins can still be registered by hand with
``get_plugin_manager().register(module_or_object)`` or passed to ``wrap`` as instances.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

import wrapcal.plugin.hookspecs as hookspecs
from wrapcal.errors import PluginNotFoundError
from wrapcal.model.split import LinearFallbackAdapter, TimmAdapter, TorchvisionAdapter

ENTRY_POINT_GROUP = "wrapcal"
DISABLE_AUTOLOAD_ENV = "WRAPCAL_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class PluginInfo:
    """One installed plugin factory.

    Attributes:
        name: The name users pass to ``wrap``.
        factory: Called with the user's keyword arguments, returns a plugin instance.
        package: The distribution that provides it (``None`` if registered by hand).
        version: That distribution's version.
        description: The first line of the factory's docstring.
    """

    name: str
    factory: Callable[..., Any]
    package: str | None
    version: str | None
    description: str


_manager: pluggy.PluginManager | None = None
_registry: dict[str, PluginInfo] | None = None


def autoload_disabled() -> bool:
    """Whether ``WRAPCAL_DISABLE_PLUGIN_AUTOLOAD`` turns entry-point loading off."""
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip() not in ("", "0")


def new_manager() -> pluggy.PluginManager:
    """A plugin manager that knows wrapcal's hooks, with nothing registered."""
    pm = pluggy.PluginManager("wrapcal")
    pm.add_hookspecs(hookspecs)
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The global manager: core split adapters plus plugins from entry points."""
    global _manager
    if _manager is None:
        pm = new_manager()
        # The core's own features are ordinary plugins, registered here, not by entry
        # point, so disabling autoload leaves wrapcal able to split models.
        for adapter in (TimmAdapter(), TorchvisionAdapter(), LinearFallbackAdapter()):
            pm.register(adapter, name=f"wrapcal.model.split.{type(adapter).__name__}")
        if not autoload_disabled():
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        _manager = pm
    return _manager


def reset() -> None:
    """Forget the global manager and registry (they are rebuilt on next use).

    Useful after installing a plugin package in a running process, and in tests.
    """
    global _manager, _registry
    _manager = None
    _registry = None


def _first_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def plugin_registry() -> dict[str, PluginInfo]:
    """Every registered plugin factory by name, with the package that provides it."""
    global _registry
    pm = get_plugin_manager()
    if _registry is not None:
        return _registry
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    registry: dict[str, PluginInfo] = {}
    for impl in pm.hook.wrapcal_register_plugins.get_hookimpls():
        dist = dists.get(id(impl.plugin))

        def register(name: str, factory: Callable[..., Any], _dist: Any = dist) -> None:
            if name in registry:
                raise ValueError(
                    f"two plugins are named {name!r}: {registry[name].package} and "
                    f"{_dist.project_name if _dist else 'a plugin registered by hand'}; "
                    "uninstall one"
                )
            registry[name] = PluginInfo(
                name=name,
                factory=factory,
                package=_dist.project_name if _dist else None,
                version=_dist.version if _dist else None,
                description=_first_line(factory),
            )

        impl.function(register=register)
    _registry = registry
    return registry


def find_plugin(name: str) -> PluginInfo:
    """The installed plugin registered as ``name``.

    Raises:
        PluginNotFoundError: No installed plugin has that name; the message lists them.
    """
    registry = plugin_registry()
    if not isinstance(name, str) or name not in registry:
        installed = ", ".join(sorted(registry)) or "none"
        hint = (
            f" (entry-point loading is off: {DISABLE_AUTOLOAD_ENV} is set)"
            if autoload_disabled()
            else ""
        )
        raise PluginNotFoundError(
            f"no plugin named {name!r}; installed plugins: {installed}{hint}. Install the "
            f"package that provides it (plugins register in the {ENTRY_POINT_GROUP!r} "
            "entry-point group) or pass a plugin instance"
        )
    return registry[name]


def plugin_name(plugin: Any) -> str | None:
    """The registry name of a plugin instance's class, if it has one."""
    for info in plugin_registry().values():
        if isinstance(info.factory, type) and type(plugin) is info.factory:
            return info.name
    return None
