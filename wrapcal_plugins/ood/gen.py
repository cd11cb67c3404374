"""Generalized entropy (Liu, Lochman & Zach, CVPR 2023): the detector score ``gen``.

"GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection" scores an
input by a generalized (Tsallis-like) entropy of its ``M`` largest softmax
probabilities, with an exponent ``gamma`` that amplifies differences near 0 and 1::

    gen(x) = sum_{j in top-M} p_j^gamma (1 - p_j)^gamma,    p = softmax(logits)

Confident (peaked) in-distribution posteriors have a low entropy; OOD ones a high one.
The paper's confidence is ``-G``; the score ``gen`` is ``G`` itself (higher = more OOD).

What it reads, and the choices it makes:

* Input: the head's own logits (:attr:`~wrapcal.OutputContext.base_logits`: the model's
  head, as the plugins that retrain it left it, applied to the model's features). Not
  calibrated logits, not the members of extra heads or dropout samples: so ``gen``
  scores the same alone and beside calibrators, samplers and the other detectors.
  Nothing is learned: no ``fit``.
* ``gamma = 0.1`` and ``M = 100`` by default, the paper's values (``M`` is capped at the
  number of classes: all of them for CIFAR-10).
* The paper's formula, as the authors' code (XixiLiu95/GEN) and OpenOOD's ``GEN``
  postprocessor compute it: a sum over the top ``M``, no clamping.
  ``pytorch_ood.detector.GEN`` differs in two ways: it averages over the ``M`` terms
  (every score divided by ``M``: the same ranking) and clamps the probabilities to
  ``[1e-7, 1 - 1e-7]``, which changes the score wherever a probability is below
  ``1e-7``: each such class then adds ``~0.2`` (``1e-7 ** 0.1``) instead of almost 0.
  The test checks ``gen = M * pytorch_ood`` where its clamp does not bind, and the
  authors' formula written out in float64 on the real logits.
* ``1 - p`` of the largest probability is the sum of the others, not ``1 - p``: in
  float32, a confident prediction rounds ``p`` to 1 and ``1 - p`` to 0 (the authors'
  float32 code then adds 0 for that class); the sum of the others keeps its value.
* A single binary logit ``z`` counts as the two logits ``[0, z]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from wrapcal.plugin import (
    Interval,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    hookimpl,
)
from wrapcal_plugins.ood._feature_stats import compute_dtype

__all__ = ["GEN", "generalized_entropy"]

_NAME = "gen"


def generalized_entropy(logits: torch.Tensor, gamma: float = 0.1, m: int = 100) -> torch.Tensor:
    """``sum_{top-M} p^gamma (1 - p)^gamma`` of ``p = softmax(logits)``, per row.

    Args:
        logits: ``[B, K]`` (``K = 1``: one binary logit ``z``, read as ``[0, z]``).
        gamma: The exponent, ``> 0``.
        m: How many of the largest probabilities are summed (capped at ``K``).

    Returns:
        ``[B]`` the generalized entropy (higher = flatter = more OOD).
    """
    if logits.shape[-1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
    probs = logits.softmax(dim=-1)
    top = probs.topk(min(int(m), probs.shape[-1]), dim=-1).values  # largest first
    # 1 - p_max as the sum of the other probabilities: no cancellation near p_max = 1.
    # The other p's are at most 1/2, where 1 - p is exact enough.
    is_max = torch.arange(probs.shape[-1], device=probs.device) == probs.argmax(
        dim=-1, keepdim=True
    )
    rest = probs.masked_fill(is_max, 0).sum(dim=-1, keepdim=True)
    complement = torch.cat([rest, 1 - top[..., 1:]], dim=-1)
    return (top.pow(gamma) * complement.pow(gamma)).sum(dim=-1)


class GEN(Plugin):
    """Generalized entropy of the ``M`` largest softmax probabilities (Liu et al. 2023).

    A detector: it changes nothing of the model and learns nothing (see the module
    docstring).

    Args:
        gamma: The exponent ``gamma > 0`` (the paper: 0.1).
        M: How many of the largest probabilities are summed (the paper: 100; capped at
            the number of classes).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "gamma": [Interval(float, 0, None, closed="neither")],
        "M": [Interval(int, 1, None)],
    }

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:
        super().__init__()
        self.gamma = gamma
        self.M = M

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.requires_fit = False  # a function of the logits alone
        tags.exportable = True
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``gen``: the generalized entropy of the head's own logits."""
        logits = context.base_logits
        score = generalized_entropy(
            logits.to(compute_dtype(logits.dtype)), float(self.gamma), int(self.M)
        )
        return {_NAME: score}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, GEN)
