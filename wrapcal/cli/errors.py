"""The command line's own errors, and the library's errors in the command line's terms.

The library speaks Python (``wrapped.fit(calibration=...)``, ``pass (X, y)``); a user
of ``wrapcal evaluate`` gave flags. :func:`in_cli_terms` rewrites what a library message
asks for into the flags that give it, so no message asks for a Python call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

__all__ = ["FIT_FLAGS", "CliError", "fit_flag", "in_cli_terms", "one_line"]

#: The ``fit`` data sets the command line gives, by the flag that gives each.
FIT_FLAGS = {"train": "--train", "calibration": "--calibration", "unlabeled": "--unlabeled"}


class CliError(ValueError):
    """Bad command-line input; the message names the flag and the fix."""


def fit_flag(name: str) -> str:
    """The flag that gives the ``fit`` data set ``name``."""
    return FIT_FLAGS.get(name, f"--fit-data {name}=SPEC")


def _fit_call(match: re.Match[str]) -> str:
    names = re.findall(r"(\w+)=", match.group(2))
    flags = [fit_flag(n) for n in names] or ["the data flags (--train, --calibration...)"]
    joiner = " or " if " or " in match.group(2) else " and "
    return ("give " if match.group(1) else "") + joiner.join(flags)


_REWRITES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    # "needs wrapped.fit(calibration=...)", "call wrapped.fit(train=(X, y), unlabeled=...)"
    (re.compile(r"(call )?(?:wrapped\.)?fit\(((?:[^()]|\([^()]*\))*)\)"), _fit_call),
    (
        re.compile(r"pass \(X, y\) or a loader that yields \(x, y\) batches"),
        "give labelled data (an .npz with labels, an IDX images file with its labels "
        "file, an ImageFolder directory or digits)",
    ),
    (
        re.compile(r"pass labelled data, e\.g\. \(X, y\) or a DataLoader yielding \(x, y\)"),
        "give labelled data with --data",
    ),
    (re.compile(r" or pass a plugin instance"), ""),
    (re.compile(r"convert the images to (\d+) channels"), r"add --channels \1"),
    (re.compile(r"one mean/std value"), "one --mean/--std value"),
    (
        re.compile(r"\(wrapped\.check_inputs = False[^)]*\)"),
        "(check the image files)",
    ),
    (re.compile(r"input_shape=\((?:C, H, W|channels, height, width)\)"), "--input-shape C,H,W"),
    (
        re.compile(
            r"fit the model again to measure them, or set wrapped\.operating_points = None "
            r"to export without them"
        ),
        "fit and save the model again to measure them",
    ),
    (
        re.compile(r"pass it: wrapcal\.load\(path, (model|split)=[^;]*\)\)?"),
        "the command line cannot rebuild it: evaluate it from Python, passing the model "
        "to wrapcal.load",
    ),
]


_PARAM = re.compile(r"\b([Pp]ass|[Ss]et|[Uu]se) (\w+)=(True|False|None|[\w.+\-]+|'[^']*')")
_PYTHON_JSON = {"True": "true", "False": "false", "None": "null"}


def in_cli_terms(message: str, plugins: Iterable[str] = ()) -> str:
    """A library message with its Python calls replaced by the flags that do the same.

    Args:
        message: The library's message.
        plugins: Plugin names: a message about one of them that says ``pass
            finetune=True`` says ``pass --plugin-arg mc_dropout.finetune=true``.
    """
    for pattern, replacement in _REWRITES:
        message = pattern.sub(replacement, message)
    about = next((p for p in plugins if re.match(rf"(plugin )?{re.escape(p)}\b", message)), None)
    if about is not None:

        def param(match: re.Match[str]) -> str:
            value = _PYTHON_JSON.get(match.group(3), match.group(3).strip("'"))
            return f"{match.group(1)} --plugin-arg {about}.{match.group(2)}={value}"

        message = _PARAM.sub(param, message)
    return message


def one_line(err: BaseException, plugins: Iterable[str] = ()) -> str:
    """An exception as one line of text, in the command line's terms."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    return in_cli_terms(" ".join(text.split()), plugins)
