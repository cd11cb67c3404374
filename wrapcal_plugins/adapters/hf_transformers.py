"""Hugging Face ``transformers`` image classifiers: a split adapter and a model family.

``wrapcal.wrap(hf_model)`` takes any ``AutoModelForImageClassification`` model (ViT,
DeiT, BEiT, DINOv2, ConvNeXt, Swin, ResNet, EfficientNet, MobileViT, LeViT...). Their
``forward(pixel_values)`` returns an output object whose ``.logits`` come from a
classifier module (``classifier``, ``fc``, ``head``...) applied to a pooled
representation, which differs per architecture (ViT: the class token after the final
layer norm; DINOv2: class token and mean patch token side by side; ConvNeXt, Swin,
ResNet: the pooler output, flattened). The split does not compute it again: the
classifier is replaced by a :class:`~wrapcal.model.split.FeatureTap`, so the model's own
forward pass produces the representation and the backbone returns what the classifier
would have read; at the first forward pass it checks that the model returned exactly
the tap's output (or, for the distilled models that average two heads, exactly that
average). ``head(backbone(pixel_values))`` is then the model's ``.logits``.

Saved models are rebuilt by name: ``{"library": "transformers", "name": model_type,
"kwargs": config}`` builds ``AutoModelForImageClassification.from_config`` with random
weights, from a config whose keys and values pass the allow-list in
:mod:`wrapcal_plugins.adapters._hf_config` (no path, repository, remote code or download).

``transformers`` is imported only when a model whose class comes from it is wrapped,
or when a ``transformers`` model is built by name.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from wrapcal.plugin import (
    HOW_TO_SPLIT_BY_HAND,
    DistilledHead,
    FeatureTap,
    ModelFamily,
    Split,
    SplitError,
    TappedBackbone,
    check_spec,
    hookimpl,
)
from wrapcal_plugins.adapters import _hf_config

__all__ = [
    "ClassifierInput",
    "build_from_config",
    "is_transformers_model",
    "wrapcal_register_models",
    "wrapcal_split_model",
]

#: Pairs of heads whose logits the model averages (as timm's distilled models do), and
#: whether they read two different tokens (DeiT: class and distillation tokens) or the
#: same pooled features (LeViT, SwiftFormer).
DISTILLED_HEADS: tuple[tuple[tuple[str, str], bool], ...] = (
    (("cls_classifier", "distillation_classifier"), True),
    (("classifier", "classifier_distill"), False),
    (("head", "dist_head"), False),
)
#: Where the classifier lives, tried in this order (``classifier`` nearly everywhere;
#: HGNetV2 and TextNet keep their pooling in ``classifier`` and the linear in ``fc``).
HEAD_NAMES = ("classifier", "fc", "head", "score")
#: Model types whose patch or position embedding takes only the configured image size
#: (the others pad, interpolate or pool any size).
FIXED_SIZE = frozenset(
    {"vit", "deit", "vit_msn", "ijepa", "levit", "hiera", "pvt", "clip", "metaclip_2", "siglip"}
)
#: Image classifiers whose forward does not take an image batch, and what to do instead.
NOT_WRAPPED = {
    "imagegpt": "it reads colour-cluster token ids, not pixel values",
    "siglip2": "it reads patch sequences with a mask and their spatial shapes, not images",
    "timm_wrapper": "wrap its timm model instead: wrapcal.wrap(model.timm_model)",
}
#: A config may not build more modules than this (the largest published image
#: classifiers have a few thousand): a hostile ``num_hidden_layers`` stops here.
MAX_MODULES = 20_000
_PARAMETER_FREE = (nn.Flatten, nn.Dropout, nn.Identity)


def is_transformers_model(model: nn.Module) -> bool:
    """Whether the model's class (or a class it derives from) comes from ``transformers``.

    Reads class names only: nothing is imported.
    """
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


def _has_linear(module: Any) -> bool:
    return isinstance(module, nn.Module) and any(isinstance(m, nn.Linear) for m in module.modules())


def _head_path(name: str, module: Any) -> str | None:
    """The slot of the head under attribute ``name``: the module itself, or the final
    linear of a ``Sequential(Flatten, Linear)`` (then the flattening stays in the
    backbone and the features are ``[B, D]``)."""
    if isinstance(module, nn.Linear):
        return name
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Linear):
        children = list(module.named_children())
        if all(isinstance(m, _PARAMETER_FREE) for _, m in children[:-1]):
            return f"{name}.{children[-1][0]}"
        return name
    if _has_linear(module) and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return name  # a head with its own layers (LeViT: batch norm, then linear)
    return None


def _find_heads(model: nn.Module) -> tuple[tuple[str, ...], bool]:
    for pair, two_tokens in DISTILLED_HEADS:
        if all(_has_linear(getattr(model, name, None)) for name in pair):
            return pair, two_tokens
    for name in HEAD_NAMES:
        path = _head_path(name, getattr(model, name, None))
        if path is not None:
            return (path,), False
    kind = type(model).__name__
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    why = " (num_labels=0: no classifier)" if labels == 0 else ""
    raise SplitError(
        f"transformers model {kind} has no linear classifier in {', '.join(HEAD_NAMES)}"
        f"{why}; wrapcal wraps image classifiers (AutoModelForImageClassification); "
        f"{HOW_TO_SPLIT_BY_HAND}"
    )


class ClassifierInput(TappedBackbone):
    """A ``transformers`` classifier whose head(s) were replaced by feature taps.

    ``forward(pixel_values)`` runs the whole model and returns what its classifier read:
    ``[B, D]``, or for two heads on two tokens, both side by side (``[B, 2 D]``, as
    :class:`~wrapcal.model.split.DistilledHead` expects). Checked once, at the first pass.

    While ``keep_output`` is ``True`` (``wrapped(x)`` sets it for one pass) it keeps
    ``kept_output = (output, logits)``: the model's own output object and the logits
    in it, so that ``wrapped(x)`` returns that object with the calibrated logits in
    place (``wrapped(x).logits``).

    Args:
        model: The model, its classifier slots holding :class:`FeatureTap` s.
        paths: The dotted names of those slots (one, or two averaged heads).
        two_tokens: Whether two heads read different inputs.
    """

    def __init__(self, model: nn.Module, paths: tuple[str, ...], two_tokens: bool) -> None:
        super().__init__(model, paths[0])
        self.paths = tuple(paths)
        self.two_tokens = two_tokens
        self.keep_output = False
        self.kept_output: tuple[Any, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        logits = out.logits if hasattr(out, "logits") else out[0]  # return_dict=False
        if self.keep_output:
            self.kept_output = (out, logits)
        taps = [self.model.get_submodule(path) for path in self.paths]
        inputs = [getattr(tap, "last_output", None) for tap in taps]
        for tap in taps:
            if isinstance(tap, FeatureTap):  # every slot holds one (the adapter put it there)
                tap.last_output = None  # do not keep the batch alive
        if not self._checked and not logits.is_meta:  # meta tensors hold no values to compare
            self._check(logits, inputs)
            self._checked = True
        features = [t for t in inputs if isinstance(t, torch.Tensor)]
        if len(features) != len(inputs):
            raise SplitError(
                f"cannot split {type(self.model).__name__}: a classifier slot among "
                f"{list(self.paths)} was not called in this pass; {HOW_TO_SPLIT_BY_HAND}"
            )
        if len(features) == 1:
            return features[0]
        return torch.cat(features, dim=-1) if self.two_tokens else features[0]

    def _check(self, logits: Any, inputs: list[Any]) -> None:
        kind = type(self.model).__name__
        where = " and ".join(f"'{p}'" for p in self.paths)
        if any(not isinstance(t, torch.Tensor) or t.ndim != 2 for t in inputs):
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in inputs]
            raise SplitError(
                f"cannot split {kind} at {where}: the classifier reads {shapes}, not "
                f"features [batch, width]; {HOW_TO_SPLIT_BY_HAND}"
            )
        if len(inputs) == 1:
            exact = logits is inputs[0]
        else:
            a, b = inputs
            same = self.two_tokens or a is b or torch.equal(a, b)
            exact = same and torch.equal(logits, (a + b) / 2)
        if not exact:
            raise SplitError(
                f"cannot split {kind} at {where}: its logits are not the classifier's "
                f"output{' (nor the average of the two)' if len(inputs) > 1 else ''}; "
                f"{HOW_TO_SPLIT_BY_HAND}"
            )


def _input(model: nn.Module) -> tuple[tuple[int, ...] | None, bool]:
    """The input the config names (channels and image size), and whether only that size
    works."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None) or config  # CLIP-like: a nested config
    channels, size = getattr(vision, "num_channels", None), getattr(vision, "image_size", None)
    if isinstance(size, int):
        size = [size, size]
    if not isinstance(channels, int) or not (
        isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size)
    ):
        return None, False
    return (channels, *size), getattr(config, "model_type", None) in FIXED_SIZE


