"""Where an export may write: the file it was given and names derived from it, nothing else.

An export writes its target (``model.onnx``, ``model.pt2``) and, for ``torch.export``,
one sidecar whose name is the target's with ``.json`` appended (``model.pt2.json``):
never a name that could be another file of the user's (the sidecar used to be
``model.json``, which is also a natural name for the saved model being exported, and
was written over it). :func:`check_target` runs before the trace, so a refused target
costs nothing:

* the target and the sidecar must not be directories;
* an existing target is replaced only when it is not a saved wrapcal model (a
  ``.wrapcal`` file is the export's input, not a previous export);
* an existing sidecar is replaced only when it holds a previous export's metadata.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wrapcal.export.checks import ExportError

__all__ = ["MAX_SIDECAR_BYTES", "check_target", "is_export_metadata", "is_saved_model", "sidecar"]

#: A previous export's metadata is at most this large; a larger file is not one.
MAX_SIDECAR_BYTES = 64 << 20
#: The longest safetensors header read to tell a saved wrapcal model (its configuration
#: is in the header's ``__metadata__``).
_MAX_HEADER = 64 << 20


def sidecar(path: Path) -> Path:
    """The metadata file written beside a ``torch.export`` file: ``model.pt2`` ->
    ``model.pt2.json`` (derived from the target, so it cannot be another file's name)."""
    return path.with_name(path.name + ".json")


def is_saved_model(path: Path) -> bool:
    """Whether ``path`` is a saved wrapcal model (a safetensors file whose header's
    ``__metadata__`` holds a ``wrapcal`` entry). Reads the header only."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER:
                return False
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and "wrapcal" in meta


def is_export_metadata(path: Path) -> bool:
    """Whether ``path`` holds the metadata of a previous export (a JSON object with
    ``format`` and ``wrapcal_version``), which a new export may replace."""
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            return False
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and {"format", "wrapcal_version"} <= set(value)


def check_target(path: Path, fmt: str) -> None:
    """Refuse a target the export must not write (module docstring).

    Args:
        path: The file to write.
        fmt: ``"onnx"`` or ``"torch"``.

    Raises:
        ExportError: The target or its sidecar is a directory, the target is a saved
            wrapcal model, or the sidecar is a file that is not a previous export's
            metadata; the message says what to do instead.
    """
    if path.is_dir():
        suffix = ".pt2" if fmt == "torch" else ".onnx"
        raise ExportError(
            f"{path} is a directory; give the file to write, e.g. {path / ('model' + suffix)}"
        )
    if path.is_file() and is_saved_model(path):
        raise ExportError(
            f"{path} is a saved wrapcal model; exporting over it would destroy it: write the "
            "export to another file (model.onnx, model.pt2)"
        )
    if path.exists() and not path.is_file():
        raise ExportError(f"{path} exists and is not a regular file; give another path")
    if fmt != "torch":
        return
    beside = sidecar(path)
    if beside.is_dir():
        raise ExportError(
            f"the metadata goes to {beside}, which is a directory; remove it or give another path"
        )
    if beside.exists() and not is_export_metadata(beside):
        raise ExportError(
            f"the metadata goes to {beside}, which exists and is not a previous export's "
            "metadata; move that file or give the export another name"
        )
