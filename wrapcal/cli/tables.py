"""Plain-text tables for the terminal."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["plugin_rows", "print_table"]


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
    with ``params``, the parameters with their defaults)."""
    last = "parameters" if params else "description"
    rows = [
        [
            info.name,
            info.version or "-",
            info.package or "-",
            _parameters(info.factory) if params else info.description,
        ]
        for info in sorted(registry.values(), key=lambda i: i.name)
    ]
    return ["name", "version", "package", last], rows
