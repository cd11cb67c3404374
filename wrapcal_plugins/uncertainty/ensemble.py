"""Deep ensembles of the checkpoints a team already has: one model, averaged probabilities.

An ensemble is a *model*, not a parameter of a plugin: wrap it like any classifier, and
every plugin (calibrators, detectors, conformal sets, OOD decisions) works on the
ensemble's output::

    from wrapcal_plugins.uncertainty.ensemble import Ensemble

    wrapped = wrapcal.wrap(Ensemble([m1, m2, m3]), plugins=["ensemble", "temperature"])
    wrapped.fit(calibration=cal)          # one pass of each member per data set
    pred = wrapped.predict(x)             # probs = mean of the members' probabilities
    pred.scores["ensemble_mutual_information"]   # disagreement between the checkpoints

Why a model (and not ``("ensemble", {"members": [m2, m3]})``): the feature cache, the
one backbone pass of ``fit`` and ``evaluate``, saving, loading and export all work on the
wrapped model's backbone. Made the backbone, the members ride on all of that unchanged;
as a plugin parameter they could not (``fit`` works from the backbone's cached features,
where the other members' features do not exist, and a plugin's parameters are JSON in a
saved file, never modules).

How it is split (:func:`wrapcal_split_model`, an adapter like timm's): each member is
split by the same adapters as any model (timm, torchvision, transformers, the last
``nn.Linear``; ``heads=`` names a member's head by hand), so members may be different
architectures, as long as they give the same classes.

* The backbone (:class:`EnsembleBackbone`) runs every member's backbone once per batch
  and puts their features side by side: the model's features are ``[B, D1 + ... + Dm]``.
  ``fit`` and ``evaluate`` cache them once per data set, keyed by every member's weights
  (a single member's own cache entry is not reused: the ensemble is one backbone).
* The head (:class:`EnsembleHead`) splits the features back, applies each member's head
  and averages the probabilities: the logits are ``log(mean_m softmax(z_m))`` (the
  predictive mean, as the core combines several members), shifted per row by
  ``logsumexp(mean_m z_m)``. The shift changes no probability (softmax ignores it) but
  keeps the logit-based scores meaningful: the core's ``energy`` and ReAct's score are
  the energy of the members' mean logits, where log-probabilities alone would give 0
  for every input. A single-logit binary model keeps one logit, the log-odds of the
  mean probability.

What the detectors read: the concatenated features (KNN, Mahalanobis, ReAct clip every
member's features) and the ensemble's head (``base_logits`` are the ensemble's logits).
Detectors that need the head to be one ``nn.Linear`` (ViM, residual, fDBD...) refuse an
ensemble with their own message.

The ``ensemble`` plugin adds the scores of disagreement between the members, from their
softmax outputs on the model's features (the same formulas as MC dropout's, whose samples
are the members here): ``ensemble_mutual_information`` (epistemic: predictive entropy
minus expected entropy; an OOD score), ``ensemble_expected_entropy`` (aleatoric),
``ensemble_predictive_entropy`` (total), ``ensemble_variation_ratio`` (1 - the share of
members voting for the modal class) and ``ensemble_std_top_prob`` (standard deviation over
members of the probability of the members' mean prediction). They read the model's
features and its head only, before any calibrator: like a detector, they score the same
beside samplers, extra heads, calibrators and decisions. On a model that is not an
:class:`Ensemble` there is one member: every disagreement is 0 (with a warning).

Saving and loading: a file records each member by name when every member can be rebuilt
by name (timm, ``wrapcal`` CIFAR ResNets, transformers; allow-listed families and
arguments only, checked member by member), else the members are custom models passed
back to load: ``wrapcal.load(path, model=Ensemble([SmallNet(), SmallNet()]))``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

import wrapcal
from wrapcal.plugin import (
    Check,
    ModelFamily,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Split,
    SplitError,
    Stage,
    check_spec,
    combine_members,
    hookimpl,
    logits_to_probs,
)
from wrapcal_plugins.sampling.mc_dropout import mc_scores

__all__ = [
    "FAMILY",
    "MAX_MEMBERS",
    "SCORES",
    "Ensemble",
    "EnsembleBackbone",
    "EnsembleHead",
    "EnsembleScores",
    "average_logits",
    "split_ensemble",
]

#: The model family (and model name) a saved ensemble is rebuilt from:
#: ``{"library": "ensemble", "name": "ensemble", "kwargs": {"members": [...]}}``.
FAMILY = "ensemble"
#: At most this many members (a saved file's description is untrusted input).
MAX_MEMBERS = 64
#: The plugin's scores (mc_dropout's formulas, named for the ensemble so both can be
#: wrapped together), with their kinds.
SCORES = {
    "ensemble_mutual_information": OutputKind.OOD_SCORE,
    "ensemble_expected_entropy": OutputKind.UNCERTAINTY,
    "ensemble_predictive_entropy": OutputKind.UNCERTAINTY,
    "ensemble_variation_ratio": OutputKind.UNCERTAINTY,
    "ensemble_std_top_prob": OutputKind.UNCERTAINTY,
}
# The head path a member may be split at (as wrapcal.load accepts for one model).
_HEAD_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,127}(\.[A-Za-z0-9][A-Za-z0-9_]{0,127}){0,31}\Z")


def average_logits(members: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, K]`` of the mean of the members' probabilities, from ``[M, B, K]``.

    ``log(mean_m softmax(z_m)) + logsumexp(mean_m z_m)``: the softmax is exactly the
    mean probability; the per-row shift makes the energy (``-logsumexp``) that of the
    members' mean logits (see the module docstring). One logit (binary): the log-odds of
    the mean probability.
    """
    combined = combine_members(members)
    if members.shape[0] == 1 or members.shape[-1] == 1:
        return combined
    return combined + torch.logsumexp(members.mean(dim=0), dim=-1, keepdim=True)


