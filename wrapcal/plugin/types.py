"""Shared types of the plugin contract: stages, output kinds, tags and the model view.

A leaf module: it imports nothing from wrapcal, so every other module can use it
without creating an import cycle.

How plugins compose (the guarantee :mod:`wrapcal.model.chain` and
:mod:`wrapcal.model.fitting` keep): every plugin is fitted on exactly what it receives
at inference.

* The stages run, and are fitted, in :class:`Stage` order. ``FEATURES`` comes first: its
  feature steps turn the backbone's output into *the model's features*, which every head
  and every detector reads, at ``fit`` as at inference. The core fits the ``FEATURES``
  plugins first, then hands every later plugin ``fit`` data that already went through
  their steps; the heads are trained on what they read.
* Samplers (``SAMPLE``) draw their samples around the heads fitted before them (a
  retrained head, the discrepancy heads); plugins fitted after them see the samples.
* Detectors read a documented input, by default :attr:`OutputContext.backbone_features`
  and :attr:`OutputContext.base_logits`, which no sampler, extra head or calibrator
  changes: a detector scores the same alone and beside any plugin that does not change
  the model's features or its head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["FeatureRows", "ModelView", "OutputContext", "OutputKind", "PluginTags", "Stage"]


class Stage(IntEnum):
    """When a plugin acts, in this order, whatever order the user listed the plugins in.

    ``fit`` runs the plugins stage by stage, in this order; at inference a plugin of a
    later stage sees what the earlier ones produced (its ``inner``). Plugins that share
    a stage are ordered by their declared ``after`` / ``before`` names, then by name.

    What each stage may change, so that every plugin is fitted on what it receives at
    inference:

    * ``FEATURES`` plugins transform the backbone's output (``features``) into the
      model's features: one deterministic ``[1, B, D]`` per input (sampling belongs to
      ``SAMPLE``). They are fitted first, from the backbone's features alone: their
      ``fit`` may call ``model.features`` but not read logits (``model.members``,
      ``model.head_logits`` and ``model.predict_features`` refuse), since the heads are
      trained after them, on their output. They cannot be combined with a plugin that
      streams inputs through the backbone (``streams_data``, ``changes_backbone``): its
      batches bypass their steps.
    * ``TRAIN``, ``HEADS`` and ``SAMPLE`` plugins build the heads. A plugin of these
      stages or of ``FEATURES`` may change the head or the backbone (``changes_head``,
      ``changes_backbone``); one of a later stage may not (its stage is fitted after
      plugins that read the head), nor one of a later stage than a ``HEADS`` plugin beside
      it (those heads were trained beside the head and its features: MC dropout
      ``finetune=True`` beside discrepancy is refused).
    * ``DETECT``, ``CALIBRATE`` and ``DECIDE`` plugins read what the heads produce.
    """

    FEATURES = 5  #: turns the backbone's output into the model's features (ASH); fitted first
    TRAIN = 10  #: retrains the head or the network (label smoothing)
    HEADS = 20  #: builds extra heads on the (retrained) head (discrepancy)
    SAMPLE = 30  #: samples at inference (MC dropout)
    DETECT = 50  #: scores inputs from their features or logits (KNN, Mahalanobis, ViM, ReAct)
    CALIBRATE = 60  #: post-hoc calibration of the final logits (temperature)
    DECIDE = 70  #: set-valued outputs and decisions from the calibrated output (conformal)


class OutputKind(str, Enum):
    """What a per-sample output is, so the harness puts it in the right table.

    Scores are floats ``[B]``, higher = more uncertain / more OOD; the harness measures
    them as OOD detectors. Sets, decisions and values are reported by the plugin's own
    :meth:`~wrapcal.Plugin.report_metrics`. The core checks every output against its
    declared kind at inference and names the plugin, the output and the kind when one
    does not match.
    """

    OOD_SCORE = "ood_score"  #: a float ``[B]`` meant to separate OOD inputs from ID ones
    UNCERTAINTY = "uncertainty"  #: a float ``[B]`` of predictive uncertainty (also an OOD score)
    SET = "set"  #: a ``[B, K]`` bool mask of classes (prediction sets)
    DECISION = "decision"  #: a ``[B]`` bool decision (abstain, reject)
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

    What a plugin changes for the others is read from these tags and from the contract
    methods it overrides (``features``, ``members``, ``transform_logits``): the test over
    every pair of built-in plugins (``tests/sdk/test_composition.py``) allows a plugin's
    outputs to differ beside another only where these say the other changes an input
    the plugin reads.

    Attributes:
        stage: When the plugin acts (:class:`Stage`; its documentation says what each
            stage may change).
        after: Names of plugins of the same stage this one must come after.
        before: Names of plugins of the same stage this one must come before.
        requires_fit: Whether ``fit`` must run before the plugin is used.
        fit_requires: ``fit`` data sets the plugin cannot fit without, each with why
            (shown when it is missing, before any backbone pass).
        fit_reads: Further ``fit`` data sets it uses when they are given.
        changes_backbone: ``fit`` changes the backbone's weights (the core recomputes
            the cached features for later plugins; evaluation gets its own pass). Only
            at the ``FEATURES`` to ``SAMPLE`` stages, at no later stage than a
            ``HEADS``-stage plugin beside it, and not beside a ``FEATURES``-stage plugin
            that transforms the features (refused before ``fit`` starts).
        changes_head: ``fit`` changes the model's own head in place (so the logits of
            every head reading it, and :attr:`OutputContext.base_logits`). Only at the
            ``FEATURES`` to ``SAMPLE`` stages, and at no later stage than a
            ``HEADS``-stage plugin beside it, whose heads were trained beside the head
            (refused before ``fit`` starts).
        needs_inputs: Inference needs the inputs themselves, not cached features, so
            cached features cannot stand in for them (``evaluate`` then runs the model
            on the data sets' inputs). Two kinds of plugin declare it. A feature step
            after the ``FEATURES`` stage that samples the backbone (MC dropout
            ``scope="all"``) must: otherwise the core computes the model's features
            once per batch and that step's ``inner(inputs)`` returns them. A plugin
            whose outputs run the network on the inputs (ODIN: a gradient with respect
            to the inputs) must too: only such a plugin's context gives
            :attr:`OutputContext.inputs` and :attr:`OutputContext.network`. Where the
            core works from cached features (``predict_features``, ``fit_features``,
            the operating points and the ``fit`` of the plugins after it, ``evaluate``
            on cached sets) there are no inputs (``context.inputs`` is ``None``): such
            a plugin leaves out the outputs that need them and documents it.
        streams_data: ``fit`` streams the user's data through the network (the data
            sets must be given as data, not as features to ``fit_features``). Not beside
            a ``FEATURES``-stage plugin that transforms the features (its batches bypass
            the transform).
        exportable: Inference is plain tensor operations that ``torch.export`` / ONNX
            can trace.
        export_refusal: When ``exportable`` is ``False``, why, in words ``wrapcal.export``
            puts after the plugin's name when it refuses the model ("differentiates the
            network with respect to its inputs at every call, which a traced graph
            cannot hold"); empty: the export names the plugin with the generic reason.
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
    export_refusal: str = ""
    outputs: dict[str, OutputKind] = field(default_factory=dict)
    fits_from_shards: bool = False
    collective_outputs: bool = False


class OutputContext:
    """What a plugin's :meth:`~wrapcal.Plugin.outputs` sees for a batch of ``B`` inputs.

    Read-only. What each field depends on, so a plugin can document its input:

    ============================  =====================================================
    ``backbone_features``         the backbone, the ``FEATURES``-stage plugins
    ``base_logits``               the above, and plugins that retrain the head
                                  (``changes_head``)
    ``features``                  the above, and samplers' feature steps (MC dropout
                                  ``scope="all"``)
    ``members``, ``combined``     the above, and plugins that add heads or samples
                                  (``members``: discrepancy, MC dropout)
    ``logits``, ``probs``         the above, and every calibrator
                                  (``transform_logits``)
    ``outputs``                   the above, and the plugins before this one
    ``inputs``                    nothing: the batch itself, as the backbone takes it
    ``network``                   as ``base_logits``
    ============================  =====================================================

    Detectors read ``backbone_features`` and ``base_logits`` unless their documentation
    says otherwise: a detector then scores the same alone and beside any sampler, extra
    head or calibrator. ``inputs`` and ``network`` are given only to a plugin whose tags
    declare ``needs_inputs`` (ODIN perturbs the inputs along the gradient of the
    network's softmax); reading them from another plugin's context raises.

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
        backbone_features: ``[B, D]`` the model's features: the backbone's output through
            the ``FEATURES``-stage plugins (none among the built-ins), one deterministic
            row per input (no sampler's samples, whatever the model holds). The very
            features ``fit`` data holds for the plugins after the ``FEATURES`` stage.
        base_logits: ``[B, K]`` the model's own head (as ``changes_head`` plugins left
            it) applied to ``backbone_features``: one set of logits per input, no extra
            head, no samples, no calibration.
        head: The model's own head, features ``[B, D]`` -> logits ``[B, K]``, for a
            detector that scores features it transformed itself (ReAct: the energy of
            ``head(min(f, c))``). Nothing it computes reaches the other plugins.
        inputs: ``[B, ...]`` the batch of inputs, on the model's device, as the
            backbone receives it; ``None`` when the core works from cached features
            (``predict_features``, ``fit_features``, the operating points, the ``fit``
            of later plugins): then no output can be computed from the inputs. Only for
            a plugin that declares ``needs_inputs``.
        network: The model's own network as one function, inputs ``[N, ...]`` ->
            logits ``[N, K]``: the backbone in eval mode, the ``FEATURES``-stage steps,
            the model's own head (as ``changes_head`` plugins left it), no sampler,
            extra head or calibrator; on ``inputs`` it gives ``base_logits``. It is
            differentiable with respect to its inputs and runs in the caller's grad
            mode: ``predict`` runs under ``torch.no_grad()``, so a plugin that needs a
            gradient calls it inside ``torch.enable_grad()`` and takes the gradient with
            ``torch.autograd.grad`` (``backward()`` would leave gradients in the user's
            parameters). Nothing it computes reaches the other plugins. Only for a
            plugin that declares ``needs_inputs``.
    """

    __slots__ = (
        "_backbone_features",
        "_base_logits",
        "_head",
        "_inputs",
        "_network",
        "combined",
        "features",
        "logits",
        "members",
        "outputs",
        "probs",
    )

    # The slots' types (set once, through object.__setattr__, in __init__).
    features: torch.Tensor
    members: torch.Tensor
    combined: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    outputs: Mapping[str, torch.Tensor]
    _backbone_features: torch.Tensor | Callable[[], torch.Tensor] | None
    _base_logits: torch.Tensor | Callable[[], torch.Tensor] | None
    _head: nn.Module | None
    _inputs: torch.Tensor | None
    _network: Callable[[torch.Tensor], torch.Tensor] | None

    def __init__(
        self,
        features: torch.Tensor,
        members: torch.Tensor,
        combined: torch.Tensor,
        logits: torch.Tensor,
        probs: torch.Tensor,
        outputs: Mapping[str, torch.Tensor],
        backbone_features: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        base_logits: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        head: nn.Module | None = None,
        inputs: torch.Tensor | None = None,
        network: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Build a context.

        ``backbone_features`` and ``base_logits`` may be tensors, functions that compute
        them when a plugin first reads them (the core passes functions: a model that
        samples its backbone needs one more, deterministic, pass for them), or ``None``:
        then they are taken from ``features`` (one sample) and ``members`` (one member),
        which is what they are in a model without samplers or extra heads. ``head`` is
        the model's own head (``None``: reading it raises). ``network`` marks a context
        built for a plugin that declares ``needs_inputs`` (the core passes both for such
        a plugin, ``inputs=None`` from cached features); without it, reading
        ``inputs`` or ``network`` raises.
        """
        for name, value in (
            ("features", features),
            ("members", members),
            ("combined", combined),
            ("logits", logits),
            ("probs", probs),
            ("outputs", outputs),
            ("_backbone_features", backbone_features),
            ("_base_logits", base_logits),
            ("_head", head),
            ("_inputs", inputs),
            ("_network", network),
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"OutputContext is read-only: cannot set {name!r}")

    @property
    def backbone_features(self) -> torch.Tensor:
        """``[B, D]``: see the class documentation."""
        source = self._backbone_features
        if source is None:
            if self.features.shape[0] != 1:
                raise ValueError(
                    "this OutputContext was built without backbone_features and its "
                    f"features hold {self.features.shape[0]} samples: pass "
                    "backbone_features=..."
                )
            return self.features[0]
        return source() if callable(source) else source

    @property
    def base_logits(self) -> torch.Tensor:
        """``[B, K]``: see the class documentation."""
        source = self._base_logits
        if source is None:
            if self.members.shape[0] != 1:
                raise ValueError(
                    "this OutputContext was built without base_logits and holds "
                    f"{self.members.shape[0]} members: pass base_logits=..."
                )
            return self.members[0]
        return source() if callable(source) else source

    @property
    def head(self) -> nn.Module:
        """The model's own head: see the class documentation."""
        if self._head is None:
            raise ValueError("this OutputContext was built without the model's head: pass head=...")
        return self._head

    def _check_inputs_given(self, name: str) -> None:
        if self._network is None:
            raise ValueError(
                f"OutputContext.{name} is given only to a plugin whose tags declare "
                "needs_inputs=True (every other plugin works from cached features as well as "
                "from inputs); set tags.needs_inputs = True in __wrapcal_tags__ (a context "
                "built by hand: pass network=...)"
            )

    @property
    def inputs(self) -> torch.Tensor | None:
        """``[B, ...]`` or ``None`` (cached features): see the class documentation."""
        self._check_inputs_given("inputs")
        return self._inputs

    @property
    def network(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Inputs -> the model's own logits: see the class documentation."""
        self._check_inputs_given("network")
        assert self._network is not None
        return self._network

    def __repr__(self) -> str:
        return (
            f"OutputContext(features={tuple(self.features.shape)}, "
            f"members={tuple(self.members.shape)}, outputs={sorted(self.outputs)})"
        )


class FeatureRows(Protocol):
    """Cached features ``[N, D]`` read a slice of rows at a time: a tensor, or the
    :class:`~wrapcal.plugin.DiskFeatures` view of a set cached on disk (what
    ``FeatureSet.features`` holds)."""

    @property
    def shape(self) -> torch.Size: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> torch.Tensor: ...


@runtime_checkable
class ModelView(Protocol):
    """The wrapped model as a plugin sees it in ``attach`` and ``fit``.

    Everything a plugin may touch; the methods run the plugins fitted *before* the
    calling one (so a calibrator fitted after a retraining plugin sees the retrained
    head). They take the cached features the plugin's ``fit`` data holds: for a
    ``FEATURES``-stage plugin the backbone's features, for every later plugin the
    model's features (already through the ``FEATURES`` stage, as
    :attr:`OutputContext.backbone_features` at inference).

    Attributes:
        backbone: Inputs ``[B, ...]`` -> features ``[B, D]``.
        head: The model's own head, features ``[B, D]`` -> logits ``[B, K]``. Applied to
            the ``fit`` data's features, it gives what
            :attr:`OutputContext.base_logits` gives at inference.
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
        """Cached features ``[N, D]`` (as the ``fit`` data holds them) through the feature
        steps of the plugins fitted before: ``[S, N, D]``, what the heads of the plugins
        fitted next read."""
        ...

    def members(self, features: torch.Tensor) -> torch.Tensor:
        """Member logits ``[M, N, K]`` of cached features ``[N, D]``."""
        ...

    def head_logits(self, features: FeatureRows) -> torch.Tensor:
        """Final logits ``[N, K]`` of cached features ``[N, D]``: the members of the
        plugins before combined, then their calibrators (not the bare head: that is
        ``head(features)``)."""
        ...

    # Any: a wrapcal.Prediction; this module is the SDK's leaf and imports nothing from
    # wrapcal, not even under TYPE_CHECKING (tests/sdk/test_contract.py: no import cycle).
    def predict_features(self, features: FeatureRows) -> Any:
        """A full :class:`~wrapcal.Prediction` of cached features ``[N, D]``."""
        ...
