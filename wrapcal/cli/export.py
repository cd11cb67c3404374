"""``wrapcal export``: a saved ``.wrapcal`` model as one ONNX or ``torch.export`` file.

Examples::

    wrapcal export model.wrapcal --format onnx --out model.onnx
    wrapcal export model.wrapcal --format torch --out model.pt2   # + model.pt2.json

The model is rebuilt from the file (a model wrapcal can build by name: timm,
torchvision, ``wrapcal.files.cifar_resnets``); see docs/export.md for what the file holds.
The model file is only read: ``--out`` (and the metadata beside a ``.pt2``, named after
it) may not be the model file, a directory, or a place that cannot be written, all
checked before the model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wrapcal.cli.errors import CliError
from wrapcal.cli.targets import check_input_path, check_output_file, same_file

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
        help="onnx (needs onnx and onnxscript) or torch (a torch.export .pt2 with its "
        "metadata beside it, in the .pt2's name + .json); default onnx",
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
    parser.add_argument(
        "--include-preprocessing",
        action="store_true",
        help="build the model's recorded preprocessing (mean, std, size) into the graph: it "
        "then takes uint8 images [batch, H, W, C] (RGB) at the recorded size",
    )


def _check_out(source: Path, out: Path, fmt: str) -> None:
    """``--out`` (or its default) and the sidecar named after it: neither the model file
    nor a directory, and writable; before the model is loaded."""
    from wrapcal.export.targets import sidecar

    suffix = SUFFIXES[fmt]
    check_output_file(out, "--out", source, f"model{suffix}")
    if fmt == "torch":
        beside = sidecar(out)
        if same_file(beside, source):
            raise CliError(
                f"--out {out}: its metadata goes to {beside}, which is the model file; "
                "give --out another name"
            )
        if beside.is_dir():
            raise CliError(
                f"--out {out}: its metadata goes to {beside}, which is a directory; give "
                "--out another name"
            )


def run(args: argparse.Namespace) -> int:
    """Load, export, and say what was written."""
    import wrapcal
    from wrapcal.cli.inputs import read_class_names
    from wrapcal.export import export
    from wrapcal.export.targets import sidecar

    source = Path(args.model)
    if not source.exists():
        raise CliError(f"model file not found: {source} (give a .wrapcal file)")
    check_input_path(source, "the model file", directory_ok=False)
    out = Path(args.out) if args.out else source.with_suffix(SUFFIXES[args.format])
    if args.format == "torch" and out.suffix == ".json":
        raise CliError(f"--out {out}: a torch export is a .pt2 file; name it {out.stem}.pt2")
    _check_out(source, out, args.format)
    names = read_class_names(args.class_names)
    wrapped = wrapcal.load(source)
    written = export(
        wrapped,
        out,
        format=args.format,
        class_names=names,
        input_shape=args.input_shape,
        include_preprocessing=args.include_preprocessing,
    )
    from wrapcal.export import read_metadata

    outputs = [o["name"] for o in read_metadata(written)["outputs"]]
    beside = f" and {sidecar(written)}" if args.format == "torch" else ""
    print(f"wrote {written}{beside}: input [batch, ...], outputs {', '.join(outputs)}")
    return 0
