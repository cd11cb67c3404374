"""ONNX export: the traced program through PyTorch's ONNX exporter, with wrapcal's metadata.

Needs the ``export`` extra (``onnx``, ``onnxscript``; ``onnxruntime`` to run the file).
The graph's input is ``input`` and its outputs carry the names of
:mod:`wrapcal.export.module`; the batch axis of each is the symbolic dimension
``batch``. Two ATen operators that PyTorch's exporter does not translate get their own
translations here, both exact:

* ``aten.sort.stable`` (the APS/RAPS conformal scores sort the probabilities with ties
  in class order) is ONNX ``TopK`` over the whole axis, which the ONNX specification
  makes stable: equal values keep their index order.
* ``aten.searchsorted`` (the binning and isotonic calibrators look probabilities up in
  their knot tables) is a count: the number of knots below each value (``<=`` with
  ``right=True``), from one broadcast comparison ``[..., B, knots]``. The tables hold
  tens to hundreds of knots per row, so the comparison is small.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.export import ExportedProgram

from wrapcal.export.checks import ExportError
from wrapcal.export.metadata import to_json
from wrapcal.export.module import OutputSpec

if TYPE_CHECKING:
    import onnx_ir  # an optional dependency: imported where used

__all__ = ["INSTALL", "save_onnx", "to_onnx"]

INSTALL = "ONNX export needs onnx and onnxscript: pip install 'wrapcal[export]'"
#: Above this size the weights go to a ``.data`` file beside the model (protobuf's 2 GB
#: limit on one message).
EXTERNAL_BYTES = 1_500_000_000


def _translations() -> dict[Callable[..., Any], Callable[..., Any]]:
    from onnxscript import opset18 as op
    from onnxscript.onnx_types import INT64

    def int64s(values: list[int]) -> INT64:
        # onnxscript's stubs type Constant's output as any tensor type; these are int64.
        return cast(INT64, op.Constant(value_ints=values))

    # Any: onnxscript's traced values (torch's exporter passes its own tensor type).
    def stable_sort(
        self: Any, stable: Any = None, dim: int = -1, descending: bool = False
    ) -> tuple[Any, Any]:
        # TopK over the whole axis is a sort; ONNX specifies ties in index order.
        # A Python int as Gather's indices becomes an int64 constant when traced; the
        # stubs accept only tensors there.
        axis_size = op.Gather(op.Shape(self), dim, axis=0)  # type: ignore[type-var]
        size = op.Reshape(axis_size, int64s([1]))
        values, indices = op.TopK(self, size, axis=dim, largest=descending, sorted=True)
        return values, indices

    def searchsorted(
        sorted_sequence: Any,
        self: Any,
        out_int32: bool = False,
        right: bool = False,
        side: str | None = None,
        sorter: Any = None,
    ) -> Any:
        if sorter is not None:
            raise NotImplementedError("searchsorted with a sorter has no ONNX translation")
        knots = op.Unsqueeze(sorted_sequence, int64s([-2]))  # [..., 1, E]
        values = op.Unsqueeze(self, int64s([-1]))  # [..., B, 1]
        below = (
            op.LessOrEqual(knots, values) if right or side == "right" else op.Less(knots, values)
        )
        # to=7: int64 (the stubs type Cast's output as any tensor type).
        count = op.ReduceSum(cast(INT64, op.Cast(below, to=7)), int64s([-1]), keepdims=0)
        return op.Cast(count, to=6) if out_int32 else count

    return {
        torch.ops.aten.sort.stable: stable_sort,
        torch.ops.aten.searchsorted.Tensor: searchsorted,
    }


def to_onnx(program: ExportedProgram, names: list[str] | None = None) -> Any:
    """The ONNX program (``torch.onnx.ONNXProgram``) of a traced program.

    Raises:
        ExportError: onnx or onnxscript is not installed.
    """
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; say so in our words)
    except ImportError as err:
        raise ExportError(INSTALL) from err
    return torch.onnx.export(
        program,
        (),  # an ExportedProgram brings its own example inputs
        None,
        input_names=["input"],
        output_names=names,
        dynamo=True,
        external_data=False,
        custom_translation_table=_translations(),
        optimize=True,
        verbose=False,
    )


#: ONNX element types of the dtypes a prediction's outputs come in.
_ONNX_TYPES = {
    "float16": "FLOAT16",
    "bfloat16": "BFLOAT16",
    "float32": "FLOAT",
    "float64": "DOUBLE",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
}


def _match_dtypes(model: onnx_ir.Model, specs: list[OutputSpec]) -> None:
    """Cast any output whose ONNX type is not the dtype ``predict`` reports.

    PyTorch's decompositions compute some half-precision reductions in float32 and the
    exporter can leave an output there (a float16 model's ``confidence`` comes out
    float32 in torch 2.14): a Cast puts it back, so the graph's types are predict's.
    """
    import onnx_ir as ir

    graph = model.graph
    for index, (value, spec) in enumerate(zip(list(graph.outputs), specs, strict=True)):
        want = ir.DataType[_ONNX_TYPES[spec.dtype]]
        if value.dtype == want:
            continue
        cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", want)], name=f"cast_{spec.name}")
        graph.append(cast)
        was = "unknown" if value.dtype is None else value.dtype.name.lower()
        value.name = f"{spec.name}_{was}"
        out = cast.outputs[0]
        out.name, out.dtype, out.shape = spec.name, want, value.shape
        graph.outputs[index] = out


def _name_batch_axis(model: onnx_ir.Model) -> None:
    """Call the (symbolic) first axis of the input and of every output ``batch``."""
    import onnx_ir as ir

    for value in (*model.graph.inputs, *model.graph.outputs):
        shape = value.shape
        if shape is not None and len(shape) > 0 and not isinstance(shape[0], int):
            value.shape = ir.Shape(["batch", *list(shape)[1:]])


def save_onnx(
    program: ExportedProgram, specs: list[OutputSpec], metadata: dict[str, Any], path: Path
) -> Path:
    """Write the ONNX file of a traced program, with ``metadata`` in ``metadata_props``."""
    onnx_program = to_onnx(program, [s.name for s in specs])
    model = onnx_program.model
    _match_dtypes(model, specs)
    _name_batch_axis(model)
    model.metadata_props.update({key: to_json(value) for key, value in metadata.items()})
    size = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    onnx_program.save(str(path), external_data=size > EXTERNAL_BYTES)
    return path
