"""Features/head split for timm, torchvision and any classifier ending in ``nn.Linear``.

Each adapter is an ordinary plugin answering ``wrapcal_split_model`` (``firstresult``):
the first one that recognises the model wins. The adapters take the head out of the
model (a copy, unless the user asked otherwise), so the backbone returns the head's
input and ``head(backbone(x))`` is exactly ``model(x)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import nn

from wrapcal.errors import SplitError
from wrapcal.plugin.hookspecs import hookimpl
from wrapcal.plugin.torch_helpers import HOW_TO_SPLIT_BY_HAND

__all__ = [
    "HOW_TO_SPLIT_BY_HAND",
    "DistilledHead",
    "DistilledTokens",
    "FeatureTap",
    "LinearFallbackAdapter",
    "Split",
    "TappedBackbone",
    "TimmAdapter",
    "TorchvisionAdapter",
    "split_at",
]


@dataclass
class Split:
    """A classifier cut in two: ``head(backbone(x))`` gives the logits.

    Attributes:
        backbone: Module mapping inputs to features ``[B, D]``.
        head: Module mapping features ``[B, D]`` to logits ``[B, K]``.
        kind: How the split was found (``"timm"``, ``"torchvision"``, ``"module"``,
            ``"linear"`` (a bare ``nn.Linear``) or ``"manual"``); saved so a loaded model is
            split the same way.
        source: How to rebuild the model by name when loading (empty for custom models).
        head_path: The dotted name of the head inside the model, when known.
        input_shape: The shape of one input the model takes, when the adapter knows it
            (channels for a CNN, the whole shape for a fixed-size ViT).
        fixed_input_size: Whether only that spatial size works.
    """

    backbone: nn.Module
    head: nn.Module
    kind: str = "manual"
    source: dict[str, Any] = field(default_factory=dict)
    head_path: str | None = None
    input_shape: tuple[int, ...] | None = None
    fixed_input_size: bool = False

    @property
    def num_classes(self) -> int:
        """Number of logits the head returns (from its last ``nn.Linear``)."""
        return _last_linear(self.head).out_features

    @property
    def num_features(self) -> int:
        """Width of the features the head takes."""
        width = getattr(self.head, "in_features", None)
        return width if isinstance(width, int) else _first_linear(self.head).in_features


def _last_linear(module: nn.Module) -> nn.Linear:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SplitError(
            f"the head {type(module).__name__} has no nn.Linear; {HOW_TO_SPLIT_BY_HAND}"
        )
    return linears[-1]


def _first_linear(module: nn.Module) -> nn.Linear:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m
    return _last_linear(module)  # raises the error that names the fix


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


class TimmClassifier(Protocol):
    """What the timm adapter calls on a timm model (found by duck typing, so any model
    with these methods splits the same way)."""

    def get_classifier(self) -> nn.Module | tuple[nn.Module, ...]: ...

    def reset_classifier(self, num_classes: int) -> None: ...

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...


def _timm(model: nn.Module) -> TimmClassifier:
    """``model`` as the timm protocol: only models that passed TimmAdapter's check for
    its methods reach the functions that call this."""
    return cast(TimmClassifier, model)


class FeatureTap(nn.Identity):
    """Stands where the head was; checks once that the model returns the head's output.

    For a model split at an arbitrary final ``nn.Linear`` the split is exact only if
    the model returns that layer's output unchanged. The tap records its output, and
    :class:`TappedBackbone` compares it, by identity, with the model's output.
    """

    #: The last output (set at each pass; ``None`` once read, not to keep the batch).
    last_output: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A new tensor object (a view, no copy): found by identity in the model's output,
        # it is the logits' slot, never the features the model may also return.
        out = x.view_as(x)
        self.last_output = out
        return out


def _holds(output: object, value: torch.Tensor) -> bool:
    """Whether the model's ``output`` is ``value`` or holds it (the object itself) as an
    item of a tuple or list or a value of a dict: the logits, returned unchanged."""
    if output is value:
        return True
    if isinstance(output, (tuple, list)):
        return any(item is value for item in output)
    if isinstance(output, Mapping):
        return any(item is value for item in output.values())
    return False


class TappedBackbone(nn.Module):
    """A model whose final linear layer was replaced by a :class:`FeatureTap`.

    The model may return that layer's output itself, or a tuple, list or dict that holds
    it unchanged (``(logits, aux)``, ``{"logits": ...}``). While ``keep_output`` is
    ``True`` (``wrapped(x)`` sets it for one pass) it keeps ``kept_output = (output,
    features)``: the model's output and the object in it where the logits go, so that
    ``wrapped(x)`` returns the same structure with the calibrated logits in place.
    """

    def __init__(self, model: nn.Module, head_path: str) -> None:
        super().__init__()
        self.model = model
        self.head_path = head_path
        self._checked = False
        self.keep_output = False
        self.kept_output: tuple[Any, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tap = self.model.get_submodule(self.head_path)
        if not isinstance(tap, FeatureTap):
            raise SplitError(
                f"the module at '{self.head_path}' of {type(self.model).__name__} was "
                "replaced after the split; wrap the model again"
            )
        out = self.model(x)
        features = tap.last_output
        if not self._checked:
            if features is None or not _holds(out, features):
                raise SplitError(
                    f"cannot split {type(self.model).__name__} at '{self.head_path}': the "
                    "model changes that layer's output before returning it (a final "
                    f"activation or reshaping); {HOW_TO_SPLIT_BY_HAND}"
                )
            self._checked = True
        if features is None:
            raise SplitError(
                f"{type(self.model).__name__} did not call its layer '{self.head_path}' in "
                f"this pass; {HOW_TO_SPLIT_BY_HAND}"
            )
        if self.keep_output:
            self.kept_output = (out, features)
        tap.last_output = None  # do not keep the batch alive
        return features


def split_at(model: nn.Module, head_path: str) -> Split:
    """Split a model at a named final module, checked at the first forward pass."""
    try:
        head = model.get_submodule(head_path)
    except AttributeError as err:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise SplitError(
            f"{type(model).__name__} has no submodule '{head_path}'; its nn.Linear layers "
            f"are {names}"
        ) from err
    _set_submodule(model, head_path, FeatureTap())
    return Split(TappedBackbone(model, head_path), head, kind="module", head_path=head_path)


class TimmAdapter:
    """timm models: ``get_classifier()`` is the head, ``reset_classifier(0)`` the backbone.

    After ``reset_classifier(0)`` timm's ``forward`` ends in
    ``forward_head(..., pre_logits=True)``: the features the classifier takes.
    """

    @hookimpl
    def wrapcal_split_model(self, model: nn.Module) -> Split | None:
        if not type(model).__module__.startswith("timm.") or not all(
            hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")
        ):
            return None
        head = _timm(model).get_classifier()
        if isinstance(head, tuple):
            return _split_distilled(model, head)
        if not isinstance(head, nn.Module) or not any(
            isinstance(m, nn.Linear) for m in head.modules()
        ):
            raise SplitError(
                f"timm model {type(model).__name__} has a classifier of type "
                f"{type(head).__name__}, not a linear layer; {HOW_TO_SPLIT_BY_HAND}"
            )
        cfg = getattr(model, "pretrained_cfg", None) or {}
        source: dict[str, Any] = {}
        if cfg.get("architecture"):
            source = {
                "library": "timm",
                "name": cfg["architecture"],
                "kwargs": _timm_kwargs(model, head),
            }
        shape, fixed = _timm_input(model)
        _timm(model).reset_classifier(0)
        return Split(
            model,
            head,
            kind="timm",
            source=source,
            head_path=_timm_head_slot(model),
            input_shape=shape,
            fixed_input_size=fixed,
        )


def _timm_kwargs(model: nn.Module, head: nn.Module) -> dict[str, Any]:
    """The constructor arguments that rebuild this timm model with the same shapes and the
    same eval-mode outputs (the registry's allow-list: sizes, rates, the pooling)."""
    kwargs: dict[str, Any] = {"num_classes": _last_linear(head).out_features}
    for attr in ("in_chans", "drop_rate"):
        value = getattr(model, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            kwargs[attr] = value
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        kwargs["img_size"] = [int(v) for v in size]
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)  # SelectAdaptivePool2d keeps its kind
    if isinstance(pool, str):
        kwargs["global_pool"] = pool
    return kwargs


def _timm_input(model: nn.Module) -> tuple[tuple[int, ...] | None, bool]:
    """The input a timm model takes: a ViT with a strict patch grid fixes its size."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    channels = getattr(model, "in_chans", None) or getattr(embed, "in_chans", None)
    if not isinstance(channels, int):
        return None, False
    if getattr(embed, "strict_img_size", False) and isinstance(size, (tuple, list)):
        return (channels, *map(int, size)), True
    default = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if isinstance(default, (tuple, list)) and len(default) == 3:
        return (channels, *map(int, default[1:])), False  # the size is only the usual one
    return None, False


def _timm_head_slot(model: nn.Module) -> str | None:
    """Where ``reset_classifier(0)`` left an Identity in place of the classifier."""
    slot = _timm(model).get_classifier()
    if not isinstance(slot, nn.Module):
        return None
    for name, module in model.named_modules():
        if module is slot and name:
            return name
    return None


class DistilledHead(nn.Module):
    """The two heads of a distilled timm model, averaged as the model does in eval mode.

    DeiT's heads read two tokens (class and distillation): the features are the two
    tokens side by side and each head reads its half. LeViT's heads read the same pooled
    features. Either way the output is ``(head(a) + head_dist(b)) / 2``, exactly the
    model's, and plugins act on these averaged logits.
    """

    def __init__(self, head: nn.Module, head_dist: nn.Module, two_tokens: bool) -> None:
        super().__init__()
        self.head = head
        self.head_dist = head_dist
        self.two_tokens = two_tokens
        width = _first_linear(head).in_features
        self.in_features = 2 * width if two_tokens else width

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.two_tokens:
            token, dist_token = features.chunk(2, dim=-1)
            return (self.head(token) + self.head_dist(dist_token)) / 2
        return (self.head(features) + self.head_dist(features)) / 2


class DistilledTokens(nn.Module):
    """A DeiT-distilled backbone: its class and distillation tokens, side by side."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = _timm(self.model).forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, 1]], dim=-1)


def _split_distilled(model: nn.Module, heads: tuple[object, ...]) -> Split:
    first, second = heads if len(heads) == 2 else (None, None)
    if not isinstance(first, nn.Module) or not isinstance(second, nn.Module):
        raise SplitError(
            f"timm model {type(model).__name__} has {len(heads)} classifiers; "
            f"{HOW_TO_SPLIT_BY_HAND}"
        )
    two_tokens = getattr(model, "dist_token", None) is not None
    head = DistilledHead(first, second, two_tokens)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    source: dict[str, Any] = {}
    if cfg.get("architecture"):
        kwargs = _timm_kwargs(model, head)
        source = {"library": "timm", "name": cfg["architecture"], "kwargs": kwargs}
    shape, fixed = _timm_input(model)
    _timm(model).reset_classifier(0)
    backbone = DistilledTokens(model) if two_tokens else model
    return Split(
        backbone, head, kind="timm", source=source, input_shape=shape, fixed_input_size=fixed
    )


#: torchvision heads are plain attributes, tried in this order.
TORCHVISION_HEADS = ("fc", "classifier", "heads", "head")


class TorchvisionAdapter:
    """torchvision models: the head is ``fc``, ``classifier``, ``heads`` or ``head``.

    A ``Sequential`` head (``Dropout, Linear`` or ``LayerNorm, Flatten, Linear``) is cut
    before its final ``Linear``; what precedes it stays in the backbone.
    """

    @hookimpl
    def wrapcal_split_model(self, model: nn.Module) -> Split | None:
        if not type(model).__module__.startswith("torchvision."):
            return None
        for attr in TORCHVISION_HEADS:
            module = getattr(model, attr, None)
            if isinstance(module, nn.Linear):
                path = attr
            elif isinstance(module, nn.Sequential) and isinstance(module[-1], nn.Linear):
                path = f"{attr}.{list(module.named_children())[-1][0]}"
            else:
                continue
            head = model.get_submodule(path)
            _set_submodule(model, path, nn.Identity())
            kwargs: dict[str, Any] = {"num_classes": head.out_features}
            if isinstance(getattr(model, "image_size", None), int):
                kwargs["image_size"] = model.image_size  # ViT's position embedding depends on it
            source = {"library": "torchvision", "class": type(model).__name__, "kwargs": kwargs}
            return Split(model, head, kind="torchvision", source=source, head_path=path)
        raise SplitError(
            f"torchvision model {type(model).__name__} has no linear head in "
            f"{', '.join(TORCHVISION_HEADS)} (SqueezeNet, say, ends in a convolution); "
            f"{HOW_TO_SPLIT_BY_HAND}"
        )


class LinearFallbackAdapter:
    """Any model: split at its last ``nn.Linear``, checked at the first forward pass."""

    @hookimpl(trylast=True)
    def wrapcal_split_model(self, model: nn.Module) -> Split | None:
        if isinstance(model, nn.Linear):
            # The model is its own head (logistic regression on given features).
            return Split(nn.Identity(), model, kind="linear")
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not names:
            raise SplitError(
                f"cannot split {type(model).__name__}: no adapter knows it and it has no "
                f"nn.Linear layer; {HOW_TO_SPLIT_BY_HAND}"
            )
        return split_at(model, names[-1])
