"""Save and load wrapped models: one safetensors file, configuration as JSON inside.

The file is a plain safetensors file: the tensors are the wrapped model's
``state_dict`` and the header's metadata holds one JSON document under ``"wrapcal"``
(format version, how to rebuild the model, the plugins with their parameters and
learned plain values). Nothing is unpickled on load. Saving writes a temporary file
beside the target and renames it, so a failed save leaves the old file intact.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from wrapcal import manager
from wrapcal.errors import SavedFileError
from wrapcal.split import Split, split_at
from wrapcal.wrapped import WrappedModel, build_wrapped, find_split, resolve_plugins

FORMAT = "wrapcal"
FORMAT_VERSION = 1


def _torchvision_builder(cls_name: str, state: dict[str, tuple[int, ...]], kwargs: dict) -> str:
    """Find the torchvision builder whose model has exactly these tensor shapes.

    Candidates are built on the meta device, so no memory or time goes to weights.
    """
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        builder = torchvision.models.get_model_builder(name)
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                candidate = builder(weights=None, **kwargs)
        except Exception:
            continue
        if type(candidate).__name__ != cls_name:
            continue
        shapes = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
        if shapes == state:
            return name
    raise SavedFileError(
        f"cannot tell which torchvision builder made this {cls_name}; save it anyway by "
        "loading with wrapcal.load(path, model=...)"
    )


def _model_source(wrapped: WrappedModel) -> dict[str, Any]:
    source = dict(wrapped.source)
    if source.get("library") == "torchvision" and "name" not in source:
        model = copy.deepcopy(wrapped.backbone)
        # Put the head back to compare the complete model with each builder's.
        parent_path, _, attr = wrapped.head_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, wrapped.head)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        try:
            source["name"] = _torchvision_builder(source["class"], shapes, source["kwargs"])
        except SavedFileError:
            source = {}
        wrapped.source = source
    if source.get("library") is None:
        known = getattr(_inner_model(wrapped), "wrapcal_source", None)
        if isinstance(known, dict):
            source = {"library": "wrapcal", **known}
    return source


def _inner_model(wrapped: WrappedModel) -> nn.Module:
    return getattr(wrapped.backbone, "model", wrapped.backbone)


def save(wrapped: WrappedModel, path: str | os.PathLike) -> Path:
    """Save ``wrapped`` to ``path`` (conventionally ``*.wrapcal``)."""
    path = Path(path)
    plugins = []
    for plugin, name in zip(wrapped.plugins, wrapped.plugin_names, strict=True):
        name = name or manager.plugin_name(plugin)
        if name is None:
            raise SavedFileError(
                f"plugin {type(plugin).__name__} has no registered name, so a saved model "
                "could not be loaded; register it in the 'wrapcal' entry-point group"
            )
        plugins.append({"name": name, "params": plugin.get_params(), "state": plugin.get_state()})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": _model_source(wrapped),
        "split": {"kind": wrapped.split_kind, "head_path": wrapped.head_path},
        "num_classes": wrapped.num_classes,
        "num_features": wrapped.num_features,
        "plugins": plugins,
    }
    try:
        text = json.dumps(config)
    except TypeError as err:
        raise SavedFileError(f"a plugin parameter or state is not JSON-able: {err}") from err
    tensors = {k: v.detach().cpu().contiguous() for k, v in wrapped.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={FORMAT: text})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the JSON configuration of a saved file, without the tensors."""
    path = Path(path)
    if not path.is_file():
        raise SavedFileError(f"no saved model at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise SavedFileError(
            f"{path} is not a readable wrapcal file (truncated or corrupt?): {err}. Save it "
            "again with wrapped.save(path)"
        ) from err
    if FORMAT not in metadata:
        raise SavedFileError(
            f"{path} is a safetensors file but not a wrapcal one (no '{FORMAT}' metadata); "
            "for bare weights, build the model and load_state_dict yourself, then wrap it"
        )
    try:
        config = json.loads(metadata[FORMAT])
    except json.JSONDecodeError as err:
        raise SavedFileError(f"{path}: the wrapcal configuration is not valid JSON: {err}") from err
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SavedFileError(
            f"{path} has format version {version!r}; this wrapcal reads up to "
            f"{FORMAT_VERSION}. Upgrade wrapcal"
        )
    return config


def _rebuild(source: dict[str, Any]) -> nn.Module:
    library, name, kwargs = source.get("library"), source.get("name"), source.get("kwargs", {})
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    if library == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)
    if library == "wrapcal":
        from wrapcal import models

        builder = getattr(models, name, None)
        if builder is None or name not in models.__all__:
            raise SavedFileError(f"wrapcal.models has no model {name!r}")
        return builder(**kwargs)
    raise SavedFileError(
        "this file holds a custom model that cannot be rebuilt by name; pass it: "
        "wrapcal.load(path, model=MyModel())"
    )


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    split: Split | None = None,
) -> WrappedModel:
    """Load a wrapped model saved with :meth:`WrappedModel.save`.

    Args:
        path: The saved file.
        model: The bare model, for custom models that cannot be rebuilt by name. It is
            copied, not changed; its weights are replaced by the saved ones in the copy.
        split: The split, if the model was wrapped with a hand-made ``Split``.

    Returns:
        The wrapped model in eval mode, with outputs identical to the saved one's.
    """
    config = read_config(path)
    if split is None:
        model = _rebuild(config["model"]) if model is None else copy.deepcopy(model)
        head_path = config["split"].get("head_path")
        kind = config["split"].get("kind")
        if kind == "manual":
            raise SavedFileError(
                "this model was wrapped with a hand-made Split; pass it: "
                "wrapcal.load(path, split=wrapcal.Split(backbone=..., head=...))"
            )
        split = split_at(model, head_path) if kind == "module" else find_split(model)
    instances, names = resolve_plugins([(p["name"], p["params"]) for p in config["plugins"]])
    wrapped = build_wrapped(split, instances, names, stacklevel=3)
    for plugin, entry in zip(wrapped.plugins, _in_stage_order(wrapped, config), strict=True):
        plugin.set_state(entry["state"])
    wrapped._set_active({id(p) for p in wrapped.plugins if not p.requires_fit or p.fitted_})
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    except (SafetensorError, OSError, ValueError) as err:
        raise SavedFileError(f"{path}: cannot read the saved tensors (corrupt?): {err}") from err
    try:
        wrapped.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise SavedFileError(
            f"{path} does not match the model it is loaded into: {str(err).splitlines()[0]} "
            "... Pass the same architecture that was saved (wrapcal.load(path, model=...))"
        ) from err
    wrapped.source = config["model"] or wrapped.source
    return wrapped.eval()


def _in_stage_order(wrapped: WrappedModel, config: dict[str, Any]) -> list[dict[str, Any]]:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for entry in config["plugins"]:
        by_name.setdefault(entry["name"], []).append(entry)
    return [by_name[name].pop(0) for name in wrapped.plugin_names]
