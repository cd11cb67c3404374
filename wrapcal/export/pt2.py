"""``torch.export`` format: an ``ExportedProgram`` file (``.pt2``) and its metadata JSON.

The ``.pt2`` loads with ``torch.export.load`` in a process that never imports wrapcal:
the graph is ATen operators only, the weights and learned buffers are its constants.
``program.module()(x)`` returns the outputs as a tuple in the order of the metadata's
``outputs``. The metadata is written twice: beside the file, under the target's name
with ``.json`` appended (``model.pt2`` -> ``model.pt2.json``; never another name, see
:mod:`wrapcal.export.targets`), and inside it as the extra file ``wrapcal.json``
(``torch.export.load(path, extra_files={"wrapcal.json": ""})`` fills it in).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from wrapcal.export.metadata import PT2_EXTRA_FILE, to_json
from wrapcal.export.targets import sidecar

__all__ = ["EXTRA_FILE", "metadata_path", "save_pt2"]

#: The name of the metadata inside the ``.pt2`` archive.
EXTRA_FILE = PT2_EXTRA_FILE


def metadata_path(path: Path) -> Path:
    """The JSON file beside an export: ``model.pt2`` -> ``model.pt2.json``."""
    return sidecar(path)


def save_pt2(program: ExportedProgram, metadata: dict[str, Any], path: Path) -> Path:
    """Write ``program`` to ``path`` and its metadata beside it (and inside it)."""
    text = to_json(metadata)
    torch.export.save(program, str(path), extra_files={EXTRA_FILE: text})
    metadata_path(path).write_text(text + "\n")
    return path
