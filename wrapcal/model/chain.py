"""The per-model chain: each plugin stage receives what the stages before it produced.

``Chain`` runs a prefix of a wrapped model's plugins (all of them at inference, the
ones fitted so far during ``fit``) through the documented steps::

    features(inputs | cached) -> members -> combine -> transform_logits -> outputs

Plugins are called in stage order; ``features`` and ``members`` nest (each plugin gets
the step of the plugins before it as ``inner``), ``transform_logits`` and ``outputs``
follow one another. Errors a plugin raises carry its name. ``PrefixView`` is what a
plugin sees of the model in ``attach`` and ``fit``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from wrapcal import distributed
from wrapcal.errors import DataError
from wrapcal.plugin.base import Plugin
from wrapcal.plugin.prediction import Prediction
from wrapcal.plugin.probs import combine_members, entropy, logits_to_probs
from wrapcal.plugin.torch_helpers import check_features
from wrapcal.plugin.types import OutputContext, OutputKind

__all__ = ["CORE_OUTPUTS", "Chain", "PrefixView", "named_errors"]

#: The core's own per-sample outputs (``max_logit`` and ``energy`` only with one member
#: of several logits: they mean nothing for an average or a single binary logit).
CORE_OUTPUTS = {
    "msp": OutputKind.UNCERTAINTY,
    "entropy": OutputKind.UNCERTAINTY,
    "max_logit": OutputKind.OOD_SCORE,
    "energy": OutputKind.OOD_SCORE,
}
#: Rows of cached features per step when a whole data set goes through the chain.
CACHED_BATCH = 8192


def named_errors(name: str, call: Callable[..., Any], *args: Any) -> Any:
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


def _overrides(plugin: Plugin, method: str) -> bool:
    return getattr(type(plugin), method) is not getattr(Plugin, method)


class Chain:
    """A prefix of a wrapped model's plugins, run in stage order.

    Args:
        backbone: Inputs -> features ``[B, D]``.
        head: Features ``[B, D]`` -> logits ``[B, K]``.
        plugins: ``(name, plugin, tags)`` in stage order.
        num_features: ``D``, checked on the backbone's output.
        input_hint: What inputs the model takes, for the message when the backbone
            fails on a batch.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        plugins: Sequence[tuple[str, Plugin, Any]],
        num_features: int,
        input_hint: str = "",
    ) -> None:
        self.backbone = backbone
        self.head = head
        self.plugins = list(plugins)
        self.num_features = num_features
        self.input_hint = input_hint

    # --- the steps ---------------------------------------------------------------------

    def _base_features(self, cached: torch.Tensor | None, inputs: torch.Tensor | None):
        if inputs is None:
            if cached is None:
                raise ValueError("no inputs and no cached features to compute features from")
            return check_features(cached, self.num_features).unsqueeze(0)
        try:
            features = self.backbone(inputs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            # Torch's message comes from deep inside the network: say what went in.
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(
                f"the backbone cannot take inputs of shape {list(inputs.shape)}"
                f"{'; ' + self.input_hint if self.input_hint else ''} (torch: {first})"
            ) from err
        return check_features(features, self.num_features).unsqueeze(0)

    def features(
        self, inputs: torch.Tensor | None, cached: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Features ``[S, B, D]`` of inputs (or of cached backbone features ``[B, D]``)."""
        step: Callable[[torch.Tensor | None], torch.Tensor] = partial(self._base_features, cached)
        for name, plugin, _ in self.plugins:
            if _overrides(plugin, "features"):
                step = partial(self._plugin_features, name, plugin, step)
        features = step(inputs)
        if features.ndim != 3 or features.shape[-1] != self.num_features:
            raise ValueError(
                f"the feature stage returned shape {tuple(features.shape)}; expected "
                f"[S, B, {self.num_features}]"
            )
        return features

    @staticmethod
    def _plugin_features(name: str, plugin: Plugin, inner: Any, inputs: Any) -> torch.Tensor:
        out = named_errors(name, plugin.features, inputs, inner)
        if not isinstance(out, torch.Tensor) or out.ndim != 3:
            raise ValueError(
                f"plugin {name}: features() must return a tensor [S, B, D], got "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
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
            if _overrides(plugin, "members"):
                step = partial(self._plugin_members, name, plugin, step)
        return step(features)

    @staticmethod
    def _plugin_members(name: str, plugin: Plugin, inner: Any, features: Any) -> torch.Tensor:
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
            if _overrides(plugin, "transform_logits"):
                logits = named_errors(name, plugin.transform_logits, logits)
        return combined, logits

    def logits(self, inputs: torch.Tensor | None, cached: torch.Tensor | None = None):
        """Final logits ``[B, K]`` of inputs or of cached features."""
        return self.finish(self.members(self.features(inputs, cached)))[1]

    def cached_logits(self, features: torch.Tensor, batch_size: int = CACHED_BATCH):
        """Final logits ``[N, K]`` of cached features ``[N, D]``, in steps of rows."""
        with torch.no_grad():
            return torch.cat(
                [
                    self.logits(None, features[i : i + batch_size])
                    for i in range(0, features.shape[0], batch_size)
                ]
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
        ran out runs ``stand_in()`` and drops its result.
        """

        def run(batch: torch.Tensor) -> Prediction:
            return self.predict(None, batch) if cached else self.predict(batch)

        if not (self.collective and distributed.active()):
            return [run(batch) for batch in batches]
        parts = []
        for batch in distributed.lockstep(batches):
            if batch is None:
                run(stand_in())
            else:
                parts.append(run(batch))
        return parts

    def predict(self, inputs: torch.Tensor | None, cached: torch.Tensor | None = None):
        """The whole chain: a :class:`~wrapcal.Prediction` with every plugin's outputs."""
        features = self.features(inputs, cached)
        members = self.members(features)
        combined, logits = self.finish(members)
        probs = logits_to_probs(logits)
        outputs, kinds = self.core_outputs(members, probs)
        for name, plugin, tags in self.plugins:
            if not _overrides(plugin, "outputs"):
                continue
            context = OutputContext(
                features, members, combined, logits, probs, MappingProxyType(dict(outputs))
            )
            found = named_errors(name, plugin.outputs, context)
            for key, value in self._checked(name, tags, found, probs.shape[0]).items():
                if key in outputs:
                    raise ValueError(f"plugin {name}: output {key!r} is already produced")
                outputs[key] = value
                kinds[key] = tags.outputs[key]
        return Prediction.build(logits, probs, outputs, kinds)

    @staticmethod
    def core_outputs(members: torch.Tensor, probs: torch.Tensor):
        """The core's scores of members ``[M, B, K]`` and final probabilities, and their
        kinds: ``msp``, ``entropy``, and with one member of several logits ``max_logit``
        and ``energy`` (of the members, before any logit transform)."""
        outputs = {"msp": 1 - probs.amax(dim=-1), "entropy": entropy(probs)}
        if members.shape[0] == 1 and members.shape[-1] > 1:
            outputs["max_logit"] = -members[0].amax(dim=-1)
            outputs["energy"] = -torch.logsumexp(members[0], dim=-1)
        return outputs, {k: CORE_OUTPUTS[k] for k in outputs}

    @staticmethod
    def _checked(name: str, tags: Any, found: Any, batch: int) -> dict[str, torch.Tensor]:
        if not isinstance(found, dict):
            raise TypeError(f"plugin {name}: outputs() must return a dict name -> tensor")
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
            if kind.is_score and (value.ndim != 1 or not value.is_floating_point()):
                raise ValueError(f"plugin {name}: score {key!r} must be a float tensor [B]")
        return found


class PrefixView:
    """The wrapped model as a plugin sees it: its parts, and the plugins before it.

    Implements :class:`wrapcal.plugin.types.ModelView`.
    """

    def __init__(self, wrapped: Any, chain: Chain) -> None:
        self._wrapped = wrapped
        self._chain = chain
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

    def features(self, cached: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._chain.features(None, cached)

    def members(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._chain.members(self._chain.features(None, features))

    def head_logits(self, features: torch.Tensor, batch_size: int = CACHED_BATCH) -> torch.Tensor:
        return self._chain.cached_logits(features, batch_size)

    def predict_features(self, features: torch.Tensor, batch_size: int = CACHED_BATCH):
        batches = (features[i : i + batch_size] for i in range(0, features.shape[0], batch_size))
        with torch.no_grad():
            return Prediction.cat(
                self._chain.predict_each(
                    batches, lambda: features[:1].new_zeros(1, features.shape[1])
                )
            )
