"""Production export: one artifact with calibrated probabilities, scores, sets and thresholds.

>>> wrapcal.export(wrapped, "model.onnx")                  # ONNX (onnx, onnxscript)
>>> wrapcal.export(wrapped, "model.pt2", format="torch")   # torch.export ExportedProgram

The graph takes a batch of inputs ``[batch, *input_shape]`` (any batch size, the model's
dtype, preprocessed as the model expects; with ``include_preprocessing=True``, ``uint8``
images ``[batch, H, W, C]`` as a camera or decoder gives them, preprocessed inside the
graph as ``wrapped.preprocess`` says) and returns, in this order, ``logits``,
``probs``, ``label``, ``confidence``, every score of ``predict`` (``msp``, ``entropy``,
``max_logit``, ``energy`` and each plugin's), then the plugins' other outputs (conformal
``sets``, ``abstain``...). It computes exactly what ``wrapped.predict`` computes, without
``predict``'s input checks. The metadata (:mod:`wrapcal.export.metadata`) names the
outputs and holds the plugins' parameters, their learned thresholds and the operating
points measured at ``fit``, and the preprocessing record (mean, std, size, channel
order, value range). See docs/export.md.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

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
    include_preprocessing: bool = False,
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
        include_preprocessing: Build ``wrapped.preprocess`` into the graph: it then
            takes ``uint8`` images ``[batch, H, W, C]`` in RGB order (L for one channel)
            at the recorded size (``preprocess.size``, else the input shape's), casts,
            scales, permutes, reorders and normalises them, and computes what
            ``predict`` computes on the normalised tensor. It does not resize: the
            server gives images of that size.

    Returns:
        The path written.

    Raises:
        ExportError: A plugin cannot be exported (the message names it and what it must
            provide), the trace fails, the format's packages are missing, the target
            is refused, the input shape is too large, the operating points hold
            names that are not plain, or ``include_preprocessing`` without a
            preprocessing record (or with an ``input_shape`` of another size).
        NotFittedError: A plugin still needs ``fit``.
        ValueError: An unknown format or bad class names.
    """
    from wrapcal.export.module import PixelInput
    from wrapcal.export.targets import check_target
    from wrapcal.export.trace import blame, example_input, pixel_example, trace
    from wrapcal.plugin.torch_helpers import float_dtype_of

    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    if format == "torch" and path.suffix == ".json":
        raise ValueError(f"{path}: the metadata goes to a .json beside the file; name it .pt2")
    check_target(path, format)  # before the trace: a refused target costs nothing
    check_operating_point_names(wrapped.operating_points)  # they may come from a file
    pixels = None
    if include_preprocessing:
        input_shape = _pixel_shape(wrapped, input_shape)
    example = example_input(wrapped, input_shape)  # checks the shape
    inputs = example
    if include_preprocessing:
        assert wrapped.preprocess is not None  # _pixel_shape refused a model without one
        pixels = PixelInput(wrapped.preprocess, float_dtype_of(wrapped) or torch.float32)
        pixels = pixels.to(wrapped.device)
        example = pixel_example(wrapped, example.shape[1:])
        inputs = pixels(example)
    program, specs = trace(wrapped, example, pixels)
    names = None if class_names is None else list(class_names)
    metadata = build_metadata(wrapped, specs, example, FORMATS[format], names, pixels is not None)
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
        raise blame(wrapped, inputs, err, "ONNX conversion", to_onnx) from err


def _pixel_shape(wrapped: WrappedModel, given: Sequence[int] | None) -> tuple[int, ...]:
    """The model's input shape ``(C, H, W)`` behind the preprocessing: the recorded size,
    else the given or known input shape's.

    Raises:
        ExportError: No preprocessing record, no size known, or a given shape that
            contradicts the record.
    """
    record = wrapped.preprocess
    if record is None:
        raise ExportError(
            "include_preprocessing=True, but the model has no preprocessing record: give it "
            "one (wrapcal.wrap(model, ..., preprocess=wrapcal.Preprocess(mean=..., std=..., "
            "size=...)), or wrapped.preprocess = wrapcal.Preprocess(...)) and export again"
        )
    known = tuple(given) if given is not None else wrapped.input_shape
    if known is not None and len(known) != 3:
        raise ExportError(
            f"include_preprocessing=True takes images: the input shape must be (C, H, W), "
            f"got {list(known)}"
        )
    if record.size is not None:
        if given is not None and tuple(given[1:]) != record.size:
            raise ExportError(
                f"input_shape {list(given)} contradicts the recorded size "
                f"{list(record.size)}: the graph with preprocessing takes images of the "
                "recorded size (it does not resize); drop input_shape or set "
                "wrapped.preprocess with another size"
            )
        return (record.channels, *record.size)
    if known is None:
        raise ExportError(
            "include_preprocessing=True needs the image size: the preprocessing record has "
            "none and the model's input shape is unknown; pass input_shape=(C, H, W)"
        )
    return (record.channels, *known[1:])


class _CallableModule(types.ModuleType):
    """``wrapcal.export(wrapped, path)`` calls :func:`export`, while
    ``wrapcal.export.read_metadata`` and ``from wrapcal.export import ...`` still reach
    the package: the function and the package share the name ``export``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
