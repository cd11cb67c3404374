"""Declared constraints on plugin parameters and learned values, checked with one message.

A plugin declares ``_parameter_constraints = {"max_iter": [Interval(int, 1, None)]}``
(and ``_state_constraints`` for the plain values it learns); the core checks them when
a plugin is created, wrapped or loaded from a file, so a bad value never reaches the
model. Each entry lists the accepted forms; a value passes if any of them accepts it.

Accepted forms: an :class:`Interval`, an :class:`Options`, ``None`` (the value may be
``None``), a type (``bool``, ``str``...), or a :class:`Check` with a predicate.
"""

from __future__ import annotations

import builtins
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, TypeAlias

__all__ = ["Check", "Constraint", "Interval", "Options", "describe", "suggest", "validate"]


@dataclass(frozen=True)
class Interval:
    """Numbers of a type within bounds (``None``: unbounded on that side).

    ``closed`` says which ends are included: ``"both"``, ``"left"``, ``"right"`` or
    ``"neither"``. ``int`` accepts integers (not bools); ``float`` accepts any real
    number except bools, and never NaN or inf.
    """

    type: type
    low: float | None
    high: float | None
    closed: str = "both"

    def accepts(self, value: object) -> bool:
        if isinstance(value, bool):
            return False
        if self.type is int and not isinstance(value, Integral):
            return False
        if not isinstance(value, Real):
            return False
        # Compared as a float: the bounds are floats, and numbers.Real declares no order.
        number = float(value)
        if not math.isfinite(number):
            return False
        low_ok = self.low is None or (
            number >= self.low if self.closed in ("both", "left") else number > self.low
        )
        high_ok = self.high is None or (
            number <= self.high if self.closed in ("both", "right") else number < self.high
        )
        return low_ok and high_ok

    def __str__(self) -> str:
        kind = "an int" if self.type is int else "a number"
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{kind} in {left}{low}, {high}{right}"


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values of a type."""

    type: type
    values: frozenset[object]

    # builtins.type: inside the class body, ``type`` names the field above.
    def __init__(self, type_: builtins.type, values: Iterable[object]) -> None:
        object.__setattr__(self, "type", type_)
        object.__setattr__(self, "values", frozenset(values))

    def accepts(self, value: object) -> bool:
        return isinstance(value, self.type) and value in self.values

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(v) for v in sorted(self.values, key=repr))


@dataclass(frozen=True)
class Check:
    """Any value for which ``predicate(value)`` is true; ``text`` says which."""

    predicate: Callable[[Any], bool]
    text: str

    def accepts(self, value: object) -> bool:
        try:
            return bool(self.predicate(value))
        except (TypeError, ValueError):
            return False

    def __str__(self) -> str:
        return self.text


#: One accepted form of a value: a type (``int``, ``str``...; ``bool`` is not an ``int``
#: here), ``None``, or an :class:`Interval`, :class:`Options` or :class:`Check`.
Constraint: TypeAlias = type | Interval | Options | Check | None


def _accepts(form: Constraint, value: object) -> bool:
    if form is None:
        return value is None
    if isinstance(form, type):
        if form is bool:
            return isinstance(value, bool)
        if form in (int, float) and isinstance(value, bool):
            return False
        return isinstance(value, form)
    return bool(form.accepts(value))


def describe(forms: Iterable[Constraint]) -> str:
    """The accepted forms in words."""
    words = []
    for form in forms:
        if form is None:
            words.append("None")
        elif isinstance(form, type):
            words.append(f"a {form.__name__}")
        else:
            words.append(str(form))
    return " or ".join(words)


def suggest(name: str, known: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest known name, or ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate(
    owner: str,
    values: Mapping[str, object],
    constraints: Mapping[str, list[Constraint]],
    what: str,
) -> None:
    """Check every value against its declared forms.

    Args:
        owner: Who the values belong to, for the message (``"plugin temperature"``).
        values: Name -> value.
        constraints: Name -> accepted forms; names without an entry are not checked.
        what: ``"parameter"`` or ``"learned value"``, for the message.

    Raises:
        ValueError: A value no form accepts; the message names the owner, the value
            and what is accepted.
    """
    for name, value in values.items():
        forms = constraints.get(name)
        if forms is None:
            continue
        if not any(_accepts(form, value) for form in forms):
            raise ValueError(
                f"{owner}: {what} {name}={value!r} is invalid; expected {describe(forms)}"
            )
