"""Assembly: resolve plugins, split the model, build the ``WrappedModel``.

The one path used by :func:`wrap` and by :func:`wrapcal.load`: plugins are created by
name (their parameters checked against their declared constraints), ordered by stage
(:mod:`wrapcal.model.ordering`), and attached to the split model.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from wrapcal.errors import SplitError
from wrapcal.files.preprocess import Preprocess, fit_to_model, resolve
from wrapcal.model import discovery
from wrapcal.model.chain import CORE_OUTPUTS
from wrapcal.model.ordering import order_plugins
from wrapcal.model.split import Split, split_at
from wrapcal.model.wrapped import WrappedModel
from wrapcal.plugin.base import Plugin, get_tags
from wrapcal.plugin.constraints import suggest
from wrapcal.plugin.torch_helpers import HOW_TO_SPLIT_BY_HAND

__all__ = ["PluginSpec", "build", "create_plugin", "find_split", "resolve_plugins", "wrap"]


#: What ``wrap`` takes for one plugin: a name, a ``(name, params)`` pair or an instance.
PluginSpec = str | tuple[str, dict[str, Any] | None] | Plugin


def create_plugin(
    name: str,
    params: dict[str, Any] | None = None,
    *,
    saved: bool = False,
    package: str | None = None,
) -> Plugin:
    """Create the plugin registered as ``name`` with ``params``, checked.

    Args:
        name: A plugin name, or ``"package:name"`` to pick one of several packages'
            plugins of one name.
        params: The plugin's parameters.
        saved: The name was read from a saved file
            (:func:`~wrapcal.model.discovery.find_saved_plugin`): it is looked up in
            ``package`` when the file names one; else a plain name that several
            packages now register means wrapcal's built-in.
        package: With ``saved``, the package the file says the plugin came from.

    Raises:
        PluginNotFoundError: No installed plugin has that name, or several packages
            register it (the message names them and how to pick one).
        TypeError: ``params`` is not a dict, or names a parameter the plugin does not
            have (the message lists the ones it has).
        ValueError: A parameter value the plugin does not accept.
    """
    params = {} if params is None else params
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise TypeError(f"plugin {name}: parameters must be a dict name -> value")
    info = discovery.find_saved_plugin(name, package) if saved else discovery.find_plugin(name)
    factory = info.factory
    signature = inspect.signature(factory)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    known = [n for n in signature.parameters if n != "self"]
    for key in params:
        if not accepts_any and key not in known:
            raise TypeError(
                f"plugin {name} has no parameter {key!r}{suggest(key, known)}; its "
                f"parameters are {', '.join(known) or 'none'}"
            )
    plugin = factory(**params)
    if not isinstance(plugin, Plugin):
        raise TypeError(
            f"plugin {name}: its factory returned a {type(plugin).__name__}, not a wrapcal.Plugin"
        )
    plugin.validate_params(f"plugin {name}")
    return plugin


def _qualified(plugin: Plugin) -> str | None:
    """The qualified name of the plugin's class, if it is registered under one name."""
    found = discovery.registrations_of(plugin)
    return found[0].qualified_name if len(found) == 1 else None


def _check_order_names(pairs: list[tuple[str, Plugin]]) -> None:
    """Refuse ``after`` / ``before`` names that no installed or listed plugin has.

    A name that is installed but not in this wrap's list is fine: ordering relative to
    an absent plugin is vacuous. A misspelt one would be silently ignored.
    """
    installed = discovery.installed_plugins()
    known = {name for name, _ in pairs} | {name.rpartition(":")[2] for name, _ in pairs}
    known |= {info.name for info in installed}
    for name, plugin in pairs:
        tags = get_tags(plugin)
        for attribute in ("after", "before"):
            for reference in getattr(tags, attribute):
                if reference in known:
                    continue
                if ":" in reference:
                    try:
                        discovery.find_plugin(reference)
                        continue
                    except LookupError:
                        pass
                listed = sorted(discovery.plugin_registry()) or ["none"]
                raise ValueError(
                    f"plugin {name}: tags.{attribute} names {reference!r}, which no installed "
                    f"plugin has{suggest(reference, sorted(known))}; installed plugins: "
                    f"{', '.join(listed)}. Fix the name (a plugin that is installed but not "
                    "in this wrap's list is fine)"
                )


def _check_outputs(pairs: list[tuple[str, Plugin]]) -> None:
    """Refuse output names that the core or another listed plugin already produces:
    a prediction holds one output per name."""
    owner: dict[str, str] = {}
    for name, plugin in pairs:
        for output in get_tags(plugin).outputs:
            if output in CORE_OUTPUTS:
                raise ValueError(
                    f"plugin {name} declares the output {output!r}, which the core already "
                    f"produces ({', '.join(CORE_OUTPUTS)}); the plugin must name its output "
                    "otherwise"
                )
            if output in owner:
                raise ValueError(
                    f"plugins {owner[output]} and {name} both declare the output {output!r}; "
                    "a prediction holds one output per name: wrap only one of them, or "
                    "rename one's output"
                )
            owner[output] = name


