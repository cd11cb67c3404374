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
import warnings

import torch
from torch import nn

from wrapcal.errors import PluginNotFoundError, SavedFileError
from wrapcal.files import families as registry
from wrapcal.files.format import SavedFile, learned_tensor_problem, read, sizes_problem
from wrapcal.model.assemble import build, find_split, resolve_plugins
from wrapcal.model.split import Split, split_at
from wrapcal.model.wrapped import WrappedModel

__all__ = ["load"]


def _check_sizes(saved: SavedFile) -> None:
    problem = sizes_problem(saved.config, saved.tensors)
    if problem:
        raise SavedFileError(f"{saved.path}: {problem}")


def _rebuild_model(saved: SavedFile, device: str | torch.device | None = None) -> nn.Module:
    source = saved.config["model"]
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
    except (ValueError, TypeError, KeyError) as err:
        # A description the family refuses while building (inconsistent sizes, a key of
        # another model type): the file's fault, said as such.
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
    if kind == "module":
        if not isinstance(head_path, str):
            raise SavedFileError(f"{saved.path}: the split has no head path")
        return split_at(model, head_path)
    return find_split(model)


def _assemble(saved: SavedFile, split: Split) -> WrappedModel:
    entries = saved.config["plugins"]
    try:
        plugins = resolve_plugins([(e["name"], e["params"]) for e in entries], saved=True)
    except PluginNotFoundError as err:
        raise SavedFileError(f"{saved.path} needs a plugin that is not installed: {err}") from err
    except (TypeError, ValueError) as err:
        raise SavedFileError(f"{saved.path}: {err}") from None
    if [name for name, _ in plugins] != [e["name"] for e in entries]:
        raise SavedFileError(f"{saved.path}: the plugins are not in the order they act in")
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
            one that needs a plugin that is not installed.
    """
    saved = read(path)
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
    for name, plugin in zip(wrapped.plugin_names, wrapped.plugins, strict=True):
        try:
            plugin.validate_state()
        except ValueError as err:
            raise SavedFileError(f"{saved.path}: plugin {name}: {err}") from None
    wrapped.source = saved.config["model"] or wrapped.source
    shape = saved.config.get("input_shape")
    wrapped.input_shape = tuple(shape) if shape else None
    wrapped.operating_points = saved.config.get("operating_points")
    return wrapped.eval()