class Ensemble(nn.Module):
    """Several classifiers of the same classes as one: the mean of their probabilities.

    ``Ensemble(members)(x)`` gives :func:`average_logits` of the members' logits, so it
    can be evaluated as a baseline like any model; :func:`wrapcal.wrap` splits it into
    the members' backbones and heads (:func:`split_ensemble`).

    Args:
        members: Two or more classifiers (``nn.Module``, inputs -> logits ``[B, K]``)
            with the same ``K``, taking the same inputs. Any architectures.
        heads: For each member, the dotted name of its final linear layer, to split it
            there by hand (as ``wrapcal.wrap(model, head=...)``), or ``None`` to let the
            adapters find it. Default: ``None`` for every member.

    Raises:
        TypeError: ``members`` is not a sequence of modules, or ``heads`` not names.
        ValueError: Fewer than two members, more than :data:`MAX_MEMBERS`, an
            ensemble among the members, one module listed twice, or ``heads`` of
            another length.
    """

    def __init__(self, members: Sequence[nn.Module], heads: Sequence[str | None] | None = None):
        super().__init__()
        if isinstance(members, nn.Module) or not isinstance(members, Sequence):
            raise TypeError(
                f"Ensemble takes a list of models, e.g. Ensemble([m1, m2, m3]); got "
                f"{type(members).__name__}"
            )
        members = list(members)
        for index, member in enumerate(members):
            if not isinstance(member, nn.Module):
                raise TypeError(
                    f"ensemble member {index} is a {type(member).__name__}, not an nn.Module"
                )
            if isinstance(member, Ensemble):
                raise ValueError(
                    f"ensemble member {index} is itself an Ensemble: list its members "
                    "instead (Ensemble([*inner.members, other]))"
                )
            first = next(i for i, other in enumerate(members) if other is member)
            if first != index:
                # Splitting takes each member's head out in place: the second split of one
                # module would cut it at another layer.
                raise ValueError(
                    f"ensemble members {first} and {index} are the same module: an ensemble "
                    "of one network twice is that network; give distinct checkpoints"
                )
        if not 2 <= len(members) <= MAX_MEMBERS:
            raise ValueError(
                f"an Ensemble needs 2 to {MAX_MEMBERS} members, got {len(members)}; wrap a "
                "single model directly"
            )
        heads = [None] * len(members) if heads is None else list(heads)
        if len(heads) != len(members):
            raise ValueError(
                f"heads has {len(heads)} entries for {len(members)} members: give one per "
                "member (None where the adapters find the head)"
            )
        for index, head in enumerate(heads):
            if head is not None and not (isinstance(head, str) and _HEAD_PATH.match(head)):
                raise TypeError(
                    f"heads[{index}] = {head!r} is not the dotted name of a module "
                    "(e.g. 'classifier.3') or None"
                )
        self.members = nn.ModuleList(members)
        self.heads: list[str | None] = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [member(x) for member in self.members]
        classes = {tuple(z.shape[1:]) for z in logits}
        if len(classes) != 1:
            raise ValueError(
                f"the ensemble's members return logits of shapes "
                f"{[tuple(z.shape) for z in logits]}: they must give the same classes"
            )
        return average_logits(torch.stack(logits))


