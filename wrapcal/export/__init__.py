"""Production export: one artifact with calibrated probabilities, scores, sets and thresholds.

>>> wrapcal.export(wrapped, "model.onnx")                  # ONNX (onnx, onnxscript)
>>> wrapcal.export(wrapped, "model.pt2", format="torch")   # torch.export ExportedProgram

The graph takes a batch of inputs ``[batch, *input_shape]`` (any batch size, the model's
dtype, preprocessed as the model expects) and returns, in this order, ``logits``,
``probs``, ``label``, ``confidence``, every score of ``predict`` (``msp``, ``entropy``,
``max_logit``, ``energy`` and each plugin's), then the plugins' other outputs (conformal
``sets``, ``abstain``...). It computes exactly what ``wrapped.predict`` computes, without
``predict``'s input checks. The metadata (:mod:`wrapcal.export.metadata`) names the
outputs and holds the plugins' parameters, their learned thresholds and the operating
points measured at ``fit``. See docs/export.md.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrapcal.export.checks import ExportError
from wrapcal.export.metadata import build_metadata, check_operating_point_names, read_metadata
from wrapcal.export.module import InferenceModule, OutputSpec

if TYPE_CHECKING:
    from wrapcal.model.wrapped import WrappedModel

__all__ = ["FORMATS", "ExportError", "InferenceModule", "OutputSpec", "export", "read_metadata"]

#: The formats :func:`export` writes, with the metadata's name for each.
FORMATS = {"onnx": "onnx", "torch": "torch.export"}


def export(
    wrapped: WrappedModel,
    path: str | Path,
    format: str = "onnx",
    *,
    class_names: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
) -> Path:
    """Export a fitted wrapped model as one file that serves without wrapcal.

    Args:
        wrapped: A fitted :class:`~wrapcal.WrappedModel` whose plugins are all
            exportable (``wrapcal.get_tags(plugin).exportable``).
        path: The file to write (``model.onnx``, ``model.pt2``). ``"torch"`` also writes
            the metadata beside it under the same name with ``.json`` appended
            (``model.pt2.json``). Refused before any work when it is a directory or a
            saved wrapcal model, or when that ``.json`` exists and is not a previous
            export's metadata (:mod:`wrapcal.export.targets`).
        format: ``"onnx"`` or ``"torch"`` (a ``torch.export`` ExportedProgram).
        class_names: The class names in output order, for the metadata; default: those
            the model carries (a ``class_names`` attribute, a Hugging Face
            ``id2label``), else none.
        input_shape: The shape of one input (``(3, 224, 224)``) when the model does not
            know it (``wrapped.input_shape`` is set by ``fit`` on inputs). Either way at
            most :data:`~wrapcal.export.trace.MAX_INPUT_VALUES` values per input.

    Returns:
        The path written.

    Raises:
        ExportError: A plugin cannot be exported (the message names it and what it must
            provide), the trace fails, the format's packages are missing, the target
            is refused, the input shape is too large, or the operating points hold
            names that are not plain.
        NotFittedError: A plugin still needs ``fit``.
        ValueError: An unknown format or bad class names.
    """
    from wrapcal.export.targets import check_target
    from wrapcal.export.trace import blame, example_input, trace

    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    if format == "torch" and path.suffix == ".json":
        raise ValueError(f"{path}: the metadata goes to a .json beside the file; name it .pt2")
    check_target(path, format)  # before the trace: a refused target costs nothing
    check_operating_point_names(wrapped.operating_points)  # they may come from a file
    example = example_input(wrapped, input_shape)
    program, specs = trace(wrapped, example)
    names = None if class_names is None else list(class_names)
    metadata = build_metadata(wrapped, specs, example, FORMATS[format], names)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "torch":
        from wrapcal.export.pt2 import save_pt2

        return save_pt2(program, metadata, path)
    from wrapcal.export.onnx import save_onnx, to_onnx

    try:
        return save_onnx(program, specs, metadata, path)
    except ExportError:
        raise
    except Exception as err:
        raise blame(wrapped, example, err, "ONNX conversion", to_onnx) from err


class _CallableModule(types.ModuleType):
    """``wrapcal.export(wrapped, path)`` calls :func:`export`, while
    ``wrapcal.export.read_metadata`` and ``from wrapcal.export import ...`` still reach
    the package: the function and the package share the name ``export``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
