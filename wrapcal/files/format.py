"""The ``.wrapcal`` file: one safetensors file, its configuration as JSON inside.

The tensors are the wrapped model's ``state_dict``; the header's metadata holds one
JSON document under ``"wrapcal"``: format version, the version of wrapcal that wrote it
(``wrapcal_version``, since 0.3: what a plugin computes may change between releases, and
load warns where a file's plugins were fitted under other rules), what the model's
inputs are (``preprocess``, since 0.3: :mod:`wrapcal.files.preprocess`, or ``null``), how
to rebuild the model (a name in :mod:`wrapcal.files.families` and allow-listed
arguments), the split, the sizes, each plugin's name, the package it came from
(``package``, since 0.3; load looks the name up there), parameters and learned plain
values, and a SHA-256 digest over the configuration and every tensor's name, dtype, shape
and bytes. Nothing is pickled. Tied
weights (one tensor under several names) are stored once, with the other names under
``"tied"`` (since 0.3: alias -> stored name), and tied again by load.

``save`` first runs on what it is about to write the checks :func:`wrapcal.load` runs
on a file (:func:`check_loadable`: sizes, each plugin's parameters and learned values
after the JSON round trip, its learned tensors against their declared shapes and dtypes,
its ``validate_state``), with load's messages, so it never writes a file that load
refuses. It then writes a temporary file beside the target (with the target's mode, or
the umask's) and renames it, so a failed save leaves the old file intact; a target that
is a directory, or one that cannot be written, is a :class:`~wrapcal.SavedFileError`
naming it. ``read`` reads the file once, checks its structure and the digest, and returns
the configuration and the tensors; :func:`wrapcal.load` builds the model from them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from wrapcal import distributed
from wrapcal._version import __version__
from wrapcal.errors import SavedFileError
from wrapcal.files.families import describe_model
from wrapcal.files.preprocess import Preprocess
from wrapcal.model import discovery
from wrapcal.model.operating_points import is_operating_points

if TYPE_CHECKING:
    from wrapcal.plugin.base import Plugin

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SavedFile",
    "check_loadable",
    "digest",
    "learned_tensor_problem",
    "read",
    "save",
    "sizes_problem",
    "state_tensors",
    "with_ties",
]

FORMAT = "wrapcal"
FORMAT_VERSION = 2
#: The safetensors header (tensor index and metadata) may not be larger than this.
MAX_HEADER_BYTES = 64 << 20
#: The largest number of classes or features a saved file may declare.
MAX_SIZE = 1 << 24
#: The most values one input of the saved input shape may hold when the file's tensors
#: hold fewer (1 GiB in float32: 3 x 9000 x 9000 pixels, a 640^3 volume).
MAX_INPUT_ELEMENTS = 1 << 28
_TMP_SUFFIX = ".wrapcal-tmp"


@dataclass
class SavedFile:
    """A saved file's checked contents.

    Attributes:
        path: Where it was read from.
        config: The JSON configuration (without the digest).
        tensors: Name -> tensor, on the CPU, as stored.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def digest(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the configuration (canonical JSON) and every tensor, in name order."""
    h = hashlib.sha256(b"wrapcal-digest-v1\0")
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{tensor.dtype!s}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _package_of(name: str, plugin: Plugin) -> str | None:
    """The distribution the wrapped model's plugin ``name`` came from (``None`` for a
    module registered by hand)."""
    plain = name.rpartition(":")[2]
    found = discovery.registrations_of(plugin)
    info = next((i for i in found if i.name == plain), found[0] if found else None)
    if info is None:  # made by a factory that is not its class: look the name up
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # load warns about a shared plain name, once
            info = discovery.find_saved_plugin(name)
    return info.package


def _plugin_entries(wrapped: Any) -> list[dict[str, Any]]:
    entries = []
    for plugin, name in zip(wrapped.plugins, wrapped.plugin_names, strict=True):
        if discovery.plugin_name(plugin) is None and name not in discovery.plugin_registry():
            raise SavedFileError(
                f"plugin {name} has no registered name, so a saved model could not be "
                "loaded; register it in the 'wrapcal' entry-point group"
            )
        entry: dict[str, Any] = {"name": name}
        package = _package_of(name, plugin)
        if package is not None:
            entry["package"] = package
        entries.append({**entry, "params": plugin.get_params(), "state": plugin.get_state()})
    return entries


def _config(wrapped: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "wrapcal_version": __version__,
        "model": describe_model(wrapped),
        "split": {"kind": wrapped.split_kind, "head_path": wrapped.head_path},
        "num_classes": wrapped.num_classes,
        "num_features": wrapped.num_features,
        "input_shape": list(wrapped.input_shape) if wrapped.input_shape else None,
        "operating_points": wrapped.operating_points,
        "preprocess": None if wrapped.preprocess is None else wrapped.preprocess.to_config(),
        "plugins": _plugin_entries(wrapped),
    }


def _clean_stale(directory: Path, name: str) -> None:
    """Remove temporary files of earlier saves of ``name`` whose process is gone."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[0-9a-f]+{re.escape(_TMP_SUFFIX)}\Z")
    for entry in directory.iterdir():
        found = pattern.match(entry.name)
        if not found:
            continue
        pid = int(found.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                entry.unlink()
        except OSError:
            pass  # alive under another user: not ours to remove


# --- the checks load runs, shared with save -------------------------------------------------


def sizes_problem(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str | None:
    """What is wrong with the header's sizes (implausible, or contradicted by the head's
    stored weight or the model description), or ``None``.

    Args:
        config: The configuration (``num_classes``, ``num_features``, ``model``).
        tensors: The tensors by name.
    """
    classes, width = config["num_classes"], config["num_features"]
    if not (0 < classes <= MAX_SIZE and 0 < width <= MAX_SIZE):
        return f"implausible sizes {classes} classes, {width} features"
    weight = tensors.get("head.weight")
    if weight is not None and tuple(weight.shape) != (classes, width):
        return (
            f"the header says {classes} classes and {width} features, but the "
            f"head's stored weight is {tuple(weight.shape)}"
        )
    kwargs = (config.get("model") or {}).get("kwargs")
    if isinstance(kwargs, dict) and "num_classes" in kwargs and kwargs["num_classes"] != classes:
        return (
            f"the model description asks for {kwargs['num_classes']!r} classes, "
            f"the header says {classes}"
        )
    shape = config.get("input_shape") or []
    elements = math.prod(shape)
    stored = sum(t.numel() for t in tensors.values())
    if elements > max(MAX_INPUT_ELEMENTS, stored):
        # One input of this shape is what a stand-in input or an export's example input
        # allocates: a header may not ask for more than the weights themselves hold.
        return (
            f"the input shape {list(shape)} is {elements} values per input, more than "
            f"{MAX_INPUT_ELEMENTS} and more than the {stored} values the file's tensors hold"
        )
    return None


def learned_tensor_problem(
    key: str,
    stored: torch.Tensor,
    spec: tuple[Any, ...],
    dtypes: tuple[torch.dtype, ...] | None,
    sizes: Mapping[str, int],
    plugin: str,
) -> str | None:
    """What is wrong with a stored learned tensor (``register_learned_buffer``), or ``None``.

    Args:
        key: The tensor's name in the file (``plugins.0.bank_``).
        stored: The tensor.
        spec: Its declared shape: ints, ``None`` (any size) or a size's name.
        dtypes: Its accepted dtypes (``None``: any floating dtype).
        sizes: ``num_features`` and ``num_classes`` of the model.
        plugin: The plugin's name, for the message.
    """
    shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec)
    fits = len(shape) == stored.ndim and all(
        want is None or want == got for want, got in zip(shape, stored.shape, strict=True)
    )
    allowed = stored.is_floating_point() if dtypes is None else stored.dtype in dtypes
    if fits and allowed:
        return None
    return (
        f"{key} is {tuple(stored.shape)} {stored.dtype}; plugin {plugin} declares {shape} "
        f"{'floating' if dtypes is None else dtypes}"
    )


def _check_entry(name: str, entry: Mapping[str, Any]) -> None:
    """Check a file's plugin entry as load does, on a new instance of the plugin: its
    registered factory, its parameters against their constraints, then its learned plain
    values through its own ``set_state``.

    Raises:
        TypeError, ValueError, LookupError: What load would raise.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load warns about a shared plain name, once
        factory = discovery.find_saved_plugin(name, entry.get("package")).factory
    plugin = factory(**entry["params"])
    plugin.validate_params(f"plugin {name}")
    try:
        plugin.set_state(entry["state"])
    except (TypeError, ValueError):
        raise
    except Exception:
        # Load calls set_state after attach: a set_state that needs what attach builds
        # cannot be checked on a new instance; load still checks it.
        return


def _load_problem(
    wrapped: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> str | None:
    """What ``wrapcal.load`` would refuse in a file of ``config`` and ``tensors`` written
    from ``wrapped`` (its message, without the file's name), or ``None``."""
    try:
        loaded = json.loads(json.dumps(config))  # what load reads back
    except (TypeError, ValueError) as err:
        return f"a plugin parameter or learned value is not JSON: {err}"
    problem = sizes_problem(loaded, tensors)
    if problem:
        return problem
    sizes = {"num_features": wrapped.num_features, "num_classes": wrapped.num_classes}
    for index, (name, plugin, entry) in enumerate(
        zip(wrapped.plugin_names, wrapped.plugins, loaded["plugins"], strict=True)
    ):
        try:
            _check_entry(name, entry)
        except (TypeError, ValueError, LookupError) as err:
            return str(err)
        for buffer, (spec, dtypes) in plugin.learned_tensor_specs().items():
            key = f"plugins.{index}.{buffer}"
            stored = tensors.get(key)
            problem = (
                None
                if stored is None
                else learned_tensor_problem(key, stored, spec, dtypes, sizes, name)
            )
            if problem:
                return problem
        try:
            plugin.validate_state()
        except ValueError as err:
            return f"plugin {name}: {err}"
    return None


def check_loadable(
    wrapped: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Any
) -> None:
    """Run on what ``save`` is about to write the checks ``wrapcal.load`` runs on a file.

    Each plugin's parameters and learned plain values are checked as they come back
    from JSON (a tuple comes back a list), through a new instance of the plugin (its
    registered factory, ``validate_params``, ``set_state``); its learned tensors against
    their declared shapes and dtypes; its current state with ``validate_state`` (NaN,
    inf, out-of-range values ``fit`` cannot produce). The header's sizes too.

    Args:
        wrapped: The model being saved.
        config: Its configuration, as it will be written.
        tensors: Its tensors, as they will be written.
        path: The target, for the message.

    Raises:
        SavedFileError: A value ``load`` would refuse; the message holds load's.
    """
    problem = _load_problem(wrapped, config, tensors)
    if problem:
        raise SavedFileError(
            f"cannot save {path}: {problem}; wrapcal.load would refuse the file, so nothing "
            "was written. Fit the plugin again (or fix the value) before saving"
        )


def _check_target(path: Path, given: Any) -> None:
    """Refuse a target that cannot be a file: a directory, ``''``, ``'.'``, ``'..'``."""
    if path.name in ("", ".", "..") or path.is_dir():
        example = (path / "model.wrapcal") if path.name not in ("", ".") else "model.wrapcal"
        raise SavedFileError(
            f"cannot save to {os.fspath(given)!r}: it is a directory, not a file name; give "
            f"the file to write, e.g. wrapped.save({os.fspath(example)!r})"
        )


def state_tensors(wrapped: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write and the ties between them: ``(name -> tensor, alias -> name)``.

    A tensor the state dict holds under several names (tied weights: a head that shares
    its weight with an embedding) is written once, under its first name; the others
    are recorded as aliases of it, and :func:`read` gives each alias that same tensor,
    so that ``wrapcal.load`` ties them again (safetensors refuses shared memory). Tensors
    that overlap in memory without being the same view (one a slice of another) are
    written as copies of their own: they load as independent tensors with the same
    values.
    """
    first: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, ...]] = set()
    tensors: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    for name, value in wrapped.state_dict().items():
        value = value.detach()
        ptr = value.untyped_storage().data_ptr() if value.numel() else 0
        if ptr == 0:  # no memory: nothing to share
            tensors[name] = value.cpu().contiguous()
            continue
        storage = (value.device, ptr)
        view = (*storage, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        if view in first:
            ties[name] = first[view]
            continue
        first[view] = name
        value = value.cpu().contiguous()
        # .cpu() and .contiguous() copy only what is on another device or strided, so a
        # CPU view of another tensor's memory is still shared here: copy it.
        tensors[name] = value.clone() if storage in storages else value
        storages.add(storage)
    return tensors, ties


def with_ties(
    tensors: Mapping[str, torch.Tensor], ties: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """``tensors`` with each tied alias naming its tensor (the same object)."""
    return {**tensors, **{alias: tensors[name] for alias, name in ties.items()}}


def save(wrapped: Any, path: str | os.PathLike) -> Path:
    """Save ``wrapped`` to ``path`` (conventionally ``*.wrapcal``).

    Tied weights (one tensor under several names) are written once and tied again by
    ``wrapcal.load`` (:func:`state_tensors`).

    Returns:
        The path written.

    Raises:
        SavedFileError: A target that is a directory (``''``, ``'.'``), one that cannot
            be written (the message names it and why; an existing file there is left
            as it was), a plugin without a registered name, parameters or learned
            values that are not JSON, or anything else ``wrapcal.load`` would refuse
            (:func:`check_loadable`); nothing is written then.
    """
    distributed.check_whole(wrapped, "save")
    given = path
    path = Path(path)
    _check_target(path, given)
    config = _config(wrapped)
    tensors, ties = state_tensors(wrapped)
    if ties:
        config["tied"] = ties
    try:
        config["digest"] = digest(config, tensors)
        text = json.dumps(config)
    except (TypeError, ValueError) as err:
        raise SavedFileError(f"a plugin parameter or learned value is not JSON: {err}") from err
    check_loadable(wrapped, config, with_ties(tensors, ties), path)
    payload = save_tensors(tensors, metadata={FORMAT: text})
    try:
        _write(path, payload)
    except OSError as err:
        # The temporary file's name means nothing to the user: say which target failed.
        raise SavedFileError(
            f"cannot save to {os.fspath(given)!r}: {err.strerror or err}. Check that its "
            "directory can be created and written and that the disk has room; an existing "
            "file there is left as it was"
        ) from err
    return path


def _write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary file beside ``path``, then rename it over
    ``path``: a failure leaves an existing file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path.parent, path.name)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
    # os.open applies the umask, as a plain open() would; an existing file keeps its mode.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --- reading ------------------------------------------------------------------------------


def _fail(path: Path, what: str) -> SavedFileError:
    return SavedFileError(
        f"{path} is not a readable wrapcal file: {what}. Save the model again with "
        "wrapped.save(path)"
    )


def _json(path: Path, text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise _fail(path, f"the {what} is nested too deeply to be a wrapcal file") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise _fail(path, f"the {what} is not valid JSON ({err})") from None


def _split_file(path: Path, blob: bytes) -> dict[str, Any]:
    if len(blob) < 8:
        raise _fail(path, "the file is too short to be a wrapcal file (truncated?)")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(blob):
        raise _fail(path, "the header length does not fit the file (truncated or corrupt?)")
    header = _json(path, blob[8 : 8 + size], "safetensors header")
    if not isinstance(header, dict):
        raise _fail(path, "the safetensors header is not an object")
    return header


def _check_config(path: Path, config: Any) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise _fail(path, "the wrapcal configuration is not an object")
    version = config.get("format_version")
    if config.get("format") != FORMAT or not isinstance(version, int):
        raise _fail(path, "the wrapcal configuration has no format version")
    if version > FORMAT_VERSION:
        raise SavedFileError(
            f"{path} has format version {version}; this wrapcal reads up to "
            f"{FORMAT_VERSION}. Upgrade wrapcal"
        )
    if version < FORMAT_VERSION:
        raise SavedFileError(
            f"{path} has format version {version}, written by an older wrapcal without a "
            "digest; load it with that version and save it again"
        )
    expected = {
        "model": dict,
        "split": dict,
        "num_classes": int,
        "num_features": int,
        "plugins": list,
        "digest": str,
    }
    for key, kind in expected.items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise _fail(path, f"the configuration's {key!r} is missing or not a {kind.__name__}")
    if not isinstance(config.get("wrapcal_version", ""), str):  # absent before 0.3
        raise _fail(path, "the wrapcal version is not a string")
    for entry in config["plugins"]:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("params"), dict)
            and isinstance(entry.get("state"), dict)
            and isinstance(entry.get("package", ""), str)
        ):
            raise _fail(path, "a plugin entry is not {name, package, params, state}")
    if not is_operating_points(config.get("operating_points")):
        raise _fail(path, "the operating points are not thresholds and metrics")
    ties = config.get("tied", {})
    if not (isinstance(ties, dict) and all(isinstance(v, str) for v in ties.values())):
        raise _fail(path, "the tied tensors are not names of tensors")
    shape = config.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list) and all(isinstance(v, int) and 0 < v < 1 << 20 for v in shape)
    ):
        raise _fail(path, "the input shape is not a list of sizes")
    record = config.get("preprocess")  # absent before 0.3
    if record is not None:
        try:
            Preprocess.from_config(record)
        except (TypeError, ValueError) as err:
            raise _fail(path, f"the preprocessing record is not valid ({err})") from None
    return config


def _config_of(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The checked wrapcal configuration in a safetensors header (digest not verified)."""
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or FORMAT not in metadata:
        raise SavedFileError(
            f"{path} is a safetensors file but not a wrapcal one (no '{FORMAT}' metadata); "
            "for bare weights, build the model and load_state_dict yourself, then wrap it"
        )
    if not isinstance(metadata[FORMAT], str):
        raise _fail(path, "the wrapcal configuration is not a string")
    return _check_config(path, _json(path, metadata[FORMAT], "wrapcal configuration"))


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A saved file's checked configuration, reading its header only (not the tensors).

    For a look at what a file records (its preprocessing, its plugins) before loading it;
    the digest is not verified here: :func:`read` (``wrapcal.load``) does that.

    Raises:
        SavedFileError: Missing, truncated, not a wrapcal file, or a newer format.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            # At most the header: its length is bounded before anything is read.
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            body = f.read(min(size, MAX_HEADER_BYTES + 1))
    except OSError as err:
        raise SavedFileError(f"cannot read {path}: {err}") from err
    return _config_of(path, _split_file(path, head + body))


def read(path: str | os.PathLike) -> SavedFile:
    """Read a saved file once and check it: structure, configuration and digest.

    Raises:
        SavedFileError: Missing, truncated, corrupt (digest mismatch), not a wrapcal
            file, or a newer format; the message says which.
    """
    path = Path(path)
    if not path.is_file():
        raise SavedFileError(f"no saved model at {path}")
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise SavedFileError(f"cannot read {path}: {err}") from err
    config = _config_of(path, _split_file(path, blob))
    try:
        tensors = load_tensors(blob)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise _fail(path, f"the tensors cannot be read (truncated or corrupt?): {err}") from None
    stored = config.pop("digest")
    if digest(config, tensors) != stored:
        raise _fail(
            path,
            "the file is corrupt: its contents do not match the digest stored when it was "
            "saved (a changed byte in the tensors or the configuration)",
        )
    ties = config.get("tied", {})
    for alias, name in ties.items():
        if alias in tensors or name not in tensors:
            raise _fail(path, f"the tied name {alias!r} is a tensor's, or ties to no tensor")
    return SavedFile(path, config, with_ties(tensors, ties))
