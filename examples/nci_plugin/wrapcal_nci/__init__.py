"""The neural-collapse OOD score NCI, as a third-party wrapcal plugin.

Liu & Qin, "Detecting Out-of-Distribution Through the Lens of Neural Collapse"
(CVPR 2025). After training to neural collapse, the penultimate features of a class,
centred on the global mean ``mu`` of the training features, point along that class's
weight vector ``w_c``; OOD features do not. With ``c`` the predicted class and
``z = f - mu``, the score is (higher = more OOD, the negated NCI)::

    nci(f) = -(z . w_c) / ||z|| - alpha * ||f||_1

The second term, off by default (``alpha = 0``), penalises features close to the
origin. This follows pytorch-ood's ``NCI``: the authors' ``||w_c||`` in the
denominator is left out.

It reads what every wrapcal detector reads: the model's features
(``OutputContext.backbone_features``) and its own head's logits of them
(``OutputContext.base_logits``), so it scores the same beside any plugin that leaves
those alone. It learns ``mu`` from ``wrapped.fit(train=...)`` (else ``calibration=``)
and copies the head's weights, which must be one ``nn.Linear``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from wrapcal.plugin import (
    DataError,
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

__version__ = "0.1.0"

_NAME = "nci"
_SETS = ("train", "calibration")
_F64 = (torch.float64,)


def _linear(head: nn.Module) -> nn.Linear:
    """The head's one linear layer (the head itself, or the only one inside it)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise ValueError(
            f"{_NAME} needs a head with one nn.Linear (its class vectors w_c); this head "
            f"has {len(linears)}: split the model at its last linear layer "
            "(wrapcal.wrap(model, head='name.of.last.linear'))"
        )
    return linears[0]


class NCI(Plugin):
    """Alignment of the centred feature with its predicted class's weights; adds ``nci``.

    Args:
        alpha: Weight of the L1 feature-norm term (0: off, pytorch-ood's default).

    Attributes:
        mean_: ``[D]`` the mean training feature ``mu`` (float64).
        weight_: ``[K, D]`` the head's class vectors (float64).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "alpha": [Interval(float, 0, None, closed="left")]
    }

    def __init__(self, alpha: float = 0.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.register_learned_buffer("mean_", ("num_features",), _F64)
        self.register_learned_buffer("weight_", (None, "num_features"), _F64)

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT  # it scores; the model's features and logits stay as they are
        tags.fit_reads = _SETS
        tags.exportable = True  # argmax, a gather, a dot product: plain tensor operations
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def attach(self, model: ModelView) -> None:
        """Refuse, at ``wrap``, a head without exactly one linear layer."""
        _linear(model.head)

    def fit(self, model: ModelView, data: FitData) -> NCI:
        """The global mean of the training features, chunk by chunk; the head's weights."""
        source = data.first(_SETS, _NAME, "the features are centred on their global mean")
        total = torch.zeros(model.num_features, dtype=torch.float64, device=model.device)
        for features, _ in source.batches():
            total += features.to(device=total.device, dtype=torch.float64).sum(dim=0)
        if not bool(torch.isfinite(total).all()):
            raise DataError(f"plugin {_NAME}: the {source.name!r} features hold NaN or inf")
        self.mean_ = total / len(source)
        self.weight_ = _linear(model.head).weight.detach().to(total.device, torch.float64)
        return self

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``nci``: minus the alignment, minus ``alpha`` times the L1 norm."""
        features = context.backbone_features
        dtype = torch.promote_types(features.dtype, torch.float32)
        logits, weight = context.base_logits, self.weight_.to(dtype)
        if logits.shape[-1] == 1:  # one binary logit z counts as [0, z], weights [0, w]
            logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
            weight = torch.cat([torch.zeros_like(weight), weight])
        centred = features.to(dtype) - self.mean_.to(dtype)
        aligned = (centred * weight[logits.argmax(dim=-1)]).sum(dim=-1)
        score = -aligned / centred.norm(dim=-1).clamp_min(1e-12)
        if self.alpha > 0:
            score = score - float(self.alpha) * features.to(dtype).abs().sum(dim=-1)
        return {_NAME: score}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, NCI)
