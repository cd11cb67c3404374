"""Directed sparsification (Sun & Li, ECCV 2022): the detector score ``dice``.

"DICE: Leveraging Sparsification for Out-of-Distribution Detection" keeps, of the
head's weights ``W`` (``[K, D]``), only those that contribute most to the logits of
in-distribution inputs. The contribution of weight ``w_kj`` is ``V_kj = w_kj *
mean_i f_ij``, its expected share of logit ``k`` over the training features; every
weight whose contribution is at most the ``p``-th percentile of all ``K x D`` of them
is set to zero. The score is the energy of the sparsified head's logits (higher = more
OOD)::

    dice(f) = -logsumexp((M * W) f + b),   M_kj = [V_kj > percentile_p(V)]

Choices:

* ``p = 90`` (``sparsity``, in percent): the paper's value for CIFAR-10 and CIFAR-100
  (it uses 70 on ImageNet) and OpenOOD's default. The percentile is numpy's (linear
  interpolation), computed exactly; the comparison is strict, as in the authors' code.
* Input: the model's features (:attr:`~wrapcal.OutputContext.backbone_features`: the
  backbone's output through any ``FEATURES``-stage plugin, one deterministic row per
  input). The head is the model's own as ``fit`` finds it (after the plugins that
  retrain it), which must be one ``nn.Linear``: its masked weights and bias are copied
  at ``fit``. It sparsifies for its own score only: the model's logits and every other
  plugin are as without it.
* The mean comes from ``train`` (else ``calibration``), in float64 chunks (bounded
  memory, summed over the ranks under ``torch.distributed``).
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
    feature_mean,
    linear_head,
)

__all__ = ["DICE"]

_NAME = "dice"
_WHY = "the weights' contributions are weighted by the mean in-distribution feature"
_F64 = (torch.float64,)


class DICE(Plugin):
    """Energy of the logits of the head with its least-contributing weights zeroed.

    A detector: it changes nothing of the model (see the module docstring).

    Args:
        sparsity: ``p`` in ``[0, 100)``: the share of the head's weights (those of
            smallest contribution) set to zero, in percent (the paper: 90 on CIFAR).

    Attributes:
        weight_: ``[K, D]`` the sparsified weights (float64).
        bias_: ``[K]`` the head's bias (zeros without one; float64).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "sparsity": [Interval(float, 0, 100, closed="left")]
    }

    def __init__(self, sparsity: float = 90.0) -> None:
        super().__init__()
        self.sparsity = sparsity
        self.register_learned_buffer("weight_", (None, "num_features"), _F64)
        self.register_learned_buffer("bias_", (None,), _F64)

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.fit_reads = FIT_SETS
        tags.fits_from_shards = True  # the feature sum is all-reduced over the ranks
        tags.exportable = True
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def attach(self, model: ModelView) -> None:
        """Check the head is one linear layer (its weights are what DICE masks)."""
        linear_head(model.head, _NAME)

    def fit(self, model: ModelView, data: FitData) -> DICE:
        """Mask the head's weights by their contribution to the mean training feature."""
        mean = feature_mean(model, data, _NAME, _WHY)
        head = linear_head(model.head, _NAME)
        weight = head.weight.detach().to(device=mean.device, dtype=torch.float64)
        contribution = weight * mean  # [K, D]: w_kj * mean_j
        threshold = chunked_quantile(lambda: [contribution.reshape(-1)], float(self.sparsity) / 100)
        bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        if head.bias is not None:
            bias = head.bias.detach().to(device=weight.device, dtype=torch.float64)
        self.weight_ = torch.where(contribution > threshold, weight, torch.zeros_like(weight))
        self.bias_ = bias
        return self

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``dice``: the energy of the sparsified head's logits of the model features."""
        features = context.backbone_features
        dtype = compute_dtype(features.dtype)
        logits = features.to(dtype) @ self.weight_.to(dtype).T + self.bias_.to(dtype)
        return {_NAME: energy(logits)}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, DICE)
