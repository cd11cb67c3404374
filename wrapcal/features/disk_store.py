"""A feature cache in a directory: data sets larger than memory, reused across runs.

``wrapped.fit(..., cache_dir="features/")`` (and ``wrapcal.evaluate(..., cache_dir=...)``)
stores each data set's backbone features as a file of rows (float32, or float16 with
``cache_dtype="float16"``), under the same key as the memory cache: the backbone's
fingerprint (weights, buffers, code: :mod:`wrapcal.features.fingerprint`) and the
data's. A later run, in this process or another, with the same backbone and data skips
the backbone. Plugins read the rows they need
(:class:`~wrapcal.features.disk_arrays.DiskFeatures`), so fitting needs bounded memory.

**Layout.** wrapcal writes only inside its own folder, ``cache_dir/wrapcal-features-v2/``,
which holds a marker file it wrote (``WRAPCAL-CACHE.json``); nothing else in
``cache_dir`` is read, renamed or removed. (A ``cache_dir`` that is itself such a folder,
marker and all, is used as it is.) Inside it:

- ``<model>-<data>-<dtype>/``: a complete entry: ``features.bin``, ``labels.bin`` and
  ``meta.json`` (sizes, the entry's own key, the digests);
- ``<model>.partial-<pid>-<8 hex>/``: an entry being written, with ``.lock`` and
  ``owner.json`` (host, pid, start time), renamed to its entry name when complete;
- ``.staging-<pid>-<8 hex>/``: where a writer takes the lock of a partial folder
  before it gets its partial name (so a partial folder never lacks its lock).

**Liveness.** The writer holds an advisory lock (``fcntl.flock``) on the ``.lock`` file
of its partial folder for the folder's whole life; the kernel releases it when the
process dies, whatever PID namespace it ran in (containers sharing a scratch disk reuse
each other's pids; locks are on the file). A cache removes a partial folder only when it
can take that lock itself (its writer is gone) or the folder has no lock file (a partial
folder gets its name only with its lock held); a staging folder whose lock is free or
missing, only once it is :data:`STAGING_AGE` seconds old. Pids are never signalled or
trusted. Where ``fcntl`` is missing (Windows), a partial folder is removed only when
nothing in it changed for :data:`STALE_AGE` seconds (``owner.json`` says whose it was).
Anything in wrapcal's folder not named as above is left alone; links are never followed.

**Integrity.** ``meta.json`` records a SHA-256 digest of every ~8 MiB chunk of
``features.bin`` and of ``labels.bin``, and the entry's key. When an entry is looked up,
its files must be plain files (a symbolic link, for the folder or any file, is refused;
the link is removed, never followed), its sizes and key must agree with ``meta.json``
and every digest must match (:func:`~wrapcal.features.disk_arrays.verify_entry`: one
read of the file, hashed in a few threads: measured at 0.7-1.0x the time a plugin takes
to read the entry's features once, page cache warm, for 20000 x 512 and 100000 x 512
float32; less than that from a cold disk). An entry that fails is removed with a
warning and rebuilt, never served. The digests guard against corruption and edits of
the data files; someone who can also rewrite ``meta.json`` can forge them, which the
labels check below and the key (the data's own fingerprint) still limit.

**Labels.** The labels that fit uses are always the data's own: the data's fingerprint
covers them, and on a hit :func:`~wrapcal.features.memory_store.cached_features`
compares the entry's labels with those of the data the user passed and rebuilds an entry
that disagrees (see there). An entry whose ``meta.json`` is missing, incomplete or
disagrees with its files is removed and rebuilt, never read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wrapcal.features.disk_arrays import STORAGE_DTYPES, DiskFeatures, DiskWriter, verify_entry
from wrapcal.features.extract import FeatureSet, FeatureSink

try:
    import fcntl
except ImportError:  # Windows: the owner record and the stale-age rule instead
    fcntl = None  # type: ignore[assignment]

__all__ = ["MARKER", "ROOT", "STAGING_AGE", "STALE_AGE", "DiskCache"]

#: The folder wrapcal owns inside ``cache_dir`` (the version changes with the layout).
ROOT = "wrapcal-features-v2"
#: The marker file that makes a folder wrapcal's.
MARKER = "WRAPCAL-CACHE.json"
_MARKER_TEXT = json.dumps({"wrapcal": "feature cache", "layout": 2}) + "\n"
#: Without ``fcntl``: seconds without a change after which a partial folder is stale.
STALE_AGE = 24 * 3600
#: Seconds after which a staging folder (a writer died while taking its lock) is removed.
STAGING_AGE = 3600

_PARTIAL = ".partial-"
_LOCK = ".lock"
_OWNER = "owner.json"
_PARTIAL_NAME = re.compile(r"[0-9a-z][0-9a-z-]*\.partial-[0-9]+-[0-9a-f]{8}")
_STAGING_NAME = re.compile(r"\.staging-[0-9]+-[0-9a-f]{8}")
_FILES = ("features.bin", "labels.bin", "meta.json")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class DiskCache:
    """Backbone features of data sets, in files under ``directory``'s
    ``wrapcal-features-v2`` folder: a :class:`~wrapcal.features.store.FeatureStore`.

    Args:
        directory: The ``cache_dir`` (created if missing); wrapcal's folder is made
            inside it, or is ``directory`` itself when that holds wrapcal's marker.
        dtype: ``"float32"`` or ``"float16"``: how features are stored (reads give
            float32); float16 halves the disk and I/O for a rounding of about 1e-3
            relative.

    Raises:
        FileExistsError: ``directory/wrapcal-features-v2`` exists but is not wrapcal's
            (no marker, not empty, or a symbolic link).
    """

    def __init__(self, directory: str | os.PathLike, dtype: str = "float32") -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(STORAGE_DTYPES)}; got {dtype!r}")
        self.directory = Path(directory)
        self.dtype = dtype
        self.enabled = True
        self.hits = 0
        self.misses = 0
        if _is_marked(self.directory):
            self.root = self.directory
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.root = self.directory / ROOT
            _claim(self.root)
        self._clean_partials()

    # --- entries -------------------------------------------------------------------------

    def _folder(self, model_key: str, data_key: str) -> Path:
        return self.root / f"{model_key}-{data_key}-{self.dtype}"

    def _clean_partials(self) -> None:
        """Remove the partial and staging folders whose writers are gone (see the
        module doc); nothing else."""
        with os.scandir(self.root) as found:
            names = [e.name for e in found]
        for name in names:
            if _PARTIAL_NAME.fullmatch(name):
                _remove_if_abandoned(self.root / name, STALE_AGE if fcntl is None else 0)
            elif _STAGING_NAME.fullmatch(name):
                _remove_if_abandoned(self.root / name, STAGING_AGE)

    def _read_meta(
        self, folder: Path, model_key: str | None = None, data_key: str | None = None
    ) -> dict[str, Any] | None:
        """The entry's meta, or ``None`` (and the folder removed) if it is not a complete
        entry of this key made of plain files."""
        try:
            info = os.lstat(folder)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(info.st_mode):
            # A link (or a file) where an entry goes: removed, never followed.
            _warn(folder, "is a symbolic link or not a folder")
            _remove(folder)
            return None
        try:
            for name in _FILES:
                if not stat.S_ISREG(os.lstat(folder / name).st_mode):
                    _warn(folder, f"has a {name} that is not a plain file (a symbolic link?)")
                    _remove(folder)
                    return None
            meta = json.loads(_read_text(folder / "meta.json"))
            rows, width = int(meta["rows"]), int(meta["width"] or 0)
            itemsize = np.dtype(STORAGE_DTYPES[meta["storage"]][1]).itemsize
            sizes_agree = (folder / "features.bin").stat().st_size == rows * width * itemsize
            labels = (folder / "labels.bin").stat().st_size
            labels_agree = labels == (rows * 8 if meta["labelled"] else 0)
            key = (meta.get("model_key"), meta.get("data_key"), meta.get("storage"))
            named = f"{key[0]}-{key[1]}-{key[2]}" == folder.name
            wanted = model_key is None or (key[0], key[1]) == (model_key, data_key)
            shaped = int(meta["chunk_rows"]) > 0 and isinstance(meta["digests"], list)
            if meta.get("complete") is True and sizes_agree and labels_agree and shaped:
                if named and wanted:
                    return meta
                _warn(folder, f"holds the entry {key[0]}-{key[1]}-{key[2]} (moved or copied)")
        except (OSError, ValueError, KeyError, TypeError):
            pass
        _remove(folder)
        return None

    def lookup(
        self, model_key: str, data_key: str, name: str, data: Any, device: torch.device
    ) -> FeatureSet | None:
        """The stored features of this backbone and data, or ``None`` (an entry that
        fails its checks is removed, with a warning: the caller rebuilds it)."""
        folder = self._folder(model_key, data_key)
        meta = self._read_meta(folder, model_key, data_key)
        if meta is None:
            return None
        try:
            wrong = verify_entry(folder, meta)
        except OSError as error:
            wrong = f"could not be read ({error})"
        if wrong is not None:
            _warn(folder, f"failed its digest check: {wrong}")
            _remove(folder)
            return None
        return self._open(folder, meta, name, data, device, None)

    def _open(
        self,
        folder: Path,
        meta: dict[str, Any],
        name: str,
        data: Any,
        device: torch.device,
        labels: torch.Tensor | None,
    ) -> FeatureSet:
        features = DiskFeatures(
            folder / "features.bin", meta["rows"], meta["width"] or 0, meta["storage"], device
        )
        if labels is None and meta["labelled"]:
            raw = np.frombuffer(_read_bytes(folder / "labels.bin"), dtype=np.int64).copy()
            labels = torch.from_numpy(raw).to(device)
        shape = tuple(meta["input_shape"]) if meta.get("input_shape") else None
        return FeatureSet(name, features, labels, data, shape)

    def forget(self, model_key: str, data_key: str) -> None:
        """Remove the entry of this backbone and data, if there is one."""
        _remove(self._folder(model_key, data_key))

    def candidates(self, model_key: str, probe: str) -> list[str]:
        """Data keys of complete entries of this backbone whose first batch is ``probe``."""
        found = []
        for folder in self.root.glob(f"{model_key}-*-{self.dtype}"):
            meta = self._read_meta(folder)
            if meta is not None and (meta.get("model_key"), meta.get("probe")) == (
                model_key,
                probe,
            ):
                found.append(str(meta["data_key"]))
        return found

    # --- writing -------------------------------------------------------------------------

    def new_sink(self, model_key: str) -> _DiskSink:
        """A writer into a locked partial folder (renamed by :meth:`store` when complete)."""
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        staging = self.root / f".staging-{tag}"
        staging.mkdir()
        try:
            lease = _Lease.take(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        partial = self.root / f"{model_key}{_PARTIAL}{tag}"
        try:
            os.rename(staging, partial)  # visible as a partial only with its lock held
            writer = DiskWriter(partial, self.dtype, exist_ok=True)
        except BaseException:
            for folder in (staging, partial):
                _remove_tree(folder)
            lease.release()
            raise
        return _DiskSink(writer, lease)

    def store(
        self,
        model_key: str,
        data_key: str,
        feature_set: FeatureSet,
        probe: str | None,
        sink: FeatureSink,
    ) -> FeatureSet:
        """Complete the sink's folder as the entry of this backbone and data."""
        disk_sink = _sink_of(sink)
        writer = disk_sink.writer
        meta = writer.finish(
            {
                "model_key": model_key,
                "data_key": data_key,
                "probe": probe,
                "input_shape": list(feature_set.input_shape or []),
            }
        )
        folder = self._folder(model_key, data_key)
        device = (
            feature_set.labels.device if feature_set.labels is not None else torch.device("cpu")
        )
        if self._read_meta(folder, model_key, data_key) is not None:
            # Another process stored it meanwhile: keep theirs (it is checked as any is).
            _remove_tree(writer.folder)
            disk_sink.lease.release()
            stored = self.lookup(model_key, data_key, feature_set.name, feature_set.data, device)
            if stored is None:
                raise OSError(
                    f"could not complete the feature cache entry {folder}: another process "
                    "replaced it with one that fails its checks; run again, or remove it"
                )
            return stored
        try:
            os.rename(writer.folder, folder)  # still locked: never cleaned as a partial
        except OSError as error:
            _remove_tree(writer.folder)
            disk_sink.lease.release()
            raise OSError(
                f"could not complete the feature cache entry {folder} ({error}); check that "
                f"{self.root} is writable, or pass another cache_dir"
            ) from error
        for name in (_LOCK, _OWNER):  # an entry holds just its three files
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
        disk_sink.lease.release()
        return self._open(
            folder, meta, feature_set.name, feature_set.data, device, feature_set.labels
        )

    def discard(self, sink: FeatureSink) -> None:
        """Remove the folder of a sink whose extraction failed."""
        disk_sink = _sink_of(sink)
        disk_sink.writer.abort()
        _remove_tree(disk_sink.writer.folder)
        disk_sink.lease.release()


