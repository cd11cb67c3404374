"""The flags of ``wrapcal evaluate`` and ``wrapcal fit`` (which share the model, fit-data and
image flags) and the types that check them as they are parsed."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from wrapcal.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageSettings, Normaliser
from wrapcal.files.preprocess import Preprocess

__all__ = [
    "add_evaluate_arguments",
    "add_fit_arguments",
    "add_fit_command_arguments",
    "add_image_arguments",
    "add_model_arguments",
    "at_least",
    "finite_float",
    "image_settings",
    "positive_float",
    "recorded_preprocess",
]

_SPECS = (
    "'digits', an .npz file, an IDX images file (with its labels file beside it), an "
    "ImageFolder directory or a saved Hugging Face dataset"
)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``, with a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(
                f"must be {'a positive integer' if low == 1 else f'at least {low}'}, got {value}"
            )
        return value

    parse.__name__ = "integer"
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def accept_rates(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated shares in (0, 1] (``0.95,0.99``)."""
    from wrapcal.model.operating_points import check_accept_rates

    try:
        return check_accept_rates(tuple(float(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected distinct shares in (0, 1] separated by commas, e.g. 0.95,0.99; got {text!r}"
        ) from None


def finite_float(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``wrapcal evaluate`` to ``parser`` (docs/cli.md describes each)."""
    parser.description = (
        "Evaluate a classifier's calibration and OOD detection (optionally wrapped with "
        "plugins) and write report.html, report.md, report.json and PNG figures."
    )
    add_model_arguments(parser, saved_ok=True, classes_from="the test data's")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help=f"labelled test data: {_SPECS}")
    data.add_argument(
        "--split",
        help="key prefix in a --data .npz, split of a saved Hugging Face DatasetDict "
        "(default: test, else the file's only or conventionally named images)",
    )
    data.add_argument(
        "--ood",
        action="append",
        default=[],
        metavar="[NAME=]SPEC",
        help="an OOD set (repeatable): 'gaussian' or 'uniform' noise shaped like the test "
        "images, an .npz, an IDX images file, an ImageFolder or a saved Hugging Face dataset",
    )
    _add_limit(data)
    fit = add_fit_arguments(parser, digits_default=True, plugins_required=False)
    fit.add_argument(
        "--save",
        metavar="FILE",
        help="also save the fitted wrapped model (the 'wrapped' variant, with --plugins) to "
        "FILE (model.wrapcal), for wrapcal export and wrapcal.load",
    )
    add_image_arguments(parser)
    run = parser.add_argument_group("run and report")
    run.add_argument(
        "--out", default="wrapcal-report", help="report directory (default: wrapcal-report)"
    )
    run.add_argument(
        "--mlflow",
        metavar="TRACKING_URI",
        help="also log the metrics, figures and report to MLflow at this tracking URI "
        "(e.g. sqlite:///mlflow.db, file:///path/mlruns, http://host:5000); needs "
        "pip install 'wrapcal[mlflow]'",
    )
    run.add_argument(
        "--mlflow-experiment",
        default="wrapcal",
        help="MLflow experiment of the run (default: wrapcal)",
    )
    run.add_argument(
        "--batch-size", type=at_least(1), default=256, help="images per batch (default: 256)"
    )
    run.add_argument("--bins", type=at_least(1), default=15, help="ECE bins (default: 15)")
    run.add_argument(
        "--bootstrap",
        type=at_least(0),
        default=1000,
        help="bootstrap resamples of the 95%% intervals, 0 for none (default: 1000)",
    )
    _add_run_basics(run, "seed of noise, --limit, fit and bootstrap (default: 0)")


def add_fit_command_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``wrapcal fit`` to ``parser``: evaluate's model, fit-data and
    image flags, without the test data and the report, and ``--save`` (required)."""
    parser.description = (
        "Wrap a classifier with plugins, fit them on the given data and save the fitted "
        "model (a .wrapcal file that wrapcal export, wrapcal evaluate and wrapcal.load take)."
    )
    add_model_arguments(parser, saved_ok=False, classes_from="the first labelled fit set's")
    fit = add_fit_arguments(parser, digits_default=False, plugins_required=True)
    fit.add_argument(
        "--save",
        required=True,
        metavar="FILE",
        help="the file to write, e.g. model.wrapcal (checked before any data is read)",
    )
    _add_limit(fit)
    add_image_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument(
        "--batch-size", type=at_least(1), default=256, help="images per batch (default: 256)"
    )
    _add_run_basics(run, "seed of --limit and the fit (default: 0)")


def add_model_arguments(
    parser: argparse.ArgumentParser, *, saved_ok: bool, classes_from: str
) -> None:
    """The positional model and the model flags (``--weights``, ``--num-classes``,
    ``--model-arg``, ``--class-names``)."""
    parser.add_argument(
        "model",
        help="FAMILY:NAME from wrapcal's model registry (timm:resnet18, torchvision:resnet18, "
        "wrapcal:cifar_resnet20)" + (" or the path of a saved .wrapcal file" if saved_ok else ""),
    )
    model = parser.add_argument_group("model")
    model.add_argument("--weights", help="safetensors state dict to load into the model")
    model.add_argument(
        "--num-classes",
        type=at_least(1),
        help=f"number of classes of the model (default: the --class-names, else {classes_from})",
    )
    model.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a constructor argument the registry allows (in_chans, img_size, drop_rate...); "
        "repeatable",
    )
    model.add_argument(
        "--class-names",
        metavar="A,B,...|@FILE",
        help="the model's class names in output order, to check ImageFolder and npz class "
        "order against",
    )


def add_fit_arguments(
    parser: argparse.ArgumentParser, *, digits_default: bool, plugins_required: bool
) -> argparse._ArgumentGroup:
    """The plugins, their parameters and the fit data flags; returns their group.

    Args:
        parser: The command's parser.
        digits_default: Whether ``--calibration`` and ``--train`` default to ``digits``
            with ``--data digits`` (``evaluate``; ``fit`` has no ``--data``).
        plugins_required: Whether ``--plugins`` must be given (``fit``: nothing to fit
            without them).
    """
    digits = " (default with --data digits: digits)" if digits_default else ""
    fit = parser.add_argument_group("plugins and their fit data")
    fit.add_argument(
        "--plugins",
        default="",
        required=plugins_required,
        help="comma-separated plugins to wrap the model with, e.g. temperature,mc_dropout "
        "(see 'wrapcal plugins')",
    )
    fit.add_argument(
        "--plugin-arg",
        action="append",
        default=[],
        metavar="PLUGIN.PARAM=VALUE",
        help="a plugin parameter (repeatable), e.g. label_smoothing.alpha=auto; values are "
        "read as JSON, else as text",
    )
    fit.add_argument("--calibration", help=f"labelled held-out calibration data: {_SPECS}{digits}")
    fit.add_argument(
        "--calibration-split", help="the same for --calibration (default: calibration, else ...)"
    )
    fit.add_argument(
        "--train",
        help="labelled training data for plugins that retrain (label_smoothing, discrepancy, "
        f"mc_dropout finetune) or read training statistics; same forms{digits}",
    )
    fit.add_argument("--train-split", help="the same for --train (default: train, else ...)")
    fit.add_argument(
        "--unlabeled",
        action="append",
        default=[],
        metavar="SPEC",
        help="unlabelled data (discrepancy: in-distribution and OOD mixed, like production "
        "traffic); repeatable, the sets are mixed; any --ood form or 'digits'",
    )
    fit.add_argument(
        "--unlabeled-split", help="the same for --unlabeled (default: unlabeled, else ...)"
    )
    fit.add_argument(
        "--fit-data",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="another named fit data set a plugin reads (repeatable), e.g. "
        "conformal=held_out.npz (npz key prefix: NAME); labels are kept when present",
    )
    fit.add_argument(
        "--accept-rates",
        type=accept_rates,
        default=(0.95,),
        metavar="RATES",
        help="shares of --calibration that the wrapped model's operating thresholds accept, "
        "one threshold per score and rate, e.g. 0.95,0.99 (default: 0.95)",
    )
    fit.add_argument(
        "--allow-partial-classes",
        action="store_true",
        help="fit on labels (--calibration, --train, --fit-data) that miss some classes, "
        "with a warning, instead of refusing",
    )
    return fit


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """``--size``, ``--channels``, ``--mean`` and ``--std``."""
    images = parser.add_argument_group("images")
    images.add_argument("--size", type=at_least(1), help="resize images to SIZE x SIZE")
    images.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="convert images to 1 (grey) or 3 (RGB) channels (default: as stored)",
    )
    images.add_argument(
        "--mean",
        type=finite_float,
        nargs="+",
        help="per-channel mean of the normalisation (default: the saved model's recorded "
        f"preprocessing, else ImageNet's {IMAGENET_MEAN})",
    )
    images.add_argument(
        "--std",
        type=positive_float,
        nargs="+",
        help="per-channel std of the normalisation (default: the saved model's recorded "
        f"preprocessing, else ImageNet's {IMAGENET_STD})",
    )


def recorded_preprocess(spec: str | None) -> Preprocess | None:
    """The preprocessing a saved ``.wrapcal`` file records (``None`` for a model built by
    name, or a file without a record): what its images must be normalised with."""
    from wrapcal.cli.errors import CliError
    from wrapcal.cli.models import is_saved_file
    from wrapcal.errors import SavedFileError
    from wrapcal.files.format import read_config

    if not spec or not is_saved_file(spec) or not Path(spec).is_file():
        return None  # a missing file is the command's own error, with its own message
    try:  # the header only: the command loads (and verifies) the whole file later
        record = read_config(spec).get("preprocess")
    except SavedFileError as err:
        raise CliError(str(err)) from None
    return None if record is None else Preprocess.from_config(record)


def image_settings(args: argparse.Namespace) -> ImageSettings:
    """The image flags as the readers take them (``--mean``/``--std`` checked).

    Without ``--mean``/``--std``, a saved model's recorded preprocessing gives them (the
    images it was fitted on were normalised that way: another normalisation would shift
    every score), else ImageNet's. Images keep their own size unless ``--size``.
    """
    from wrapcal.cli.errors import CliError

    recorded = recorded_preprocess(getattr(args, "model", None))
    mean: tuple[float, ...] = tuple(IMAGENET_MEAN)
    std: tuple[float, ...] = tuple(IMAGENET_STD)
    if recorded is not None and not (args.mean or args.std):
        if recorded.channel_order == "BGR":
            raise CliError(
                f"{args.model} takes BGR images and the command line reads RGB: "
                "serve it from Python (wrapcal.load) or give --mean/--std for RGB"
            )
        # The readers give pixels in [0, 1]; the record's mean and std are on the scale of
        # its value range (low, high): x * (high - low) + low, then (x - mean) / std.
        low, high = recorded.value_range
        mean = tuple((m - low) / (high - low) for m in recorded.mean)
        std = tuple(s / (high - low) for s in recorded.std)
    mean = tuple(args.mean or mean)
    std = tuple(args.std or std)
    if len(mean) != len(std):
        raise CliError(
            f"--mean has {len(mean)} values and --std {len(std)}; give as many of each "
            "(one per channel, or one for all)"
        )
    # Not the record's size: a timm model records its pretrained input size (224) even
    # when it was trained and fitted on smaller images; resizing is --size's job.
    size = (args.size, args.size) if args.size else None
    # Commands without --seed or --limit (monitor) read every image, as the readers do.
    seed, limit = getattr(args, "seed", 0), getattr(args, "limit", None)
    return ImageSettings(Normaliser(mean, std), size, args.channels, seed, limit)


def _add_limit(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--limit",
        type=at_least(1),
        help="use at most N images of every set, drawn at random (--seed), for a quick look",
    )


def _add_run_basics(group: argparse._ArgumentGroup, seed_help: str) -> None:
    group.add_argument("--seed", type=at_least(0), default=0, help=seed_help)
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")
