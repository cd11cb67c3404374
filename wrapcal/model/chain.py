"""The per-model chain: each plugin stage receives what the stages before it produced.

``Chain`` runs a prefix of a wrapped model's plugins (all of them at inference, the
ones fitted so far during ``fit``) through the documented steps::

    backbone(inputs) | cached -> FEATURES-stage steps = the model's features f [B, D]
        -> the other feature steps (samplers) -> features [S, B, D]
        -> members [M, B, K] -> combine -> transform_logits -> outputs

Plugins are called in stage order (:class:`~wrapcal.Stage`); ``features`` and
``members`` nest (each plugin gets the step of the plugins before it as ``inner``),
``transform_logits`` and ``outputs`` follow one another. Errors a plugin raises carry
its name. ``PrefixView`` is what a plugin sees of the model in ``attach`` and ``fit``.

How composition is kept honest: every plugin is fitted on exactly what it receives at
inference, whatever the list order.

* ``FEATURES`` is the first stage. Its feature steps (a third party's ASH) turn the
  backbone's output into the model's features ``f``; every later step and every head
  reads them. :mod:`wrapcal.model.fitting` fits the ``FEATURES`` plugins first and then
  gives every later plugin ``fit`` data that went through their steps (a chain built
  with ``features_done=True`` does not apply them to cached features again), so a
  head retrained at the ``TRAIN`` stage is trained on the features it reads. A
  ``FEATURES`` plugin's own ``fit`` cannot read logits: the heads are trained after it.
* The heads (``TRAIN``, ``HEADS``, ``SAMPLE``) are fitted in stage order, each on the
  members of the plugins before it; a sampler samples around the heads fitted before it.
* Every plugin's outputs see two inputs that no sampler, extra head or calibrator
  changes: :attr:`~wrapcal.OutputContext.backbone_features` (``f``, one deterministic
  row per input) and :attr:`~wrapcal.OutputContext.base_logits` (the model's own head
  applied to ``f``). Detectors read these, and fit on the same: the ``fit`` data's
  features and ``model.head`` of them. Which rows are ``f`` is decided from the tags,
  never from what a plugin passes its ``inner``: unless a sampler's feature step
  declares ``needs_inputs`` (it samples the backbone: MC dropout ``scope="all"``), the
  model's features are computed once per batch and are the innermost feature step, so
  every sampler's ``inner(inputs)`` returns them; otherwise the samplers run the model
  step themselves and ``f`` is one more backbone pass, in eval mode, made only when a
  plugin reads it.
* A plugin that declares ``needs_inputs`` also gets the batch of inputs and the
  model's own network (:attr:`~wrapcal.OutputContext.inputs`,
  :attr:`~wrapcal.OutputContext.network`: the backbone in eval mode, the
  ``FEATURES``-stage steps, the head; what ``base_logits`` reads), to run it again on
  inputs of its own (ODIN's perturbed inputs). From cached features its ``inputs``
  are ``None``.
* Outputs are checked against their declared :class:`~wrapcal.OutputKind`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from types import MappingProxyType
from typing import Protocol, TypeVar

import torch
from torch import nn

from wrapcal import distributed
from wrapcal.errors import DataError, WrapcalError
from wrapcal.plugin.base import Plugin
from wrapcal.plugin.prediction import Prediction
from wrapcal.plugin.probs import combine_members, entropy, logits_to_probs
from wrapcal.plugin.torch_helpers import check_features, in_mode
from wrapcal.plugin.types import FeatureRows, OutputContext, OutputKind, PluginTags, Stage
from wrapcal.plugin.validation import check_finite

__all__ = ["CORE_OUTPUTS", "Chain", "ModelParts", "PrefixView", "named_errors", "overrides"]

#: The core's own per-sample outputs. ``msp`` and ``entropy`` read the final
#: probabilities, so every plugin that changes the logits changes them (calibrators
#: too). ``max_logit`` and ``energy`` read the one member: the head's logits of the
#: features the heads read, before any calibrator. They exist only when there is one
#: member of several logits (they mean nothing for an average of members or for a single
#: binary logit): plugins that change the model's features or its head change them,
#: samplers and extra heads remove them, detectors, calibrators and decisions leave them.
CORE_OUTPUTS = {
    "msp": OutputKind.UNCERTAINTY,
    "entropy": OutputKind.UNCERTAINTY,
    "max_logit": OutputKind.OOD_SCORE,
    "energy": OutputKind.OOD_SCORE,
}
#: Rows of cached features per step when a whole data set goes through the chain.
CACHED_BATCH = 8192


#: What a call wrapped by :func:`named_errors` returns.
R = TypeVar("R")


def named_errors(name: str, call: Callable[..., R], *args: object) -> R:
    """``call(*args)``, with ``plugin <name>:`` put in front of the message of any error.

    The exception keeps its type and traceback; a message that already names a plugin
    is left as it is (errors pass through nested plugins).
    """
    try:
        return call(*args)
    except distributed.DistributedError:
        raise  # names the rank and what it was doing: already says where
    except Exception as err:
        first = err.args[0] if err.args else None
        if isinstance(first, str) and not first.startswith("plugin "):
            err.args = (f"plugin {name}: {first}", *err.args[1:])
        elif not err.args:
            err.args = (f"plugin {name}: {type(err).__name__}",)
        raise


def overrides(plugin: Plugin, method: str) -> bool:
    """Whether the plugin's class overrides a contract method (``features``...)."""
    return getattr(type(plugin), method) is not getattr(Plugin, method)


