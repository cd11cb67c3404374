"""``wrapcal fit``: wrap a model with plugins, fit them and save the fitted model, from the
command line; and the fit step that ``wrapcal evaluate`` shares with it.

Examples::

    wrapcal fit timm:resnet10t --weights w.safetensors --plugins temperature,knn \\
        --calibration digits --train digits --save model.wrapcal
    wrapcal export model.wrapcal --out model.onnx

The plugins, their parameters, the model and the fit sets the plugins read are checked
as ``evaluate`` checks them, and so are the input paths and ``--save``
(:func:`wrapcal.cli.targets.check_output_file`), all before any data is read. There is
no test set: the first labelled fit set read (``--train``, else ``--calibration``, else a
``--fit-data`` set, in that order) sets the images' channels, size and normalisation for
the others, and counts the classes when no flag gives them. docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import wrapcal.cli.inputs as inputs
import wrapcal.cli.models as models
import wrapcal.cli.targets as targets
from wrapcal.cli.errors import FIT_FLAGS, CliError, fit_flag
from wrapcal.cli.options import image_settings
from wrapcal.cli.plugin_args import create_plugins
from wrapcal.datasets import ImageSettings, Loaded

__all__ = [
    "check_fit_sets",
    "fit_paths",
    "fit_plan",
    "preprocess_of",
    "read_fit_sets",
    "run",
    "wrap_and_fit",
]

COMMAND = "fit"


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


def fit_plan(
    args: argparse.Namespace, plugins: list[tuple[str, Any]], default: str | None = None
) -> dict[str, Any]:
    """The fit sets to read, each with its spec(s), checked against what the plugins read
    and require before any data is read.

    Args:
        args: The command's flags.
        plugins: ``(name, plugin)`` pairs from ``--plugins``.
        default: The spec ``--train`` and ``--calibration`` default to (``digits`` for
            ``evaluate --data digits``), or ``None``.
    """
    from wrapcal.model.fitting import read_sets

    named = _named_sets(args.fit_data)
    given: dict[str, Any] = {
        "train": args.train or default,
        "calibration": args.calibration or default,
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
            inputs.say(args.command, "warning", f"no plugin reads {flag} ({users}); it is ignored")
    return {name: spec for name, spec in given.items() if spec and name in reads}


def fit_paths(plan: dict[str, Any]) -> list[tuple[str, str, Path]]:
    """The files and directories the planned fit sets read: flag, what, path."""
    found = []
    for name, value in plan.items():
        flag = _flag(name)
        for spec in value if isinstance(value, list) else [value]:
            path = targets.data_path(spec)
            if path is not None:
                found.append((flag, f"{name} data", path))
    return found


def _read_one(
    name: str, spec: Any, args: argparse.Namespace, settings: ImageSettings, like: Loaded | None
) -> Any:
    if name == "unlabeled":
        if like is None:
            raise CliError(
                "--unlabeled is read like a labelled set (its channels, size and "
                "normalisation): give --train or --calibration too"
            )
        return inputs.read_unlabeled(spec, settings, like, args.unlabeled_split)[0]
    if name in FIT_FLAGS:
        flag, split = FIT_FLAGS[name], getattr(args, f"{name}_split")
        split_flag = f"{flag}-split"
    else:
        flag, split, split_flag = f"--fit-data {name}=", None, ""
    return inputs.read(spec, name, flag.rstrip("="), settings, split, split_flag, like)


def read_fit_sets(
    plan: dict[str, Any],
    args: argparse.Namespace,
    settings: ImageSettings,
    like: Loaded | None,
) -> tuple[dict[str, Any], Loaded | None]:
    """Read the planned fit sets: ``Loaded`` sets, and the ``unlabeled`` mix as data.

    Args:
        plan: :func:`fit_plan`'s sets.
        args: The command's flags.
        settings: The image flags.
        like: The set the others take their channels, size and normalisation from (the
            test set); ``None``: the first labelled set read (in plan order) is it.

    Returns:
        The sets, and the reference set (``like``, or the one chosen).
    """
    order = sorted(plan, key=lambda n: n == "unlabeled")  # a labelled set first
    sets: dict[str, Any] = {}
    for name in order:
        sets[name] = _read_one(name, plan[name], args, settings, like)
        if like is None and isinstance(sets[name], Loaded):
            like = sets[name]
    return {name: sets[name] for name in plan}, like


def check_fit_sets(
    sets: dict[str, Any], model: models.Resolved, allow_partial: bool, command: str
) -> tuple[dict[str, Any], list[str]]:
    """Class order, label range and class coverage of the labelled fit sets; returns the
    sets as data for ``fit`` and the warnings to repeat after the results."""
    loud, data = [], {}
    for name, loaded in sets.items():
        if not isinstance(loaded, Loaded):  # the unlabelled mix
            data[name] = loaded
            continue
        flag = _flag(name)
        loaded = inputs.reconcile_classes(loaded, flag, model.reference, model.source, command)
        inputs.check_label_range(loaded, flag, model.num_classes)
        text = inputs.check_coverage(loaded, flag, model.num_classes, allow_partial)
        if text:
            inputs.say(command, "WARNING", text)
            loud.append(text)
        data[name] = loaded.data
    return data, loud


def preprocess_of(reference: Loaded | None) -> dict[str, Any] | None:
    """What the command did to the images, as the model's recorded preprocessing: pixels
    in [0, 1] normalised with the set's mean and std, at its size, grey or RGB."""
    if reference is None or reference.shape[0] not in (1, 3):
        return None
    channels, height, width = reference.shape
    return {
        "mean": list(reference.normalise.mean),
        "std": list(reference.normalise.std),
        "size": (height, width),
        "channel_order": "L" if channels == 1 else "RGB",
    }


