"""Activation shaping, then energy: the detector scores ``ash`` and ``scale``.

Both shape each input's penultimate features ``f`` (width ``D``) with its own top-``k``
activations, ``k = D - round(D p / 100)``, before the model's head, and score the energy
of the shaped logits, ``-logsumexp(head(shape(f)))`` (higher = more OOD). Nothing is
learned: the threshold is each input's own percentile, so both work right after
``wrap``. With ``s1 = sum(f)`` and ``s2`` the sum of the top ``k`` values:

* ``ash`` (Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for
  Out-of-Distribution Detection", ICLR 2023) zeroes all but the top ``k`` values, then
  ASH-S (``variant="s"``, the paper's best) multiplies what is left by ``exp(s1 / s2)``;
  ASH-B (``"b"``) sets each kept value to ``s1 / k`` (the sum is kept, the pattern
  binarised); ASH-P (``"p"``) only prunes. ``percentile=90``: the authors' CIFAR
  configurations (``ash_s@90`` for a ResNet-34 on CIFAR-10, 512-d features, and a
  DenseNet-100 on CIFAR-100, 342-d), their ImageNet ResNet-50 value and OpenOOD v1.5's
  default (it sweeps 65..95). On narrow features it keeps few values: 6 of the 64 of
  the shared CIFAR-10 ResNet-20, whose MNIST AUROC is 0.913 at 90 and 0.977 at 85.
* ``scale`` (Xu, Lian, Cheng & Liu, "Scaling for Training Time and Post-hoc
  Out-of-distribution Detection Enhancement", ICLR 2024) prunes nothing: it multiplies
  the *whole* feature vector by ``exp(s1 / s2)`` (the paper finds pruning hurts ID
  accuracy and does not help detection; the scale factor alone does).
  ``percentile=85``: the authors' configuration (kai422/SCALE, OpenOOD's default).

What they read, and what they shape for whom (as ``react``):

* Input: the model's features (:attr:`~wrapcal.OutputContext.backbone_features`: the
  backbone's output through any ``FEATURES``-stage plugin, one deterministic row per
  input) and the model's own head (:attr:`~wrapcal.OutputContext.head`, as the plugins
  that retrain it left it). Not sampled features, extra heads or calibrated logits.
* They shape for their own score only: the model's features, logits and probabilities
  and every other plugin are exactly as without them (the ASH paper reports the shaped
  network's accuracy; here the classifier keeps its unshaped features, the shaped
  logits serve the score, so accuracy cannot drop).
* Meant for non-negative (post-ReLU) features, as in both papers: with negative values
  ``s2`` can be small or zero and ``exp(s1 / s2)`` meaningless. A row whose top-``k``
  sum is exactly zero (an all-zero row) gets the factor 1 rather than NaN. ``k`` is at
  least 1.
* A single binary logit ``z`` counts as ``[0, z]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from wrapcal.plugin import (
    Interval,
    Options,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    hookimpl,
)
from wrapcal_plugins.ood._feature_stats import compute_dtype, energy

__all__ = ["ASH", "SCALE", "ash", "kept", "scale"]

VARIANTS = ("s", "b", "p")


def kept(width: int, percentile: float) -> int:
    """Activations kept of ``width`` at ``percentile``: ``width - round(width p / 100)``
    (the authors' rounding, half to even), at least 1."""
    return max(1, width - round(width * percentile / 100))


def _ratio(total: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``s1 / s2`` per row, 0 where ``s2`` is 0 (an all-zero row: factor exp(0) = 1)."""
    safe = torch.where(top == 0, torch.ones_like(top), top)
    return torch.where(top == 0, torch.zeros_like(top), total / safe)


def ash(features: torch.Tensor, percentile: float, variant: str = "s") -> torch.Tensor:
    """ASH of each row ``[..., D]``: keep its top ``k`` values, zero the rest; ``"s"``
    rescales the kept values by ``exp(s1 / s2)``, ``"b"`` sets each to ``s1 / k``."""
    k = kept(features.shape[-1], percentile)
    values, index = features.topk(k, dim=-1)
    total = features.sum(dim=-1, keepdim=True)
    if variant == "b":
        values = (total / k).expand_as(values)
    elif variant == "s":
        values = values * torch.exp(_ratio(total, values.sum(dim=-1, keepdim=True)))
    return torch.zeros_like(features).scatter(-1, index, values)


def scale(features: torch.Tensor, percentile: float) -> torch.Tensor:
    """SCALE of each row ``[..., D]``: the whole row times ``exp(s1 / s2)``, with ``s2``
    the sum of its top ``k`` values."""
    k = kept(features.shape[-1], percentile)
    top = features.topk(k, dim=-1).values.sum(dim=-1, keepdim=True)
    return features * torch.exp(_ratio(features.sum(dim=-1, keepdim=True), top))


class _Shaping(Plugin):
    """A detector scoring the energy of the head's logits of shaped features."""

    _NAME: ClassVar[str]

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        # A detector: it scores, and leaves the features every head reads alone.
        tags.stage = Stage.DETECT
        tags.requires_fit = False  # each input's own percentile: nothing to learn
        tags.exportable = True  # topk, scatter, exp, a linear head
        tags.outputs = {self._NAME: OutputKind.OOD_SCORE}
        return tags

    def _shape(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """The energy of the model's head's logits of the shaped model features."""
        features = context.backbone_features
        shaped = self._shape(features.to(compute_dtype(features.dtype)))
        logits = context.head(shaped.to(features.dtype))
        return {self._NAME: energy(logits.to(compute_dtype(logits.dtype)))}


class ASH(_Shaping):
    """Energy of the head's logits of each input's pruned (and rescaled) features.

    A detector: it changes nothing of the model (see the module docstring).

    Args:
        percentile: Share of each input's activations set to zero, in percent, in
            ``[0, 100)`` (90: the authors' CIFAR-10 and ImageNet value).
        variant: ``"s"`` (prune, rescale the rest by ``exp(s1 / s2)``: the paper's
            best), ``"b"`` (prune, set the rest to their mean ``s1 / k``) or ``"p"``
            (prune only).
    """

    _NAME = "ash"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "percentile": [Interval(float, 0, 100, closed="left")],
        "variant": [Options(str, VARIANTS)],
    }

    def __init__(self, percentile: float = 90.0, variant: str = "s") -> None:
        super().__init__()
        self.percentile = percentile
        self.variant = variant

    def _shape(self, features: torch.Tensor) -> torch.Tensor:
        return ash(features, float(self.percentile), self.variant)


class SCALE(_Shaping):
    """Energy of the head's logits of each input's features scaled by ``exp(s1 / s2)``.

    A detector: it changes nothing of the model (see the module docstring).

    Args:
        percentile: The top ``100 - percentile`` percent of each input's activations
            give ``s2``, in ``[0, 100)`` (85: the authors' value).
    """

    _NAME = "scale"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "percentile": [Interval(float, 0, 100, closed="left")],
    }

    def __init__(self, percentile: float = 85.0) -> None:
        super().__init__()
        self.percentile = percentile

    def _shape(self, features: torch.Tensor) -> torch.Tensor:
        return scale(features, float(self.percentile))


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register("ash", ASH)
    register("scale", SCALE)