def transforms_features(plugin: Plugin, tags: PluginTags) -> bool:
    """Whether the plugin is a ``FEATURES``-stage plugin with a feature step: part of
    what makes the model's features."""
    return tags.stage is Stage.FEATURES and overrides(plugin, "features")


def samples_features(plugin: Plugin, tags: PluginTags) -> bool:
    """Whether the plugin has a feature step after the ``FEATURES`` stage (a sampler's):
    it changes the features the heads read, not the model's features."""
    return overrides(plugin, "features") and not transforms_features(plugin, tags)


class _Once:
    """A value computed on first use, then kept (shared by every plugin's context)."""

    def __init__(self, compute: Callable[[], torch.Tensor]) -> None:
        self._compute = compute
        self._value: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._compute()
        return self._value


def _first(stacked: torch.Tensor) -> torch.Tensor:
    """The first of ``[S, B, ...]``: the one sample of a step that gives one."""
    return stacked[0]


def _reuse(
    model: torch.Tensor,
    inputs: torch.Tensor | None,
    model_step: Callable[[torch.Tensor | None], torch.Tensor],
    given: torch.Tensor | None,
) -> torch.Tensor:
    """The innermost feature step when nothing samples the backbone: the model's
    features of this batch, computed once (``model``); other inputs a plugin passes
    (its own copies) get their own pass."""
    return model if given is inputs else model_step(given)