# --- the folder wrapcal owns ---------------------------------------------------------------


def _is_marked(folder: Path) -> bool:
    """Whether ``folder`` is a real folder holding wrapcal's marker (a plain file)."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        if not stat.S_ISREG(os.lstat(folder / MARKER).st_mode):
            return False
        return _read_text(folder / MARKER) == _MARKER_TEXT
    except (OSError, UnicodeDecodeError):
        return False


def _claim(root: Path) -> None:
    """Make ``root`` wrapcal's folder, or check that it is; refuse anything else."""
    with contextlib.suppress(FileExistsError):
        root.mkdir()
    if _is_marked(root):
        return

    def not_ours(why: str) -> FileExistsError:
        return FileExistsError(
            f"{root} exists and is not wrapcal's feature cache folder (no {MARKER} marker, "
            f"and {why}); wrapcal writes only inside a folder it made: move {root.name} "
            "away, or pass another cache_dir"
        )

    if not stat.S_ISDIR(os.lstat(root).st_mode):
        raise not_ours("it is not a folder (a symbolic link?)")
    with os.scandir(root) as found:
        # Only the marker, or a marker being written by a process that died meanwhile.
        if any(not e.name.startswith((MARKER, f".{MARKER}.")) for e in found):
            if _is_marked(root):  # another process marked it and began writing meanwhile
                return
            raise not_ours("it holds files")
    # Empty (just made, here or by a process racing this one): mark it.
    tmp = root / f".{MARKER}.{os.getpid()}-{secrets.token_hex(4)}"
    tmp.write_text(_MARKER_TEXT)
    os.replace(tmp, root / MARKER)


