"""ReAct feature clipping with an energy OOD score, as a wrapcal plugin.

Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations",
NeurIPS 2021. The clip value is the ``percentile``-th percentile of all the
in-distribution training features (the paper uses the 90th).
"""

from __future__ import annotations

import torch

from wrapcal import Plugin, Stage, hookimpl

__version__ = "0.1.0"


class ReAct(Plugin):
    """Clip penultimate features at an in-distribution percentile; adds react_energy."""

    # Acts on the head's input, like a sampler does, so it wraps the heads of plugins
    # fitted before it and sits under MC dropout.
    stage = Stage.SAMPLE

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__()
        self.percentile = percentile
        self.register_buffer("clip_", torch.tensor(float("inf")))

    @hookimpl
    def wrapcal_fit(self, wrapped, data) -> None:
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        train = data.require("train", "react", "the clip value is a percentile of ID features")
        features = train.features.flatten().double()
        self.clip_ = torch.quantile(features[: 2**24], self.percentile / 100).to(self.clip_)

    @hookimpl(tryfirst=True)
    def wrapcal_head_members(self, wrapped, features, from_inputs):
        clipped = features.clamp(max=self.clip_.to(features.dtype))
        return wrapped.call_inner(
            "wrapcal_head_members", self, wrapped=wrapped, features=clipped, from_inputs=from_inputs
        )

    @hookimpl
    def wrapcal_scores(self, wrapped, members, probs):
        # Energy of the clipped logits, averaged over members when there are several.
        return {"react_energy": -torch.logsumexp(members, dim=-1).mean(dim=0)}


@hookimpl
def wrapcal_register_plugins(register) -> None:
    register("react", ReAct)