def resolve_plugins(
    plugins: Iterable[PluginSpec],
    *,
    saved: bool = False,
    packages: Mapping[str, str] | None = None,
) -> list[tuple[str, Plugin]]:
    """Names, ``(name, params)`` pairs and instances -> ``(name, plugin)`` in stage order.

    A plugin keeps the name it was given (plain, or ``"package:name"``); an instance
    gets its class's registered name, qualified when several packages share the plain
    one (:func:`~wrapcal.model.discovery.plugin_name`), else its class name. That name
    is what a saved file stores.

    Args:
        plugins: The plugins, in any order.
        saved: The names were read from a saved file (:func:`create_plugin`).
        packages: With ``saved``: name -> the package the file says it came from, for
            the names the file gives one.

    Raises:
        PluginNotFoundError: A name no installed plugin has, or one several packages
            register.
        TypeError: A bad item, parameters or tags.
        ValueError: A plugin listed twice, a bad parameter value, an unknown name in
            ``after`` / ``before``, an output name the core or another listed plugin
            already has, or an ordering cycle.
    """
    if isinstance(plugins, (str, Plugin)) or (
        isinstance(plugins, tuple) and len(plugins) == 2 and isinstance(plugins[0], str)
    ):
        raise TypeError(
            f"plugins must be a list, e.g. plugins=[{plugins!r}]; got a single "
            f"{type(plugins).__name__}"
        )
    pairs: list[tuple[str, Plugin]] = []
    # What makes two items one plugin: "temperature", "wrapcal:temperature" and a
    # TemperatureScaler() are the same; the qualified name says so.
    identities: dict[str, str] = {}
    for item in plugins:
        if isinstance(item, str) or (
            isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
        ):
            name, params = (item, None) if isinstance(item, str) else item
            package = (packages or {}).get(name) if saved else None
            pairs.append((name, create_plugin(name, params, saved=saved, package=package)))
        elif isinstance(item, Plugin):
            name = discovery.plugin_name(item) or type(item).__name__
            item.validate_params(f"plugin {name}")
            pairs.append((name, item))
        else:
            raise TypeError(
                "plugins must be names, (name, params) pairs or wrapcal.Plugin instances; "
                f"got {type(item).__name__}"
            )
        identity = _qualified(pairs[-1][1]) or name
        if identities.get(identity, name) != name:
            raise ValueError(
                f"plugin {identity} is listed twice (as {identities[identity]!r} and "
                f"{name!r}); give it once (with all its parameters)"
            )
        identities[identity] = name
    for index, (name, plugin) in enumerate(pairs):
        if any(plugin is other for _, other in pairs[:index]):
            raise ValueError(f"plugin {name} is listed twice (the same instance)")
        get_tags(plugin)  # checks the stage and output kinds now, not at first use
    _check_order_names(pairs)
    _check_outputs(pairs)
    return order_plugins(pairs)


def find_split(model: nn.Module) -> Split:
    """Split ``model`` (modified in place) with the first adapter that knows it."""
    split = discovery.get_plugin_manager().hook.wrapcal_split_model(model=model)
    if split is None:
        raise SplitError(f"no adapter could split {type(model).__name__}; {HOW_TO_SPLIT_BY_HAND}")
    return split


def build(split: Split, plugins: list[tuple[str, Plugin]], stacklevel: int) -> WrappedModel:
    """``WrappedModel(split, plugins)``, with the plugins' attach warnings pointing at the
    caller ``stacklevel - 1`` frames up (a warning from inside the core helps no one,
    and the default filter would show only the first of its kind)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = WrappedModel(split, plugins)
    for warning in caught:
        warnings.warn(warning.message, warning.category, stacklevel=stacklevel)
    return wrapped


def _copy_split(split: Split) -> Split:
    # The user's modules are never changed: fitting trains the copy's head in place.
    return Split(
        copy.deepcopy(split.backbone),
        copy.deepcopy(split.head),
        split.kind,
        dict(split.source),
        split.head_path,
    )


def wrap(
    model: nn.Module | None,
    plugins: Sequence[PluginSpec] = (),
    *,
    inplace: bool = False,
    head: str | None = None,
    split: Split | None = None,
    preprocess: Preprocess | Mapping[str, Any] | Any = None,
) -> WrappedModel:
    """Wrap a classifier with plugins.

    Args:
        model: A timm or torchvision model, or any ``nn.Module`` that maps inputs to
            logits and ends in an ``nn.Linear`` (``None`` with ``split=``).
        plugins: Plugin names (``"temperature"``), ``(name, params)`` pairs or plugin
            instances. They act by stage, not in list order.
        inplace: Use ``model`` (or the ``split``'s modules) itself instead of a copy.
            The copy is the default: the user's model is never changed.
        head: The dotted name of the final linear layer, to split there by hand.
        split: A complete :class:`~wrapcal.model.split.Split`, to skip the adapters.
        preprocess: What the model's inputs are: a :class:`~wrapcal.Preprocess`
            (``mean``, ``std``, ``size``, ``channel_order``, ``value_range``), a dict of
            its fields, or a Hugging Face image processor (or its config dict). Default:
            what the model says (a timm model's data config, a ``wrapcal_preprocess``
            attribute such as wrapcal's CIFAR ResNets carry), else none. Saved with the
            model and written into exports.

    Returns:
        The :class:`~wrapcal.WrappedModel`, in eval mode (an inference object; see
        its documentation).

    Raises:
        TypeError: ``preprocess`` of another type.
        ValueError: ``preprocess`` values that are not valid, or that contradict the
            number of channels the model takes.
    """
    if split is None and not isinstance(model, nn.Module):
        raise TypeError(f"wrap takes an nn.Module, got {type(model).__name__}")
    resolved = resolve_plugins(plugins)
    # Read before the split: the adapters take the model apart.
    record = resolve(preprocess, model if split is None else split.backbone)
    if split is None:
        assert isinstance(model, nn.Module)  # refused above otherwise
        target = model if inplace else copy.deepcopy(model)
        split = split_at(target, head) if head is not None else find_split(target)
    elif not inplace:
        split = _copy_split(split)
    wrapped = build(split, resolved, stacklevel=3)
    if preprocess is None and record is not None:
        record = fit_to_model(record, wrapped.input_shape, wrapped.fixed_input_size)
    wrapped.preprocess = record
    return wrapped
