"""``wrapcal export``: a saved ``.wrapcal`` model as one ONNX or ``torch.export`` file.

Examples::

    wrapcal export model.wrapcal --format onnx --out model.onnx
    wrapcal export model.wrapcal --format torch --out model.pt2   # + model.json

The model is rebuilt from the file (a model wrapcal can build by name: timm,
torchvision, ``wrapcal.files.cifar_resnets``); see docs/export.md for what the file holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wrapcal.cli.errors import CliError

__all__ = ["add_export_arguments", "run"]

SUFFIXES = {"onnx": ".onnx", "torch": ".pt2"}


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape: give positive ints separated by commas, e.g. 3,224,224"
        )
    return shape


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``wrapcal export``."""
    parser.add_argument("model", help="a model saved with wrapped.save (a .wrapcal file)")
    parser.add_argument(
        "--format",
        choices=sorted(SUFFIXES),
        default="onnx",
        help="onnx (needs onnx and onnxscript) or torch (a torch.export .pt2 with a .json "
        "of metadata beside it); default onnx",
    )
    parser.add_argument(
        "--out", help="the file to write (default: the model's path with .onnx / .pt2)"
    )
    parser.add_argument(
        "--class-names",
        metavar="A,B,...|@FILE",
        help="the model's class names in output order, for the metadata",
    )
    parser.add_argument(
        "--input-shape",
        type=_shape,
        metavar="C,H,W",
        help="the shape of one input, when the saved model does not know it",
    )


def run(args: argparse.Namespace) -> int:
    """Load, export, and say what was written."""
    import wrapcal
    from wrapcal.cli.inputs import read_class_names
    from wrapcal.export import export

    source = Path(args.model)
    if not source.is_file():
        raise CliError(f"model file not found: {source} (give a .wrapcal file)")
    out = Path(args.out) if args.out else source.with_suffix(SUFFIXES[args.format])
    if out.resolve() == source.resolve():
        raise CliError(f"--out {out} is the model file itself; give another path")
    names = read_class_names(args.class_names)
    wrapped = wrapcal.load(source)
    written = export(
        wrapped, out, format=args.format, class_names=names, input_shape=args.input_shape
    )
    from wrapcal.export import read_metadata

    outputs = [o["name"] for o in read_metadata(written)["outputs"]]
    beside = f" and {written.with_suffix('.json')}" if args.format == "torch" else ""
    print(f"wrote {written}{beside}: input [batch, ...], outputs {', '.join(outputs)}")
    return 0
