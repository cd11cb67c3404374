"""The model to evaluate: built by name through :mod:`wrapcal.files.families`, or loaded from a
saved ``.wrapcal`` file; weights, device, the input it takes and its class names."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wrapcal.cli.errors import CliError
from wrapcal.cli.plugin_args import parse_value
from wrapcal.datasets import Loaded
from wrapcal.files import families as registry

__all__ = [
    "BackboneHead",
    "Resolved",
    "build",
    "check_input",
    "device",
    "expected_input",
    "is_saved_file",
    "load_weights",
    "model_class_names",
    "parse_model_args",
    "probe",
    "resolve",
]


class BackboneHead(nn.Module):
    """A saved model's own backbone and head without plugins: the baseline."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def is_saved_file(spec: str) -> bool:
    """Whether the model argument names a saved file rather than ``FAMILY:NAME``."""
    return spec.endswith(".wrapcal") or (":" not in spec and Path(spec).exists())


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``--model-arg KEY=VALUE`` (repeatable) -> constructor arguments."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise CliError(f"--model-arg {item!r}: use KEY=VALUE, e.g. --model-arg drop_rate=0.1")
        if key in kwargs:
            raise CliError(f"--model-arg: {key} is given twice; give it once")
        if key == "num_classes":
            raise CliError("--model-arg num_classes: use --num-classes")
        kwargs[key] = parse_value(value)
    return kwargs


def check(spec: str, kwargs: dict[str, Any]) -> tuple[str, str]:
    """Check ``FAMILY:NAME`` and its arguments against the registry, building nothing."""
    library, name = registry.parse_model_spec(spec)
    try:
        registry.check_spec(library, name, kwargs)
    except ValueError as err:
        raise CliError(f"--model-arg: {err}") from None
    return library, name


def build(spec: str, kwargs: dict[str, Any], num_classes: int | None) -> nn.Module:
    """``FAMILY:NAME`` with random weights, through the registry's allow-list."""
    library, name = registry.parse_model_spec(spec)
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    try:
        return registry.build_model(library, name, **kwargs)
    except ValueError as err:
        raise CliError(f"{spec}: {err}") from None
    except TypeError as err:  # an allowed argument this architecture does not take
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise CliError(f"{spec} cannot be built with {given} ({err}); check --model-arg") from None


def load_weights(model: nn.Module, path: str) -> None:
    """Load a safetensors state dict into ``model`` (strict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"--weights: weights file not found: {path}")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        raise CliError(f"--weights: cannot read {path} as safetensors: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        # Counted here, after torch refused: torch itself forgives some keys (BatchNorm's
        # num_batches_tracked), and its own message lists every key.
        lines = str(err).strip().splitlines()
        detail = _mismatch(model.state_dict(), state) or lines[-1].strip()
        raise CliError(
            f"--weights: {path} does not fit the model ({detail}); check the model name, "
            "--num-classes and --model-arg"
        ) from err


def _mismatch(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str | None:
    """How a state dict differs from the model's, each kind counted with its first key
    (a list of every key of a model built wrongly would run to hundreds)."""
    kinds = [
        (
            "key(s) of the model missing from the file",
            # BatchNorm fills a missing num_batches_tracked in itself: not a mismatch.
            [k for k in own if k not in given and not k.endswith("num_batches_tracked")],
        ),
        ("key(s) in the file the model does not have", [k for k in given if k not in own]),
        (
            "tensor(s) of another shape",
            [
                f"{k}: {list(given[k].shape)} in the file, {list(own[k].shape)} in the model"
                for k in own
                if k in given and own[k].shape != given[k].shape
            ],
        ),
    ]
    parts = [f"{len(keys)} {what}, first {keys[0]}" for what, keys in kinds if keys]
    return "; ".join(parts) or None


def device(name: str | None) -> torch.device:
    """``--device``, checked (default: CUDA when available)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        found = torch.device(name)
    except RuntimeError as err:
        raise CliError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from err
    if found.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available here; use --device cpu")
    return found


def expected_input(model: nn.Module) -> tuple[int | None, tuple[int, int] | None]:
    """The channels a model takes (its first convolution's) and the one image size it
    takes when it has only one (a ViT with a strict patch grid), when they can be told."""
    shape = getattr(model, "input_shape", None)  # a WrappedModel knows what it was fitted on
    fixed = bool(getattr(model, "fixed_input_size", False))
    if isinstance(shape, tuple) and len(shape) == 3:
        return int(shape[0]), ((int(shape[1]), int(shape[2])) if fixed else None)
    size = None
    for module in model.modules():
        embed = getattr(module, "patch_embed", None)
        if embed is not None and getattr(embed, "strict_img_size", False):
            img = getattr(embed, "img_size", None)
            if isinstance(img, (tuple, list)) and len(img) == 2:
                size = (int(img[0]), int(img[1]))
            break
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (conv.in_channels if conv is not None else None), size


