"""A sample third-party wrapcal package: vector scaling and a Mahalanobis OOD score.

It shows the plugin-author surface, as a third party writes it: classes with their
parameters in ``__init__`` (checked against declared constraints), tags that say what
they read and produce, learned tensors in buffers (one of them data-sized), ``fit`` on
cached features, a logit transform and a feature-space score.

Both keep the plugin contract: wrapcal's conformance kit passes on them
(``wrapcal.testing.check_plugin("sample_vector_scaling")`` and
``check_plugin("mahalanobis_sample")``, run by wrapcal's ``tests/sdk/test_conformance.py``),
the one line a plugin package adds to its own tests.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

# 0.2.0's import paths, kept on purpose: this package stands for those written against
# them, which keep working in this release (with a DeprecationWarning).
from wrapcal import OutputKind, Plugin, Stage, hookimpl
from wrapcal.params import Interval


class VectorScaling(Plugin):
    """Per-class scale and bias on the logits, fitted by NLL on the calibration set."""

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "max_iter": [Interval(int, 1, 10_000)]
    }

    def __init__(self, max_iter: int = 200) -> None:
        super().__init__()
        self.max_iter = max_iter
        self.register_buffer("scale_", torch.ones(0))
        self.register_buffer("bias_", torch.zeros(0))

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.CALIBRATE
        tags.fit_requires = {"calibration": "it fits on held-out labels"}
        return tags

    def attach(self, model) -> None:
        k = model.num_classes
        self.scale_ = torch.ones(k, device=model.device)
        self.bias_ = torch.zeros(k, device=model.device)

    def fit(self, model, data):
        cal = data.require("calibration", "sample_vector_scaling", "it fits on held-out labels")
        logits = model.head_logits(cal.features).double()  # the plugins before this one
        labels = cal.require_labels("sample_vector_scaling")
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
        return self

    def transform_logits(self, logits):
        return logits * self.scale_.to(logits.dtype) + self.bias_.to(logits.dtype)


class Mahalanobis(Plugin):
    """Mahalanobis distance to the nearest class mean (Lee et al. 2018), shared covariance."""

    def __init__(self) -> None:
        super().__init__()
        self.register_learned_buffer("means_", (None, "num_features"), (torch.float64,))
        self.register_learned_buffer(
            "precision_", ("num_features", "num_features"), (torch.float64,)
        )

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.fit_requires = {"train": "class means and covariance of in-distribution features"}
        tags.outputs = {"mahalanobis": OutputKind.OOD_SCORE}
        return tags

    def fit(self, model, data):
        train = data.require("train", "mahalanobis")
        labels = train.require_labels("mahalanobis")
        features = model.features(train.features).mean(0).double()  # [N, D]
        classes = max(model.num_classes, 2)
        counts = torch.bincount(labels, minlength=classes).clamp_min(1).to(features)
        sums = features.new_zeros(classes, features.shape[1])
        means = sums.index_add_(0, labels, features) / counts[:, None]
        centred = features - means[labels]
        covariance = centred.T @ centred / len(features)
        self.means_ = means
        # float32 features: eigenvalues below 1e-10 of the largest are rounding noise, and
        # inverting them makes the distances depend on the CPU's summation order.
        self.precision_ = torch.linalg.pinv(covariance, hermitian=True, rtol=1e-10)
        return self

    def outputs(self, context):
        features = context.features.mean(0).to(self.means_.dtype)  # [B, D]
        diff = features[:, None, :] - self.means_[None]  # [B, C, D]
        distance = torch.einsum("bcd,de,bce->bc", diff, self.precision_, diff)
        return {"mahalanobis": distance.min(dim=1).values.to(context.probs.dtype)}


@hookimpl
def wrapcal_register_plugins(register) -> None:
    register("sample_vector_scaling", VectorScaling)
    register("mahalanobis_sample", Mahalanobis)
