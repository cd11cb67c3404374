"""Gradient norms (Huang, Geng & Li, NeurIPS 2021): the detector score ``gradnorm``.

"On the Importance of Gradients for Detecting Distributional Shifts in the Wild" scores
an input by the L1 norm of the gradient, with respect to the last layer's weights ``W``,
of the KL divergence from the uniform distribution ``u`` to the softmax at temperature
``T``::

    S(x) = || d KL(u || softmax(z / T)) / dW ||_1,    z = W f + b

In-distribution inputs get peaked softmax outputs, far from uniform, and large
gradients; OOD inputs get flat ones and small gradients. ``S`` is higher for
in-distribution inputs, so the wrapcal score is its negative (higher = more OOD)::

    gradnorm(x) = -S(x)

A gradient method, computed in closed form. The paper backpropagates one input at a
time; for a linear last layer the gradient has a closed form. With
``KL(u || p) = -1/K sum_c log p_c - log K`` and ``p = softmax(z / T)``,
``dKL/dz_j = (p_j - 1/K) / T``, and ``dz_j / dW_jd = f_d``, so the gradient is the outer
product ``(p - u) f^T / T`` and its L1 norm factorises::

    S(x) = (1/T) * sum_j |p_j - 1/K| * sum_d |f_d| = ||p - u||_1 ||f||_1 / T

exactly (the test checks it against autograd and against ``pytorch_ood.detector.
GradNorm`` restricted to the head's weight). Its cost is that of the softmax of the
logits and one L1 norm of the features: ``O(K + D)`` per input beside the model's own
forward pass, with no backward pass and no ``K x D`` per-input gradient. The authors'
code runs one backward pass per input (batch size 1, through the whole network);
``pytorch_ood`` materialises the per-input gradients with ``torch.func.vmap``.

What it reads, and the choices it makes:

* Input: the model's features ``f`` (:attr:`~wrapcal.OutputContext.backbone_features`,
  the input of the last layer) and the head's own logits
  (:attr:`~wrapcal.OutputContext.base_logits`). Not the members of extra heads or
  dropout samples, not calibrated logits: so ``gradnorm`` scores the same alone and
  beside calibrators, samplers and the other detectors. Nothing is learned: no ``fit``.
* The head must be one ``nn.Linear`` (the "last layer" whose input is ``f``); it is
  checked at ``wrap``. The gradient of the weights only, not of the bias (as the paper
  and the authors' code, which read ``head.weight.grad``).
* The KL divergence, as the paper writes it, so ``T`` is the paper's temperature
  (default 1, the paper's choice). The authors' code sums the cross-entropy over the
  classes with all-ones targets instead of the KL's ``1/K`` weights, which multiplies
  every score by ``K`` (the ranking is the same); ``pytorch_ood``'s ``GradNorm`` takes
  the mean, as the paper, and equals ``gradnorm`` exactly.
* A single binary logit ``z`` counts as the two logits ``[0, z]`` for the softmax, and
  the gradient is that of the one row of weights the head has:
  ``|sigmoid(z / T) - 1/2| ||f||_1 / T``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from wrapcal.plugin import (
    Interval,
    ModelView,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    hookimpl,
)
from wrapcal_plugins.ood._feature_stats import compute_dtype, linear_head

__all__ = ["GradNorm", "gradnorm_score"]

_NAME = "gradnorm"


def gradnorm_score(
    features: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``-||dKL(u || softmax(z / T)) / dW||_1`` of a linear head, in closed form.

    Args:
        features: ``[B, D]`` the head's inputs ``f``.
        logits: ``[B, K]`` the head's logits ``z = W f + b`` (``K = 1``: one binary logit).
        temperature: ``T > 0``.

    Returns:
        ``[B]`` the negated L1 norm of the gradient with respect to ``W``.
    """
    scaled = logits / temperature
    if logits.shape[-1] == 1:
        # One row of weights: dKL/dz = (sigmoid(z / T) - 1/2) / T.
        distance = (torch.sigmoid(scaled[..., 0]) - 0.5).abs()
    else:
        distance = (scaled.softmax(dim=-1) - 1.0 / logits.shape[-1]).abs().sum(dim=-1)
    return -(distance * features.abs().sum(dim=-1)) / temperature


class GradNorm(Plugin):
    """The negated L1 norm of the KL-to-uniform gradient of the head's weights.

    A detector: it changes nothing of the model and learns nothing (see the module
    docstring).

    Args:
        temperature: ``T > 0`` of the softmax (the paper: 1).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "temperature": [Interval(float, 0, None, closed="neither")]
    }

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.requires_fit = False  # a closed form of the features and logits
        tags.exportable = True
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def attach(self, model: ModelView) -> None:
        """Check that the head is one linear layer, whose input is the features."""
        try:
            linear_head(model.head, _NAME)
        except ValueError:
            raise ValueError(
                f"{_NAME} needs the model's head to be one nn.Linear (logits = W f + b): "
                "its score is the gradient of the last layer's weights, computed in "
                f"closed form from the features f. This model's head is "
                f"{type(model.head).__name__}. Split the model at its last linear layer "
                "(wrapcal.wrap(model, head='name.of.last.linear')) or use the gen or "
                "energy score, which read the logits only"
            ) from None

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``gradnorm``: ``-||p - u||_1 ||f||_1 / T`` of the model's features and logits."""
        features, logits = context.backbone_features, context.base_logits
        dtype = compute_dtype(torch.promote_types(features.dtype, logits.dtype))
        score = gradnorm_score(features.to(dtype), logits.to(dtype), float(self.temperature))
        return {_NAME: score}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, GradNorm)
