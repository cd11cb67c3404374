"""Rectified activations (Sun, Guo & Li, NeurIPS 2021): the detector score ``react``.

"ReAct: Out-of-distribution Detection With Rectified Activations" clips the penultimate
features at ``c``, the ``p``-th percentile of their in-distribution values (``p = 90``,
the paper's default for CIFAR and ImageNet), before the head: OOD inputs cause a few
abnormally large activations that push their logits up; clipped, they no longer do.
The score is the energy of the logits of the clipped features (higher = more OOD)::

    react(f) = -logsumexp(head(min(f, c)))

What it reads, and what it clips for whom:

* Input: the model's features ``f`` (:attr:`~wrapcal.OutputContext.backbone_features`:
  the backbone's output, through any ``FEATURES``-stage plugin, one deterministic row
  per input) and the model's own head (:attr:`~wrapcal.OutputContext.head`, as the
  plugins that retrain it left it). Not the members of extra heads or dropout samples,
  not calibrated logits: ``react`` scores the same alone and beside MC dropout,
  the discrepancy heads, the other detectors, calibrators and decisions.
* It clips for its own score only. The model's features, its logits and probabilities,
  the core's ``energy`` and ``max_logit`` and every other plugin are exactly as without
  it (the paper's classifier keeps the unclipped features; the clipped logits serve the
  score). So ``react`` is not ``energy``: it equals ``energy`` only on inputs none of
  whose features exceed ``c``.
* ``c`` is the exact percentile of every value of the ``train`` features (else
  ``calibration``), the same features it reads at inference, numpy's linear
  interpolation. It is computed in bounded memory and deterministically
  (:func:`~wrapcal_plugins.ood._feature_stats.chunked_quantile`: a histogram pass narrows
  down the range that holds the rank, the values in it are sorted; three passes over
  the cached features), not on a subsample.
* A single binary logit ``z`` counts as ``[0, z]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from wrapcal.plugin import (
    FitData,
    Interval,
    ModelView,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    hookimpl,
)
from wrapcal_plugins.ood._feature_stats import (
    FIT_SETS,
    chunked_quantile,
    compute_dtype,
    energy,
    feature_value_chunks,
    fit_set,
)

__all__ = ["ReAct"]

_NAME = "react"
_WHY = "the clip value is a percentile of in-distribution features"


class ReAct(Plugin):
    """Energy of the head's logits of the features clipped at a training percentile.

    A detector: it changes nothing of the model (see the module docstring).

    Args:
        percentile: ``p`` in (0, 100]: the clip value is the ``p``-th percentile of the
            training features' values (the paper: 90).

    Attributes:
        clip_: The clip value ``c`` (a float64 scalar buffer).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "percentile": [Interval(float, 0, 100, closed="right")]
    }

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__()
        self.percentile = percentile
        self.register_buffer("clip_", torch.tensor(float("inf"), dtype=torch.float64))

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        # A detector: it scores, and leaves the features every head reads alone.
        tags.stage = Stage.DETECT
        tags.fit_reads = FIT_SETS
        tags.fits_from_shards = True  # counts and bounds are combined over the ranks
        tags.exportable = True
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def fit(self, model: ModelView, data: FitData) -> ReAct:
        """The clip value: the exact percentile of the training features' values."""
        source = fit_set(data, _NAME, _WHY)
        clip = chunked_quantile(
            lambda: feature_value_chunks(model, source),
            float(self.percentile) / 100,
            shards=source,
        )
        self.clip_ = torch.tensor(clip, dtype=torch.float64, device=model.device)
        return self

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``react``: the energy of the head's logits of the clipped model features."""
        features = context.backbone_features
        clipped = features.clamp(max=self.clip_.to(features.dtype))
        logits = context.head(clipped)
        return {_NAME: energy(logits.to(compute_dtype(logits.dtype)))}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, ReAct)
