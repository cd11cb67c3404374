"""Hugging Face configs as untrusted input: the allow-list the ``transformers`` family checks.

A saved file describes a ``transformers`` image classifier by its ``model_type`` and its
config as a plain dict. ``AutoModelForImageClassification.from_config`` would follow
some config keys off the machine or into arbitrary code (``auto_map`` with
``trust_remote_code``, ``_name_or_path``, a pretrained ``backbone``, a hub attention
kernel in ``attn_implementation``, a ``quantization_config``), so a key is accepted only
if it is one of the keys that the config classes of the known image classifiers
serialise by default, none of those, and its value is plain JSON (numbers, short
identifier-like strings, lists of them; ``id2label`` with the class names). Model types
outside the image-classification mapping, and those that do not map pixels to a
classifier head (:data:`NOT_BY_NAME`), are not known.

Everything here imports ``transformers`` only when called.
"""

from __future__ import annotations

import logging
import math
import re
from functools import cache
from typing import Any

from wrapcal.plugin import Check, Interval, Options

__all__ = [
    "DENIED",
    "NOT_BY_NAME",
    "allowed_keys",
    "check_for_type",
    "class_names_of",
    "config_class",
    "config_kwargs",
    "known_types",
    "union_constraints",
]

#: Keys never taken from outside: they name files, repositories, remote code, kernels to
#: download, quantisation back-ends or a pretrained backbone, or are bookkeeping.
DENIED = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "auto_map",
        "trust_remote_code",
        "transformers_version",
        "model_type",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "attn_implementation",
        "experts_implementation",
        "backbone",
        "backbone_config",
        "backbone_kwargs",
        "use_pretrained_backbone",
        "use_timm_backbone",
        "pretrained_cfg",
        "architecture",
        "model_args",
        "custom_pipelines",
        "tokenizer_class",
    }
)

#: Image-classification model types that cannot be rebuilt by name (they can still be
#: wrapped, and loaded with ``wrapcal.load(path, model=...)``): timm_wrapper builds a
#: timm model by name (wrap ``model.timm_model``: the timm adapter knows it), ImageGPT
#: reads token ids, SigLIP 2 reads patch sequences, Perceiver's head is a cross-attention
#: decoder, ShieldGemma 2 is a language model, DiNAT needs the natten library.
NOT_BY_NAME = frozenset(
    {"timm_wrapper", "imagegpt", "siglip2", "perceiver", "shieldgemma2", "dinat"}
)

_MAX_INT = 1 << 24
_MAX_CLASSES = 1_000_000
_MAX_SIDE = 8192
_WORD = re.compile(r"[A-Za-z0-9_.\-]{0,64}\Z")
_PROBLEMS = ["regression", "single_label_classification", "multi_label_classification"]


