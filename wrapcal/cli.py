"""The ``wrapcal`` command: ``demo``, ``evaluate`` and ``plugins``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from wrapcal.errors import WrapcalError


def _cmd_plugins(args: argparse.Namespace) -> int:
    from wrapcal.manager import autoload_disabled, plugin_registry

    registry = plugin_registry()
    if not registry:
        note = " (entry-point loading is off)" if autoload_disabled() else ""
        print(f"no plugins installed{note}")
        return 0
    rows = [("name", "version", "package", "description")] + [
        (i.name, i.version or "-", i.package or "-", i.description)
        for i in sorted(registry.values(), key=lambda i: i.name)
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3])
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from wrapcal.demo import run_demo

    run_demo(out=args.out, progress=not args.no_progress, seed=args.seed)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from wrapcal.report.cli import run_evaluate

    return run_evaluate(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``wrapcal`` command."""
    parser = argparse.ArgumentParser(
        prog="wrapcal",
        description="Retrofit calibration, uncertainty and OOD detection onto classifiers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the whole pipeline on scikit-learn's bundled digits")
    demo.add_argument("--out", default="wrapcal-demo-report", help="report directory")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_cmd_demo)

    plugins = sub.add_parser("plugins", help="list installed plugins")
    plugins.set_defaults(func=_cmd_plugins)

    try:
        from wrapcal.report.cli import add_evaluate_arguments
    except ImportError:
        add_evaluate_arguments = None
    if add_evaluate_arguments is not None:
        evaluate = sub.add_parser("evaluate", help="calibration and OOD report for a model")
        add_evaluate_arguments(evaluate)
        evaluate.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wrapcal`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (WrapcalError, FileNotFoundError, ValueError) as err:
        print(f"wrapcal {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