class EnsembleBackbone(nn.Module):
    """The members' backbones, each run once per batch, features side by side.

    Args:
        backbones: Each member's backbone (inputs -> ``[B, D_m]``).
        widths: Each member's feature width ``D_m``.
    """

    def __init__(self, backbones: Sequence[nn.Module], widths: Sequence[int]) -> None:
        super().__init__()
        self.members = nn.ModuleList(backbones)
        self.widths = [int(w) for w in widths]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for index, (backbone, width) in enumerate(zip(self.members, self.widths, strict=True)):
            features = backbone(x)
            if not (
                isinstance(features, torch.Tensor)
                and features.ndim == 2
                and features.shape[1] == width
            ):
                shape = tuple(features.shape) if isinstance(features, torch.Tensor) else features
                raise SplitError(
                    f"ensemble member {index}'s backbone returned {shape}, not features "
                    f"[B, {width}] for its head"
                )
            parts.append(features)
        return torch.cat(parts, dim=-1)


class EnsembleHead(nn.Module):
    """Features ``[N, D1 + ... + Dm]`` -> the ensemble's logits ``[N, K]``.

    Args:
        heads: Each member's head (features ``[N, D_m]`` -> logits ``[N, K]``).
        widths: Each member's feature width ``D_m``, in the backbone's order.
    """

    def __init__(self, heads: Sequence[nn.Module], widths: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.widths = [int(w) for w in widths]
        self.in_features = sum(self.widths)

    def member_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Each member's logits ``[M, N, K]``: its head on its own columns."""
        parts = features.split(self.widths, dim=-1)
        return torch.stack([head(part) for head, part in zip(self.heads, parts, strict=True)])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return average_logits(self.member_logits(features))


def _member_source(wrapped: Any) -> dict[str, Any] | None:
    """How to rebuild a split member by name, or ``None`` when it cannot be."""
    source = dict(wrapped.source)
    if isinstance(source.get("library"), str) and isinstance(source.get("name"), str):
        return {
            "library": source["library"],
            "name": source["name"],
            "kwargs": dict(source.get("kwargs", {})),
        }
    inner = getattr(wrapped.backbone, "model", wrapped.backbone)
    known = getattr(inner, "wrapcal_source", None)  # wrapcal's own CIFAR ResNets
    if isinstance(known, dict) and isinstance(known.get("name"), str):
        return {
            "library": "wrapcal",
            "name": known["name"],
            "kwargs": dict(known.get("kwargs", {})),
        }
    # Custom models, and torchvision members (named by the shapes of a whole model only
    # for a single model): passed back to load.
    return None


def split_ensemble(model: Ensemble) -> Split:
    """Split every member with the adapters (or at its ``heads`` entry), then put the
    backbones side by side and the heads together.

    The members are split in place (``wrap`` passes a copy).

    Raises:
        SplitError: A member no adapter can split (the message names the member and how
            to give its head), or members of different numbers of classes.
    """
    parts = []
    for index, (member, head) in enumerate(zip(model.members, model.heads, strict=True)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a member's own wrap warnings are not the user's
                parts.append(wrapcal.wrap(member, inplace=True, head=head))
        except SplitError as err:
            raise SplitError(
                f"ensemble member {index} ({type(member).__name__}): {err}. Name its final "
                f"linear layer: Ensemble(members, heads=[... 'name.of.last.linear' at "
                f"position {index} ...])"
            ) from err
    classes = [part.num_classes for part in parts]
    if len(set(classes)) != 1:
        raise SplitError(
            f"the ensemble's members give different numbers of logits {classes}: an "
            "ensemble averages the probabilities of the same classes; wrap members "
            "trained on the same classes"
        )
    widths = [part.num_features for part in parts]
    sources = [_member_source(part) for part in parts]
    source: dict[str, Any] = {}
    if all(s is not None for s in sources):
        kwargs: dict[str, Any] = {"members": sources}
        if any(h is not None for h in model.heads):
            kwargs["heads"] = list(model.heads)
        source = {"library": FAMILY, "name": FAMILY, "kwargs": kwargs}
    shapes = {part.input_shape for part in parts if part.input_shape is not None}
    return Split(
        EnsembleBackbone([part.backbone for part in parts], widths),
        EnsembleHead([part.head for part in parts], widths),
        kind=FAMILY,
        source=source,
        input_shape=next(iter(shapes)) if len(shapes) == 1 else None,
        fixed_input_size=any(part.fixed_input_size for part in parts) and len(shapes) == 1,
    )


@hookimpl(tryfirst=True)
def wrapcal_split_model(model: nn.Module) -> Split | None:
    """Split an :class:`Ensemble` (:func:`split_ensemble`); ``None`` for other models."""
    return split_ensemble(model) if isinstance(model, Ensemble) else None


# --- saving and loading by name ----------------------------------------------------------


def _member_specs_problem(members: Any) -> str | None:
    """What is wrong with an untrusted list of member descriptions, or ``None``."""
    if not isinstance(members, list) or not 2 <= len(members) <= MAX_MEMBERS:
        return f"members must be a list of 2 to {MAX_MEMBERS} model descriptions"
    for index, spec in enumerate(members):
        if not isinstance(spec, dict) or set(spec) - {"library", "name", "kwargs"}:
            return f"member {index} is not a description {{library, name, kwargs}}"
        if spec.get("library") == FAMILY:
            return f"member {index} is an ensemble: ensembles do not nest"
        try:
            check_spec(spec.get("library"), spec.get("name"), spec.get("kwargs", {}))
        except ValueError as err:
            return f"member {index}: {err}"
    return None


def _heads_ok(heads: Any) -> bool:
    return isinstance(heads, list) and all(
        h is None or (isinstance(h, str) and _HEAD_PATH.match(h)) for h in heads
    )


def _build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """An :class:`Ensemble` of its members built by name (each checked again)."""
    members = kwargs["members"]
    problem = _member_specs_problem(members)
    if problem:
        raise ValueError(problem)
    built = []
    for spec in members:
        family, member_name, member_kwargs = check_spec(
            spec["library"], spec["name"], spec.get("kwargs", {})
        )
        built.append(family.build(member_name, member_kwargs))
    return Ensemble(built, kwargs.get("heads"))


@hookimpl
def wrapcal_register_models(register: Callable[[ModelFamily], None]) -> None:
    """The ``ensemble`` family: a saved ensemble of members that are built by name."""
    register(
        ModelFamily(
            FAMILY,
            _build,
            lambda: [FAMILY],
            lambda name: name == FAMILY,
            {
                "members": [
                    Check(
                        lambda members: _member_specs_problem(members) is None,
                        f"a list of 2 to {MAX_MEMBERS} descriptions of allow-listed models",
                    )
                ],
                "heads": [Check(_heads_ok, "a list of dotted module names or None")],
            },
        )
    )


# --- the plugin: disagreement between the members -------------------------------------------


class EnsembleScores(Plugin):
    """Scores of disagreement between an :class:`Ensemble`'s members (``"ensemble"``).

    Reads the model's features (:attr:`~wrapcal.OutputContext.backbone_features`) and
    its head: each member's head on its own features, softmax, then MC dropout's entropy
    decomposition and vote statistics with the members as samples (see the module
    docstring for each score). Learns nothing; changes nothing of the model.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {}

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        # It scores from the model's features and head, as a detector does.
        tags.stage = Stage.DETECT
        tags.requires_fit = False
        tags.exportable = True
        tags.outputs = dict(SCORES)
        return tags

    def attach(self, model: Any) -> None:
        """Warn when the model is not an ensemble: one member, no disagreement."""
        if not isinstance(model.head, EnsembleHead):
            warnings.warn(
                f"ensemble: {model.name} is a single network, so its ensemble has one member "
                "and every disagreement score is 0; wrap an ensemble of checkpoints: "
                "wrapcal.wrap(Ensemble([model, other, ...]), plugins=['ensemble', ...]) "
                "(from wrapcal_plugins.uncertainty.ensemble import Ensemble)",
                UserWarning,
                stacklevel=2,
            )

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """The disagreement scores ``[B]`` of the members' softmax outputs."""
        head = context.head
        if isinstance(head, EnsembleHead):
            members = head.member_logits(context.backbone_features)
        else:
            members = context.base_logits.unsqueeze(0)
        # The members' own prediction, not a calibrator's: the scores do not move with one.
        label = logits_to_probs(combine_members(members)).argmax(dim=-1)
        scores = mc_scores(members, label)
        return {f"ensemble_{name}": value for name, value in scores.items()}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register("ensemble", EnsembleScores)