def _mapping() -> dict[str, Any]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    return dict(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


@cache
def known_types() -> tuple[str, ...]:
    """The model types the family builds: the image-classification mapping's, less
    :data:`NOT_BY_NAME`."""
    return tuple(sorted(t for t in _mapping() if t not in NOT_BY_NAME))


def class_names_of(model_type: str) -> tuple[str, ...]:
    """The classifier classes of a model type (DeiT and LeViT have two: with teacher)."""
    names = _mapping().get(model_type, ())
    return (names,) if isinstance(names, str) else tuple(names)


def config_class(model_type: str) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def _keys_of(config_class: Any) -> dict[str, Any]:
    """A config class's serialised keys (less the denied ones) -> the sub-config class
    for nested configs (CLIP's ``vision_config``), else ``None``."""
    subs = dict(getattr(config_class, "sub_configs", None) or {})
    library_log = logging.getLogger("transformers")
    level = library_log.level
    library_log.setLevel(logging.ERROR)  # the defaults of some text sub-configs warn
    try:
        defaults = config_class().to_dict()
    finally:
        library_log.setLevel(level)
    keys = {}
    for key in defaults:
        if key in DENIED or key.startswith("_"):
            continue
        sub = subs.get(key)
        keys[key] = sub if isinstance(sub, type) and hasattr(sub, "to_dict") else None
    return keys


@cache
def allowed_keys(model_type: str) -> dict[str, Any]:
    """The keys a ``model_type`` config may have: key -> sub-config class or ``None``."""
    return _keys_of(config_class(model_type))


def _plain(value: Any, depth: int = 0) -> bool:
    """JSON scalars, identifier-like strings and (nested) lists of them."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= _MAX_INT
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return bool(_WORD.match(value))
    if isinstance(value, list):
        return depth < 3 and len(value) <= 256 and all(_plain(v, depth + 1) for v in value)
    return False


def _side(value: Any) -> bool:
    sides = value if isinstance(value, list) and len(value) in (1, 2) else [value]
    return all(Interval(int, 1, _MAX_SIDE).accepts(v) for v in sides)


def _name(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 256 and value.isprintable()


def _id2label(value: Any) -> bool:
    if not isinstance(value, dict) or not 0 < len(value) <= _MAX_CLASSES:
        return False
    ids = {str(i) for i in range(len(value))}
    return {str(k) for k in value} == ids and all(_name(v) for v in value.values())


def _label2id(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) <= _MAX_CLASSES
        and all(_name(k) and Interval(int, 0, _MAX_CLASSES).accepts(v) for k, v in value.items())
    )


def _architectures(value: Any) -> bool:
    if value is None:
        return True
    every = {n for t in known_types() for n in class_names_of(t)}
    return isinstance(value, list) and len(value) == 1 and value[0] in every


def _nested_keys(sub: Any) -> set[str]:
    """A nested config's keys; its own class names are the outer config's business."""
    return set(_keys_of(sub)) - {"id2label", "label2id", "num_labels"}


def _nested(keys: set[str]) -> Check:
    return Check(
        lambda v: isinstance(v, dict) and all(k in keys and _plain(x) for k, x in v.items()),
        f"a nested config of plain values (keys: {', '.join(sorted(keys))})",
    )


_PLAIN = Check(_plain, "plain JSON: null, a bool, a number, a short word or a list of them")
_SPECIAL: dict[str, list[Any]] = {
    "id2label": [
        None,
        Check(_id2label, "an object {'0': name, '1': name, ...} of the class names"),
    ],
    "label2id": [None, Check(_label2id, "an object {name: class index}")],
    "num_labels": [Interval(int, 1, _MAX_CLASSES)],
    "num_classes": [Interval(int, 1, _MAX_CLASSES)],  # the CLI's --num-classes
    "architectures": [Check(_architectures, "a list of one image-classification class name")],
    "problem_type": [None, Options(str, _PROBLEMS)],
    "image_size": [Check(_side, f"an int or a pair of ints in [1, {_MAX_SIDE}]")],
}


@cache
def union_constraints() -> dict[str, list[Any]]:
    """Every key some known model type takes, with its constraint (what the registry
    checks before building; :func:`check_for_type` narrows it to one model type)."""
    plain: set[str] = set()
    nested: dict[str, set[str]] = {}
    for model_type in known_types():
        for key, sub in allowed_keys(model_type).items():
            if sub is None:
                plain.add(key)
            else:
                nested.setdefault(key, set()).update(_nested_keys(sub))
    constraints: dict[str, list[Any]] = {key: [_PLAIN] for key in plain}
    for key, keys in nested.items():
        constraints[key] = [*constraints.get(key, []), _nested(keys)]
    constraints.update(_SPECIAL)
    return constraints


def check_for_type(model_type: str, kwargs: dict[str, Any]) -> None:
    """Refuse a key (or a nested config's key) that this model type's config lacks.

    Raises:
        ValueError: Naming the key and the model type.
    """
    allowed = allowed_keys(model_type)
    for key, value in kwargs.items():
        if key not in allowed and key not in _SPECIAL:
            raise ValueError(f"transformers model {model_type!r} has no config key {key!r}")
        sub = allowed.get(key)
        if sub is not None and isinstance(value, dict):
            extra = sorted(set(value) - _nested_keys(sub))
            if extra:
                raise ValueError(
                    f"transformers model {model_type!r}: {key} has no key {extra[0]!r}"
                )


def config_kwargs(config: Any) -> dict[str, Any]:
    """A config as the plain dict a saved file holds: the allowed keys only, with
    ``id2label``'s keys as strings (JSON's, so the file's digest is stable)."""
    allowed = allowed_keys(config.model_type)
    kwargs = {k: v for k, v in config.to_dict().items() if k in allowed}
    for key, sub in allowed.items():
        if sub is not None and isinstance(kwargs.get(key), dict):
            nested = _nested_keys(sub)
            kwargs[key] = {k: v for k, v in kwargs[key].items() if k in nested}
    if isinstance(kwargs.get("id2label"), dict):
        kwargs["id2label"] = {str(k): v for k, v in kwargs["id2label"].items()}
    return kwargs
