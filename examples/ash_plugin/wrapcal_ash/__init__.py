"""ASH activation shaping with an energy OOD score, as a third-party wrapcal plugin.

Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for
Out-of-Distribution Detection", ICLR 2023. Per input, ASH-S keeps the largest
``100 - percentile`` percent of the penultimate activations, zeroes the rest and
multiplies what is left by ``exp(s1 / s2)`` (``s1``, ``s2``: the sums of the activations
before and after pruning); ASH-P only prunes. The head reads the shaped features and
the score is the energy of its logits, ``-logsumexp(logits)`` (higher = more OOD).

Nothing is learned: the threshold is each input's own percentile, so the plugin works
right after ``wrap``. Meant for non-negative (post-ReLU) features, as in the paper.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from wrapcal.plugin import Interval, Options, OutputKind, Plugin, PluginTags, Stage, hookimpl

__version__ = "0.1.0"


def ash(features: torch.Tensor, percentile: float, variant: str = "s") -> torch.Tensor:
    """Shape each row of ``features`` (last axis): keep its top ``100 - percentile``
    percent, zero the rest; ASH-S also rescales the kept values by ``exp(s1 / s2)``."""
    width = features.shape[-1]
    keep = max(1, width - round(width * percentile / 100))
    values, index = features.topk(keep, dim=-1)
    pruned = torch.zeros_like(features).scatter(-1, index, values)
    if variant == "p":
        return pruned
    ratio = features.sum(dim=-1, keepdim=True) / pruned.sum(dim=-1, keepdim=True)
    return pruned * torch.exp(ratio)


class ASH(Plugin):
    """Prune (and rescale) each input's penultimate activations; adds the score ``ash``.

    Args:
        percentile: Share of each input's activations set to zero, in percent (the
            paper: 90 on ImageNet, 95 on CIFAR).
        variant: ``"s"`` (prune and rescale, the paper's best) or ``"p"`` (prune only).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "percentile": [Interval(float, 0, 100, closed="left")],
        "variant": [Options(str, ("s", "p"))],
    }

    def __init__(self, percentile: float = 90.0, variant: str = "s") -> None:
        super().__init__()
        self.percentile = percentile
        self.variant = variant

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        # Acts on the features the heads read: every head and every sample sees them shaped.
        tags.stage = Stage.FEATURES
        tags.requires_fit = False
        tags.exportable = True
        tags.outputs = {"ash": OutputKind.OOD_SCORE}
        return tags

    def features(self, inputs, inner):
        return ash(inner(inputs), float(self.percentile), self.variant)

    def outputs(self, context):
        # Energy of the combined logits (the mean of several heads or dropout samples).
        return {"ash": -torch.logsumexp(context.combined, dim=-1)}


@hookimpl
def wrapcal_register_plugins(register) -> None:
    register("ash", ASH)
