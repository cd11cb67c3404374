"""ODIN (Liang, Li & Srikant, ICLR 2018): the detector score ``odin``.

"Enhancing the reliability of out-of-distribution image detection in neural networks"
scales the logits by a temperature ``T`` and moves each input a small step ``eps``
against the gradient of its own log maximum softmax, which raises the softmax of
in-distribution inputs more than that of OOD ones; the score is the maximum softmax of
the moved input::

    x' = x - eps * sign(-grad_x log max_c softmax(f(x) / T)_c)
    odin(x) = 1 - max_c softmax(f(x') / T)_c          (higher = more OOD)

``f`` is the model's own network (backbone and head). The defaults are the paper's and
``pytorch_ood.detector.ODIN``'s: ``T = 1000``, ``eps = 0.0014``. wrapcal's score is
``1 - `` the paper's (as the core's ``msp`` is ``1 -`` the maximum softmax), so higher
means more OOD: ``pytorch_ood``'s score is ``-max softmax``, ours is ``1 +`` it.

What it reads, and what it costs:

* Input: the batch of inputs and the model's own network
  (:attr:`~wrapcal.OutputContext.inputs`, :attr:`~wrapcal.OutputContext.network`:
  backbone in eval mode, any ``FEATURES``-stage plugin, the head as the plugins that
  retrain it left it). Not the members of extra heads or dropout samples, not
  calibrated logits: ``odin`` scores the same alone and beside MC dropout, the
  discrepancy heads, the other detectors, calibrators and decisions. It changes
  nothing of the model: the perturbed inputs serve its score only.
* It needs the inputs themselves (``tags.needs_inputs``). Where the core works from
  cached features (``predict_features``, ``fit_features``, the operating points that
  ``fit`` measures, the ``fit`` of the plugins after it) there are no inputs and the
  ``odin`` score is absent from the prediction (every other output is there); on the
  inputs (``predict``, ``evaluate`` on data sets, which then runs the model on them) it
  is always there. Nothing to fit.
* Cost: one more forward pass with gradients, one backward pass to the inputs and one
  more forward pass per batch, beside the model's own forward pass
  (``benchmarks/bench_odin.py`` prints the ratio), and the memory of a training step at
  ``predict``'s ``batch_size``. The gradient is taken with ``torch.autograd.grad``: the
  model's parameters collect no gradients.
* ``eps`` is a step in the model's input space, as ``pytorch_ood`` takes it by default.
  The paper's step is in pixel space ([0, 1]) of normalised inputs: its code divides
  the gradient's sign by the normalisation's standard deviation per channel; pass that
  ``input_std`` to do the same (``pytorch_ood``'s ``norm_std``).
* Not exportable: a traced graph cannot differentiate with respect to its inputs.
* A single binary logit ``z`` counts as the two classes ``[sigmoid(-z), sigmoid(z)]``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from wrapcal.plugin import (
    Check,
    DataError,
    Interval,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    hookimpl,
    logits_to_log_probs,
    logits_to_probs,
)

__all__ = ["ODIN"]

_NAME = "odin"
_EXPORT_REFUSAL = (
    "differentiates the network with respect to its inputs at every call (ODIN's input "
    "perturbation), which a traced graph cannot hold; export the model without odin and "
    "score with it in PyTorch"
)


def _is_std(value: Any) -> bool:
    """A non-empty list of positive finite numbers (no bools)."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in value
        )
    )


class ODIN(Plugin):
    """One minus the temperature-scaled maximum softmax of the input moved by ODIN's step.

    A detector: it changes nothing of the model (see the module docstring).

    Args:
        temperature: ``T > 0`` that divides the logits (the paper: 1000).
        eps: ``eps >= 0``, the size of the step in input space (the paper: 0.0014);
            ``0`` gives the temperature-scaled maximum softmax of the inputs.
        input_std: ``None``, or the per-channel standard deviations of the inputs'
            normalisation: the step's sign is divided by them, so ``eps`` is a step in
            pixel space as in the paper's code (``pytorch_ood``'s ``norm_std``).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "temperature": [Interval(float, 0, None, closed="neither")],
        "eps": [Interval(float, 0, None, closed="left")],
        "input_std": [
            None,
            Check(_is_std, "a non-empty list of positive numbers, one per input channel"),
        ],
    }

    def __init__(
        self, temperature: float = 1000.0, eps: float = 0.0014, input_std: list[float] | None = None
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.eps = eps
        self.input_std = input_std

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        # A detector that runs the network on the inputs: it reads context.inputs and
        # context.network, which only a plugin that declares needs_inputs gets.
        tags.stage = Stage.DETECT
        tags.requires_fit = False
        tags.needs_inputs = True
        tags.exportable = False
        tags.export_refusal = _EXPORT_REFUSAL
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``odin``; absent when the core works from cached features (no inputs)."""
        inputs = context.inputs
        if inputs is None:
            return {}  # cached features: no inputs to perturb (module docstring)
        if not inputs.is_floating_point():
            raise DataError(
                f"odin perturbs the inputs along a gradient, so they must be floating point; "
                f"got {inputs.dtype}: convert them (x.float()) before predict"
            )
        perturbed = self.perturb(context.network, inputs)
        with torch.no_grad():
            logits = context.network(perturbed)
            probs = logits_to_probs(logits / self.temperature)
        return {_NAME: 1 - probs.amax(dim=-1)}

    def perturb(self, network: Any, inputs: torch.Tensor) -> torch.Tensor:
        """ODIN's inputs ``x - eps * sign(-grad_x log max softmax(network(x) / T))``
        (the sign divided by ``input_std`` per channel when it is given)."""
        std = self._channel_std(inputs)
        # predict may run under torch.inference_mode (serving code): a gradient needs a
        # normal tensor, and grad mode on.
        with torch.inference_mode(False), torch.enable_grad():
            x = inputs.detach().clone().requires_grad_(True)
            log_probs = logits_to_log_probs(network(x) / self.temperature)
            # Summed over the batch: each input's gradient is its own loss's.
            loss = -log_probs.amax(dim=-1).sum()
            # Only the input's gradient: the user's parameters collect none.
            (gradient,) = torch.autograd.grad(loss, x)
            direction = gradient.sign()
            if std is not None:
                direction = direction / std
            return x.detach() - self.eps * direction

    def _channel_std(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """``input_std`` shaped to divide the inputs' channels (axis 1), or ``None``."""
        if self.input_std is None:
            return None
        channels = len(self.input_std)
        if inputs.ndim < 2 or inputs.shape[1] != channels:
            raise DataError(
                f"odin's input_std has {channels} values (one per channel) but the inputs "
                f"have shape {list(inputs.shape)}: pass one standard deviation per channel of "
                "axis 1, or input_std=None for a step in the model's input space"
            )
        std = torch.tensor(self.input_std, dtype=inputs.dtype, device=inputs.device)
        return std.view(1, channels, *([1] * (inputs.ndim - 2)))


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, ODIN)
