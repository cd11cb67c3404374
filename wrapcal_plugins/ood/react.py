"""Rectified activations (Sun, Guo & Li, NeurIPS 2021): clip the features; score ``react``.

"ReAct: Out-of-distribution Detection With Rectified Activations" clips the penultimate
features at ``c``, the ``p``-th percentile of their in-distribution values (``p = 90``,
the paper's default for CIFAR and ImageNet), before the head: OOD inputs cause a few
abnormally large activations that push their logits up; clipped, they no longer do.
The score is the energy of the logits of the clipped features,
``react = -logsumexp(logits(min(f, c)))`` (higher = more OOD).

What this plugin does, and the choices it makes:

* A feature-stage plugin: it changes the features every head reads, so the model's
  logits are those of the clipped features (accuracy moves a little, usually by a
  fraction of a point) and everything after it (detectors, calibrators such as
  temperature, fitted after it) sees the clipped model.
* ``c`` is the exact percentile of every value of the ``train`` features (else
  ``calibration``), as the plugins before it give them (every MC-dropout sample's),
  numpy's linear interpolation. It is computed in bounded memory and deterministically
  (:func:`~wrapcal_plugins.ood._feature_stats.chunked_quantile`: a histogram pass narrows
  down the range that holds the rank, the values in it are sorted; three passes over
  the cached features), not on a subsample.
* The score is the energy of the *combined* logits (the average of several heads or
  dropout samples), before any calibrator; a single binary logit ``z`` counts as
  ``[0, z]``. With one head it equals the core's ``energy`` of the clipped model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from wrapcal import (
    FitData,
    ModelView,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    hookimpl,
)
from wrapcal.plugin.constraints import Interval
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
    """Clip features at a percentile of the training features; score ``react``.

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
        # Acts on the features the heads read: every head and every sample sees them clipped.
        tags.stage = Stage.FEATURES
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

    def features(
        self,
        inputs: torch.Tensor | None,
        inner: Callable[[torch.Tensor | None], torch.Tensor],
    ) -> torch.Tensor:
        """The features of the plugins before, clipped at ``clip_`` from above."""
        features = inner(inputs)
        return features.clamp(max=self.clip_.to(features.dtype))

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``react``: the energy of the combined logits of the clipped features."""
        combined = context.combined
        return {_NAME: energy(combined.to(compute_dtype(combined.dtype)))}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, ReAct)
