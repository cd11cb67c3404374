"""The order plugins act in: by stage, then by declared ``after`` / ``before``, then name.

The same plugins in any list order give the same model: the list order is never used.
Nor does what else is installed: the name that breaks ties is the plain one
(``temperature``), not the qualified one an instance gets while another package
registers the same name (``wrapcal:temperature``).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from wrapcal.plugin.base import Plugin, get_tags
from wrapcal.plugin.types import Stage

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


def _tie_break(name: str) -> tuple[str, str]:
    """The key that orders plugins free to go next: the plain name, then the full one.

    An instance's name is qualified only while another package registers its plain name,
    so sorting on the full name would let an unrelated install reorder a user's plugins
    (``"wrapcal:temperature"`` sorts after ``"vector_scaling"``, ``"temperature"`` before).
    """
    return name.rpartition(":")[2], name


def order_plugins(plugins: Sequence[tuple[str, Plugin]]) -> list[tuple[str, Plugin]]:
    """Sort ``(name, plugin)`` pairs into the order they act in.

    Stages come in :class:`~wrapcal.Stage` order. Inside a stage a plugin comes after
    the plugins it names in its tags' ``after`` and before those in ``before`` (names
    of plugins that are absent are ignored here: :func:`wrapcal.wrap` refuses names no
    installed plugin has); among plugins free to go next, the smallest plain name goes
    first (``"wrapcal:temperature"`` sorts as ``"temperature"``), then the smallest full
    name, so installing a package that shares a name never reorders a wrap's plugins.

    Raises:
        ValueError: Two plugins share a name, or ``after`` / ``before`` form a cycle.
    """
    names = [name for name, _ in plugins]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(
            f"plugin {twice[0]} is listed twice; give it once (with all its parameters)"
        )
    by_stage: dict[Stage, list[tuple[str, Plugin]]] = {}
    for name, plugin in plugins:
        by_stage.setdefault(get_tags(plugin).stage, []).append((name, plugin))
    ordered: list[tuple[str, Plugin]] = []
    for stage in sorted(by_stage):
        ordered += _within_stage(by_stage[stage])
    return ordered


def _within_stage(group: list[tuple[str, Plugin]]) -> list[tuple[str, Plugin]]:
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
    ready = [_tie_break(name) for name, deps in needs.items() if not deps]
    heapq.heapify(ready)
    out: list[tuple[str, Plugin]] = []
    while ready:
        _, name = heapq.heappop(ready)
        out.append((name, present[name]))
        for other, deps in needs.items():
            if name in deps:
                deps.discard(name)
                if not deps:
                    heapq.heappush(ready, _tie_break(other))
    if len(out) != len(group):
        stuck = sorted(set(present) - {name for name, _ in out})
        raise ValueError(
            f"plugins {', '.join(stuck)} name each other in after=/before= in a cycle; "
            "drop one of the constraints"
        )
    return out
