"""The metadata an export carries: what goes in, what comes out, and the operating points.

One JSON-able dict (:func:`build_metadata`), stored as the ONNX model's
``metadata_props`` (one entry per top-level key, its value JSON-encoded) or as a JSON
file beside a ``.pt2`` (and inside it, as the extra file ``wrapcal.json``).
:func:`read_metadata` reads it back from either, without wrapcal's other modules.

Keys:
    ``format``, ``wrapcal_version``, ``torch_version``;
    ``model``: its name, ``num_features`` and ``num_classes`` (of the probabilities);
    ``class_names``: in output order, or ``None`` when unknown;
    ``input``: ``name``, ``shape`` (``"batch"`` first) and ``dtype``; with the
    preprocessing in the graph also ``layout`` (``"NHWC"``) and ``channel_order`` (of the
    ``uint8`` images it takes: ``"RGB"``, or ``"L"``);
    ``preprocessing``: what the model's inputs are (:class:`~wrapcal.Preprocess`:
    ``mean``, ``std``, ``size``, ``channel_order``, ``value_range``, ``interpolation``)
    and ``in_graph`` (whether the graph applies it to ``uint8`` images, or takes inputs
    already preprocessed so), or ``None`` when unknown;
    ``outputs``: in graph order, each ``name``, ``kind``, ``dtype`` and ``shape``;
    ``plugins``: by name, in the order they act: ``class``, ``stage``, ``params``
    (``plugin.get_params()``), ``state`` (learned plain values), ``learned`` (learned
    tensors of at most :data:`SMALL` elements as values, e.g. conformal
    ``thresholds``, abstain ``threshold``; larger ones as ``shape`` and ``dtype``) and
    ``outputs`` (name -> kind);
    ``operating_points``: ``wrapped.operating_points`` as measured at ``fit`` on the
    calibration set (per score, the threshold accepting ``accept_rate`` of it, 95% by
    default; with several ``fit(accept_rates=...)`` also ``accept_rates`` and
    ``thresholds_at``, one table per rate; accuracy, ECE, NLL), or ``None``. Copied
    only when every name in it is a plain name (:data:`NAME`) and each threshold names
    one of the exported outputs: the operating points may come from a saved file, and a
    server reads these names (as keys, in pages, in paths).
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wrapcal.export.checks import ExportError
from wrapcal.export.module import OutputSpec
from wrapcal.export.targets import is_export_metadata, sidecar
from wrapcal.plugin.base import Plugin, get_tags

#: The name of the metadata inside a ``.pt2`` archive (``torch.export.save``'s extra file).
PT2_EXTRA_FILE = "wrapcal.json"

if TYPE_CHECKING:
    from wrapcal.model.wrapped import WrappedModel

__all__ = [
    "KEYS",
    "NAME",
    "SMALL",
    "build_metadata",
    "check_operating_point_names",
    "checked_operating_points",
    "class_names_of",
    "read_metadata",
    "to_json",
]

#: The names an export's operating points may hold (scores and metrics): letters,
#: digits and ``_ . @ % + -``, at most 64 characters; no path separator, no markup.
NAME = re.compile(r"[A-Za-z0-9_.@%+-]{1,64}")

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
    "preprocessing",
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


def _learned(plugin: Plugin) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, buffer in plugin.named_buffers():
        dtype = str(buffer.dtype).removeprefix("torch.")
        if buffer.numel() <= SMALL:
            out[name] = buffer.detach().cpu().tolist()
        else:
            out[name] = {"shape": list(buffer.shape), "dtype": dtype}
    return out


def _plugin_entry(plugin: Plugin) -> dict[str, Any]:
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


def _shown(name: object) -> str:
    """A name for a message: its repr, cut to 40 characters (a hostile one may be long)."""
    text = repr(name)
    return text if len(text) <= 40 else text[:37] + "..."


_FIX = (
    "fit the model again to measure them, or set wrapped.operating_points = None to "
    "export without them"
)


def check_operating_point_names(points: Any) -> None:
    """Refuse operating points that are not the form ``fit`` measures, or that hold a
    name that is not plain (:data:`NAME`); cheap, so :func:`wrapcal.export.export` runs
    it before the trace.

    Raises:
        ExportError: The first problem, and the fix.
    """
    from wrapcal.model.operating_points import is_operating_points

    if points is None:
        return
    if not is_operating_points(points):
        raise ExportError(
            f"the model's operating points are not the thresholds and metrics fit measures; {_FIX}"
        )
    for table, names in _named_tables(points):
        for name in names:
            if not NAME.fullmatch(name):
                raise ExportError(
                    f"the model's operating points name a {table} {_shown(name)} "
                    f"({len(name)} characters), which is not a plain name (letters, digits, "
                    f"_ . @ % + -, at most 64); {_FIX}"
                )


def _named_tables(points: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(what, names)`` of every table of names in operating points: the thresholds,
    the metrics, and with several rates each rate's thresholds."""
    tables: list[tuple[str, Any]] = [
        ("threshold", points["thresholds"]),
        ("metric", points["metrics"]),
    ]
    for rate, thresholds in points.get("thresholds_at", {}).items():
        tables.append((f"threshold at {rate}", thresholds))
    return tables


