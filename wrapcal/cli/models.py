"""The model to evaluate: built by name through :mod:`wrapcal.files.families`, or loaded from a
saved ``.wrapcal`` file; weights, device, the input it takes and its class names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wrapcal.cli.errors import CliError
from wrapcal.cli.plugin_args import parse_value
from wrapcal.files import families as registry

__all__ = [
    "BackboneHead",
    "build",
    "device",
    "expected_input",
    "is_saved_file",
    "load_weights",
    "model_class_names",
    "parse_model_args",
    "probe",
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
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CliError(
            f"--weights: {path} does not fit the model ({detail}); check the model name, "
            "--num-classes and --model-arg"
        ) from err


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
