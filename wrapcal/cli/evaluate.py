"""``wrapcal evaluate``: a calibration and OOD report for a model, from the command line.

Examples::

    wrapcal evaluate timm:resnet10t --data digits --ood noise=gaussian --out report
    wrapcal evaluate wrapcal:cifar_resnet20 --weights cifar10_resnet20.safetensors \\
        --data cifar10_jpeg.npz --ood mnist=t10k-images-idx3-ubyte.gz \\
        --plugins temperature --calibration cifar10_jpeg.npz --calibration-split train

The bare model is always evaluated (as ``baseline``); with ``--plugins`` it is also
wrapped, fitted and evaluated as ``wrapped``. A saved ``.wrapcal`` file is evaluated as
``wrapped``, beside its own backbone and head without plugins as ``baseline``.

Every flag is checked before any data is read: the plugins and their parameters, the
model name, which data sets the plugins need (``wrapcal.model.fitting.read_sets``),
that every input path is a readable file or directory, that ``--out`` can be written
(:mod:`wrapcal.cli.targets`) and, with ``--mlflow``, that the tracking store takes a run
(:mod:`wrapcal.cli.tracking`: the run is created then, and logged into at the end).
docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import wrapcal.cli.inputs as inputs
import wrapcal.cli.models as models
import wrapcal.cli.targets as targets
from wrapcal.cli.errors import FIT_FLAGS, CliError, fit_flag, in_cli_terms
from wrapcal.cli.plugin_args import create_plugins
from wrapcal.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageSettings, Loaded, Normaliser

__all__ = ["run"]

COMMAND = "evaluate"


def _settings(args: argparse.Namespace) -> ImageSettings:
    mean = tuple(args.mean or IMAGENET_MEAN)
    std = tuple(args.std or IMAGENET_STD)
    if len(mean) != len(std):
        raise CliError(
            f"--mean has {len(mean)} values and --std {len(std)}; give as many of each "
            "(one per channel, or one for all)"
        )
    size = (args.size, args.size) if args.size else None
    return ImageSettings(Normaliser(mean, std), size, args.channels, args.seed, args.limit)


def _named_sets(items: list[str]) -> dict[str, str]:
    """``--fit-data NAME=SPEC`` (repeatable) -> name -> spec."""
    named: dict[str, str] = {}
    for item in items:
        name, eq, spec = item.partition("=")
        if not eq or not name.isidentifier() or not spec:
            raise CliError(f"--fit-data {item!r}: use NAME=SPEC, e.g. conformal=held_out.npz")
        if name in FIT_FLAGS:
            raise CliError(f"--fit-data {item!r}: give the {name} data with {FIT_FLAGS[name]}")
        if name in named:
            raise CliError(f"--fit-data: two sets are named {name!r}")
        named[name] = spec
    return named


def _fit_plan(args: argparse.Namespace, plugins: list[tuple[str, Any]]) -> dict[str, Any]:
    """The fit sets to read, each with its spec(s), checked against what the plugins read
    and require before any data is read."""
    from wrapcal.model.fitting import read_sets

    named = _named_sets(args.fit_data)
    given: dict[str, Any] = {
        "train": args.train or ("digits" if args.data == "digits" else None),
        "calibration": args.calibration or ("digits" if args.data == "digits" else None),
        "unlabeled": args.unlabeled or None,
        **named,
    }
    reads, needs = read_sets(
        SimpleNamespace(plugin_names=[n for n, _ in plugins], plugins=[p for _, p in plugins])
    )
    for plugin, required in needs.items():
        for name, why in required.items():
            if given.get(name) is None:
                flag = fit_flag(name)
                raise CliError(
                    f"plugin {plugin} needs {flag}{': ' + why if why else ''}; give it with "
                    f"{flag if '=' in flag else flag + ' SPEC'} (see docs/cli.md)"
                )
    explicit = {**{n: getattr(args, n) for n in FIT_FLAGS}, **named}
    for name, value in explicit.items():
        if value and name not in reads:
            users = ", ".join(n for n, _ in plugins) or "no --plugins"
            flag = fit_flag(name).replace("SPEC", value) if name in named else fit_flag(name)
            inputs.say(COMMAND, "warning", f"no plugin reads {flag} ({users}); it is ignored")
    return {name: spec for name, spec in given.items() if spec and name in reads}


def _check_input(model: Any, test: Loaded, label: str) -> None:
    channels, size = models.expected_input(model)
    if channels is not None and test.shape[0] != channels:
        raise CliError(
            f"--data images have {test.shape[0]} channel(s) but {label} takes {channels}: add "
            f"--channels {channels} (grey is replicated to RGB, RGB averaged to grey)"
            if channels in (1, 3)
            else f"--data images have {test.shape[0]} channel(s) but {label} takes {channels}"
        )
    if size is not None and tuple(test.shape[1:]) != size:
        raise CliError(
            f"--data images are {test.shape[1]}x{test.shape[2]} but {label} takes exactly "
            f"{size[0]}x{size[1]}: add --size {size[0]}"
            if size[0] == size[1]
            else f"--data images are {test.shape[1]}x{test.shape[2]} but {label} takes "
            f"exactly {size[0]}x{size[1]}"
        )
    models.probe(model, inputs.first_inputs(test.data), "the --data images")


def _read_fit_sets(
    plan: dict[str, Any], args: argparse.Namespace, settings: ImageSettings, test: Loaded
) -> dict[str, Any]:
    """Read the planned fit sets, shaped like the test set: ``Loaded`` sets, and the
    ``unlabeled`` mix as data."""
    sets: dict[str, Any] = {}
    for name, spec in plan.items():
        if name == "unlabeled":
            sets[name], _ = inputs.read_unlabeled(spec, settings, test, args.unlabeled_split)
            continue
        if name in FIT_FLAGS:
            flag, split = FIT_FLAGS[name], getattr(args, f"{name}_split")
            split_flag = f"{flag}-split"
        else:
            flag, split, split_flag = f"--fit-data {name}=", None, ""
        sets[name] = inputs.read(spec, name, flag.rstrip("="), settings, split, split_flag, test)
    return sets


@contextmanager
def _relayed(plugins: list[str]) -> Iterator[None]:
    """Library warnings as ``wrapcal evaluate: warning:`` lines, in the command's terms,
    also when the block fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                text = " ".join(str(warning.message).split())
                inputs.say(COMMAND, "warning", in_cli_terms(text, plugins))


