"""``wrapcal monitor``: a saved model watched over windows of traffic, with alerts and a
report over time.

Examples::

    wrapcal monitor model.wrapcal --traffic mon.npz --traffic tue.npz --reference cal.npz
    wrapcal monitor model.wrapcal --traffic stream/ --window-size 1000 --reference ref.json
    wrapcal monitor model.wrapcal --traffic day1=a.npz --traffic day2=b.npz --labels \\
        --reference cal.npz --save-reference ref.json --mlflow sqlite:///mlflow.db

Each ``--traffic`` is one window, in the order given (``NAME=SPEC`` names it); with
``--window-size N`` they are read as one stream cut into windows of ``N`` images.
``--reference`` is the calibration set (one pass, needed for the drift tests) or a
reference saved by ``--save-reference``. The report (``monitor.html``, ``monitor.md``,
``monitor.json``, ``figures/``) goes to ``--out``; ``--fail-on-alert`` exits with 1
when a rule fired (for a scheduled job). See docs/monitoring.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wrapcal.cli.errors import CliError
from wrapcal.cli.options import add_image_arguments, at_least, image_settings

__all__ = ["add_monitor_arguments", "run"]

COMMAND = "monitor"
_SPECS = (
    "an .npz file, an IDX images file, an ImageFolder directory or a saved Hugging Face dataset"
)


def _fraction(text: str) -> float | None:
    """An argparse type: a number in (0, 1), or ``off``."""
    if text.lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number in (0, 1) or off, got {text!r}"
        ) from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1) or off, got {value}")
    return value


def add_monitor_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``wrapcal monitor``."""
    parser.add_argument("model", help="a model saved with wrapped.save (a .wrapcal file)")
    data = parser.add_argument_group("traffic")
    data.add_argument(
        "--traffic",
        action="append",
        required=True,
        metavar="[NAME=]SPEC",
        help=f"one window of traffic ({_SPECS}, or 'digits'); repeatable, in time order",
    )
    data.add_argument(
        "--window-size",
        type=at_least(1),
        help="read the --traffic sets as one stream cut into windows of N images",
    )
    data.add_argument(
        "--labels",
        action="store_true",
        help="the traffic is labelled: report realised accuracy, ECE and the estimate's error",
    )
    data.add_argument(
        "--reference",
        help="the calibration set (same forms; needed for the drift tests) or a reference "
        "saved with --save-reference (.json); default: the model's operating points",
    )
    data.add_argument("--save-reference", help="write the reference's summary to this .json")
    rules = parser.add_argument_group("alert rules ('off' switches one off)")
    rules.add_argument("--min-accuracy", type=_fraction, help="alert below this estimate")
    rules.add_argument(
        "--max-drop",
        type=_fraction,
        default=0.05,
        help="alert when the estimate is this far below the calibration set's (default 0.05)",
    )
    rules.add_argument(
        "--ood-alpha",
        type=_fraction,
        default=0.01,
        help="level of the binomial test of the OOD rate (default 0.01)",
    )
    rules.add_argument(
        "--drift-alpha",
        type=_fraction,
        default=0.01,
        help="level of the KS drift tests, shared among the scores (default 0.01)",
    )
    rules.add_argument(
        "--ood-score",
        default="auto",
        help="what counts as OOD: auto (the ood plugin's is_ood, else the first OOD "
        "score, else msp), a score name, or none",
    )
    add_image_arguments(parser)
    out = parser.add_argument_group("run and report")
    out.add_argument("--out", default="wrapcal-monitor", help="report directory")
    out.add_argument("--fail-on-alert", action="store_true", help="exit with 1 when any rule fired")
    out.add_argument("--mlflow", metavar="TRACKING_URI", help="log each window as a step")
    out.add_argument("--mlflow-experiment", default="wrapcal", help="MLflow experiment")
    out.add_argument("--batch-size", type=at_least(1), default=256, help="images per batch")
    out.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def _windows(args: argparse.Namespace, settings: Any) -> tuple[list[Any], list[str]]:
    from wrapcal.cli.inputs import read

    role = "test" if args.labels else "unlabeled"
    data, names = [], []
    for item in args.traffic:
        name, eq, spec = item.partition("=")
        if not eq:
            name, spec = Path(item).stem or item, item
        if not spec:
            raise CliError(f"--traffic {item!r}: use [NAME=]SPEC, e.g. --traffic day1=day1.npz")
        data.append(read(spec, role, "--traffic", settings).data)
        names.append(name)
    return data, names


