"""The data flags of ``wrapcal evaluate``, read through :mod:`wrapcal.datasets`, with the
checks a fit needs: class order, label range and class coverage."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from wrapcal.cli.errors import CliError, in_cli_terms
from wrapcal.datasets import ImageSettings, Loaded, check_class_order, read_spec
from wrapcal.datasets.specs import concat_inputs

__all__ = [
    "check_coverage",
    "check_label_range",
    "first_inputs",
    "read",
    "read_class_names",
    "read_ood",
    "read_unlabeled",
    "reconcile_classes",
    "relayed",
    "say",
]


def say(command: str, kind: str, message: str) -> None:
    """One line on stderr: ``wrapcal evaluate: warning: ...``."""
    print(f"wrapcal {command}: {kind}: {message}", file=sys.stderr)


@contextmanager
def relayed(command: str, plugins: list[str]) -> Iterator[None]:
    """Library warnings as ``wrapcal <command>: warning:`` lines, in the command's terms,
    also when the block fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                text = " ".join(str(warning.message).split())
                say(command, "warning", in_cli_terms(text, plugins))


def read(
    spec: str,
    role: str,
    flag: str,
    settings: ImageSettings,
    split: str | None = None,
    split_flag: str = "",
    like: Loaded | None = None,
) -> Loaded:
    """One data flag's set, with messages that start with the flag.

    ``split`` is the value of ``split_flag`` when the user gave it (then it must exist),
    else ``None`` (the role's name is tried, then the file's conventional names).
    """
    return read_spec(
        spec,
        role,
        settings,
        split=split or role,
        strict_split=split is not None,
        like=like,
        where=f"{flag} {spec}",
        split_option=split_flag,
    )


def read_ood(items: list[str], settings: ImageSettings, test: Loaded) -> dict[str, Any]:
    """``--ood [NAME=]SPEC`` (repeatable) -> name -> data, shaped like the test set."""
    ood: dict[str, Any] = {}
    for item in items:
        name, eq, spec = item.partition("=")
        if not eq:
            name, spec = Path(item).stem.split(".")[0] or item, item
        if not name or not spec:
            raise CliError(f"--ood {item!r}: use NAME=SPEC, e.g. --ood noise=gaussian")
        if name in ood:
            raise CliError(f"--ood: two OOD sets are named {name!r}; name them NAME=SPEC")
        ood[name] = read(spec, "ood", "--ood", settings, like=test).data
    return ood


def read_unlabeled(
    specs: list[str], settings: ImageSettings, test: Loaded, split: str | None
) -> tuple[Any, int]:
    """``--unlabeled SPEC`` (repeatable): the sets' inputs mixed into one, and its size."""
    parts = [
        read(spec, "unlabeled", "--unlabeled", settings, split, "--unlabeled-split", test)
        for spec in specs
    ]
    return concat_inputs(parts), sum(p.n for p in parts)


def read_class_names(text: str | None) -> list[str] | None:
    """``--class-names``: ``a,b,c`` or ``@FILE`` with one name per line."""
    if text is None:
        return None
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise FileNotFoundError(f"--class-names: file not found: {path}")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [n.strip() for n in text.split(",")]
    if not names or any(not n for n in names):
        raise CliError(
            f"--class-names {text!r}: give the model's class names in output order, "
            "comma-separated (cat,dog) or @FILE with one per line"
        )
    if len(set(names)) != len(names):
        raise CliError("--class-names: a name appears twice; each class needs its own name")
    return names


def reconcile_classes(
    loaded: Loaded,
    flag: str,
    reference: Sequence[str] | None,
    source: str,
    command: str,
) -> Loaded:
    """Check a labelled set's class names (folders, ``classes`` array) against the model's.

    A set whose names are all among the reference's is renumbered by name; otherwise a
    warning says what differs. An ImageFolder without a reference gets a note on its
    alphabetical class order (and a warning when its folders are numbered).
    """
    names = loaded.class_names
    if names is None or loaded.kind in ("digits", "noise"):
        return loaded
    if reference is not None and list(names) == list(reference):
        return loaded
    if reference is None:
        if loaded.kind != "folder":
            return loaded
        result = check_class_order(names, None)
        for text in result.warnings:
            say(command, "warning", f"{flag}: {text} (--class-names)")
        if not result.warnings:
            shown = ", ".join(f"{i}={n}" for i, n in enumerate(names[:6]))
            say(
                command,
                "note",
                f"{flag}: class indices follow alphabetical folder order ({shown}"
                f"{', ...' if len(names) > 6 else ''}); give the model's class names with "
                "--class-names to check them",
            )
        return loaded
    result = check_class_order(names, reference)
    for text in result.warnings:
        say(command, "warning", f"{flag}: {text} (the model's classes from {source})")
    if result.mapping is not None and not result.same:
        return loaded.relabel(result.mapping)
    return loaded


def check_label_range(loaded: Loaded, flag: str, num_classes: int) -> None:
    """Labels must name one of the model's classes."""
    if loaded.labels is not None and len(loaded.labels) and int(loaded.labels.max()) >= num_classes:
        raise CliError(
            f"{flag}: labels reach {int(loaded.labels.max())} but the model has {num_classes} "
            f"classes (0 to {num_classes - 1}); check --num-classes and the data"
        )


def check_coverage(loaded: Loaded, flag: str, num_classes: int, allow: bool) -> str | None:
    """Labels that cover only some of the model's classes skew a fit toward those present.

    Returns:
        The warning to repeat after the results when ``allow`` (``None`` if every class
        is present).

    Raises:
        CliError: Classes are missing and ``allow`` is false.
    """
    if loaded.labels is None:
        return None
    present = set(torch.unique(loaded.labels).tolist())
    missing = [k for k in range(num_classes) if k not in present]
    if not missing:
        return None
    shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
    text = (
        f"{flag} labels cover {num_classes - len(missing)} of the model's {num_classes} "
        f"classes (missing: {shown}); a fit on them is skewed toward the classes present "
        "(in one such case ECE rose from 12.6% to 54.5%)"
    )
    if not allow:
        raise CliError(
            f"{text}. Give data that covers every class, or pass --allow-partial-classes "
            "to fit anyway"
        )
    return text


def first_inputs(data: Any, count: int = 2) -> torch.Tensor:
    """The first ``count`` inputs of a set, for a probe pass."""
    if isinstance(data, tuple):
        return data[0][:count]
    if isinstance(data, torch.Tensor):
        return data[:count]
    items = [data[i] for i in range(min(count, len(data)))]
    return torch.stack([i[0] if isinstance(i, (tuple, list)) else i for i in items])
