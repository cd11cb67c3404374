"""What can be exported, checked before tracing, and which plugin stops a failed trace.

A plugin declares ``tags.exportable = True`` when its inference path (``features``,
``members``, ``transform_logits``, ``outputs``) is plain tensor operations
(docs/export.md). :func:`check_exportable` refuses the others up front, naming each
with what it needs to provide. A plugin that declares itself exportable but whose
trace fails anyway is found by :func:`find_culprit`: the plugin part of the chain is
traced from backbone features, one plugin more at a time, which costs no backbone.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from wrapcal import distributed
from wrapcal.errors import WrapcalError
from wrapcal.plugin.base import Plugin, get_tags

if TYPE_CHECKING:
    from wrapcal.model.wrapped import WrappedModel

__all__ = ["ExportError", "check_exportable", "describe_plugin", "find_culprit", "first_line"]

#: Where the contract for exportable plugins is written down.
GUIDE = "docs/export.md"


class ExportError(WrapcalError, ValueError):
    """A wrapped model cannot be exported; the message names the plugin and the fix."""


def first_line(err: BaseException) -> str:
    """The first line of the innermost error's message (torch's run to pages, and the
    ONNX exporter's outer error only says which step failed), colour codes removed."""
    while err.__cause__ is not None and str(err.__cause__).strip():
        err = err.__cause__
    for line in str(err).splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
        if line:
            return line
    return type(err).__name__


def describe_plugin(name: str, plugin: Plugin) -> str:
    """``plugin <name>`` with the parameters that differ from its class's defaults
    (tags may depend on them: ``mc_dropout (scope='all')``)."""
    defaults = {
        key: p.default
        for key, p in inspect.signature(type(plugin).__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    changed = [
        f"{key}={value!r}"
        for key, value in plugin.get_params().items()
        if key not in defaults or defaults[key] != value
    ]
    return f"plugin {name}" + (f" ({', '.join(changed)})" if changed else "")


def _reason(name: str, plugin: Plugin) -> str:
    tags = get_tags(plugin)
    who = describe_plugin(name, plugin)
    if tags.export_refusal:
        return f"{who} {tags.export_refusal}"
    if tags.needs_inputs:
        return (
            f"{who} runs the network on the inputs at every call (its tags say "
            "needs_inputs=True: it samples the backbone with fresh random draws), which a "
            "fixed graph cannot reproduce; choose the plugin's parameters that act on the "
            "features or logits only (their tags say exportable=True)"
        )
    return (
        f"{who} ({type(plugin).__module__}.{type(plugin).__qualname__}) does not declare "
        "an exportable inference path; it must compute features/members/transform_logits/"
        "outputs with plain tensor operations (no .item(), numpy, data-dependent Python "
        "branches or in-place changes of its inputs) and set tags.exportable = True "
        f"({GUIDE})"
    )


def check_exportable(wrapped: WrappedModel) -> None:
    """Refuse a model with a plugin that is not exportable, naming every such plugin.

    Raises:
        ExportError: The model's plugins that cannot be exported and what each needs.
        NotFittedError: A plugin still needs ``fit``.
    """
    wrapped.check_is_fitted()
    distributed.check_whole(wrapped, "export")
    reasons = [
        _reason(name, plugin)
        for name, plugin in zip(wrapped.plugin_names, wrapped.plugins, strict=True)
        if not get_tags(plugin).exportable
    ]
    if reasons:
        raise ExportError("cannot export this model: " + "; ".join(reasons))


def find_culprit(wrapped: WrappedModel, attempt: Callable[[int], None]) -> str | None:
    """The first plugin whose addition makes ``attempt`` fail, described, or ``None``.

    Args:
        wrapped: The wrapped model.
        attempt: ``attempt(upto)`` traces the plugin part of the chain with the first
            ``upto`` plugins (from backbone features) and raises if it cannot.
    """
    for upto, (name, plugin) in enumerate(
        zip(wrapped.plugin_names, wrapped.plugins, strict=True), start=1
    ):
        try:
            attempt(upto)
        except Exception:
            return describe_plugin(name, plugin)
    return None
