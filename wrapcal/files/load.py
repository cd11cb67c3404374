"""``load``: rebuild a saved wrapped model, trusting nothing in the file.

A saved file is untrusted input. What a hostile file can do: make ``load`` fail with
a :class:`~wrapcal.SavedFileError`, or give a model that the digest-protected contents
describe (its own weights and allow-listed settings). What it cannot do: choose a code
path (only registered model families and plugins, by plain name), make ``load`` open a
file or the network (no constructor argument is a path, URL or download flag), or
allocate more than it holds (every size is checked against the stored tensors on the
meta device before anything is built).
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from typing import Any

import torch
from torch import nn

from wrapcal.errors import PluginNotFoundError, SavedFileError, SplitError
from wrapcal.files import families as registry
from wrapcal.files.format import SavedFile, learned_tensor_problem, read, sizes_problem
from wrapcal.files.preprocess import Preprocess, fit_to_model
from wrapcal.model.assemble import build, find_split, resolve_plugins
from wrapcal.model.split import Split, split_at
from wrapcal.model.wrapped import WrappedModel
from wrapcal.plugin.base import get_tags

__all__ = ["MAX_UNSTORED_BYTES", "load"]

#: Buffers a model computes rather than stores may take this much memory even when the
#: file's tensors take less (small models whose index buffers outweigh their weights).
MAX_UNSTORED_BYTES = 16 << 20
# A head path a file may name: dotted public attribute names (a Sequential's indices too).
_HEAD_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,127}(\.[A-Za-z0-9][A-Za-z0-9_]{0,127}){0,31}\Z")


def _check_sizes(saved: SavedFile) -> None:
    problem = sizes_problem(saved.config, saved.tensors)
    if problem:
        raise SavedFileError(f"{saved.path}: {problem}")


#: The split kind of an ensemble of checkpoints (``wrapcal_plugins.uncertainty.ensemble``).
_ENSEMBLE = "ensemble"


def _ensemble_members(saved: SavedFile) -> int:
    """How many members a saved ensemble holds (its backbone's ``members.<i>``)."""
    found = {
        key.split(".")[2]
        for key in saved.tensors
        if key.startswith("backbone.members.") and key.count(".") >= 3
    }
    return len(found)


def _rebuild_model(saved: SavedFile, device: str | torch.device | None = None) -> nn.Module:
    source = saved.config["model"]
    if not source and saved.config["split"].get("kind") == _ENSEMBLE:
        raise SavedFileError(
            f"this file holds an ensemble of {_ensemble_members(saved)} custom models that "
            "cannot be rebuilt by name; pass models of the same architectures, in the same "
            "order: wrapcal.load(path, model=Ensemble([Model1(), Model2(), ...])) (from "
            "wrapcal_plugins.uncertainty.ensemble import Ensemble)"
        )
    if not source:
        raise SavedFileError(
            "this file holds a custom model that cannot be rebuilt by name; pass it: "
            "wrapcal.load(path, model=MyModel())"
        )
    try:
        family, name, kwargs = registry.check_spec(
            source.get("library"), source.get("name"), source.get("kwargs", {})
        )
    except ValueError as err:
        raise SavedFileError(f"{saved.path}: {err}") from None
    try:
        if device is None:
            return family.build(name, kwargs)
        with torch.device(device):
            return family.build(name, kwargs)
    except torch.OutOfMemoryError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        # A description the family refuses while building (inconsistent sizes, a key of
        # another model type): the file's fault, said as such.
        raise SavedFileError(f"{saved.path}: cannot build {name}: {err}") from None
    except (NotImplementedError, RuntimeError) as err:
        if device is not None:
            raise  # an operation the meta device lacks: the caller builds for real instead
        # A description the library refuses in its own words (a RuntimeError from timm).
        raise SavedFileError(f"{saved.path}: cannot build {name}: {err}") from None


def _split(saved: SavedFile, model: nn.Module) -> Split:
    kind = saved.config["split"].get("kind")
    head_path = saved.config["split"].get("head_path")
    if kind == "manual":
        raise SavedFileError(
            "this model was wrapped with a hand-made Split; pass it: "
            "wrapcal.load(path, split=wrapcal.Split(backbone=..., head=...))"
        )
    if kind == "linear":
        if not isinstance(model, nn.Linear):
            raise SavedFileError(
                f"{saved.path} holds a bare nn.Linear; pass one: model=nn.Linear(...)"
            )
        return Split(nn.Identity(), model, kind="linear")
    try:
        if kind == "module":
            if not isinstance(head_path, str) or not _HEAD_PATH.match(head_path):
                raise SavedFileError(
                    f"{saved.path}: the split's head path {head_path!r} is not the dotted name "
                    "of a module (public names: letters, digits and '_', not starting with "
                    "'_'); save the model again"
                )
            return split_at(model, head_path)
        split = find_split(model)
    except SplitError as err:
        # The file names a split this model does not have: the file's (or the model
        # passed with it) fault, not a split to make by hand.
        raise SavedFileError(
            f"{saved.path} does not match the model it is loaded into: {err}. Pass the same "
            "architecture that was saved (wrapcal.load(path, model=...))"
        ) from None
    if kind == _ENSEMBLE and split.kind != _ENSEMBLE:
        # Its tensors would not match either; say what to pass instead.
        raise SavedFileError(
            f"{saved.path} holds an ensemble of {_ensemble_members(saved)} models, not a "
            f"{type(model).__name__}; pass the members: wrapcal.load(path, "
            "model=Ensemble([Model1(), Model2(), ...])) (from "
            "wrapcal_plugins.uncertainty.ensemble import Ensemble)"
        )
    return split


def _in_acting_order(saved: SavedFile, names: list[str]) -> list[dict]:
    """The file's plugin entries in the order the plugins act in now, its tensors
    (``plugins.<index>.*``) renumbered to match.

    A file lists its plugins in the order they acted in when it was saved. That order
    can change between releases (0.2.0 ran ``react`` after the heads; it is a detector
    now, ordered by name among the others), so state is matched to plugins by name,
    never by position.
    """
    entries = saved.config["plugins"]
    position = {entry["name"]: index for index, entry in enumerate(entries)}
    if [entry["name"] for entry in entries] == names:
        return entries
    moved = {position[name]: index for index, name in enumerate(names)}
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in saved.tensors.items():
        head, index, rest = key.split(".", 2) if key.count(".") >= 2 else (key, "", "")
        if head == "plugins" and index.isdigit() and int(index) in moved:
            key = f"plugins.{moved[int(index)]}.{rest}"
        renamed[key] = tensor
    saved.tensors = renamed
    saved.config["plugins"] = [entries[position[name]] for name in names]
    return saved.config["plugins"]


def _assemble(saved: SavedFile, split: Split) -> WrappedModel:
    entries = saved.config["plugins"]
    # The package each plugin came from (files of 0.3 on): looked up there, so another
    # package registering the same name since cannot take its place.
    packages = {e["name"]: e["package"] for e in entries if "package" in e}
    try:
        plugins = resolve_plugins(
            [(e["name"], e["params"]) for e in entries], saved=True, packages=packages
        )
    except PluginNotFoundError as err:
        raise SavedFileError(f"{saved.path} needs a plugin that is not installed: {err}") from err
    except (TypeError, ValueError) as err:
        raise SavedFileError(f"{saved.path}: {err}") from None
    entries = _in_acting_order(saved, [name for name, _ in plugins])
    try:
        wrapped = build(split, plugins, stacklevel=4)
        for plugin, entry in zip(wrapped.plugins, entries, strict=True):
            plugin.set_state(entry["state"])
    except (TypeError, ValueError) as err:
        raise SavedFileError(f"{saved.path}: {err}") from None
    return wrapped


def _fit_learned_buffers(saved: SavedFile, wrapped: WrappedModel) -> None:
    """Give data-sized buffers (a KNN bank) the size the file holds, after checking it."""
    sizes = {"num_features": wrapped.num_features, "num_classes": wrapped.num_classes}
    for index, plugin in enumerate(wrapped.plugins):
        for name, (spec, dtypes) in plugin.learned_tensor_specs().items():
            key = f"plugins.{index}.{name}"
            stored = saved.tensors.get(key)
            if stored is None:
                continue
            problem = learned_tensor_problem(
                key, stored, spec, dtypes, sizes, wrapped.plugin_names[index]
            )
            if problem:
                raise SavedFileError(f"{saved.path}: {problem}")
            setattr(plugin, name, torch.empty(stored.shape, dtype=stored.dtype))


def _check_dtypes(saved: SavedFile, expected: dict[str, torch.Tensor]) -> None:
    """Refuse model tensors (backbone and head) whose floating dtypes the model's layers
    cannot take together.

    A file may hold the model in any one floating dtype (a ``half()`` model loads in
    float16), or in the dtypes of the model it is loaded into, tensor by tensor (a model
    built with some tensors in another dtype). Anything else (a float16 head in a float32
    model) would load and then fail at the first ``predict``.
    """
    floating = {
        key: tensor.dtype
        for key, tensor in saved.tensors.items()
        if not key.startswith("plugins.") and tensor.is_floating_point()
    }
    if len(set(floating.values())) <= 1:
        return
    odd = [key for key, dtype in floating.items() if dtype != expected[key].dtype]
    if not odd:
        return
    common = max(set(floating.values()), key=list(floating.values()).count)
    key = next((k for k in odd if floating[k] != common), odd[0])
    raise SavedFileError(
        f"{saved.path}: {key} is {floating[key]} in the file, but the model's other tensors "
        f"are {common} and the model it is loaded into has it in {expected[key].dtype}: its "
        "layers cannot compute in both. Save the model again after casting it whole "
        "(wrapped.to(dtype))"
    )


def _check_tensors(saved: SavedFile, wrapped: WrappedModel) -> None:
    expected = wrapped.state_dict()
    missing = sorted(set(expected) - set(saved.tensors))
    extra = sorted(set(saved.tensors) - set(expected))
    if missing or extra:
        raise SavedFileError(
            f"{saved.path} does not match the model it is loaded into: missing "
            f"{missing[:5]}, unexpected {extra[:5]}. Pass the same architecture that was "
            "saved (wrapcal.load(path, model=...))"
        )
    for key, want in expected.items():
        got = saved.tensors[key]
        same_kind = (
            got.is_floating_point() and want.is_floating_point()
        ) or got.dtype == want.dtype
        if tuple(got.shape) != tuple(want.shape) or not same_kind:
            raise SavedFileError(
                f"{saved.path} does not match the model it is loaded into: {key} is "
                f"{tuple(got.shape)} {got.dtype} in the file, {tuple(want.shape)} "
                f"{want.dtype} in the model. Pass the same architecture that was saved"
            )
    _check_dtypes(saved, expected)


def _tie_again(wrapped: WrappedModel) -> None:
    """Make tied weights one parameter again.

    A tied tensor is stored once and read back as one tensor under each of its names
    (:func:`wrapcal.files.format.state_tensors`); ``load_state_dict(assign=True)`` wraps
    it in a new ``Parameter`` per name, sharing memory. Each name gets the first one, as
    in the model that was saved (one parameter for an optimiser, ``a is b``).
    """
    first: dict[tuple[Any, ...], nn.Parameter] = {}
    for module in wrapped.modules(remove_duplicate=False):
        for attr, param in list(module._parameters.items()):
            if param is None or not param.numel():
                continue
            view = (
                param.untyped_storage().data_ptr(),
                param.storage_offset(),
                tuple(param.shape),
                param.stride(),
                param.dtype,
            )
            kept = first.setdefault(view, param)
            if kept is not param:
                setattr(module, attr, kept)


def _check_on_meta(saved: SavedFile) -> None:
    """Build the whole wrapped model on the meta device (no memory) and compare every
    tensor's shape with the file's, before anything real is allocated."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real build warns, once
            model = _rebuild_model(saved, device="meta")
            wrapped = _assemble(saved, _split(saved, model))
    except (NotImplementedError, RuntimeError):
        return  # a model that cannot be built on meta: the checks after building remain
    _fit_learned_buffers(saved, wrapped)
    _check_tensors(saved, wrapped)
    _check_unstored_buffers(saved, wrapped)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _check_unstored_buffers(saved: SavedFile, wrapped: WrappedModel) -> None:
    """Refuse a description whose buffers that are not stored (non-persistent ones,
    computed from allow-listed sizes: attention-bias indices and masks that grow with a
    timm ``img_size``) would take more memory than the file's own tensors, and more than
    :data:`MAX_UNSTORED_BYTES`: a header may not ask for memory its contents do not
    justify. Measured on the meta device, before anything is allocated."""
    stored_keys = set(wrapped.state_dict())
    unstored = sum(
        _nbytes(buffer) for name, buffer in wrapped.named_buffers() if name not in stored_keys
    )
    stored = sum(_nbytes(tensor) for tensor in saved.tensors.values())
    if unstored > max(stored, MAX_UNSTORED_BYTES):
        raise SavedFileError(
            f"{saved.path}: the model it describes ({saved.config['model'].get('name')} with "
            f"{saved.config['model'].get('kwargs')}) computes {unstored >> 20} MiB of "
            f"buffers that are not stored, more than its {stored >> 20} MiB of stored "
            "tensors: a size in its description (img_size?) is not the saved model's. Save "
            "the model again"
        )


#: Built-in plugins whose meaning changed in 0.3, so that a file of 0.2.0 or older that
#: holds one loads into a different model: name -> what changed.
_CHANGED_IN_0_3 = {
    "react": (
        "in wrapcal 0.2.0 react clipped the model's features for every plugin and for the "
        "logits; since 0.3 it is a detector that clips for its own score only, so this "
        "model's logits and probabilities are the unclipped model's, not the saved ones"
    ),
}


def _warn_of_changed_plugins(
    saved: SavedFile, file_order: list[str], wrapped: WrappedModel
) -> None:
    """Warn when a file written before wrapcal saved its version (0.2.0 or older) holds a
    built-in whose meaning changed since, and name what was fitted on its old output.

    Args:
        saved: The file.
        file_order: Its plugins' names in the order it lists them: the order they acted
            in when it was saved, so the plugins after one were fitted on its output.
        wrapped: The model loaded from it.
    """
    if "wrapcal_version" in saved.config:
        return
    plugins = dict(zip(wrapped.plugin_names, wrapped.plugins, strict=True))
    for index, name in enumerate(file_order):
        plain = name.rpartition(":")[2]
        if plain not in _CHANGED_IN_0_3 or name not in (plain, f"wrapcal:{plain}"):
            continue
        fitted = [
            later for later in file_order[index + 1 :] if get_tags(plugins[later]).requires_fit
        ]
        stale = [f"plugin{'s' if len(fitted) > 1 else ''} {', '.join(fitted)}"] if fitted else []
        if saved.config.get("operating_points"):
            stale.append("the operating points")
        consequence = (
            f"; {' and '.join(stale)} were fitted or measured on the old, clipped model's "
            "outputs and no longer match what they receive. Fit the model again "
            "(wrapped.fit(...) with the data used before) and save it again"
            if stale
            else ". Save the model again with this version of wrapcal to silence this warning"
        )
        warnings.warn(
            f"{saved.path} was saved by wrapcal 0.2.0 or older and holds plugin {name}: "
            f"{_CHANGED_IN_0_3[plain]}{consequence}",
            UserWarning,
            stacklevel=3,
        )


def _set_preprocess(saved: SavedFile, wrapped: WrappedModel) -> None:
    """The file's preprocessing record (checked by ``read``), or for a file written
    before records were saved, what the rebuilt model says (as ``wrap`` would)."""
    if "preprocess" in saved.config:
        record = saved.config["preprocess"]
        try:
            wrapped.preprocess = None if record is None else Preprocess.from_config(record)
        except ValueError as err:
            raise SavedFileError(f"{saved.path}: {err}") from None
        return
    inner = getattr(wrapped.backbone, "model", wrapped.backbone)
    try:
        record = Preprocess.from_model(inner)
        if record is not None:
            record = fit_to_model(record, wrapped.input_shape, wrapped.fixed_input_size)
        wrapped.preprocess = record
    except (ValueError, TypeError, ImportError):
        wrapped.preprocess = None  # the model's own statement is only a default


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    split: Split | None = None,
) -> WrappedModel:
    """Load a wrapped model saved with ``wrapped.save`` (or :func:`wrapcal.save`).

    Args:
        path: The saved file.
        model: The bare model, for custom models that cannot be rebuilt by name. It is
            copied, not changed; the copy gets the saved weights.
        split: The split, if the model was wrapped with a hand-made ``Split``; its
            modules are copied, not changed.

    Returns:
        The wrapped model in eval mode, with outputs identical to the saved one's, each
        tensor in the dtype it was saved in.

    Raises:
        SavedFileError: A missing, truncated, corrupt, hostile or mismatched file, or
            one that needs a plugin that is not installed (or not the package it was
            saved from).

    Warns:
        UserWarning: A file of wrapcal 0.2.0 or older holds a built-in whose meaning
            changed since (``react``, which clipped the model's features then): the
            outputs differ from the saved model's; the message names what to fit again.
    """
    saved = read(path)
    file_order = [entry["name"] for entry in saved.config["plugins"]]
    _check_sizes(saved)
    if split is not None:
        split = Split(
            copy.deepcopy(split.backbone),
            copy.deepcopy(split.head),
            split.kind,
            dict(split.source),
            split.head_path,
        )
    else:
        if model is None:
            _check_on_meta(saved)
            model = _rebuild_model(saved)
        else:
            model = copy.deepcopy(model)
        split = _split(saved, model)
    wrapped = _assemble(saved, split)
    _fit_learned_buffers(saved, wrapped)
    _check_tensors(saved, wrapped)
    wrapped.load_state_dict(saved.tensors, strict=True, assign=True)
    _tie_again(wrapped)
    for name, plugin in zip(wrapped.plugin_names, wrapped.plugins, strict=True):
        try:
            plugin.validate_state()
        except ValueError as err:
            raise SavedFileError(f"{saved.path}: plugin {name}: {err}") from None
    wrapped.source = saved.config["model"] or wrapped.source
    shape = saved.config.get("input_shape")
    wrapped.input_shape = tuple(shape) if shape else None
    wrapped.operating_points = saved.config.get("operating_points")
    _set_preprocess(saved, wrapped)
    _warn_of_changed_plugins(saved, file_order, wrapped)
    return wrapped.eval()
