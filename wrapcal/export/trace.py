"""Tracing a wrapped model with ``torch.export``: one graph, any batch size.

:func:`trace` checks that every plugin is exportable, runs the chain once on an example
batch to learn its outputs, and exports :class:`~wrapcal.export.module.InferenceModule`
with the batch dimension dynamic. When the trace fails, the plugin part of the chain is
traced from backbone features one plugin more at a time (:func:`find_culprit`) so that
the error names the plugin responsible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.export import Dim, ExportedProgram

from wrapcal.export.checks import (
    GUIDE,
    ExportError,
    check_exportable,
    find_culprit,
    first_line,
)
from wrapcal.export.module import InferenceModule, OutputSpec, PixelInput, output_specs
from wrapcal.plugin.torch_helpers import float_dtype_of, in_mode

if TYPE_CHECKING:
    from wrapcal.model.wrapped import WrappedModel

__all__ = [
    "EXAMPLE_BATCH",
    "MAX_INPUT_VALUES",
    "example_input",
    "export_program",
    "pixel_example",
    "trace",
]

#: Rows of the example batch the graph is traced with. Not 1 or 0, which torch.export
#: specialises on; the graph then takes any batch size from 1 up.
EXAMPLE_BATCH = 2
#: The most values one input may have (2**24: 3 x 2364 x 2364, an image far larger than
#: classifiers take). The shape may come from a saved file, whose allow-list bounds each
#: size but not their product: [3, 1048575, 1048575] would ask for a 26 TB example batch,
#: and the trace then runs the model on it. Raise it here for a model that needs more.
MAX_INPUT_VALUES = 1 << 24


def example_input(wrapped: WrappedModel, input_shape: Sequence[int] | None = None) -> torch.Tensor:
    """A seeded example batch ``[2, *input_shape]`` in the model's dtype and device.

    Raises:
        ExportError: The model does not know the shape of its inputs and none is given,
            or the shape is not positive ints or holds more than :data:`MAX_INPUT_VALUES`
            values (checked before anything is allocated).
    """
    given = input_shape is not None
    shape = tuple(input_shape) if input_shape is not None else wrapped.input_shape
    if shape is None:
        raise ExportError(
            "the model's input shape is unknown (it was fitted from features, and the "
            "model does not say): pass input_shape=(channels, height, width)"
        )
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise ExportError(f"input_shape {shape!r} must be positive ints, one per input axis")
    values = math.prod(shape)  # Python ints: no overflow, nothing allocated yet
    if values > MAX_INPUT_VALUES:
        dtype = float_dtype_of(wrapped) or torch.float32
        size = EXAMPLE_BATCH * values * dtype.itemsize
        source = "given" if given else "recorded in the model as wrapped.input_shape"
        raise ExportError(
            f"input shape {list(shape)} ({source}) holds {values:,} values per input, over "
            f"the export's limit of {MAX_INPUT_VALUES:,}; its example batch alone would take "
            f"{_bytes(size)}. Give the model's real input shape: input_shape=(C, H, W)"
        )
    dtype = float_dtype_of(wrapped) or torch.float32
    generator = torch.Generator(device="cpu").manual_seed(0)
    example = torch.randn((EXAMPLE_BATCH, *shape), generator=generator)
    return example.to(device=wrapped.device, dtype=dtype)


def _bytes(size: int) -> str:
    scaled = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if scaled < 1000 or unit == "TB":
            return f"{scaled:,.0f} {unit}" if unit == "B" else f"{scaled:,.1f} {unit}"
        scaled /= 1000
    return f"{scaled} B"  # unreachable


def pixel_example(wrapped: WrappedModel, shape: Sequence[int]) -> torch.Tensor:
    """A seeded example batch of ``uint8`` images ``[2, H, W, C]`` for the model's input
    shape ``(C, H, W)``, on the model's device."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    c, h, w = shape
    images = torch.randint(0, 256, (EXAMPLE_BATCH, h, w, c), generator=generator)
    return images.to(device=wrapped.device, dtype=torch.uint8)


def export_program(
    wrapped: WrappedModel,
    example: torch.Tensor,
    cached: bool = False,
    upto: int | None = None,
    pixels: PixelInput | None = None,
) -> tuple[ExportedProgram, list[OutputSpec]]:
    """``torch.export`` of the chain (or of its first ``upto`` plugins from features),
    behind ``pixels`` when given (then ``example`` is ``uint8`` images)."""
    with in_mode(wrapped, False), torch.no_grad():
        specs = output_specs(wrapped, example, cached, upto, pixels)
        module = InferenceModule(wrapped, [s.name for s in specs], cached, upto, pixels)
        program = torch.export.export(
            module, (example,), dynamic_shapes=({0: Dim("batch", min=1)},), strict=False
        )
    return program, specs


def feature_example(wrapped: WrappedModel, example: torch.Tensor) -> torch.Tensor:
    """Backbone features of the example batch, for tracing the plugin part alone."""
    with in_mode(wrapped, False), torch.no_grad():
        return wrapped.backbone(example)


def trace(
    wrapped: WrappedModel, example: torch.Tensor, pixels: PixelInput | None = None
) -> tuple[ExportedProgram, list[OutputSpec]]:
    """The wrapped model as an ``ExportedProgram`` with a dynamic batch, and its outputs
    (``pixels``: behind that preprocessing, ``example`` being ``uint8`` images).

    Raises:
        ExportError: A plugin is not exportable, or the trace fails (naming the plugin
            responsible when it is one).
        NotFittedError: A plugin still needs ``fit``.
    """
    check_exportable(wrapped)
    try:
        return export_program(wrapped, example, pixels=pixels)
    except ExportError:
        raise
    except Exception as err:
        inputs = example if pixels is None else pixels(example)
        raise blame(wrapped, inputs, err, "torch.export", None) from err


def blame(
    wrapped: WrappedModel, example: torch.Tensor, err: Exception, step: str, then: Any
) -> ExportError:
    """An :class:`ExportError` for a failed ``step``, naming the plugin that causes it.

    Args:
        wrapped: The wrapped model.
        example: The example input batch.
        err: What the step raised.
        step: ``"torch.export"`` or ``"ONNX conversion"``.
        then: ``None``, or ``then(program)`` run on each traced prefix (the ONNX
            conversion), for a failure that happens after ``torch.export``.
    """
    message = first_line(err)
    if message.startswith("Constraints violated (batch)"):
        message = (
            "the graph depends on the batch size (a loop or branch on it), which must stay free"
        )
    culprit: str | None
    if message.startswith("plugin "):  # raised inside a plugin's method: already named
        culprit, _, message = message.partition(": ")
    else:
        features = feature_example(wrapped, example)

        def attempt(upto: int) -> None:
            program, _ = export_program(wrapped, features, cached=True, upto=upto)
            if then is not None:
                then(program)

        culprit = find_culprit(wrapped, attempt)
    if culprit is None:
        return ExportError(
            f"{step} failed on the model's backbone or head, not on a plugin: {message}"
        )
    return ExportError(
        f"{culprit}: its inference cannot be exported ({step}: {message}). An exportable "
        "plugin computes features/members/transform_logits/outputs with plain tensor "
        "operations: no .item() or numpy, no Python branch or loop on the batch size or "
        f"on tensor values, operators ONNX has ({GUIDE})"
    )
