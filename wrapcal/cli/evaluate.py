"""``wrapcal evaluate``: a calibration and OOD report for a model, from the command line.

Examples::

    wrapcal evaluate timm:resnet10t --data digits --ood noise=gaussian --out report
    wrapcal evaluate wrapcal:cifar_resnet20 --weights cifar10_resnet20.safetensors \\
        --data cifar10_jpeg.npz --ood mnist=t10k-images-idx3-ubyte.gz \\
        --plugins temperature --calibration cifar10_jpeg.npz --calibration-split train

The bare model is always evaluated (as ``baseline``); with ``--plugins`` it is also
wrapped, fitted and evaluated as ``wrapped``, and ``--save FILE`` saves that fitted
``wrapped`` model (the fit step is :mod:`wrapcal.cli.fit`'s, shared with ``wrapcal fit``).
A saved ``.wrapcal`` file is evaluated as ``wrapped``, beside its own backbone and head
without plugins as ``baseline``.

Every flag is checked before any data is read: the plugins and their parameters, the
model name, which data sets the plugins need (``wrapcal.model.fitting.read_sets``),
that every input path is a readable file or directory, that ``--out`` (and ``--save``) can
be written (:mod:`wrapcal.cli.targets`) and, with ``--mlflow``, that the tracking store takes a run
(:mod:`wrapcal.cli.tracking`: the run is created then, and logged into at the end).
docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import wrapcal.cli.fit as fit_step
import wrapcal.cli.inputs as inputs
import wrapcal.cli.models as models
import wrapcal.cli.targets as targets
from wrapcal.cli.errors import CliError
from wrapcal.cli.options import image_settings
from wrapcal.cli.plugin_args import create_plugins
from wrapcal.datasets import ImageSettings

__all__ = ["run"]

COMMAND = "evaluate"


def _check_flags(args: argparse.Namespace) -> tuple[list[tuple[str, Any]], dict, dict]:
    """Everything that can be checked without data: plugins and their parameters, the
    model spec and its arguments, the fit sets the plugins need. Returns the plugins,
    the model arguments and the fit plan."""
    plugins = create_plugins(args.plugins, args.plugin_arg)
    model_kwargs = models.parse_model_args(args.model_arg)
    if models.is_saved_file(args.model):
        if not Path(args.model).is_file():
            raise FileNotFoundError(f"model file not found: {args.model}")
        extra = [f for f, v in (("--plugins", plugins), ("--plugin-arg", args.plugin_arg),
                                ("--weights", args.weights), ("--model-arg", model_kwargs),
                                ("--num-classes", args.num_classes)) if v]  # fmt: skip
        if extra:
            raise CliError(
                f"a saved .wrapcal model already has its plugins, weights and classes; "
                f"{', '.join(extra)} apply to FAMILY:NAME models"
            )
        if args.save:
            raise CliError(
                f"--save: {args.model} is saved already; --save writes the model that "
                "--plugins fits on a FAMILY:NAME model"
            )
        return plugins, model_kwargs, {}
    if args.save and not plugins:
        raise CliError(
            "--save writes the fitted wrapped model and there is none without --plugins; "
            "name the plugins to fit, e.g. --plugins temperature"
        )
    models.check(args.model, model_kwargs)
    if args.weights and not Path(args.weights).exists():
        raise FileNotFoundError(f"--weights: weights file not found: {args.weights}")
    return plugins, model_kwargs, fit_step.fit_plan(args, plugins, _digits_default(args))


def _digits_default(args: argparse.Namespace) -> str | None:
    """With ``--data digits``, ``--train`` and ``--calibration`` default to the digits."""
    return "digits" if args.data == "digits" else None


def _input_paths(args: argparse.Namespace, plan: dict[str, Any]) -> list[tuple[str, str, Path]]:
    """Every path the command will read: the flag that gives it, what it is, the path."""
    found: list[tuple[str, str, Path]] = []
    if models.is_saved_file(args.model):
        found.append(("the model file", "model file", Path(args.model)))
    if args.weights:
        found.append(("--weights", "weights file", Path(args.weights)))
    if args.class_names and args.class_names.startswith("@"):
        found.append(("--class-names", "class names file", Path(args.class_names[1:])))
    specs = [("--data", "test", args.data)]
    for item in args.ood:
        _, eq, spec = item.partition("=")
        specs.append(("--ood", "ood", spec if eq and not Path(item).exists() else item))
    for flag, role, spec in specs:
        path = targets.data_path(spec)
        if path is not None:
            found.append((flag, f"{role} data", path))
    return found + fit_step.fit_paths(plan)


def _check_paths(args: argparse.Namespace, plan: dict[str, Any]) -> None:
    """Inputs readable (regular files or directories), ``--out`` writable and none of
    them: before any data is read."""
    paths = _input_paths(args, plan)
    for flag, what, path in paths:
        directory_ok = what.endswith(" data")
        targets.check_input_path(path, flag, directory_ok=directory_ok, what=what)
    targets.check_report_dir(args.out, [path for _, _, path in paths])
    if args.save:
        targets.check_save_file(args.save, [path for _, _, path in paths], args.out)


def evaluate(args: argparse.Namespace) -> Path:
    """Run the command; returns the report directory."""
    from wrapcal.cli.tracking import open_run

    plugins, model_kwargs, plan = _check_flags(args)
    _check_paths(args, plan)
    names = inputs.read_class_names(args.class_names)
    models.device(args.device)  # checked before reading data too
    settings = image_settings(args)
    # Last of the checks: it creates the run (a write, which a read-only store refuses).
    tracking = open_run(args.mlflow, args.mlflow_experiment) if args.mlflow else None
    try:
        out = _evaluate(args, plugins, model_kwargs, plan, names, settings, tracking)
    except BaseException:
        if tracking is not None:
            tracking.finish(ok=False)
        raise
    if tracking is not None:
        tracking.finish(ok=True)
    return out


def _evaluate(
    args: argparse.Namespace,
    plugins: list[tuple[str, Any]],
    model_kwargs: dict,
    plan: dict[str, Any],
    names: list[str] | None,
    settings: ImageSettings,
    tracking: Any,
) -> Path:
    """Read the data, fit, evaluate, write the report (and log it to ``tracking``)."""
    from wrapcal.report import evaluate as evaluate_models

    test = inputs.read(args.data, "test", "--data", settings, args.split, "--split")
    model = models.resolve(args, model_kwargs, test, f"--data {args.data}", names)
    test = inputs.reconcile_classes(test, "--data", model.reference, model.source, COMMAND)
    inputs.check_label_range(test, "--data", model.num_classes)
    models.check_input(model.saved or model.baseline, test, "--data")

    ood = inputs.read_ood(args.ood, settings, test)
    sets, _ = fit_step.read_fit_sets(plan, args, settings, test)
    data, loud = fit_step.check_fit_sets(sets, model, args.allow_partial_classes, COMMAND)

    runs: dict[str, Any] = {"baseline": model.baseline}
    saved = None
    if model.saved is not None:
        runs["wrapped"] = model.saved
    elif plugins:
        runs["wrapped"] = fit_step.wrap_and_fit(args, model.baseline, plugins, data, test)
        if args.save:  # before the evaluation: a fit is kept even if the report fails
            saved = fit_step.save(runs["wrapped"], args.save, COMMAND)
    # The report labels classes by name when they are known: --class-names, the model's
    # own, else the test set's (an npz's classes, an ImageFolder's folders, the digits).
    class_names = model.reference or test.class_names
    if class_names is not None and len(class_names) != model.num_classes:
        class_names = None  # names of another class count are not the model's
    with inputs.relayed(COMMAND, [n for n, _ in plugins]):
        report = evaluate_models(
            runs,
            test.data,
            ood,
            n_bins=args.bins,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            bootstrap=args.bootstrap,
            seed=args.seed,
            class_names=class_names,
        )
        out = report.save(args.out)
    calibration = report.to_markdown().split("\n## Calibration", 1)[1].split("\n## ", 1)[0]
    # The terminal gets plain text: the Markdown's bold marks on the best values would
    # print as literal asterisks (#28).
    print("Calibration" + calibration.rstrip().replace("**", ""))
    print(f"\nreport written to {out / 'report.html'} (also report.md, report.json, figures/)")
    if saved is not None:
        print(f"saved the wrapped model to {saved}")
    if tracking is not None:
        from wrapcal.cli.tracking import log_into

        log_into(tracking, report, out)
        print(
            f"logged to MLflow ({tracking.uri}, experiment {tracking.experiment!r}): run "
            f"{tracking.run_id}"
        )
    for text in loud:
        inputs.say(COMMAND, "WARNING", text)
    return out


def run(args: argparse.Namespace) -> int:
    """``wrapcal evaluate``; errors are left to ``wrapcal.cli.main``, which prints one
    line and returns 2."""
    evaluate(args)
    return 0
