"""A feature cache in a directory: data sets larger than memory, reused across runs.

``wrapped.fit(..., cache_dir="features/")`` (and ``wrapcal.evaluate(..., cache_dir=...)``)
stores each data set's backbone features in ``cache_dir`` as a file of rows (float32,
or float16 with ``cache_dtype="float16"``), under the same key as the memory cache: the
backbone's fingerprint and the data's. A later run, in this process or another, with
the same weights and data skips the backbone. Plugins read the rows they need
(:class:`~wrapcal.features.disk_arrays.DiskFeatures`), so fitting needs bounded memory.

An entry is written under a temporary name (``.partial-<pid>-...``) and renamed when
complete. A run killed half-way leaves only such a folder, which is removed once its
process is gone; an entry whose ``meta.json`` is missing, incomplete or disagrees with
its files' sizes is removed and rebuilt, never read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wrapcal.features.disk_arrays import STORAGE_DTYPES, DiskFeatures, DiskWriter
from wrapcal.features.extract import FeatureSet, FeatureSink

__all__ = ["DiskCache"]

_PARTIAL = ".partial-"


class DiskCache:
    """Backbone features of data sets, in files under ``directory``: a
    :class:`~wrapcal.features.store.FeatureStore`.

    Args:
        directory: Where entries live (created if missing).
        dtype: ``"float32"`` or ``"float16"``: how features are stored (reads give
            float32); float16 halves the disk and I/O for a rounding of about 1e-3
            relative.
    """

    def __init__(self, directory: str | os.PathLike, dtype: str = "float32") -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(STORAGE_DTYPES)}; got {dtype!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.enabled = True
        self.hits = 0
        self.misses = 0
        self._clean_partials()

    # --- entries -------------------------------------------------------------------------

    def _folder(self, model_key: str, data_key: str) -> Path:
        return self.directory / f"{model_key}-{data_key}-{self.dtype}"

    def _clean_partials(self) -> None:
        for entry in self.directory.glob(f"*{_PARTIAL}*"):
            pid = entry.name.split(_PARTIAL, 1)[1].split("-", 1)[0]
            try:
                os.kill(int(pid), 0)
            except (ValueError, ProcessLookupError):
                shutil.rmtree(entry, ignore_errors=True)  # its writer is gone: half-written
            except OSError:
                pass

    def _read_meta(self, folder: Path) -> dict[str, Any] | None:
        """The entry's meta, or ``None`` (and the folder removed) if it is not complete."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
            rows, width = int(meta["rows"]), int(meta["width"])
            itemsize = np.dtype(STORAGE_DTYPES[meta["storage"]][1]).itemsize
            sizes_agree = (folder / "features.bin").stat().st_size == rows * width * itemsize
            labels = (folder / "labels.bin").stat().st_size
            labels_agree = labels == (rows * 8 if meta["labelled"] else 0)
            if meta.get("complete") is True and sizes_agree and labels_agree:
                return meta
        except (OSError, ValueError, KeyError, TypeError):
            pass
        shutil.rmtree(folder, ignore_errors=True)
        return None

    def lookup(
        self, model_key: str, data_key: str, name: str, data: Any, device: torch.device
    ) -> FeatureSet | None:
        """The stored features of this backbone and data, or ``None``."""
        folder = self._folder(model_key, data_key)
        if not folder.is_dir():
            return None
        meta = self._read_meta(folder)
        if meta is None:
            return None
        features = DiskFeatures(
            folder / "features.bin", meta["rows"], meta["width"], meta["storage"], device
        )
        labels = None
        if meta["labelled"]:
            labels = torch.from_numpy(np.fromfile(folder / "labels.bin", dtype=np.int64)).to(device)
        shape = tuple(meta["input_shape"]) if meta.get("input_shape") else None
        return FeatureSet(name, features, labels, data, shape)

    def candidates(self, model_key: str, probe: str) -> list[str]:
        """Data keys of complete entries of this backbone whose first batch is ``probe``."""
        found = []
        for folder in self.directory.glob(f"{model_key}-*-{self.dtype}"):
            meta = self._read_meta(folder)
            if meta is not None and meta.get("probe") == probe:
                found.append(folder.name[len(model_key) + 1 : -len(self.dtype) - 1])
        return found

    # --- writing -------------------------------------------------------------------------

    def new_sink(self, model_key: str) -> _DiskSink:
        """A writer into a temporary folder (renamed by :meth:`store` when complete)."""
        tmp = self.directory / f"{model_key}{_PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
        writer = DiskWriter(tmp, self.dtype)
        return _DiskSink(writer)

    def store(
        self,
        model_key: str,
        data_key: str,
        feature_set: FeatureSet,
        probe: str | None,
        sink: FeatureSink,
    ) -> FeatureSet:
        """Complete the sink's folder as the entry of this backbone and data."""
        writer = _writer_of(sink)
        writer.finish({"probe": probe, "input_shape": list(feature_set.input_shape or [])})
        folder = self._folder(model_key, data_key)
        if folder.exists():  # another process stored it meanwhile: keep theirs
            shutil.rmtree(writer.folder, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.replace(writer.folder, folder)
        device = (
            feature_set.labels.device if feature_set.labels is not None else torch.device("cpu")
        )
        stored = self.lookup(model_key, data_key, feature_set.name, feature_set.data, device)
        if stored is None:
            raise OSError(f"could not complete the feature cache entry {folder}")
        return stored

    def discard(self, sink: FeatureSink) -> None:
        """Remove the folder of a sink whose extraction failed."""
        writer = _writer_of(sink)
        writer.abort()
        shutil.rmtree(writer.folder, ignore_errors=True)


def _writer_of(sink: FeatureSink) -> DiskWriter:
    """The file writer behind a sink this store handed out (:meth:`DiskCache.new_sink`)."""
    if not isinstance(sink, _DiskSink):
        raise TypeError(
            f"a DiskCache completes only the sinks it made (DiskCache.new_sink); got "
            f"{type(sink).__name__}"
        )
    return sink.writer


class _DiskSink:
    """A :class:`~wrapcal.features.store.FeatureSink` whose rows go to the file."""

    def __init__(self, writer: DiskWriter) -> None:
        self.writer = writer

    def append(self, features: torch.Tensor, labels: torch.Tensor | None) -> None:
        self.writer.append(features, labels)

    def finish(self) -> DiskFeatures:
        width = self.writer.width or 0
        return DiskFeatures(
            self.writer.folder / "features.bin", self.writer.rows, width, self.writer.storage
        )