def checked_operating_points(points: Any, outputs: list[str]) -> dict[str, Any] | None:
    """The operating points to write into the metadata, checked.

    Args:
        points: ``wrapped.operating_points`` (from ``fit``, or from a saved file).
        outputs: The names of the exported outputs.

    Raises:
        ExportError: Not the form ``fit`` measures, a name that is not plain
            (:data:`NAME`), or a threshold for a score the export does not output.
    """
    check_operating_point_names(points)
    if points is None:
        return None
    every = [points["thresholds"], *points.get("thresholds_at", {}).values()]
    unknown = [name for table in every for name in table if name not in outputs]
    if unknown:
        raise ExportError(
            f"the model's operating points hold a threshold for {_shown(unknown[0])}, which "
            f"is not one of the exported outputs ({', '.join(outputs)}); {_FIX}"
        )
    return points


def build_metadata(
    wrapped: WrappedModel,
    specs: list[OutputSpec],
    example: torch.Tensor,
    fmt: str,
    class_names: list[str] | None,
    includes_preprocessing: bool = False,
) -> dict[str, Any]:
    """The export's metadata (module docstring), JSON-able (``includes_preprocessing``:
    the graph takes ``uint8`` images ``[N, H, W, C]``).

    Raises:
        ValueError: ``class_names`` does not hold one name per class.
        ExportError: The operating points hold names that must not be copied
            (:func:`checked_operating_points`).
    """
    from wrapcal._version import __version__

    classes = wrapped.num_classes_out
    record = wrapped.preprocess
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
        "input": _input_entry(wrapped, example, includes_preprocessing),
        "preprocessing": None
        if record is None
        else {**record.to_config(), "in_graph": includes_preprocessing},
        "outputs": [spec.as_dict() for spec in specs],
        "plugins": {
            name: _plugin_entry(plugin)
            for name, plugin in zip(wrapped.plugin_names, wrapped.plugins, strict=True)
        },
        "operating_points": checked_operating_points(
            wrapped.operating_points, [spec.name for spec in specs]
        ),
    }


def _input_entry(wrapped: WrappedModel, example: torch.Tensor, pixels: bool) -> dict[str, Any]:
    """The ``input`` entry: what the graph takes."""
    entry: dict[str, Any] = {
        "name": "input",
        "shape": ["batch", *example.shape[1:]],
        "dtype": str(example.dtype).removeprefix("torch."),
    }
    if pixels:
        assert wrapped.preprocess is not None  # pixels in the graph come from its record
        entry["layout"] = "NHWC"
        entry["channel_order"] = "L" if wrapped.preprocess.channels == 1 else "RGB"
    return entry


def _from_archive(path: Path) -> dict[str, Any] | None:
    """The metadata inside a ``.pt2`` (its extra file ``wrapcal.json``), read from the
    zip archive without loading the program."""

    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.endswith(f"/extra/{PT2_EXTRA_FILE}"):
                    return json.loads(archive.read(info))
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an export: an ``.onnx`` file's ``metadata_props``, or for a
    ``.pt2`` the JSON file beside it (``model.pt2.json``; ``model.json`` as earlier
    exports wrote it, when it holds export metadata), else the copy inside it.

    Raises:
        FileNotFoundError: No such export, or no metadata beside or inside the ``.pt2``.
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
    beside = sidecar(path)
    if beside.is_file():
        return json.loads(beside.read_text())
    legacy = path.with_suffix(".json")
    if legacy.is_file() and is_export_metadata(legacy):
        return json.loads(legacy.read_text())
    if not path.is_file():
        raise FileNotFoundError(f"no export at {path}")
    inside = _from_archive(path)
    if inside is None:
        raise FileNotFoundError(f"no metadata file {beside} beside {path}, nor inside it")
    return inside
