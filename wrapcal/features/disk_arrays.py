"""Backbone features on disk: written batch by batch, read by row ranges on demand.

For feature sets larger than memory (1.28 M ImageNet images x 2048 features is 10 GB
in float32), :class:`DiskFeatures` stands in for the ``[N, D]`` tensor a plugin gets:
``len``, ``shape``, ``dtype``, ``device``, and indexing by an int, a slice or an index
tensor, which reads just those rows from the file (with ``os.pread``, so the rows read
do not stay resident in the process) and returns a float32 tensor on ``device``.
Statistics over the whole set go through ``FeatureSet.batches`` in bounded memory.

An entry of a cache directory is a folder with ``features.bin`` (row-major, float32 or
float16), ``labels.bin`` (int64, optional) and ``meta.json``. It is written under a
temporary name and renamed when complete; a folder without a complete ``meta.json``
whose sizes agree with its files is never read (see :mod:`wrapcal.features.disk_store`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["STORAGE_DTYPES", "DiskFeatures", "DiskWriter"]

#: The dtypes features may be stored in, by name.
STORAGE_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}


class DiskFeatures:
    """A read-only ``[N, D]`` view of features stored in a file.

    Args:
        path: The ``features.bin`` file.
        rows: ``N``.
        width: ``D``.
        storage: ``"float32"`` or ``"float16"`` (what the file holds; reads give float32).
        device: Where the rows read are put.
    """

    def __init__(
        self,
        path: Path,
        rows: int,
        width: int,
        storage: str = "float32",
        device: torch.device | str = "cpu",
    ) -> None:
        self.path = Path(path)
        self.rows = int(rows)
        self.width = int(width)
        self.storage = storage
        self._numpy = STORAGE_DTYPES[storage][1]
        self.device = torch.device(device)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.width))

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> torch.dtype:
        """What reads give: float32, whatever the file holds."""
        return torch.float32

    def __len__(self) -> int:
        return self.rows

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def to(self, device: torch.device | str | None = None, **_: Any) -> DiskFeatures:
        """The same features, read onto another device."""
        if device is None:
            return self
        return DiskFeatures(self.path, self.rows, self.width, self.storage, device)

    def _read(self, start: int, stop: int) -> np.ndarray:
        itemsize = np.dtype(self._numpy).itemsize
        count = max(0, stop - start) * self.width
        with open(self.path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), count * itemsize, start * self.width * itemsize)
        if len(data) != count * itemsize:
            raise OSError(f"{self.path} is shorter than its {self.rows} rows: truncated?")
        return np.frombuffer(data, dtype=self._numpy).reshape(-1, self.width)

    def _out(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array.astype(np.float32, copy=True)).to(self.device)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            row = int(index) + (self.rows if index < 0 else 0)
            if not 0 <= row < self.rows:
                raise IndexError(f"row {index} of {self.rows}")
            return self._out(self._read(row, row + 1))[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(self.rows)
            block = self._read(start, stop) if stop > start else np.zeros((0, self.width))
            return self._out(block[::step] if step != 1 else block)
        rows = torch.as_tensor(index).reshape(-1).cpu().numpy().astype(np.int64)
        if rows.size and (rows.min() < -self.rows or rows.max() >= self.rows):
            raise IndexError(f"rows out of range for {self.rows} rows")
        rows = np.where(rows < 0, rows + self.rows, rows)
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        out = np.empty((len(rows), self.width), dtype=self._numpy)
        # Runs of consecutive rows are read at once: one pread per run, not per row.
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        for run in np.split(np.arange(len(wanted)), breaks):
            if run.size:
                first, last = int(wanted[run[0]]), int(wanted[run[-1]])
                block = self._read(first, last + 1)
                out[order[run]] = block[wanted[run] - first]
        return self._out(out)

    def __repr__(self) -> str:
        return f"DiskFeatures({self.rows} x {self.width} {self.storage}, {self.path})"


class DiskWriter:
    """Writes one data set's features (and labels) into a folder, batch by batch."""

    def __init__(self, folder: Path, storage: str = "float32") -> None:
        if storage not in STORAGE_DTYPES:
            raise ValueError(
                f"cache dtype must be one of {sorted(STORAGE_DTYPES)}; got {storage!r}"
            )
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=False)
        self.storage = storage
        self._features = open(self.folder / "features.bin", "wb")  # noqa: SIM115 - closed in finish
        self._labels = open(self.folder / "labels.bin", "wb")  # noqa: SIM115
        self.rows = 0
        self.width: int | None = None
        self.labelled: bool | None = None

    def append(self, features: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Add a batch of features ``[B, D]`` and its labels (or ``None``)."""
        array = features.detach().to("cpu", torch.float32).numpy()
        self.width = self.width or array.shape[1]
        self._features.write(array.astype(STORAGE_DTYPES[self.storage][1]).tobytes())
        labelled = labels is not None
        if self.labelled is None:
            self.labelled = labelled
        if labelled:
            self._labels.write(labels.detach().to("cpu", torch.int64).numpy().tobytes())
        self.rows += array.shape[0]

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Flush, and write ``meta.json`` last: the folder is complete once it exists."""
        for f in (self._features, self._labels):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        meta = {
            **meta,
            "rows": self.rows,
            "width": self.width,
            "storage": self.storage,
            "labelled": bool(self.labelled),
            "complete": True,
        }
        tmp = self.folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.folder / "meta.json")
        return meta

    def abort(self) -> None:
        for f in (self._features, self._labels):
            f.close()