@dataclass
class _Model:
    """The model to evaluate, what it takes and what its classes are called."""

    baseline: Any
    saved: Any  # the loaded WrappedModel of a .wrapcal file, or None
    num_classes: int
    reference: list[str] | None  # the model's class names, when known
    source: str  # where ``reference`` comes from, for messages


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
        return plugins, model_kwargs, {}
    models.check(args.model, model_kwargs)
    if args.weights and not Path(args.weights).exists():
        raise FileNotFoundError(f"--weights: weights file not found: {args.weights}")
    return plugins, model_kwargs, _fit_plan(args, plugins)


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
    for name, value in plan.items():
        flag = fit_flag(name).replace("=SPEC", "")
        for spec in value if isinstance(value, list) else [value]:
            specs.append((flag, name, spec))
    for flag, role, spec in specs:
        path = targets.data_path(spec)
        if path is not None:
            found.append((flag, f"{role} data", path))
    return found


def _check_paths(args: argparse.Namespace, plan: dict[str, Any]) -> None:
    """Inputs readable (regular files or directories), ``--out`` writable and none of
    them: before any data is read."""
    paths = _input_paths(args, plan)
    for flag, what, path in paths:
        directory_ok = what.endswith(" data")
        targets.check_input_path(path, flag, directory_ok=directory_ok, what=what)
    targets.check_report_dir(args.out, [path for _, _, path in paths])


