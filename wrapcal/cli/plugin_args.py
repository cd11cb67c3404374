"""``--plugins`` and ``--plugin-arg``: plugins created from the command line, checked.

``--plugin-arg PLUGIN.PARAMETER=VALUE`` (repeatable) sets one parameter of one of the
``--plugins``; for a plugin name two packages register, both take the qualified name
(``--plugins otherpkg:temperature --plugin-arg otherpkg:temperature.max_iter=50``).
The value is read as JSON when it parses (``50``, ``0.05``, ``true``, ``null``,
``[0, 0.05, 0.1]``, ``"text"``), as Python's ``True``/``False``/``None``, and otherwise
as a plain string (``auto``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from wrapcal.cli.errors import CliError
from wrapcal.errors import WrapcalError

__all__ = ["create_plugins", "parse_plugin_args", "parse_value"]

# PLUGIN may be qualified by its package, whose name may hold dots: "my.pkg:knn.k=50"
# (the parameter is what follows the last dot before "=").
_FORM = re.compile(
    r"(?P<plugin>[A-Za-z_][\w\-.]*(?::[A-Za-z_][\w\-]*)?)\.(?P<key>[A-Za-z_]\w*)=(?P<value>.*)\Z",
    re.S,
)
_PYTHON = {"True": True, "False": False, "None": None}
_EXAMPLE = "e.g. --plugin-arg temperature.max_iter=50"


def parse_value(text: str) -> Any:
    """A value as written on the command line: JSON, Python's constants, or a string."""
    if text in _PYTHON:
        return _PYTHON[text]
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, float) and value != value:  # NaN never makes a parameter
        return text
    return value


def parse_plugin_args(items: list[str], plugins: list[str]) -> dict[str, dict[str, Any]]:
    """``["temperature.max_iter=50"]`` -> ``{"temperature": {"max_iter": 50}}``.

    Raises:
        CliError: A bad form, a plugin not among ``plugins`` or a parameter set twice.
    """
    params: dict[str, dict[str, Any]] = {name: {} for name in plugins}
    for item in items:
        match = _FORM.match(item)
        if match is None:
            raise CliError(f"--plugin-arg {item!r}: use PLUGIN.PARAMETER=VALUE, {_EXAMPLE}")
        plugin, key = match["plugin"], match["key"]
        if plugin not in params:
            # "temperature.x=1" for "--plugins otherpkg:temperature": one listed plugin
            # has that plain name, so the qualifier would only repeat itself.
            same = [name for name in plugins if name.rpartition(":")[2] == plugin]
            plugin = same[0] if len(same) == 1 and ":" not in plugin else plugin
        if plugin not in params:
            listed = ", ".join(plugins) or "none"
            raise CliError(
                f"--plugin-arg {item!r}: {plugin} is not among --plugins ({listed}); add it "
                "to --plugins to set its parameters"
            )
        if key in params[plugin]:
            raise CliError(f"--plugin-arg: {plugin}.{key} is given twice; give it once")
        params[plugin][key] = parse_value(match["value"])
    return params


def _plugin_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if any(not n for n in names) and text.strip():
        raise CliError(
            f"--plugins {text!r}: an empty name; separate names by single commas, e.g. "
            "--plugins temperature,mc_dropout"
        )
    names = [n for n in names if n]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise CliError(f"--plugins: {name} is listed twice; list each plugin once")
    return names


def create_plugins(text: str, items: list[str]) -> list[tuple[str, Any]]:
    """Create the ``--plugins`` with their ``--plugin-arg`` parameters, checked now, so a
    misspelt name or parameter fails before any data is read.

    Returns:
        ``(name, plugin)`` pairs in the order given.

    Raises:
        CliError: Unknown plugin, bad form, unknown parameter or a value the plugin
            does not accept; the message names the flag.
    """
    from wrapcal.model.assemble import create_plugin

    names = _plugin_names(text)
    params = parse_plugin_args(items, names)
    created = []
    for name in names:
        given = params[name]
        shown = " ".join(f"{name}.{k}={json.dumps(v)}" for k, v in given.items())
        try:
            created.append((name, create_plugin(name, given)))
        except LookupError as err:  # PluginNotFoundError
            raise CliError(f"--plugins: {err}") from None
        except (TypeError, ValueError, WrapcalError) as err:
            raise CliError(f"--plugin-arg {shown}: {err}") from None
    return created
