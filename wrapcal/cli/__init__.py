"""The ``wrapcal`` command: ``demo``, ``evaluate``, ``fit``, ``export``, ``monitor`` and
``plugins``.

Every bad input ends the command with exit code 2 and one line on stderr,
``wrapcal <command>: error: <what is wrong and how to fix it>``, in the command
line's own terms (its flags, never a Python call); never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from wrapcal.cli.errors import CliError, one_line
from wrapcal.errors import WrapcalError

__all__ = ["build_parser", "main"]


class UsageError(Exception):
    """A flag argparse refused; carries the parser's program name."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) and no ``sys.exit``."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def _cmd_plugins(args: argparse.Namespace) -> int:
    from wrapcal.cli.tables import clash_notes, plugin_rows, print_table
    from wrapcal.model.discovery import (
        DISABLE_AUTOLOAD_ENV,
        autoload_disabled,
        clashes,
        plugin_registry,
    )

    registry = plugin_registry()
    off = f"third-party plugins are not loaded: {DISABLE_AUTOLOAD_ENV} is set"
    if not registry:
        print(f"no plugins installed{f' ({off})' if autoload_disabled() else ''}")
        return 0
    header, rows = plugin_rows(registry, params=args.params)
    print_table(header, rows)
    notes = clash_notes(clashes())
    if autoload_disabled():
        notes.append(off)
    if notes:
        print()
        print("\n".join(notes))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from wrapcal.cli.demo import run_demo
    from wrapcal.cli.targets import check_report_dir

    check_report_dir(args.out)  # before the training, not after it

    run_demo(out=args.out, progress=not args.no_progress, seed=args.seed)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from wrapcal.cli.evaluate import run

    return run(args)


def _cmd_fit(args: argparse.Namespace) -> int:
    from wrapcal.cli.fit import run

    return run(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from wrapcal.cli.export import run

    return run(args)


def _cmd_monitor(args: argparse.Namespace) -> int:
    from wrapcal.cli.monitor import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``wrapcal`` command."""
    from wrapcal.cli.options import add_evaluate_arguments, add_fit_command_arguments, at_least

    parser = _Parser(
        prog="wrapcal",
        description="Retrofit calibration, uncertainty and OOD detection onto classifiers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="the whole pipeline on scikit-learn's bundled digits")
    demo.add_argument("--out", default="wrapcal-demo-report", help="report directory")
    demo.add_argument("--seed", type=at_least(0), default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_cmd_demo)

    plugins = sub.add_parser("plugins", help="list installed plugins")
    plugins.add_argument(
        "--params",
        action="store_true",
        help="list each plugin's parameters and defaults (for evaluate --plugin-arg)",
    )
    plugins.set_defaults(func=_cmd_plugins)

    evaluate = sub.add_parser("evaluate", help="calibration and OOD report for a model")
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_evaluate)

    fit = sub.add_parser("fit", help="wrap a model with plugins, fit them and save it")
    add_fit_command_arguments(fit)
    fit.set_defaults(func=_cmd_fit)

    from wrapcal.cli.export import add_export_arguments

    export = sub.add_parser("export", help="a saved model as one ONNX or torch.export file")
    add_export_arguments(export)
    export.set_defaults(func=_cmd_export)

    from wrapcal.cli.monitor import add_monitor_arguments

    monitor = sub.add_parser(
        "monitor", help="a saved model over windows of traffic: estimates, drift, alerts"
    )
    add_monitor_arguments(monitor)
    monitor.set_defaults(func=_cmd_monitor)
    return parser


def _plugin_names() -> list[str]:
    from wrapcal.model.discovery import plugin_registry

    try:
        return list(plugin_registry())
    except Exception:  # a broken plugin package must not hide the error being reported
        return []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wrapcal`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra:  # said by the command they were given to, not by "wrapcal"
            raise UsageError(
                f"wrapcal {args.command}", f"unrecognized arguments: {' '.join(extra)}"
            )
    except UsageError as err:
        print(f"{err.prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (CliError, WrapcalError, OSError, ValueError, TypeError, LookupError) as err:
        print(f"wrapcal {args.command}: error: {one_line(err, _plugin_names())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wrapcal {args.command}: interrupted", file=sys.stderr)
        return 130