def model_class_names(model: nn.Module) -> list[str] | None:
    """The class names a model carries, in output order, when it carries real ones
    (``class_names``, a Hugging Face config's ``id2label`` that is not ``LABEL_k``)."""
    for module in model.modules():
        names = getattr(module, "class_names", None)
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            return list(names)
        id2label = getattr(getattr(module, "config", None), "id2label", None)
        if isinstance(id2label, dict) and id2label:
            ordered = [str(id2label[k]) for k in sorted(id2label, key=int)]
            if not all(re.fullmatch(r"LABEL_\d+", n) for n in ordered):
                return ordered
    return None


def probe(model: nn.Module, batch: torch.Tensor, what: str) -> None:
    """Run two inputs through ``model``, so a shape it cannot take fails here, in words,
    not deep inside the evaluation."""
    param = next(model.parameters(), None)
    if param is not None:  # the data is read on the CPU; the model may be on a GPU
        batch = batch.to(device=param.device, dtype=param.dtype)
    try:
        with torch.no_grad():
            model(batch)
    except (RuntimeError, ValueError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        channels, size = expected_input(model)
        takes = []
        if channels is not None:
            takes.append(f"{channels}-channel images")
        if size is not None:
            takes.append(f"of exactly {size[0]}x{size[1]}")
        hint = f"; it takes {' '.join(takes)}" if takes else ""
        raise CliError(
            f"the model cannot take {what} of shape {tuple(batch.shape[1:])} ({first}){hint}: "
            "adapt them with --channels / --size, or the model with --model-arg"
        ) from None


@dataclass
class Resolved:
    """The model a command works on, what it takes and what its classes are called."""

    baseline: Any  # the model as given (a saved file's backbone and head without plugins)
    saved: Any  # the loaded WrappedModel of a .wrapcal file, or None
    num_classes: int
    reference: list[str] | None  # the model's class names, when known
    source: str  # where ``reference`` comes from, for messages


def resolve(
    args: argparse.Namespace,
    kwargs: dict[str, Any],
    data: Loaded | None,
    where: str,
    names: list[str] | None,
) -> Resolved:
    """Load or build the model ``args.model`` names, on ``--device``, with ``--weights``.

    Args:
        args: The command's flags (``model``, ``weights``, ``num_classes``, ``device``).
        kwargs: The checked ``--model-arg`` values.
        data: The labelled set the classes are counted from when no flag gives them
            (``evaluate``: the test set; ``fit``: the first labelled fit set; ``None``
            when ``fit``'s plugins read no labelled set).
        where: The flag and spec of ``data`` (``--data x.npz``), for messages.
        names: ``--class-names``, when given.
    """
    import wrapcal
    from wrapcal.cli.inputs import relayed

    found = device(args.device)
    num_classes: int | None
    if is_saved_file(args.model):
        with relayed(args.command, []):
            saved = wrapcal.load(args.model).to(found)
        baseline: Any = BackboneHead(saved.backbone, saved.head)
        num_classes, carried = saved.num_classes_out, model_class_names(saved)
    else:
        saved = None
        counted = data.num_classes if data is not None else None
        num_classes = args.num_classes or (len(names) if names else counted)
        if num_classes is None:
            raise CliError(f"{where} has no labels to count the classes from; give --num-classes")
        baseline = build(args.model, kwargs, num_classes)
        if args.weights:
            load_weights(baseline, args.weights)
        baseline = baseline.to(found).eval()
        carried = model_class_names(baseline)
    if names is not None and len(names) != num_classes:
        raise CliError(
            f"--class-names gives {len(names)} names but the model has {num_classes} classes"
        )
    reference, source = (names, "--class-names") if names else (carried, "the model")
    if reference is None and data is not None and data.kind != "folder" and data.class_names:
        reference, source = data.class_names, where
    return Resolved(baseline, saved, num_classes, reference, source)


def check_input(model: nn.Module, data: Loaded, flag: str, label: str = "the model") -> None:
    """The images of ``data`` (given by ``flag``) are what ``model`` takes: its channels,
    its one size when it has one, and a probe pass; the message says which flag fixes it."""
    channels, size = expected_input(model)
    if channels is not None and data.shape[0] != channels:
        raise CliError(
            f"{flag} images have {data.shape[0]} channel(s) but {label} takes {channels}: add "
            f"--channels {channels} (grey is replicated to RGB, RGB averaged to grey)"
            if channels in (1, 3)
            else f"{flag} images have {data.shape[0]} channel(s) but {label} takes {channels}"
        )
    if size is not None and tuple(data.shape[1:]) != size:
        raise CliError(
            f"{flag} images are {data.shape[1]}x{data.shape[2]} but {label} takes exactly "
            f"{size[0]}x{size[1]}: add --size {size[0]}"
            if size[0] == size[1]
            else f"{flag} images are {data.shape[1]}x{data.shape[2]} but {label} takes "
            f"exactly {size[0]}x{size[1]}"
        )
    from wrapcal.cli.inputs import first_inputs

    probe(model, first_inputs(data.data), f"the {flag} images")