def _model(args: argparse.Namespace, kwargs: dict, test: Loaded, names: Any) -> _Model:
    """Load or build the model (its classes from the flags or the test data)."""
    import wrapcal

    device = models.device(args.device)
    if models.is_saved_file(args.model):
        with _relayed([]):
            saved = wrapcal.load(args.model).to(device)
        baseline: Any = models.BackboneHead(saved.backbone, saved.head)
        num_classes, carried = saved.num_classes_out, models.model_class_names(saved)
    else:
        saved = None
        num_classes = args.num_classes or (len(names) if names else test.num_classes)
        if num_classes is None:
            raise CliError("--data has no labels to count the classes from; give --num-classes")
        baseline = models.build(args.model, kwargs, num_classes)
        if args.weights:
            models.load_weights(baseline, args.weights)
        baseline = baseline.to(device).eval()
        carried = models.model_class_names(baseline)
    if names is not None and len(names) != num_classes:
        raise CliError(
            f"--class-names gives {len(names)} names but the model has {num_classes} classes"
        )
    reference, source = (names, "--class-names") if names else (carried, "the model")
    if reference is None and test.kind != "folder" and test.class_names is not None:
        reference, source = test.class_names, f"--data {args.data}"
    return _Model(baseline, saved, num_classes, reference, source)


def _checked_fit_sets(
    sets: dict[str, Any], model: _Model, allow_partial: bool
) -> tuple[dict[str, Any], list[str]]:
    """Class order, label range and class coverage of the labelled fit sets; returns the
    sets as data for ``fit`` and the warnings to repeat after the results."""
    loud, data = [], {}
    for name, loaded in sets.items():
        if not isinstance(loaded, Loaded):  # the unlabelled mix
            data[name] = loaded
            continue
        flag = fit_flag(name).replace("=SPEC", "")
        loaded = inputs.reconcile_classes(loaded, flag, model.reference, model.source, COMMAND)
        inputs.check_label_range(loaded, flag, model.num_classes)
        text = inputs.check_coverage(loaded, flag, model.num_classes, allow_partial)
        if text:
            inputs.say(COMMAND, "WARNING", text)
            loud.append(text)
        data[name] = loaded.data
    return data, loud


def _wrapped(
    args: argparse.Namespace, baseline: Any, plugins: list[tuple[str, Any]], data: dict
) -> Any:
    import wrapcal
    from wrapcal.plugin.base import get_tags

    with _relayed([n for n, _ in plugins]):
        wrapped = wrapcal.wrap(baseline, [plugin for _, plugin in plugins])
        if data or any(get_tags(p).requires_fit for _, p in plugins):
            wrapped.fit(
                **data,
                batch_size=args.batch_size,
                progress=not args.no_progress,
                seed=args.seed,
                accept_rates=getattr(args, "accept_rates", (0.95,)),
            )
    return wrapped


def evaluate(args: argparse.Namespace) -> Path:
    """Run the command; returns the report directory."""
    from wrapcal.cli.tracking import open_run

    plugins, model_kwargs, plan = _check_flags(args)
    _check_paths(args, plan)
    names = inputs.read_class_names(args.class_names)
    models.device(args.device)  # checked before reading data too
    settings = _settings(args)
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
    model = _model(args, model_kwargs, test, names)
    test = inputs.reconcile_classes(test, "--data", model.reference, model.source, COMMAND)
    inputs.check_label_range(test, "--data", model.num_classes)
    _check_input(model.saved or model.baseline, test, "the model")

    ood = inputs.read_ood(args.ood, settings, test)
    sets = _read_fit_sets(plan, args, settings, test)
    data, loud = _checked_fit_sets(sets, model, args.allow_partial_classes)

    runs: dict[str, Any] = {"baseline": model.baseline}
    if model.saved is not None:
        runs["wrapped"] = model.saved
    elif plugins:
        runs["wrapped"] = _wrapped(args, model.baseline, plugins, data)
    with _relayed([n for n, _ in plugins]):
        report = evaluate_models(
            runs,
            test.data,
            ood,
            n_bins=args.bins,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            bootstrap=args.bootstrap,
            seed=args.seed,
        )
        out = report.save(args.out)
    calibration = report.to_markdown().split("\n## Calibration", 1)[1].split("\n## ", 1)[0]
    print("Calibration" + calibration.rstrip())
    print(f"\nreport written to {out / 'report.html'} (also report.md, report.json, figures/)")
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