def wrap_and_fit(
    args: argparse.Namespace,
    baseline: Any,
    plugins: list[tuple[str, Any]],
    data: dict,
    reference: Loaded | None,
) -> Any:
    """``wrapcal.wrap(baseline, plugins).fit(**data)`` with the run flags, warnings said
    as the command's; the model records the preprocessing of ``reference``'s images
    (:func:`preprocess_of`), which every set was read like."""
    import wrapcal
    from wrapcal.plugin.base import get_tags

    with inputs.relayed(args.command, [n for n, _ in plugins]):
        wrapped = wrapcal.wrap(
            baseline, [plugin for _, plugin in plugins], preprocess=preprocess_of(reference)
        )
        if data or any(get_tags(p).requires_fit for _, p in plugins):
            wrapped.fit(
                **data,
                batch_size=args.batch_size,
                progress=not args.no_progress,
                seed=args.seed,
                accept_rates=args.accept_rates,
            )
    return wrapped


def save(wrapped: Any, path: str, command: str = COMMAND) -> Path:
    """Save the fitted model to ``--save``."""
    with inputs.relayed(command, list(wrapped.plugin_names)):
        return Path(wrapped.save(path))


def _check_flags(args: argparse.Namespace) -> tuple[list[tuple[str, Any]], dict, dict]:
    plugins = create_plugins(args.plugins, args.plugin_arg)
    if not plugins:
        raise CliError("--plugins is empty; name the plugins to fit, e.g. --plugins temperature")
    if models.is_saved_file(args.model):
        raise CliError(
            f"{args.model} is a saved model, already fitted; wrapcal fit takes FAMILY:NAME "
            "(timm:resnet18 --weights w.safetensors). Evaluate the saved model with "
            "wrapcal evaluate, or export it with wrapcal export"
        )
    model_kwargs = models.parse_model_args(args.model_arg)
    models.check(args.model, model_kwargs)
    plan = fit_plan(args, plugins)
    return plugins, model_kwargs, plan


def _check_paths(args: argparse.Namespace, plan: dict[str, Any]) -> None:
    """Inputs readable, ``--save`` writable and none of them: before any data is read."""
    paths = fit_paths(plan)
    if args.weights:
        paths.insert(0, ("--weights", "weights file", Path(args.weights)))
    if args.class_names and args.class_names.startswith("@"):
        paths.append(("--class-names", "class names file", Path(args.class_names[1:])))
    for flag, what, path in paths:
        targets.check_input_path(path, flag, directory_ok=what.endswith(" data"), what=what)
    targets.check_save_file(args.save, [path for _, _, path in paths])


def fit(args: argparse.Namespace) -> Path:
    """Run ``wrapcal fit``; returns the file written."""
    plugins, model_kwargs, plan = _check_flags(args)
    _check_paths(args, plan)
    names = inputs.read_class_names(args.class_names)
    models.device(args.device)  # checked before reading data too
    settings = image_settings(args)

    sets, reference = read_fit_sets(plan, args, settings, None)
    first = next((n for n, s in sets.items() if s is reference), None)
    where = f"{_flag(first)} {plan[first]}" if first else "the fit data (no labelled set)"
    model = models.resolve(args, model_kwargs, reference, where, names)
    if reference is not None:
        assert first is not None  # the reference is one of the sets
        models.check_input(model.baseline, reference, _flag(first))
    data, loud = check_fit_sets(sets, model, args.allow_partial_classes, COMMAND)

    wrapped = wrap_and_fit(args, model.baseline, plugins, data, reference)
    path = save(wrapped, args.save)
    print(f"fitted {', '.join(wrapped.plugin_names)} on {_described(plan, sets)}")
    shape = "x".join(map(str, wrapped.input_shape)) if wrapped.input_shape else "unknown"
    print(
        f"saved {path}: {model.num_classes} classes, input {shape}; serve it with: "
        f"wrapcal export {path} --out {path.with_suffix('.onnx')}"
    )
    for text in loud:
        inputs.say(COMMAND, "WARNING", text)
    return path


def _flag(name: str) -> str:
    return fit_flag(name).replace("=SPEC", "")


def _described(plan: dict[str, Any], sets: dict[str, Any]) -> str:
    """``--calibration digits (397 images), --train digits (1000 images)``."""
    from wrapcal.data import num_samples

    parts = []
    for name, data in sets.items():
        spec = plan[name] if isinstance(plan[name], str) else " + ".join(plan[name])
        n = data.n if isinstance(data, Loaded) else num_samples(data)
        parts.append(f"{_flag(name)} {spec} ({n} images)")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    """``wrapcal fit``; errors are left to ``wrapcal.cli.main``, which prints one line and
    returns 2."""
    fit(args)
    return 0
