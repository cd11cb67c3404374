"""ReAct feature clipping with an energy OOD score, as a wrapcal plugin.

Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations",
NeurIPS 2021. The clip value is the ``percentile``-th percentile of all the
in-distribution training features (the paper uses the 90th).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from wrapcal import OutputKind, Plugin, Stage, hookimpl
from wrapcal.params import Interval

__version__ = "0.1.0"


class ReAct(Plugin):
    """Clip penultimate features at an in-distribution percentile; adds react_energy."""

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "percentile": [Interval(float, 0, 100, closed="right")]
    }

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__()
        self.percentile = percentile
        self.register_buffer("clip_", torch.tensor(float("inf")))

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        # Acts on the features the heads read: every head and every sample sees them clipped.
        tags.stage = Stage.FEATURES
        tags.fit_requires = {"train": "the clip value is a percentile of ID features"}
        tags.outputs = {"react_energy": OutputKind.OOD_SCORE}
        return tags

    def fit(self, model, data):
        train = data.require("train", "react")
        features = model.features(train.features).flatten().double()
        self.clip_ = torch.quantile(features[: 2**24], self.percentile / 100).to(self.clip_)
        return self

    def features(self, inputs, inner):
        features = inner(inputs)
        return features.clamp(max=self.clip_.to(features.dtype))

    def outputs(self, context):
        # Energy of the clipped logits, averaged over members when there are several.
        return {"react_energy": -torch.logsumexp(context.members, dim=-1).mean(dim=0)}


@hookimpl
def wrapcal_register_plugins(register) -> None:
    register("react", ReAct)