class Chain:
    """A prefix of a wrapped model's plugins, run in stage order.

    Args:
        backbone: Inputs -> features ``[B, D]``.
        head: Features ``[B, D]`` -> logits ``[B, K]``.
        plugins: ``(name, plugin, tags)`` in stage order.
        num_features: ``D``, checked on the backbone's output.
        input_hint: What inputs the model takes, for the message when the backbone
            fails on a batch.
        check_finite: Refuse cached features that hold NaN or inf values (features a
            user passes to ``predict_features``), batch by batch, with a
            :class:`~wrapcal.errors.DataError` as ``predict`` refuses such inputs.
        features_done: Cached features given to this chain are the model's features,
            already through the ``FEATURES``-stage steps (the ``fit`` data of the
            plugins after that stage): those steps are not applied to them again.
            Inputs always go through every step.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        plugins: Sequence[tuple[str, Plugin, PluginTags]],
        num_features: int,
        input_hint: str = "",
        *,
        features_done: bool = False,
        check_finite: bool = False,
    ) -> None:
        self.backbone = backbone
        self.head = head
        self.plugins = list(plugins)
        self.num_features = num_features
        self.input_hint = input_hint
        self.features_done = features_done
        self.check_finite = check_finite

    # --- the steps ---------------------------------------------------------------------

    def _base_features(
        self, cached: torch.Tensor | None, inputs: torch.Tensor | None
    ) -> torch.Tensor:
        if inputs is None:
            if cached is None:
                raise ValueError("no inputs and no cached features to compute features from")
            if self.check_finite:
                check_finite(cached, "features")
            return check_features(cached, self.num_features).unsqueeze(0)
        try:
            features = self.backbone(inputs)
        except torch.OutOfMemoryError:
            raise
        except WrapcalError:
            raise  # a split that does not hold, a plugin's own error: already says what
        except Exception as err:
            # A batch dimension left out ([3, H, W] for [N, 3, H, W]) reaches layers that
            # refuse it (BatchNorm's ValueError, a reduction's IndexError): say so first.
            self._refuse_one_input(inputs)
            if not isinstance(err, RuntimeError):
                raise
            # Torch's message comes from deep inside the network: say what went in.
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(
                f"the backbone cannot take inputs of shape {list(inputs.shape)}"
                f"{'; ' + self.input_hint if self.input_hint else ''} (torch: {first})"
            ) from err
        if not (
            isinstance(features, torch.Tensor)
            and features.ndim == 2
            and features.shape[0] == inputs.shape[0]
        ):
            # Layers that take unbatched inputs (convolutions) turn one input without its
            # batch dimension into features of another shape, or of another batch size
            # (rows that are channels): never a split to redo by hand.
            self._refuse_one_input(inputs)
            if isinstance(features, torch.Tensor) and features.ndim == 2:
                raise DataError(
                    f"the backbone returned {features.shape[0]} rows of features for "
                    f"{inputs.shape[0]} inputs of shape {list(inputs.shape)}"
                    f"{'; ' + self.input_hint if self.input_hint else ''}: pass a batch "
                    "[N, ...] with one input per row"
                )
        return check_features(features, self.num_features).unsqueeze(0)

    def _refuse_one_input(self, inputs: torch.Tensor) -> None:
        """Raise the "one input instead of a batch" error when ``inputs`` is one input
        without its batch dimension: the backbone takes ``inputs.unsqueeze(0)`` and
        returns one row of features. Only called once the batch has failed, so the extra
        pass (eval mode, no gradients: nothing in the model changes) costs nothing on
        the way that works."""
        try:
            with torch.no_grad(), in_mode(self.backbone, False):
                out = self.backbone(inputs.unsqueeze(0))
        except torch.OutOfMemoryError:
            raise
        except Exception:
            return  # not one input either: the caller's error stands
        if (
            isinstance(out, torch.Tensor)
            and out.ndim == 2
            and out.shape[0] == 1
            and out.shape[1] == self.num_features
        ):
            raise DataError(
                f"inputs have shape {list(inputs.shape)}: one input (an image?) instead of a "
                f"batch; add a batch dimension with x.unsqueeze(0), giving "
                f"{[1, *inputs.shape]}"
                f"{' (' + self.input_hint + ')' if self.input_hint else ''}"
            )

    def _model_step(
        self, cached: torch.Tensor | None
    ) -> Callable[[torch.Tensor | None], torch.Tensor]:
        """Inputs (or ``None`` for ``cached``) -> the model's features ``[1, B, D]``: the
        backbone's output through the ``FEATURES``-stage feature steps."""
        step: Callable[[torch.Tensor | None], torch.Tensor] = partial(self._base_features, cached)
        if cached is not None and self.features_done:
            return step
        for name, plugin, tags in self.plugins:
            if transforms_features(plugin, tags):
                step = partial(self._plugin_features, name, plugin, step, True)
        return step

    @property
    def samples_backbone(self) -> bool:
        """Whether a sampler's feature step runs the backbone itself on the inputs
        (declares ``needs_inputs``: MC dropout ``scope="all"``), so that what its
        ``inner`` returns may be a random sample rather than the model's features."""
        return any(
            tags.needs_inputs and samples_features(plugin, tags) for _, plugin, tags in self.plugins
        )

    def _deterministic(
        self, model_step: Callable[[torch.Tensor | None], torch.Tensor], inputs: torch.Tensor
    ) -> torch.Tensor:
        """The model's features ``[B, D]`` of inputs from a plain pass: the backbone in
        eval mode (no dropout, whatever a sampler left switched on), as ``fit``'s
        feature pass computes them."""
        with in_mode(self.backbone, False):
            return model_step(inputs)[0]

    def _features(
        self, inputs: torch.Tensor | None, cached: torch.Tensor | None
    ) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """``(features [S, B, D], the model's features [B, D] on demand)``.

        Decided from the tags (:attr:`samples_backbone`), never from what a sampler
        passes its ``inner``: a sampler may call ``inner(inputs)`` several times with the
        backbone's dropout on, and none of those samples is the model's features.
        """
        model_step = self._model_step(cached)
        innermost: Callable[[torch.Tensor | None], torch.Tensor]
        if inputs is not None and self.samples_backbone:
            # The samplers run the backbone themselves; the model's features are one
            # more, plain, pass, made only if a plugin reads them.
            innermost = model_step
            model_features: Callable[[], torch.Tensor] = _Once(
                lambda: self._deterministic(model_step, inputs)
            )
        else:
            # Nothing samples the backbone: the model's features are computed once and
            # are the innermost step. A sampler's inner(inputs) returns them (running the
            # deterministic step again would give the same rows); other inputs a plugin
            # builds itself get their own pass.
            model = model_step(inputs)
            innermost = partial(_reuse, model, inputs, model_step)
            model_features = partial(_first, model)
        step: Callable[[torch.Tensor | None], torch.Tensor] = innermost
        for name, plugin, tags in self.plugins:
            if samples_features(plugin, tags):
                step = partial(self._plugin_features, name, plugin, step, False)
        features = step(inputs)
        if features.ndim != 3 or features.shape[-1] != self.num_features:
            raise ValueError(
                f"the feature stage returned shape {tuple(features.shape)}; expected "
                f"[S, B, {self.num_features}]"
            )
        return features, model_features

    def features(
        self, inputs: torch.Tensor | None, cached: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Features ``[S, B, D]`` of inputs (or of cached features ``[B, D]``)."""
        return self._features(inputs, cached)[0]

    def network(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's own logits ``[B, K]`` of inputs: the backbone in eval mode, the
        ``FEATURES``-stage steps, the head (``base_logits`` of these inputs). Runs in
        the caller's grad mode, differentiable with respect to ``inputs``: what
        :attr:`~wrapcal.OutputContext.network` gives a plugin that declares
        ``needs_inputs``."""
        with in_mode(self.head, False):
            return self.head(self._deterministic(self._model_step(None), inputs))

    def model_features(
        self, inputs: torch.Tensor | None, cached: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The model's features ``[B, D]`` of inputs (or of cached features): the
        backbone's output through the ``FEATURES``-stage steps, no sampler's samples
        (inputs go through the backbone in eval mode)."""
        model_step = self._model_step(cached)
        if inputs is None:
            return model_step(None)[0]
        return self._deterministic(model_step, inputs)

    @staticmethod
    def _plugin_features(
        name: str,
        plugin: Plugin,
        inner: Callable[[torch.Tensor | None], torch.Tensor],
        single: bool,
        inputs: torch.Tensor | None,
    ) -> torch.Tensor:
        out = named_errors(name, plugin.features, inputs, inner)
        if not isinstance(out, torch.Tensor) or out.ndim != 3:
            raise ValueError(
                f"plugin {name}: features() must return a tensor [S, B, D], got "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
            )
        if single and out.shape[0] != 1:
            raise ValueError(
                f"plugin {name}: a FEATURES-stage plugin must return one set of features "
                f"per input ([1, B, D]), got {out.shape[0]} samples; a plugin that samples "
                "belongs to Stage.SAMPLE"
            )
        return out

    def _base_members(self, features: torch.Tensor) -> torch.Tensor:
        samples, batch, width = features.shape
        logits = self.head(features.reshape(samples * batch, width))
        return logits.reshape(samples, batch, -1)

    def members(self, features: torch.Tensor) -> torch.Tensor:
        """Member logits ``[M, B, K]`` of features ``[S, B, D]``."""
        step: Callable[[torch.Tensor], torch.Tensor] = self._base_members
        for name, plugin, _ in self.plugins:
            if overrides(plugin, "members"):
                step = partial(self._plugin_members, name, plugin, step)
        return step(features)

    @staticmethod
    def _plugin_members(
        name: str,
        plugin: Plugin,
        inner: Callable[[torch.Tensor], torch.Tensor],
        features: torch.Tensor,
    ) -> torch.Tensor:
        out = named_errors(name, plugin.members, features, inner)
        if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[1] != features.shape[1]:
            raise ValueError(
                f"plugin {name}: members() must return a tensor [M, B, K] with "
                f"B = {features.shape[1]}, got "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
            )
        return out

    def finish(self, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(combined, final logits)``: members combined, then every logit transform."""
        combined = combine_members(members)
        logits = combined
        for name, plugin, _ in self.plugins:
            if overrides(plugin, "transform_logits"):
                logits = named_errors(name, plugin.transform_logits, logits)
        return combined, logits

    def logits(
        self, inputs: torch.Tensor | None, cached: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final logits ``[B, K]`` of inputs or of cached features."""
        return self.finish(self.members(self.features(inputs, cached)))[1]

    def cached_logits(self, features: FeatureRows, batch_size: int = CACHED_BATCH) -> torch.Tensor:
        """Final logits ``[N, K]`` of cached features ``[N, D]``, in steps of rows."""
        with torch.no_grad():
            if features.shape[0] == 0:
                # No rows: the logits of one row of zeros, none of them kept, so the
                # result has the columns and dtype every plugin gives.
                return self.logits(None, features[:1].new_zeros(1, *features.shape[1:]))[:0]
            return torch.cat(
                [
                    self.logits(None, features[i : i + batch_size])
                    for i in range(0, features.shape[0], batch_size)
                ]
            )

    @property
    def _plain(self) -> bool:
        """Whether no plugin changes the features the heads read nor the members: the
        members are then ``head(f)`` of the model's features ``f``, one member."""
        return not any(
            samples_features(plugin, tags) or overrides(plugin, "members")
            for _, plugin, tags in self.plugins
        )

    @property
    def collective(self) -> bool:
        """Whether inference synchronises the ranks (a plugin's ``collective_outputs``)."""
        return any(tags.collective_outputs for _, _, tags in self.plugins)

    def predict_each(
        self,
        batches: Iterable[torch.Tensor],
        stand_in: Callable[[], torch.Tensor],
        *,
        cached: bool = True,
    ) -> list[Prediction]:
        """Predictions of each batch (cached features, or inputs with ``cached=False``).

        When a plugin synchronises the ranks at inference, every rank runs the same
        number of batches (:func:`wrapcal.distributed.lockstep`): a rank whose batches
        ran out runs ``stand_in()`` and drops its result (a rank with no batch at all
        keeps its first one's rows, none of them: an empty prediction of the right
        shapes).
        """

        def run(batch: torch.Tensor) -> Prediction:
            return self.predict(None, batch) if cached else self.predict(batch)

        if not (self.collective and distributed.active()):
            return [run(batch) for batch in batches]
        parts = []
        spare: Prediction | None = None
        for batch in distributed.lockstep(batches):
            if batch is None:
                padding = run(stand_in())
                spare = padding if spare is None else spare
            else:
                parts.append(run(batch))
        if not parts and spare is not None:
            parts.append(spare.select_rows(slice(0, 0)))
        return parts

    @property
    def runs_alone(self) -> bool:
        """Whether this rank may run the chain on its own: no plugin synchronises the
        ranks at inference, or no process group is running."""
        return not (self.collective and distributed.active())

    def empty_prediction(self, one: torch.Tensor, *, cached: bool) -> Prediction:
        """The prediction of no rows, every output with its shape past the batch and its
        dtype: the chain's prediction of ``one`` (one input, or one row of features with
        ``cached``), none of its rows kept. Only where the chain :attr:`runs_alone`."""
        full = self.predict(None, one) if cached else self.predict(one)
        return full.select_rows(slice(0, 0))

    def predict(
        self, inputs: torch.Tensor | None, cached: torch.Tensor | None = None
    ) -> Prediction:
        """The whole chain: a :class:`~wrapcal.Prediction` with every plugin's outputs."""
        features, model_features = self._features(inputs, cached)
        members = self.members(features)
        combined, logits = self.finish(members)
        probs = logits_to_probs(logits)
        outputs, kinds = self.core_outputs(members, probs)
        base_logits: Callable[[], torch.Tensor]
        if self._plain:
            # The one member is the head of the model's features already (the same
            # rows through the same head): bit for bit what base_logits computes.
            base_logits = partial(_first, members)
        else:
            base_logits = _Once(lambda: self.head(model_features()))
        for name, plugin, tags in self.plugins:
            if not overrides(plugin, "outputs"):
                continue
            # Only a plugin that declares needs_inputs gets them: the others must score
            # cached features as they score inputs.
            reads_inputs = tags.needs_inputs
            context = OutputContext(
                features,
                members,
                combined,
                logits,
                probs,
                MappingProxyType(dict(outputs)),
                backbone_features=model_features,
                base_logits=base_logits,
                head=self.head,
                inputs=inputs if reads_inputs else None,
                network=self.network if reads_inputs else None,
            )
            found = named_errors(name, plugin.outputs, context)
            for key, value in self._checked(name, tags, found, probs).items():
                if key in outputs:
                    raise ValueError(f"plugin {name}: output {key!r} is already produced")
                outputs[key] = value
                kinds[key] = tags.outputs[key]
        return Prediction.build(logits, probs, outputs, kinds)

    @staticmethod
    def core_outputs(
        members: torch.Tensor, probs: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, OutputKind]]:
        """The core's scores of members ``[M, B, K]`` and final probabilities, and their
        kinds: ``msp``, ``entropy``, and with one member of several logits ``max_logit``
        and ``energy`` (of that member, before any logit transform)."""
        outputs = {"msp": 1 - probs.amax(dim=-1), "entropy": entropy(probs)}
        if members.shape[0] == 1 and members.shape[-1] > 1:
            outputs["max_logit"] = -members[0].amax(dim=-1)
            outputs["energy"] = -torch.logsumexp(members[0], dim=-1)
        return outputs, {k: CORE_OUTPUTS[k] for k in outputs}

    @staticmethod
    def _checked(
        name: str, tags: PluginTags, found: object, probs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The plugin's outputs, each checked against its declared kind."""
        if not isinstance(found, dict):
            raise TypeError(f"plugin {name}: outputs() must return a dict name -> tensor")
        batch, classes = probs.shape[0], probs.shape[-1]
        for key, value in found.items():
            kind = tags.outputs.get(key)
            if kind is None:
                raise ValueError(
                    f"plugin {name}: output {key!r} is not declared; add it to "
                    "__wrapcal_tags__().outputs with its OutputKind"
                )
            if not isinstance(value, torch.Tensor) or value.ndim < 1 or value.shape[0] != batch:
                raise ValueError(
                    f"plugin {name}: output {key!r} must be a tensor with the batch ({batch}) first"
                )
            got = f"got a {str(value.dtype).removeprefix('torch.')} tensor {tuple(value.shape)}"
            if kind.is_score and (value.ndim != 1 or not value.is_floating_point()):
                raise ValueError(
                    f"plugin {name}: score {key!r} must be a float tensor [B] (declared "
                    f"OutputKind.{kind.name}); {got}"
                )
            if kind is OutputKind.SET and (
                value.dtype != torch.bool or value.shape != (batch, classes)
            ):
                raise ValueError(
                    f"plugin {name}: output {key!r} is declared OutputKind.SET, so it must be "
                    f"a bool tensor [B, K] = [{batch}, {classes}] (a mask of classes); {got}. "
                    "Return the mask (e.g. probs >= threshold), or declare another kind "
                    "(VALUE for other per-class tensors)"
                )
            if kind is OutputKind.DECISION and (value.dtype != torch.bool or value.ndim != 1):
                raise ValueError(
                    f"plugin {name}: output {key!r} is declared OutputKind.DECISION, so it must "
                    f"be a bool tensor [B] = [{batch}]; {got}. Return the decision "
                    "(e.g. score > threshold), or declare the score as OOD_SCORE/UNCERTAINTY"
                )
        return found


class ModelParts(Protocol):
    """What :class:`PrefixView` reads of a wrapped model (a
    :class:`~wrapcal.WrappedModel` is one)."""

    backbone: nn.Module
    head: nn.Module
    head_path: str | None
    num_classes: int
    num_features: int
    backbone_passes: int

    @property
    def device(self) -> torch.device: ...

    @property
    def model_name(self) -> str: ...


class PrefixView:
    """The wrapped model as a plugin sees it: its parts, and the plugins before it.

    Implements :class:`wrapcal.plugin.types.ModelView`.

    Args:
        wrapped: The model's parts.
        chain: The plugins fitted before the one that gets this view.
        refuse_logits: When given, the methods that compute logits (``members``,
            ``head_logits``, ``predict_features``) raise a ``ValueError`` with this
            reason (a ``FEATURES``-stage plugin is fitted before the heads).
    """

    def __init__(self, wrapped: ModelParts, chain: Chain, refuse_logits: str | None = None) -> None:
        self._wrapped = wrapped
        self._chain = chain
        self._refuse_logits = refuse_logits
        self.backbone = wrapped.backbone
        self.head = wrapped.head
        self.head_path = wrapped.head_path
        self.num_classes = wrapped.num_classes
        self.num_features = wrapped.num_features

    @property
    def device(self) -> torch.device:
        return self._wrapped.device

    @property
    def backbone_passes(self) -> int:
        """Passes over a data set the backbone has made; a plugin that streams data
        through the backbone adds its own (``model.backbone_passes += 1``)."""
        return self._wrapped.backbone_passes

    @backbone_passes.setter
    def backbone_passes(self, value: int) -> None:
        self._wrapped.backbone_passes = value

    @property
    def name(self) -> str:
        return self._wrapped.model_name

    def _check_logits_allowed(self) -> None:
        if self._refuse_logits is not None:
            raise ValueError(self._refuse_logits)

    def features(self, cached: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._chain.features(None, cached)

    def members(self, features: torch.Tensor) -> torch.Tensor:
        self._check_logits_allowed()
        with torch.no_grad():
            return self._chain.members(self._chain.features(None, features))

    def head_logits(self, features: FeatureRows, batch_size: int = CACHED_BATCH) -> torch.Tensor:
        self._check_logits_allowed()
        return self._chain.cached_logits(features, batch_size)

    def predict_features(self, features: FeatureRows, batch_size: int = CACHED_BATCH) -> Prediction:
        self._check_logits_allowed()
        batches = (features[i : i + batch_size] for i in range(0, features.shape[0], batch_size))

        def stand_in() -> torch.Tensor:
            return features[:1].new_zeros(1, features.shape[1])

        with torch.no_grad():
            parts = self._chain.predict_each(batches, stand_in)
            if not parts:
                if not self._chain.runs_alone:
                    raise DataError(
                        "no features to predict on any rank: give at least one rank rows"
                    )
                parts = [self._chain.empty_prediction(stand_in(), cached=True)]
            return Prediction.cat(parts)
