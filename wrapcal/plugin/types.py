"""Shared types of the plugin contract: stages, output kinds, tags and the model view.

A leaf module: it imports nothing from wrapcal, so every other module can use it
without creating an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["ModelView", "OutputContext", "OutputKind", "PluginTags", "Stage"]


class Stage(IntEnum):
    """When a plugin acts, in this order, whatever order the user listed the plugins in.

    ``fit`` runs the plugins stage by stage; at inference a plugin of a later stage
    sees what the earlier ones produced (its ``inner``). Plugins that share a stage are
    ordered by their declared ``after`` / ``before`` names, then by name.
    """

    TRAIN = 10  #: retrains the head or the network (label smoothing)
    HEADS = 20  #: builds extra heads on the (retrained) head (discrepancy)
    SAMPLE = 30  #: samples at inference (MC dropout)
    FEATURES = 40  #: transforms the features the heads read (ReAct)
    DETECT = 50  #: scores inputs from their features or logits (KNN, Mahalanobis, ViM)
    CALIBRATE = 60  #: post-hoc calibration of the final logits (temperature)
    DECIDE = 70  #: set-valued outputs and decisions from the calibrated output (conformal)


class OutputKind(str, Enum):
    """What a per-sample output is, so the harness puts it in the right table.

    Scores are floats ``[B]``, higher = more uncertain / more OOD; the harness measures
    them as OOD detectors. Sets, decisions and values are reported by the plugin's own
    :meth:`~wrapcal.Plugin.report_metrics`.
    """

    OOD_SCORE = "ood_score"  #: meant to separate OOD inputs from in-distribution ones
    UNCERTAINTY = "uncertainty"  #: a measure of predictive uncertainty (also an OOD score)
    SET = "set"  #: a ``[B, K]`` boolean mask of classes (prediction sets)
    DECISION = "decision"  #: a ``[B]`` boolean decision (abstain, reject)
    VALUE = "value"  #: any other per-sample tensor with the batch first

    @property
    def is_score(self) -> bool:
        """Whether outputs of this kind are scores (floats, higher = more uncertain)."""
        return self in (OutputKind.OOD_SCORE, OutputKind.UNCERTAINTY)


@dataclass
class PluginTags:
    """What a plugin declares about itself, in one place (like scikit-learn's tags).

    A plugin overrides :meth:`~wrapcal.Plugin.__wrapcal_tags__`, starts from
    ``super().__wrapcal_tags__()`` and sets what differs; tags may depend on the
    plugin's parameters.

    Attributes:
        stage: When the plugin acts (:class:`Stage`).
        after: Names of plugins of the same stage this one must come after.
        before: Names of plugins of the same stage this one must come before.
        requires_fit: Whether ``fit`` must run before the plugin is used.
        fit_requires: ``fit`` data sets the plugin cannot fit without, each with why
            (shown when it is missing, before any backbone pass).
        fit_reads: Further ``fit`` data sets it uses when they are given.
        changes_backbone: ``fit`` changes the backbone's weights (the core recomputes
            the cached features for later plugins; evaluation gets its own pass).
        changes_head: ``fit`` changes the model's own head in place.
        needs_inputs: Inference needs the inputs themselves, not cached features (it
            samples the backbone), so cached features cannot stand in for them.
        streams_data: ``fit`` streams the user's data through the network (the data
            sets must be given as data, not as features to ``fit_features``).
        exportable: Inference is plain tensor operations that ``torch.export`` / ONNX
            can trace.
        outputs: The per-sample outputs the plugin adds, by name, with their kind.
        fits_from_shards: Under ``torch.distributed``, ``fit`` can take a data set
            as this rank's shard (``FeatureSet.sharded``) and combine what it needs
            across ranks itself (``FeatureSet.sum_over_shards`` ...). A fit set that
            only such plugins read is never gathered (docs/scale.md).
        collective_outputs: Inference synchronises the ranks (a KNN bank searched per
            shard): every rank must predict together, and the model cannot be saved or
            exported before ``wrapcal.distributed.unshard``.
    """

    stage: Stage = Stage.CALIBRATE
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    requires_fit: bool = True
    fit_requires: dict[str, str] = field(default_factory=dict)
    fit_reads: tuple[str, ...] = ()
    changes_backbone: bool = False
    changes_head: bool = False
    needs_inputs: bool = False
    streams_data: bool = False
    exportable: bool = False
    outputs: dict[str, OutputKind] = field(default_factory=dict)
    fits_from_shards: bool = False
    collective_outputs: bool = False


@dataclass(frozen=True)
class OutputContext:
    """What a plugin's :meth:`~wrapcal.Plugin.outputs` sees for a batch of ``B`` inputs.

    Attributes:
        features: ``[S, B, D]`` features the heads read, every sample of them
            (``S = 1`` unless a plugin samples the backbone).
        members: ``[M, B, K]`` member logits (several heads, dropout samples).
        combined: ``[B, K]`` the members combined (log of the mean probability when
            ``M > 1``), before any logit transform.
        logits: ``[B, K]`` the final logits, after every calibrator so far.
        probs: ``[B, K']`` the final probabilities, ``wrapcal.plugin.probs.logits_to_probs``
            of ``logits`` in their dtype (float32 for a float32 model); ``K' = 2`` for a
            single-logit binary model. Use these, not your own softmax: the prediction
            reports exactly these.
        outputs: The per-sample outputs of the core and of the plugins before this one
            (scores, sets, decisions), by name.
    """

    features: torch.Tensor
    members: torch.Tensor
    combined: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    outputs: Mapping[str, torch.Tensor]


@runtime_checkable
class ModelView(Protocol):
    """The wrapped model as a plugin sees it in ``attach`` and ``fit``.

    Everything a plugin may touch; the methods run the plugins *before* the calling
    one (so a calibrator fitted after a retraining plugin sees the retrained head).

    Attributes:
        backbone: Inputs ``[B, ...]`` -> features ``[B, D]``.
        head: The model's own head, features ``[B, D]`` -> logits ``[B, K]``.
        head_path: Dotted name of the slot the head was cut from, inside the backbone's
            model, when known.
        num_classes: ``K``, the number of logits (1 for a single-logit binary model).
        num_features: ``D``, the width of the features.
        device: Where the model's parameters are.
        name: A readable name of the model, for messages.
        backbone_passes: Passes over a data set the backbone has made; a plugin that
            streams data through the backbone adds its own.
    """

    backbone: nn.Module
    head: nn.Module
    head_path: str | None
    num_classes: int
    num_features: int
    backbone_passes: int

    @property
    def device(self) -> torch.device: ...

    @property
    def name(self) -> str: ...

    def features(self, cached: torch.Tensor) -> torch.Tensor:
        """Cached backbone features ``[N, D]`` through the earlier plugins' feature
        stages: ``[S, N, D]``."""
        ...

    def members(self, features: torch.Tensor) -> torch.Tensor:
        """Member logits ``[M, N, K]`` of cached features ``[N, D]``."""
        ...

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Final logits ``[N, K]`` of cached features ``[N, D]``."""
        ...

    def predict_features(self, features: torch.Tensor) -> Any:
        """A full :class:`~wrapcal.Prediction` of cached features ``[N, D]``."""
        ...