# --- liveness of partial folders ----------------------------------------------------------


class _Lease:
    """The lock a writer holds on its partial folder's ``.lock`` for the folder's life,
    and the owner record (host, pid, start time) written beside it."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @classmethod
    def take(cls, folder: Path) -> _Lease:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        (folder / _OWNER).write_text(json.dumps(owner))
        fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
            except BaseException:
                os.close(fd)
                raise
        return cls(fd)

    def release(self) -> None:
        """Let go of the lock (closing the file does); idempotent."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _remove_if_abandoned(folder: Path, min_age: float) -> None:
    """Remove a partial or staging folder if its writer is gone: with ``fcntl``, when its
    lock can be taken (or it has none and is ``min_age`` seconds old); without, when
    nothing in it changed for ``min_age`` seconds. A symbolic link is left alone."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return
    except OSError:
        return
    if fcntl is None:
        if _age(folder) >= min_age:
            _remove_tree(folder)
        return
    try:
        fd = os.open(folder / _LOCK, os.O_RDONLY | _NOFOLLOW)
    except OSError:  # no lock file (or not a file): a writer that died taking it
        if _age(folder) >= min_age:
            _remove_tree(folder)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # held: its writer is alive, in whatever PID namespace
        _remove_tree(folder)  # removed while this process holds the lock
    finally:
        os.close(fd)


def _age(folder: Path) -> float:
    """Seconds since anything in ``folder`` (not following links) last changed."""
    newest = 0.0
    with contextlib.suppress(OSError):
        newest = os.lstat(folder).st_mtime
        with os.scandir(folder) as found:
            for entry in found:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return time.time() - newest


# --- removing, reading ----------------------------------------------------------------------


def _remove_tree(folder: Path) -> None:
    """Remove a folder of wrapcal's and what is in it; a link inside is removed, not
    followed (``shutil.rmtree``); a link in the folder's place is left alone."""
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.lstat(folder).st_mode):
            shutil.rmtree(folder, ignore_errors=True)


