"""One model registry: every model wrapcal builds by name, with allow-listed arguments.

``wrapcal.load``, the CLI (``timm:resnet18``) and the demo all build models here. A
family (timm, torchvision, ``wrapcal.files.cifar_resnets``, or one a plugin package registers
through ``wrapcal_register_models``) knows its names and the constructor arguments
that may come from outside: sizes and rates, never a path, a URL or a flag that
downloads. Models are always built with random weights (``pretrained=False``).

Names and arguments are untrusted input (a saved file's header, a command line):
a name must be a plain identifier (letters, digits, ``_ . -``; no ``hf-hub:`` or
``local-dir:`` scheme, no path) that the family knows, and every argument must be in
the family's allow-list and pass its constraint.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wrapcal.model.discovery import get_plugin_manager
from wrapcal.plugin.constraints import Check, Interval, Options, suggest, validate

__all__ = [
    "ModelFamily",
    "build_model",
    "check_spec",
    "describe_model",
    "families",
    "model_shapes",
    "parse_model_spec",
    "reset",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")
_CLASSES = [Interval(int, 1, 1_000_000)]
_RATE = [Interval(float, 0, 1, closed="left")]
_SIZE = [Interval(int, 1, 8192)]


def _size_or_pair(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(Interval(int, 1, 8192).accepts(v) for v in value)
    return Interval(int, 1, 8192).accepts(value)


@dataclass(frozen=True)
class ModelFamily:
    """A library of models buildable by name.

    Attributes:
        name: The prefix users write (``"timm"`` in ``timm:resnet18``).
        build: ``build(name, kwargs)`` -> a model with random weights.
        names: Lists the model names the family knows (for messages).
        knows: Whether the family knows a name.
        kwargs: The constructor arguments allowed from outside, with their constraints
            (:mod:`wrapcal.plugin.constraints` forms).
    """

    name: str
    build: Callable[[str, dict[str, Any]], nn.Module]
    names: Callable[[], Iterable[str]]
    knows: Callable[[str], bool]
    kwargs: Mapping[str, list[Any]] = field(default_factory=dict)


def _timm_family() -> ModelFamily:
    def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    def names() -> list[str]:
        import timm

        return timm.list_models()

    def knows(name: str) -> bool:
        import timm

        # An architecture, never ``name.tag``: a pretrained tag names weights to download,
        # and with pretrained=False timm refuses some tags at build (a RuntimeError).
        return "." not in name and bool(timm.is_model(name))

    pools = Options(str, ["", "avg", "max", "avgmax", "catavgmax", "token", "map", "fast"])
    return ModelFamily(
        "timm",
        build,
        names,
        knows,
        {
            "num_classes": _CLASSES,
            "in_chans": [Interval(int, 1, 64)],
            "img_size": [Check(_size_or_pair, "an int or a pair of ints in [1, 8192]")],
            "global_pool": [pools],
            "drop_rate": _RATE,
            "drop_path_rate": _RATE,
        },
    )


def _torchvision_family() -> ModelFamily:
    def names() -> list[str]:
        import torchvision

        return torchvision.models.list_models(module=torchvision.models)

    def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
        import torchvision

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # googlenet/inception warn about init
            return torchvision.models.get_model(name, weights=None, **kwargs)

    return ModelFamily(
        "torchvision",
        build,
        names,
        lambda name: name in names(),
        {
            "num_classes": _CLASSES,
            "image_size": _SIZE,
            "dropout": _RATE,
            "aux_logits": [bool],
            "init_weights": [bool],
            "transform_input": [bool],
        },
    )


def _wrapcal_family() -> ModelFamily:
    def names() -> list[str]:
        from wrapcal.files import cifar_resnets as models

        return [n for n in models.__all__ if n[0].islower()]

    def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
        from wrapcal.files import cifar_resnets as models

        depth = re.fullmatch(r"cifar_resnet(\d+)", name)
        if depth and name not in names():
            return models.cifar_resnet(int(depth.group(1)), **kwargs)
        return getattr(models, name)(**kwargs)

    def knows(name: str) -> bool:
        return name in names() or re.fullmatch(r"cifar_resnet(\d{1,3})", name) is not None

    return ModelFamily(
        "wrapcal",
        build,
        names,
        knows,
        {"num_classes": _CLASSES, "depth": [Interval(int, 8, 1000)]},
    )


_families: tuple[Any, dict[str, ModelFamily]] | None = None


def families() -> dict[str, ModelFamily]:
    """Every model family by prefix: the built-in ones and those plugins register.

    Collected again whenever the global plugin manager is rebuilt
    (:func:`wrapcal.model.discovery.reset`).
    """
    global _families
    pm = get_plugin_manager()
    if _families is None or _families[0] is not pm:
        found = {f.name: f for f in (_timm_family(), _torchvision_family(), _wrapcal_family())}

        def register(family: ModelFamily) -> None:
            if not isinstance(family, ModelFamily):
                raise TypeError(
                    "wrapcal_register_models: register a wrapcal.files.families.ModelFamily"
                )
            if family.name in found:
                raise ValueError(f"two model families are named {family.name!r}")
            found[family.name] = family

        pm.hook.wrapcal_register_models(register=register)
        _families = (pm, found)
    return _families[1]


def reset() -> None:
    """Forget the families (they are collected again on next use)."""
    global _families
    _families = None


def check_spec(library: Any, name: Any, kwargs: Any) -> tuple[ModelFamily, str, dict[str, Any]]:
    """Check an untrusted model description; return the family, name and arguments.

    Raises:
        ValueError: An unknown family or name, a name with a scheme or path, or an
            argument outside the family's allow-list or its constraint.
    """
    known = families()
    if not isinstance(library, str) or library not in known:
        raise ValueError(
            f"unknown model family {library!r}; wrapcal builds {', '.join(sorted(known))}"
        )
    family = known[library]
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"{library} model name {name!r} is not a plain name (letters, digits, '_', '.', "
            "'-'; no scheme such as hf-hub: or local-dir:, no path)"
        )
    if not family.knows(name):
        architecture, dot, tag = name.partition(".")
        if dot and architecture and family.knows(architecture):
            raise ValueError(
                f"{library} model name {name!r} carries a pretrained tag ({tag!r}); wrapcal "
                f"builds models by architecture with random weights (a saved file holds its "
                f"own weights): use {architecture!r}"
            )
        raise ValueError(f"unknown {library} model {name!r}{suggest(name, family.names())}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"{library} model arguments must be an object of named values")
    for key in kwargs:
        if key not in family.kwargs:
            raise ValueError(
                f"{library} model argument {key!r} is not allowed; allowed: "
                f"{', '.join(sorted(family.kwargs))}"
            )
    validate(f"{library}:{name}", kwargs, family.kwargs, "argument")
    return family, name, dict(kwargs)


def build_model(library: str, name: str, **kwargs: Any) -> nn.Module:
    """Build ``library:name`` with random weights, after :func:`check_spec`."""
    family, name, kwargs = check_spec(library, name, kwargs)
    return family.build(name, kwargs)


def model_shapes(library: str, name: str, kwargs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of ``library:name``, built on the meta device (no memory)."""
    family, name, kwargs = check_spec(library, name, kwargs)
    with torch.device("meta"):
        model = family.build(name, kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``, checked against the registry."""
    library, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(
            f"unknown model {spec!r}: use FAMILY:NAME with FAMILY one of "
            f"{', '.join(sorted(families()))} (timm:resnet18), or the path of a saved "
            ".wrapcal file"
        )
    check_spec(library, name, {})
    return library, name


def _torchvision_builder(cls_name: str, shapes: dict[str, tuple[int, ...]], kwargs: dict) -> str:
    """The torchvision builder whose model has exactly these tensor shapes (built on the
    meta device, so no memory or time goes to weights), or ``""``."""
    family = families()["torchvision"]
    for name in family.names():
        try:
            with torch.device("meta"):
                candidate = family.build(name, kwargs)
        except Exception:  # builders that do not take these arguments
            continue
        if type(candidate).__name__ != cls_name:
            continue
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            return name
    return ""


def describe_model(wrapped: Any) -> dict[str, Any]:
    """How to rebuild a wrapped model's classifier by name: ``{"library", "name",
    "kwargs"}``, or ``{}`` for a model only its author can build (passed to ``load``).

    A torchvision model is matched to its builder by the shapes of its tensors;
    a ``wrapcal.files.cifar_resnets`` model says its own name.
    """
    source = dict(wrapped.source)
    if source.get("library") == "torchvision" and "name" not in source:
        model = copy.deepcopy(wrapped.backbone)
        # Put the head back to compare the complete model with each builder's.
        parent_path, _, attr = wrapped.head_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, wrapped.head)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        name = _torchvision_builder(source.pop("class"), shapes, source["kwargs"])
        source = {**source, "name": name} if name else {}
        wrapped.source = source
    if source.get("library") is None:
        inner = getattr(wrapped.backbone, "model", wrapped.backbone)
        known = getattr(inner, "wrapcal_source", None)
        if isinstance(known, dict):
            source = {"library": "wrapcal", **known}
    return {k: source[k] for k in ("library", "name", "kwargs") if k in source}
