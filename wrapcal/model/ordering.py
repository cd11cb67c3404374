"""The order plugins act in: by stage, then by declared ``after`` / ``before``, then name.

The same plugins in any list order give the same model: the list order is never used.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

from wrapcal.plugin.base import get_tags

__all__ = ["order_plugins", "refers_to"]


def refers_to(reference: str, name: str) -> bool:
    """Whether a name in ``after`` / ``before`` means the plugin listed as ``name``.

    Either may be qualified by its package (``"wrapcal:temperature"``): a plain
    reference means every listed plugin of that name, a qualified one the plugin listed
    under it or under its plain name (a plain name in a wrap's list is one only one
    package registers; the core checks that a qualified reference is installed).
    """
    if reference == name:
        return True
    plain_reference = reference.rpartition(":")[2]
    if ":" in reference:
        return ":" not in name and plain_reference == name
    return name.rpartition(":")[2] == reference


def order_plugins(plugins: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Sort ``(name, plugin)`` pairs into the order they act in.

    Stages come in :class:`~wrapcal.Stage` order. Inside a stage a plugin comes after
    the plugins it names in its tags' ``after`` and before those in ``before`` (names
    of plugins that are absent are ignored here: :func:`wrapcal.wrap` refuses names no
    installed plugin has); among plugins free to go next, the smallest name goes first.

    Raises:
        ValueError: Two plugins share a name, or ``after`` / ``before`` form a cycle.
    """
    names = [name for name, _ in plugins]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(
            f"plugin {twice[0]} is listed twice; give it once (with all its parameters)"
        )
    by_stage: dict[Any, list[tuple[str, Any]]] = {}
    for name, plugin in plugins:
        by_stage.setdefault(get_tags(plugin).stage, []).append((name, plugin))
    ordered: list[tuple[str, Any]] = []
    for stage in sorted(by_stage):
        ordered += _within_stage(by_stage[stage])
    return ordered


def _within_stage(group: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    present = {name: plugin for name, plugin in group}
    needs: dict[str, set[str]] = {name: set() for name in present}
    for name, plugin in group:
        tags = get_tags(plugin)
        for reference in tags.after:
            for other in present:
                if other != name and refers_to(reference, other):
                    needs[name].add(other)
        for reference in tags.before:
            for other in present:
                if other != name and refers_to(reference, other):
                    needs[other].add(name)
    ready = [name for name, deps in needs.items() if not deps]
    heapq.heapify(ready)
    out: list[tuple[str, Any]] = []
    while ready:
        name = heapq.heappop(ready)
        out.append((name, present[name]))
        for other, deps in needs.items():
            if name in deps:
                deps.discard(name)
                if not deps:
                    heapq.heappush(ready, other)
    if len(out) != len(group):
        stuck = sorted(set(present) - {name for name, _ in out})
        raise ValueError(
            f"plugins {', '.join(stuck)} name each other in after=/before= in a cycle; "
            "drop one of the constraints"
        )
    return out