def _reference(args: argparse.Namespace, settings: Any, wrapped: Any) -> Any:
    from wrapcal.cli.inputs import read
    from wrapcal.monitoring import Reference

    if args.reference is None:
        return None
    if args.reference.endswith(".json"):
        try:
            return Reference.load(args.reference)
        except FileNotFoundError:
            raise CliError(f"--reference {args.reference}: file not found") from None
        except ValueError as err:
            raise CliError(f"--reference {args.reference}: {err}") from None
    data = read(args.reference, "calibration", "--reference", settings).data
    return Reference.from_data(wrapped, data, batch_size=args.batch_size)


def run(args: argparse.Namespace) -> int:
    """Load, monitor, write the report; 1 with ``--fail-on-alert`` when a rule fired."""
    import wrapcal
    from wrapcal.cli.models import device as pick_device
    from wrapcal.cli.targets import check_input_path, check_report_dir
    from wrapcal.monitoring import AlertRules

    source = Path(args.model)
    if not source.exists():
        raise CliError(f"model file not found: {source} (give a .wrapcal file)")
    check_input_path(source, "the model file", directory_ok=False)
    out = check_report_dir(args.out, [source])
    if args.save_reference and not args.reference:
        raise CliError("--save-reference needs --reference SPEC (the calibration set to summarise)")
    if args.save_reference and args.reference.endswith(".json"):
        raise CliError("--save-reference: --reference is a saved reference already; copy the file")
    device = pick_device(args.device)
    rules = AlertRules(args.min_accuracy, args.max_drop, args.ood_alpha, args.drift_alpha)
    ood_score = None if args.ood_score.lower() == "none" else args.ood_score
    settings = image_settings(args)
    names: list[str] | None
    windows, names = _windows(args, settings)
    tracking = None
    if args.mlflow:
        from wrapcal.cli.tracking import open_run

        tracking = open_run(args.mlflow, args.mlflow_experiment)
    try:
        wrapped = wrapcal.load(source).to(device)
        reference = _reference(args, settings, wrapped)
        if args.save_reference and reference is not None:
            reference.save(args.save_reference)
        traffic: Any = windows
        if args.window_size:
            from torch.utils.data import ConcatDataset

            traffic = ConcatDataset([_as_dataset(d, args.labels) for d in windows])
            names = None
        result = wrapcal.monitor(
            wrapped,
            traffic,
            reference=reference,
            window_size=args.window_size,
            names=names,
            rules=rules,
            ood_score=ood_score,
            batch_size=args.batch_size,
        )
        result.save(out)
        print(result)
        for alert in result.alerts:
            print(f"ALERT {alert.name}: {alert.rule}: {alert.message}")
        print(f"\nreport written to {out / 'monitor.html'} (also monitor.md, monitor.json)")
        if tracking is not None:
            from wrapcal.monitoring.tracking import log_monitor

            log_monitor(result, tracking.run_id, tracking_uri=tracking.uri, directory=out)
            print(f"logged to MLflow ({tracking.uri}): run {tracking.run_id}, a step per window")
    except BaseException:
        if tracking is not None:
            tracking.finish(ok=False)
        raise
    if tracking is not None:
        tracking.finish(ok=True)
    return 1 if args.fail_on_alert and result.alerts else 0


def _as_dataset(data: Any, labelled: bool) -> Any:
    """One ``--traffic`` set as a Dataset, to join the others into one stream."""
    from torch.utils.data import TensorDataset

    if isinstance(data, tuple):
        return TensorDataset(*data) if labelled else TensorDataset(data[0])
    if hasattr(data, "shape"):
        return TensorDataset(data)
    return data