def _source(model: nn.Module) -> dict[str, Any]:
    """How to rebuild the model by name, or ``{}`` (then ``wrapcal.load(path, model=...)``).

    Only the classes ``transformers`` maps its image-classification model types to are
    rebuilt: a subclass or a remote-code model is its author's to build.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = type(model)
    if (
        model_type not in _hf_config.known_types()
        or cls.__name__ not in _hf_config.class_names_of(model_type)
        or not cls.__module__.startswith("transformers.")
    ):
        return {}
    kwargs = {**_hf_config.config_kwargs(config), "architectures": [cls.__name__]}
    try:
        check_spec("transformers", model_type, kwargs)
    except ValueError as err:
        warnings.warn(
            f"{cls.__name__} is wrapped, but a saved file could not rebuild it by name "
            f"({err}); load it with wrapcal.load(path, model=the_model)",
            UserWarning,
            stacklevel=2,
        )
        return {}
    return {"library": "transformers", "name": model_type, "kwargs": kwargs}


@hookimpl
def wrapcal_split_model(model: nn.Module) -> Split | None:
    """Split a ``transformers`` image classifier at its classifier; ``None`` for others."""
    if not is_transformers_model(model):
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in NOT_WRAPPED:
        raise SplitError(f"cannot wrap {type(model).__name__}: {NOT_WRAPPED[model_type]}")
    paths, two_tokens = _find_heads(model)
    heads = [model.get_submodule(path) for path in paths]
    source = _source(model)
    shape, fixed = _input(model)
    for path in paths:
        _set_submodule(model, path, FeatureTap())
    head = heads[0] if len(heads) == 1 else DistilledHead(heads[0], heads[1], two_tokens)
    return Split(
        ClassifierInput(model, paths, two_tokens),
        head,
        kind="transformers",
        source=source,
        head_path=paths[0],
        input_shape=shape,
        fixed_input_size=fixed,
    )


@contextlib.contextmanager
def _module_budget(limit: int) -> Iterator[None]:
    """Stop a build that registers more than ``limit`` submodules, as it goes."""
    from torch.nn.modules.module import register_module_module_registration_hook

    count = 0

    def hook(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise ValueError(
                f"this transformers config builds more than {limit} modules; the largest "
                "image classifiers have a few thousand (check num_hidden_layers, depths)"
            )

    handle = register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def build_from_config(model_type: str, kwargs: dict[str, Any]) -> nn.Module:
    """``AutoModelForImageClassification.from_config`` with random weights.

    ``kwargs`` passed :func:`wrapcal.files.families.check_spec` (every key allowed for some
    model type, every value plain); here they are narrowed to ``model_type``'s keys.
    ``num_classes`` (the CLI's ``--num-classes``) sets ``num_labels``. Works under
    ``with torch.device("meta"):`` (how ``wrapcal.load`` checks a file's shapes first).

    Raises:
        ValueError: A key this model type does not have, a number of classes that
            disagrees with ``id2label``, or more than :data:`MAX_MODULES` modules.
    """
    from transformers import AutoModelForImageClassification

    _hf_config.check_for_type(model_type, kwargs)
    # A copy: some models append to their config's lists while they are built (LeViT's
    # down_ops), which must not change the caller's (a loaded file's) description.
    kwargs = copy.deepcopy(kwargs)
    # Output format only: wrapcal reads the logits either way, and a tuple-returning config
    # breaks some models' own forward (ViT's reads .last_hidden_state of its encoder's
    # tuple in transformers 5): built as returning dicts, the outputs are the same.
    kwargs.pop("return_dict", None)
    classes = kwargs.pop("num_classes", None)
    if classes is not None:
        if "id2label" in kwargs and len(kwargs["id2label"]) != classes:
            raise ValueError(
                f"num_classes={classes} but id2label names {len(kwargs['id2label'])} classes"
            )
        kwargs.setdefault("num_labels", classes)
    config = _hf_config.config_class(model_type)(**kwargs)
    if not config.architectures:  # from_config needs it to choose among several classes
        config.architectures = [_hf_config.class_names_of(model_type)[0]]
    with _module_budget(MAX_MODULES), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return AutoModelForImageClassification.from_config(config, trust_remote_code=False)


class _Constraints(Mapping):
    """The family's allow-list, computed (importing ``transformers``) at first use."""

    def _data(self) -> dict[str, list[Any]]:
        return _hf_config.union_constraints()

    def __getitem__(self, key: str) -> list[Any]:
        return self._data()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())


def _known() -> tuple[str, ...]:
    return _hf_config.known_types()


@hookimpl
def wrapcal_register_models(register: Callable[[ModelFamily], None]) -> None:
    """The ``transformers`` family: ``transformers:vit`` and saved files, by model type."""
    # Lazy: registering imports nothing; transformers is imported at the first build or check.
    register(
        ModelFamily(
            "transformers", build_from_config, _known, lambda name: name in _known(), _Constraints()
        )
    )
