"""The metadata an export carries: what goes in, what comes out, and the operating points.

One JSON-able dict (:func:`build_metadata`), stored as the ONNX model's
``metadata_props`` (one entry per top-level key, its value JSON-encoded) or as a JSON
file beside a ``.pt2`` (and inside it, as the extra file ``wrapcal.json``).
:func:`read_metadata` reads it back from either, without wrapcal's other modules.

Keys:
    ``format``, ``wrapcal_version``, ``torch_version``;
    ``model``: its name, ``num_features`` and ``num_classes`` (of the probabilities);
    ``class_names``: in output order, or ``None`` when unknown;
    ``input``: ``name``, ``shape`` (``"batch"`` first) and ``dtype``;
    ``outputs``: in graph order, each ``name``, ``kind``, ``dtype`` and ``shape``;
    ``plugins``: by name, in the order they act: ``class``, ``stage``, ``params``
    (``plugin.get_params()``), ``state`` (learned plain values), ``learned`` (learned
    tensors of at most :data:`SMALL` elements as values, e.g. conformal
    ``thresholds``, abstain ``threshold``; larger ones as ``shape`` and ``dtype``) and
    ``outputs`` (name -> kind);
    ``operating_points``: ``wrapped.operating_points`` as measured at ``fit`` on the
    calibration set (thresholds accepting 95% of it per score; accuracy, ECE, NLL), or
    ``None``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wrapcal.export.module import OutputSpec
from wrapcal.plugin.base import get_tags

if TYPE_CHECKING:
    from wrapcal.model.wrapped import WrappedModel

__all__ = ["KEYS", "SMALL", "build_metadata", "class_names_of", "read_metadata", "to_json"]

#: Learned tensors up to this many elements are written out as values.
SMALL = 1024
#: The top-level keys, in order (each one ONNX ``metadata_props`` entry).
KEYS = (
    "format",
    "wrapcal_version",
    "torch_version",
    "model",
    "class_names",
    "input",
    "outputs",
    "plugins",
    "operating_points",
)


def _plain(value: Any) -> Any:
    """``value`` with non-finite floats as strings (``"inf"``), which JSON cannot hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_json(value: Any) -> str:
    """Strict JSON of a metadata value (no NaN/inf literals)."""
    return json.dumps(_plain(value), allow_nan=False)


def class_names_of(model: nn.Module) -> list[str] | None:
    """The class names a model carries in output order (a ``class_names`` attribute, or a
    Hugging Face config's ``id2label`` that is not ``LABEL_k``), if any."""
    for module in model.modules():
        names = getattr(module, "class_names", None)
        if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
            return list(names)
        id2label = getattr(getattr(module, "config", None), "id2label", None)
        if isinstance(id2label, dict) and id2label:
            ordered = [str(id2label[k]) for k in sorted(id2label, key=int)]
            if not all(n.startswith("LABEL_") and n[6:].isdigit() for n in ordered):
                return ordered
    return None


def _learned(plugin: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, buffer in plugin.named_buffers():
        dtype = str(buffer.dtype).removeprefix("torch.")
        if buffer.numel() <= SMALL:
            out[name] = buffer.detach().cpu().tolist()
        else:
            out[name] = {"shape": list(buffer.shape), "dtype": dtype}
    return out


def _plugin_entry(plugin: nn.Module) -> dict[str, Any]:
    tags = get_tags(plugin)
    kind = type(plugin)
    return {
        "class": f"{kind.__module__}.{kind.__qualname__}",
        "stage": tags.stage.name,
        "params": plugin.get_params(),
        "state": plugin.get_state(),
        "learned": _learned(plugin),
        "outputs": {name: k.value for name, k in tags.outputs.items()},
    }


def build_metadata(
    wrapped: WrappedModel,
    specs: list[OutputSpec],
    example: torch.Tensor,
    fmt: str,
    class_names: list[str] | None,
) -> dict[str, Any]:
    """The export's metadata (module docstring), JSON-able.

    Raises:
        ValueError: ``class_names`` does not hold one name per class.
    """
    from wrapcal._version import __version__

    classes = wrapped.num_classes_out
    names = class_names if class_names is not None else class_names_of(wrapped.backbone)
    if names is not None and (
        len(names) != classes or not all(isinstance(n, str) and n for n in names)
    ):
        raise ValueError(
            f"class_names holds {len(names)} names; the model has {classes} classes: give "
            "one non-empty name per class, in output order"
        )
    return {
        "format": fmt,
        "wrapcal_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "model": {
            "name": wrapped.model_name,
            "num_features": wrapped.num_features,
            "num_classes": classes,
        },
        "class_names": None if names is None else list(names),
        "input": {
            "name": "input",
            "shape": ["batch", *example.shape[1:]],
            "dtype": str(example.dtype).removeprefix("torch."),
        },
        "outputs": [spec.as_dict() for spec in specs],
        "plugins": {
            name: _plugin_entry(plugin)
            for name, plugin in zip(wrapped.plugin_names, wrapped.plugins, strict=True)
        },
        "operating_points": wrapped.operating_points,
    }


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an export: an ``.onnx`` file's ``metadata_props``, or the JSON
    file beside a ``.pt2`` (``model.pt2`` -> ``model.json``).

    Raises:
        FileNotFoundError: No such export, or no JSON beside the ``.pt2``.
        ValueError: The file holds no wrapcal metadata.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        if "wrapcal_version" not in props:
            raise ValueError(f"{path} holds no wrapcal metadata (not exported by wrapcal?)")
        return {key: json.loads(props[key]) for key in KEYS if key in props}
    beside = path.with_suffix(".json")
    if not beside.is_file():
        raise FileNotFoundError(f"no metadata file {beside} beside {path}")
    return json.loads(beside.read_text())