def _remove(path: Path) -> None:
    """Remove what sits at an entry's name: a folder (as :func:`_remove_tree`), or a link
    or file (the link itself: its target is never touched)."""
    try:
        info = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _read_bytes(path: Path) -> bytes:
    """The bytes of a plain file, refusing a symbolic link (``OSError``)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _read_text(path: Path) -> str:
    return _read_bytes(path).decode()


def _warn(folder: Path, problem: str) -> None:
    warnings.warn(
        f"feature cache entry {folder} {problem}: removed, not served; the backbone runs "
        "again to rebuild it",
        RuntimeWarning,
        stacklevel=3,
    )


# --- sinks ---------------------------------------------------------------------------------


def _sink_of(sink: FeatureSink) -> _DiskSink:
    """A sink this store handed out (:meth:`DiskCache.new_sink`), or a clear error."""
    if not isinstance(sink, _DiskSink):
        raise TypeError(
            f"a DiskCache completes only the sinks it made (DiskCache.new_sink); got "
            f"{type(sink).__name__}"
        )
    return sink


class _DiskSink:
    """A :class:`~wrapcal.features.store.FeatureSink` whose rows go to the file, and the
    lock that keeps its folder from being cleaned while it is written."""

    def __init__(self, writer: DiskWriter, lease: _Lease) -> None:
        self.writer = writer
        self.lease = lease

    def append(self, features: torch.Tensor, labels: torch.Tensor | None) -> None:
        self.writer.append(features, labels)

    def finish(self) -> DiskFeatures:
        width = self.writer.width or 0
        return DiskFeatures(
            self.writer.folder / "features.bin", self.writer.rows, width, self.writer.storage
        )
