"""A sample third-party wrapcal plugin: vector scaling (Guo et al. 2017).

It shows the whole plugin-author surface: a class with parameters in ``__init__``,
learned tensors in buffers, a ``fit`` on cached features and a logit transform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wrapcal import Plugin, Stage, hookimpl


class VectorScaling(Plugin):
    """Per-class scale and bias on the logits, fitted by NLL on the calibration set."""

    stage = Stage.CALIBRATE

    def __init__(self, max_iter: int = 200) -> None:
        super().__init__()
        self.max_iter = max_iter
        self.register_buffer("scale_", torch.ones(0))
        self.register_buffer("bias_", torch.zeros(0))

    @hookimpl
    def wrapcal_attach(self, wrapped) -> None:
        k = wrapped.num_classes
        self.scale_ = torch.ones(k, device=wrapped.device)
        self.bias_ = torch.zeros(k, device=wrapped.device)

    @hookimpl
    def wrapcal_fit(self, wrapped, data) -> None:
        cal = data.require("calibration", "vector_scaling", "it fits on held-out labels")
        logits = wrapped.head_logits(cal.features).double()
        labels = cal.require_labels("vector_scaling")
        scale = torch.ones_like(logits[0]).requires_grad_()
        bias = torch.zeros_like(logits[0]).requires_grad_()
        opt = torch.optim.LBFGS(
            [scale, bias], max_iter=self.max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(logits * scale + bias, labels)
            loss.backward()
            return loss

        opt.step(closure)
        self.scale_ = scale.detach().to(self.scale_.dtype)
        self.bias_ = bias.detach().to(self.bias_.dtype)

    @hookimpl(wrapper=True)
    def wrapcal_transform_logits(self, wrapped, logits):
        out = yield
        return out * self.scale_.to(out.dtype) + self.bias_.to(out.dtype)


@hookimpl
def wrapcal_register_plugins(register) -> None:
    register("vector_scaling", VectorScaling)
