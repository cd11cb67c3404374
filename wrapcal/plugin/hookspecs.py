"""The discovery hooks: how packages register plugins, split adapters and model families.

Hooks only register things (as in simonw/llm). They are answered by modules and
objects on the global plugin manager (:func:`wrapcal.model.discovery.get_plugin_manager`),
found through the ``wrapcal`` entry-point group: wrapcal's own entry points (the
built-ins) always, other packages' unless ``WRAPCAL_DISABLE_PLUGIN_AUTOLOAD=1``. What a
plugin does to a model is not a hook: it is the plugin's own documented methods
(:class:`wrapcal.Plugin`), which the core calls in stage order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from wrapcal.plugin.base import Plugin

hookspec = pluggy.HookspecMarker("wrapcal")
hookimpl = pluggy.HookimplMarker("wrapcal")

__all__ = ["hookimpl", "hookspec"]


@hookspec
def wrapcal_register_plugins(register: Callable[[str, Callable[..., Plugin]], None]) -> None:
    """Register plugin factories by name.

    A name is the package's to choose (no ``:`` in it). If another installed package
    registers the same name, neither plain name is usable but nothing else breaks:
    users pick one with its qualified name ``"package:name"`` (the distribution's name,
    as in ``"wrapcal:temperature"``), which works for any plugin.

    Args:
        register: Call ``register("temperature", TemperatureScaler)``; the factory is
            called with the user's keyword arguments and must return a
            :class:`wrapcal.Plugin`.
    """


@hookspec(firstresult=True)
# Any: a wrapcal.Split or None; wrapcal.model.split imports this module (no import cycle).
def wrapcal_split_model(model: nn.Module) -> Any:
    """Split a classifier into a feature extractor and a head.

    The first adapter that recognises the model returns its :class:`wrapcal.Split`;
    the others return ``None``. Built-in adapters handle timm, torchvision and, last
    (``trylast``), any model whose final operation is an ``nn.Linear``.

    Args:
        model: The model to split. The adapter may modify it (``wrap`` passes a copy
            unless the user asked for ``inplace=True``).
    """


@hookspec
def wrapcal_register_models(register: Callable[[Any], None]) -> None:
    """Register model families that ``wrapcal.load`` and the CLI may build by name.

    Args:
        register: Call ``register(ModelFamily(...))`` (``from wrapcal.plugin import
            ModelFamily``) with the family's name (the prefix users write, as in
            ``timm:resnet18``), builder, known names and allow-listed arguments.
    """
