"""Backbone features on disk: written batch by batch, read by row ranges on demand.

For feature sets larger than memory (1.28 M ImageNet images x 2048 features is 10 GB
in float32), :class:`DiskFeatures` stands in for the ``[N, D]`` tensor a plugin gets:
``len``, ``shape``, ``dtype``, ``device``, and indexing by an int, a slice or an index
tensor, which reads just those rows from the file (with ``os.pread``, so the rows read
do not stay resident in the process) and returns a float32 tensor on ``device``.
Statistics over the whole set go through ``FeatureSet.batches`` in bounded memory.

An entry of a cache directory is a folder with ``features.bin`` (row-major, float32 or
float16), ``labels.bin`` (int64, optional) and ``meta.json``. :class:`DiskWriter` records
in ``meta.json`` a SHA-256 digest of every chunk of ``chunk_rows`` rows of
``features.bin`` (``digests``; about 8 MiB each) and of the whole ``labels.bin``
(``labels_digest``), computed from the bytes as they are written; :func:`verify_entry`
checks them, chunk by chunk in a few threads (:mod:`hashlib` releases the GIL), in
bounded memory. The entry is written under a temporary name and renamed when complete;
a folder without a complete ``meta.json`` whose sizes and digests agree with its files
is never read (see :mod:`wrapcal.features.disk_store`).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHUNK_BYTES", "DIGEST", "STORAGE_DTYPES", "DiskFeatures", "DiskWriter", "verify_entry"]

#: The dtypes features may be stored in, by name.
STORAGE_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}

#: The hash of the entries' digests: SHA-256, about twice as fast as BLAKE2b on CPUs with
#: SHA instructions (x86 since 2017, ARMv8), and as hard to forge.
DIGEST = "sha256"

#: About how many bytes of ``features.bin`` one digest covers.
CHUNK_BYTES = 8 << 20

# O_NOFOLLOW where the platform has it: an entry's files are opened only if they are
# files, never through a symbolic link planted in their place.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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
    """Writes one data set's features (and labels) into a folder, batch by batch, with
    the digests of what it wrote.

    Args:
        folder: The folder to write into: created, or (``exist_ok``) already made empty
            by the caller (the disk store makes it, with its lock, first).
        storage: ``"float32"`` or ``"float16"``.
        exist_ok: Whether ``folder`` may exist already.
    """

    def __init__(self, folder: Path, storage: str = "float32", exist_ok: bool = False) -> None:
        if storage not in STORAGE_DTYPES:
            raise ValueError(
                f"cache dtype must be one of {sorted(STORAGE_DTYPES)}; got {storage!r}"
            )
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=exist_ok)
        self.storage = storage
        self._itemsize = np.dtype(STORAGE_DTYPES[storage][1]).itemsize
        self._features = open(self.folder / "features.bin", "xb")  # noqa: SIM115 - closed in finish
        self._labels = open(self.folder / "labels.bin", "xb")  # noqa: SIM115
        self.rows = 0
        self.width: int | None = None
        self.labelled: bool | None = None
        self.chunk_rows: int | None = None
        self._digests: list[str] = []
        self._chunk = hashlib.new(DIGEST)
        self._in_chunk = 0  # rows in the chunk being hashed
        self._labels_hash = hashlib.new(DIGEST)

    def append(self, features: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Add a batch of features ``[B, D]`` and its labels (or ``None``)."""
        array = features.detach().to("cpu", torch.float32).numpy()
        self.width = self.width or array.shape[1]
        if self.chunk_rows is None:
            self.chunk_rows = max(1, CHUNK_BYTES // max(1, self.width * self._itemsize))
        stored = np.ascontiguousarray(array.astype(STORAGE_DTYPES[self.storage][1]))
        self._features.write(stored.tobytes())
        self._hash_rows(stored)
        labelled = labels is not None
        if self.labelled is None:
            self.labelled = labelled
        if labels is not None:
            data = labels.detach().to("cpu", torch.int64).numpy().tobytes()
            self._labels.write(data)
            self._labels_hash.update(data)
        self.rows += array.shape[0]

    def _hash_rows(self, rows: np.ndarray) -> None:
        """Feed the rows to the chunk digests, closing a chunk every ``chunk_rows`` rows
        (batches and chunks need not line up)."""
        assert self.chunk_rows is not None
        start = 0
        while start < len(rows):
            take = min(len(rows) - start, self.chunk_rows - self._in_chunk)
            self._chunk.update(rows[start : start + take].data.cast("B"))
            self._in_chunk += take
            start += take
            if self._in_chunk == self.chunk_rows:
                self._digests.append(self._chunk.hexdigest())
                self._chunk, self._in_chunk = hashlib.new(DIGEST), 0

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Flush, and write ``meta.json`` last: the folder is complete once it exists."""
        for f in (self._features, self._labels):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        digests = list(self._digests)
        if self._in_chunk:
            digests.append(self._chunk.hexdigest())
        meta = {
            **meta,
            "rows": self.rows,
            "width": self.width,
            "storage": self.storage,
            "labelled": bool(self.labelled),
            "hash": DIGEST,
            "chunk_rows": self.chunk_rows or 1,
            "digests": digests,
            "labels_digest": self._labels_hash.hexdigest(),
            "complete": True,
        }
        tmp = self.folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.folder / "meta.json")
        return meta

    def abort(self) -> None:
        for f in (self._features, self._labels):
            f.close()


def _digest_of_range(fd: int, offset: int, size: int) -> str:
    """SHA-256 of ``size`` bytes of ``fd`` from ``offset`` (read in 1 MiB pieces)."""
    h = hashlib.new(DIGEST)
    buffer = bytearray(min(size, 1 << 20) or 1)
    view = memoryview(buffer)
    done = 0
    while done < size:
        want = min(len(buffer), size - done)
        if hasattr(os, "preadv"):  # into the one buffer: no allocation per piece
            got = os.preadv(fd, [view[:want]], offset + done)
        else:
            data = os.pread(fd, want, offset + done)
            got = len(data)
            view[:got] = data
        if got <= 0:
            return ""  # shorter than meta says: cannot match
        h.update(view[:got])
        done += got
    return h.hexdigest()


def _open_file(path: Path) -> int:
    """A read-only descriptor of ``path``, refusing a symbolic link (``OSError``)."""
    return os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_BINARY", 0))


def verify_entry(folder: Path, meta: dict[str, Any], threads: int | None = None) -> str | None:
    """Check an entry's files against the digests its ``meta.json`` records.

    Args:
        folder: The entry.
        meta: Its ``meta.json``, already checked for its fields and the files' sizes.
        threads: How many chunks are hashed at once (default: up to 4, one per CPU).

    Returns:
        ``None`` when every digest matches, else what does not (for the warning).
    """
    if meta.get("hash") != DIGEST:
        return f"digests made with {meta.get('hash')!r}, not {DIGEST}"
    rows, width = int(meta["rows"]), int(meta["width"] or 0)
    chunk_rows = int(meta["chunk_rows"])
    itemsize = np.dtype(STORAGE_DTYPES[meta["storage"]][1]).itemsize
    digests = meta["digests"]
    starts = range(0, rows, chunk_rows)
    if len(digests) != len(starts):
        return f"{len(digests)} digests for {len(starts)} chunks of features"
    row_bytes = width * itemsize
    fd = _open_file(folder / "features.bin")
    try:
        workers = threads or max(1, min(4, os.cpu_count() or 1))

        def chunk(start: int) -> str:
            size = (min(rows, start + chunk_rows) - start) * row_bytes
            return _digest_of_range(fd, start * row_bytes, size)

        if workers > 1 and len(starts) > 1:
            with ThreadPoolExecutor(workers) as pool:
                found = list(pool.map(chunk, starts))
        else:
            found = [chunk(start) for start in starts]
    finally:
        os.close(fd)
    bad = [i for i, (a, b) in enumerate(zip(found, digests, strict=True)) if a != b]
    if bad:
        first = bad[0] * chunk_rows
        return f"features.bin differs from its digest in {len(bad)} chunk(s) (first at row {first})"
    fd = _open_file(folder / "labels.bin")
    try:
        size = os.fstat(fd).st_size
        if _digest_of_range(fd, 0, size) != meta["labels_digest"]:
            return "labels.bin differs from its digest"
    finally:
        os.close(fd)
    return None
