"""The plugin contract: every hook a plugin can implement.

Two kinds of hooks live here.

*Discovery hooks* are answered by modules and objects registered on the global
plugin manager (:func:`wrapcal.manager.get_plugin_manager`), found through the
``wrapcal`` entry-point group.

*Model hooks* are answered by plugin instances registered on one wrapped model's
own manager. They are called in stage order (training plugins, then head builders,
then samplers, then post-hoc calibrators), whatever order the user listed them in.
Plugin classes usually subclass :class:`wrapcal.Plugin`, which provides the
bookkeeping; a hook a plugin does not need is simply not implemented.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch import nn

    from wrapcal.cache import FitData
    from wrapcal.split import Split
    from wrapcal.wrapped import WrappedModel

hookspec = pluggy.HookspecMarker("wrapcal")
hookimpl = pluggy.HookimplMarker("wrapcal")


# --- discovery -----------------------------------------------------------------------


@hookspec
def wrapcal_register_plugins(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register plugin factories by name.

    Args:
        register: Call ``register("temperature", TemperatureScaler)``; the factory is
            called with the user's keyword arguments and must return a plugin instance.
    """


@hookspec(firstresult=True)
def wrapcal_split_model(model: nn.Module) -> Split | None:
    """Split a classifier into a feature extractor and a head.

    The first adapter that recognises the model returns its :class:`~wrapcal.split.Split`;
    the others return ``None``. Built-in adapters handle timm, torchvision and, last,
    any model whose final operation is an ``nn.Linear``.

    Args:
        model: The model to split. The adapter may modify it (``wrap`` passes a copy
            unless the user asked for ``inplace=True``).
    """


# --- per wrapped model -----------------------------------------------------------------


@hookspec
def wrapcal_attach(wrapped: WrappedModel) -> None:
    """Change the wrapped model's structure once, when the plugin is added.

    Called at ``wrap`` time and again when a saved model is loaded, so it must build
    the same modules (with any weights) every time: learned values come from
    ``fit`` or from the saved state.
    """


@hookspec
def wrapcal_fit(wrapped: WrappedModel, data: FitData) -> None:
    """Learn from data, mostly from the cached backbone features in ``data``.

    Called once per plugin in stage order; plugins fitted earlier are already active
    in ``wrapped.head_logits(...)``, later ones not yet.
    """


@hookspec(firstresult=True)
def wrapcal_features(wrapped: WrappedModel, inputs: torch.Tensor) -> torch.Tensor | None:
    """Compute the backbone features of a batch of inputs as ``[S, B, D]``.

    The core's implementation runs the backbone once (``S = 1``); a plugin that samples
    the whole network (MC dropout with ``scope="all"``) returns ``S`` stochastic passes.
    """


@hookspec(firstresult=True)
def wrapcal_head_members(
    wrapped: WrappedModel, features: torch.Tensor, from_inputs: bool
) -> torch.Tensor | None:
    """Map features ``[B, D]`` to member logits ``[M, B, K]``.

    The core's implementation applies the head once (``M = 1``). A plugin that builds
    several heads or samples the head returns more members; it may call the remaining
    implementations through ``wrapped.call_inner("wrapcal_head_members", self, ...)``,
    passing every argument on. Members are ordered with the inner implementation's
    members varying fastest.

    Args:
        features: ``[B, D]`` features (``S`` feature samples are flattened into ``B``).
        from_inputs: True when the features were just computed from inputs by
            ``wrapcal_features`` (so a plugin that samples there has sampled them);
            False for cached features during ``fit``.
    """


@hookspec(firstresult=True)
def wrapcal_transform_logits(wrapped: WrappedModel, logits: torch.Tensor) -> torch.Tensor:
    """Post-process the combined logits ``[B, K]`` (temperature scaling).

    The core returns the logits unchanged; calibrators implement this as a new-style
    wrapper (``@hookimpl(wrapper=True)``): ``logits = yield`` then return the
    transformed logits.
    """


@hookspec
def wrapcal_scores(
    wrapped: WrappedModel, members: torch.Tensor, probs: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """Add named uncertainty scores, one value per sample, higher = more uncertain.

    Args:
        members: Member logits ``[M, B, K]`` before the logit transform.
        probs: The final predictive probabilities ``[B, K]``.
    """
