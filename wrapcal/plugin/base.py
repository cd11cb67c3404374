"""The base class of wrapcal plugins: the per-model contract as documented methods.

A plugin is an ``nn.Module`` (so its learned tensors travel with the wrapped model)
with scikit-learn's habits: ``__init__`` only stores its parameters, checked against
``_parameter_constraints``; ``fit`` returns ``self``; learned state ends in ``_``; a
plugin used before the ``fit`` it needs raises :class:`~wrapcal.NotFittedError`.

The core calls the methods below in stage order (:class:`~wrapcal.Stage`); a plugin
overrides the ones it needs and never calls the core back. At inference a batch flows::

    inputs -> features [S, B, D] -> members [M, B, K] -> combined [B, K]
           -> transform_logits (calibrators) -> probs -> outputs (scores, sets, decisions)

``features`` and ``members`` receive ``inner``: the same step of the plugins before
this one (and the core), to call on the input and build on. Defaults pass through.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from wrapcal.errors import NotFittedError
from wrapcal.plugin.constraints import Constraint, validate
from wrapcal.plugin.types import ModelView, OutputContext, PluginTags

if TYPE_CHECKING:
    from wrapcal.features.extract import FitData
    from wrapcal.plugin.prediction import Prediction

__all__ = ["Plugin", "fit_call", "get_tags", "not_fitted_error"]

#: A learned tensor's declared shape: an int, ``None`` (any size: taken from the saved
#: file) or the name of a model size (``"num_features"``, ``"num_classes"``).
ShapeSpec = tuple[int | str | None, ...]


class Plugin(nn.Module):
    """Base class of plugins. Override the contract methods the plugin needs.

    Class attributes:
        _parameter_constraints: Parameter name -> accepted forms
            (:mod:`wrapcal.plugin.constraints`), checked whenever the plugin is created, wrapped or
            loaded.
        _state_constraints: Learned plain value (an attribute ending in ``_``) ->
            accepted forms. These values are saved as JSON and checked on load; tensors
            belong in buffers instead.
    """

    _parameter_constraints: ClassVar[dict[str, list[Constraint]]] = {}
    _state_constraints: ClassVar[dict[str, list[Constraint]]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.fitted_ = False
        self._learned_specs: dict[str, tuple[ShapeSpec, tuple[torch.dtype, ...] | None]] = {}

    # --- declarations --------------------------------------------------------------------

    def __wrapcal_tags__(self) -> PluginTags:
        """What the plugin declares about itself (stage, data it reads, outputs...).

        Override it: ``tags = super().__wrapcal_tags__()``, set what differs, return it.
        """
        return PluginTags()

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [
            name
            for name, p in signature.parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """The constructor's parameters, as stored on the instance (JSON-able)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def validate_params(self, owner: str | None = None) -> None:
        """Check the parameters against ``_parameter_constraints``.

        Raises:
            ValueError: A parameter's value is not accepted; the message names the
                plugin, the parameter and the accepted values.
        """
        owner = owner or f"plugin {type(self).__name__}"
        validate(owner, self.get_params(), self._parameter_constraints, "parameter")

    # --- learned state ---------------------------------------------------------------------

    def register_learned_buffer(
        self,
        name: str,
        shape: ShapeSpec,
        dtypes: tuple[torch.dtype, ...] | None = None,
    ) -> None:
        """Register a learned tensor whose size depends on the data (a feature bank).

        The buffer starts empty (size 0 where ``shape`` says ``None``); a saved file
        restores it at the size it holds, after checking it against ``shape`` and
        ``dtypes`` (``None``: any floating dtype).

        Args:
            name: The buffer's name (conventionally ending in ``_``).
            shape: Each dimension an int, ``None`` (any size) or ``"num_features"`` /
                ``"num_classes"`` (the model's sizes).
            dtypes: The accepted dtypes, or ``None`` for any floating dtype.
        """
        self._learned_specs[name] = (tuple(shape), dtypes)
        zeros = tuple(d if isinstance(d, int) else 0 for d in shape)
        self.register_buffer(name, torch.zeros(zeros, dtype=(dtypes or (torch.float32,))[0]))

    def learned_tensor_specs(self) -> dict[str, tuple[ShapeSpec, tuple[torch.dtype, ...] | None]]:
        """The buffers registered with :meth:`register_learned_buffer`, with their specs."""
        return dict(self._learned_specs)

    def get_state(self) -> dict[str, Any]:
        """Learned plain values (JSON-able) to save beside the tensors."""
        state: dict[str, Any] = {"fitted": bool(self.fitted_)}
        for name in self._state_constraints:
            state[name] = self.__dict__.get(name)
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned, checked like ``fit`` would set it.

        Raises:
            ValueError: A value is missing, unknown or not accepted.
        """
        owner = f"plugin {type(self).__name__}"
        if not isinstance(state, dict) or not isinstance(state.get("fitted"), bool):
            raise ValueError(f"{owner}: the learned state must be an object with 'fitted'")
        unknown = set(state) - {"fitted", *self._state_constraints}
        if unknown:
            raise ValueError(f"{owner}: unknown learned values {sorted(unknown)}")
        values = {k: state.get(k) for k in self._state_constraints}
        validate(owner, values, self._state_constraints, "learned value")
        self.fitted_ = state["fitted"]
        for name, value in values.items():
            setattr(self, name, value)

    def validate_state(self) -> None:
        """Check learned tensors after they were loaded from a file (called by ``load``).

        The default refuses NaN and inf in every floating buffer; a plugin whose learned
        values have a range (a temperature > 0) checks that too, as its ``fit`` would.

        Raises:
            ValueError: A learned value ``fit`` could not have produced.
        """
        for name, buffer in self.named_buffers(recurse=False):
            if buffer.is_floating_point() and not torch.isfinite(buffer).all():
                raise ValueError(f"learned tensor {name} holds NaN or inf values")

    def check_is_fitted(self) -> None:
        """Raise :class:`NotFittedError` if the plugin needs a ``fit`` it has not had.

        The message names the ``fit`` data sets the plugin's tags say it reads
        (``fit_requires``, ``fit_reads``), not every data set ``fit`` takes.
        """
        if not self.fitted_ and get_tags(self).requires_fit:
            raise not_fitted_error([(type(self).__name__, self)])

    # --- the contract --------------------------------------------------------------------

    def attach(self, model: ModelView) -> None:
        """Change structure once: build extra heads, resolve rates from the model.

        Called at ``wrap`` time and again when a saved model is loaded, so it must build
        the same modules every time; learned values come from ``fit`` or the file.
        """

    def fit(self, model: ModelView, data: FitData) -> Plugin:
        """Learn from ``data``: cached backbone features of the ``fit`` data sets.

        ``model``'s methods run the plugins fitted before this one. Returns ``self``.
        """
        return self

    def features(
        self,
        inputs: torch.Tensor | None,
        inner: Callable[[torch.Tensor | None], torch.Tensor],
    ) -> torch.Tensor:
        """Features ``[S, B, D]`` of a batch.

        Args:
            inputs: The batch of inputs, or ``None`` when the core works from cached
                features (``fit``, ``predict_features``): then only ``inner`` can
                produce them.
            inner: The features of the plugins before this one (and of the backbone):
                ``inner(inputs)`` -> ``[S, B, D]``. After the ``FEATURES`` stage, unless a
                feature step declares ``needs_inputs`` (it samples the backbone, and
                must say so), the model's features are computed once per batch and
                ``inner(inputs)`` returns them without running the backbone again.
        """
        return inner(inputs)

    def members(
        self, features: torch.Tensor, inner: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Member logits ``[M, B, K]`` from features ``[S, B, D]``.

        Args:
            features: What the feature stage produced.
            inner: The members of the plugins before this one (and of the head):
                ``inner(features)`` with features ``[S', B, D]`` -> ``[M', B, K]``,
                sample-major (the inner members vary fastest).
        """
        return inner(features)

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Post-process the combined logits ``[B, K]`` (calibrators)."""
        return logits

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """Named per-sample outputs (scores ``[B]``, sets ``[B, K]``, decisions ``[B]``).

        Declare each name and its :class:`~wrapcal.OutputKind` in the tags' ``outputs``.
        """
        return {}

    def report_metrics(self, prediction: Prediction, labels: torch.Tensor) -> dict[str, Any]:
        """Metrics of the plugin's outputs on labelled data, for the evaluation report.

        Returns:
            Metric name -> a float, or a dict with ``"value"`` and optionally ``"ci"``
            (``[low, high]``), ``"percent"`` and ``"higher_is_better"``; other
            JSON-able values (per-class tables) are kept in the JSON report.
        """
        return {}

    def unshard(self) -> None:
        """Gather a learned state kept sharded across ``torch.distributed`` ranks back
        onto every rank, so each rank holds the whole plugin.

        Called by :func:`wrapcal.distributed.unshard` on every rank, for plugins whose
        tags declare ``collective_outputs`` (a KNN bank fitted with ``shard_bank=True``,
        searched per shard at inference). Afterwards inference must not need the other
        ranks, and the plugin can be saved and exported. It is a collective call: every
        rank calls it, in the same order. The default does nothing (a plugin whose
        state is never sharded has nothing to gather).
        """

    # --- plumbing ----------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # A property that raises NotFittedError (an AttributeError, like scikit-learn's)
        # makes Python retry through __getattr__, where nn.Module would replace the
        # message with "no attribute": call the property again to raise its own error.
        attribute = getattr(type(self), name, None)
        if isinstance(attribute, property) and attribute.fget is not None:
            return attribute.fget(self)
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())


def get_tags(plugin: Plugin) -> PluginTags:
    """A plugin's tags (``plugin.__wrapcal_tags__()``), checked.

    Raises:
        TypeError: The tags are not a :class:`~wrapcal.plugin.types.PluginTags`, the stage
            is not a :class:`~wrapcal.Stage` member, ``after`` / ``before`` are not
            tuples of names, or an output's name is not a string or its kind not an
            :class:`~wrapcal.OutputKind`.
    """
    from wrapcal.plugin.types import OutputKind, Stage

    tags = plugin.__wrapcal_tags__()
    name = type(plugin).__name__
    if not isinstance(tags, PluginTags):
        raise TypeError(f"plugin {name}: __wrapcal_tags__ must return a wrapcal.PluginTags")
    if not isinstance(tags.stage, Stage):
        raise TypeError(
            f"plugin {name}: stage {tags.stage!r} is not a wrapcal.Stage; use one of "
            f"{', '.join(s.name for s in Stage)} (order inside a stage with after=/before=)"
        )
    for attribute in ("after", "before"):
        names = getattr(tags, attribute)
        # A bare string would be read letter by letter: after="temperature" orders
        # the plugin after plugins named "t", "e", ...
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise TypeError(
                f"plugin {name}: tags.{attribute} must be a tuple of plugin names, e.g. "
                f"{attribute}=('temperature',); got {names!r}"
            )
    if not isinstance(tags.outputs, dict):
        raise TypeError(f"plugin {name}: tags.outputs must be a dict name -> OutputKind")
    for output, kind in tags.outputs.items():
        if not isinstance(output, str) or not output:
            raise TypeError(f"plugin {name}: output name {output!r} is not a non-empty string")
        if not isinstance(kind, OutputKind):
            raise TypeError(
                f"plugin {name}: output {output!r} has kind {kind!r}, not an OutputKind; use "
                f"one of {', '.join(f'OutputKind.{k.name}' for k in OutputKind)}"
            )
    return tags


def fit_call(tags: PluginTags) -> str:
    """The ``fit`` call a plugin's tags ask for, for messages.

    ``wrapped.fit(calibration=...)`` for data it requires (``fit_requires``), with the
    data it reads when given (``fit_reads``) beside it; ``wrapped.fit(train=...) or
    wrapped.fit(calibration=...)`` for a plugin that reads any of several and requires
    none; ``wrapped.fit(...)`` for one that declares neither.
    """
    required = list(tags.fit_requires)
    optional = [name for name in tags.fit_reads if name not in required]
    if required:
        call = f"wrapped.fit({', '.join(f'{name}=...' for name in required)})"
        if optional:
            call += f" (it also reads {' and '.join(f'{n}=...' for n in optional)} when given)"
        return call
    if optional:
        return " or ".join(f"wrapped.fit({name}=...)" for name in optional)
    return "wrapped.fit(...)"


def not_fitted_error(plugins: Sequence[tuple[str, Plugin]]) -> NotFittedError:
    """The error for ``(name, plugin)`` pairs used before the ``fit`` they need.

    Each plugin's message names only the data sets its tags declare (:func:`fit_call`).
    """
    if len(plugins) == 1:
        name, plugin = plugins[0]
        return NotFittedError(
            f"plugin {name} is not fitted: call {fit_call(get_tags(plugin))} before predicting"
        )
    each = "; ".join(f"{name}: {fit_call(get_tags(plugin))}" for name, plugin in plugins)
    return NotFittedError(
        f"plugins {', '.join(name for name, _ in plugins)} are not fitted: call wrapped.fit "
        f"with the data each needs before predicting ({each})"
    )
