"""Plain-text tables for the terminal."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["clash_notes", "plugin_rows", "print_table"]


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell; the last column is not padded."""
    table = [list(header), *map(list, rows)]
    widths = [max(len(r[c]) for r in table) for c in range(len(header) - 1)]
    for row in table:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())


def _parameters(factory: Any) -> str:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return "?"
    shown = []
    for name, p in signature.parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        shown.append(name if p.default is p.empty else f"{name}={p.default!r}")
    return ", ".join(shown) or "-"


def plugin_rows(registry: Mapping[str, Any], params: bool = False) -> tuple[list[str], list]:
    """The rows of ``wrapcal plugins``: name, version, package and the description (or,
    with ``params``, the parameters with their defaults).

    ``registry`` maps the names ``wrap`` takes to their :class:`PluginInfo`
    (:func:`wrapcal.model.discovery.plugin_registry`). A name several packages register
    is listed once per package, qualified (``wrapcal:temperature``), and its last cell
    starts with ``[clash]``; rows of one name stand together, the built-in first.
    """
    last = "parameters" if params else "description"
    rows = []
    for key, info in sorted(
        registry.items(), key=lambda kv: (kv[1].name, not kv[1].builtin, kv[0])
    ):
        text = _parameters(info.factory) if params else info.description
        if key != info.name:  # qualified: the plain name is shared
            text = f"[clash] {text}".rstrip()
        rows.append([key, info.version or "-", info.package or "-", text])
    return ["name", "version", "package", last], rows


def clash_notes(clashes: Mapping[str, Sequence[Any]]) -> list[str]:
    """One line per shared plugin name: who registers it and how to pick each."""
    notes = []
    for name, infos in sorted(clashes.items()):
        packages = ", ".join(info.package or info.source for info in infos)
        choices = " or ".join(info.qualified_name for info in infos)
        notes.append(
            f"[clash] {name} is registered by {len(infos)} packages ({packages}): plain "
            f"{name} is refused; use {choices}"
        )
    return notes
