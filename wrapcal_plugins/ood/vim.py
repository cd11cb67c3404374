"""Virtual-logit matching (Wang, Li, Zhang & Zhang, CVPR 2022): score ``vim``.

"ViM: Out-Of-Distribution with Virtual-logit Matching" moves the origin of the feature
space to ``u = -pinv(W) b`` (``W``, ``b``: the head's weights and bias, so that the
logits are ``W (f - u)``), finds the principal subspace ``P`` of the training features
about ``u`` (the top ``D`` eigenvectors of ``1/N sum_i (f_i - u)(f_i - u)^T``) and
scores the norm of the residual ``(f - u)^{P perp}``, which in-distribution features
barely have. Scaled by ``alpha`` to the size of the logits, it is a virtual logit beside
the real ones; the paper's confidence is ``-alpha ||x^{P perp}|| + logsumexp(logits)``,
and the score ``vim`` here is its negative (higher = more OOD)::

    vim(f) = alpha * ||(f - u) R|| - logsumexp(logits(f))

with ``R`` the orthonormal basis of the residual space and ``alpha = mean_i max_k
logit_ik / mean_i ||(f_i - u) R||`` over the training set, as in the paper and the
authors' code (haoqiwang/vim ``benchmark.py``).

What it reads (so it scores the same alone and beside any plugin that does not change
these):

* the model's features ``f`` (:attr:`~wrapcal.OutputContext.backbone_features`: the
  backbone's output through any ``FEATURES``-stage plugin, one deterministic row per
  input), and
* the head's own logits (:attr:`~wrapcal.OutputContext.base_logits`: the model's head,
  as the plugins that retrain it left it, applied to ``f``).

Not the members of extra heads or dropout samples, not their average, not calibrated
logits: beside MC dropout, which averages ``T`` dropped-out heads, the logits term would
otherwise be an average of probabilities read as if it were logits (ViM's Gaussian-noise
AUROC on the shared ResNet-20 fell from 1.000 to 0.003 that way). ``fit`` reads the
same two: the ``fit`` data's features and ``model.head`` of them.

Choices:

* ``dim=None`` (the principal dimension ``D``): 1000 for features of width >= 2048 and
  512 for width >= 768, the authors' values (BiT/ResNet-50, ViT), and half the width
  below that (the rule of later re-implementations; OpenOOD uses 256 for its 512-d
  CIFAR ResNet-18, and the issue's 64-d ResNet-20 used 32).
* The head: ``model.head`` as ``fit`` finds it, i.e. after the plugins before this one
  retrained it (label smoothing, the discrepancy heads' head 1, MC dropout's
  fine-tuning). It must be one ``nn.Linear``. A single binary logit ``z`` counts as the
  two logits ``[0, z]``.
* Statistics in float64, in chunks (one pass for the second moment, one for
  ``alpha``); the residual basis is a float64 buffer, used in float32 at inference.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

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
from wrapcal_plugins.ood._feature_stats import (
    FIT_SETS,
    base_logits,
    compute_dtype,
    energy,
    feature_chunks,
    fit_set,
    linear_head,
    max_logit,
    residual_subspace,
)

__all__ = ["ViM", "default_dim", "principal_dim"]

_NAME = "vim"
_WHY = "the principal subspace of in-distribution features"
_F64 = (torch.float64,)


def default_dim(width: int) -> int:
    """The principal dimension for features of this width (see the module docstring)."""
    if width >= 2048:
        return 1000
    if width >= 768:
        return 512
    return max(1, width // 2)


def principal_dim(model: ModelView, dim: int | None, plugin: str) -> int:
    """``dim`` (or :func:`default_dim` of the feature width) checked against the width,
    at ``attach``; the head must be one ``nn.Linear`` (it places the origin)."""
    width = model.num_features
    resolved = default_dim(width) if dim is None else int(dim)
    if resolved >= width:
        raise ValueError(
            f"plugin {plugin}: dim={resolved} leaves no residual space: the features have "
            f"{width} dimensions; use dim < {width} (None picks {default_dim(width)})"
        )
    linear_head(model.head, plugin)
    return resolved


class ViM(Plugin):
    """Residual norm off the principal subspace minus the energy; score ``vim``.

    Args:
        dim: Dimension ``D`` of the principal subspace, below the feature width;
            ``None`` picks it from the width (:func:`default_dim`).

    Attributes:
        origin_: ``[D]`` the origin ``u = -pinv(W) b`` (float64).
        residual_basis_: ``[D, D - dim]`` orthonormal basis of the residual space.
        alpha_: The scale of the virtual logit (a float64 scalar buffer).
        dim_: The principal dimension used (resolved from ``dim`` at ``wrap``).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {"dim": [None, Interval(int, 1, None)]}

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.register_learned_buffer("origin_", ("num_features",), _F64)
        self.register_learned_buffer("residual_basis_", ("num_features", None), _F64)
        self.register_buffer("alpha_", torch.zeros((), dtype=torch.float64))

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.fit_reads = FIT_SETS
        tags.fits_from_shards = True  # the sums are all-reduced over the ranks
        tags.exportable = True
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def attach(self, model: ModelView) -> None:
        """Resolve ``dim`` from the feature width; check the head is linear."""
        self.dim_ = principal_dim(model, self.dim, _NAME)

    def fit(self, model: ModelView, data: FitData) -> ViM:
        """The origin from the head, the subspace and ``alpha`` from the training set."""
        source = fit_set(data, _NAME, _WHY)
        origin, basis = residual_subspace(model, source, self.dim_, _NAME)
        logit_sum = residual_sum = 0.0
        for features, _ in feature_chunks(model, source):
            shifted = features.to(torch.float64) - origin
            residual_sum += float((shifted @ basis).norm(dim=-1).sum())
            logit_sum += float(max_logit(base_logits(model, features)).double().sum())
        sums = torch.tensor([logit_sum, residual_sum], dtype=torch.float64)
        logit_sum, residual_sum = (float(v) for v in source.sum_over_shards(sums))
        if residual_sum <= 0:
            raise DataError(
                f"plugin {_NAME}: the {source.name!r} features have no residual off their "
                f"{self.dim_}-dimensional principal subspace ({source.total} rows); give more "
                "data or a smaller dim"
            )
        self.origin_ = origin
        self.residual_basis_ = basis
        # On the model's device, beside the other buffers (as react's clip_).
        self.alpha_ = torch.tensor(
            logit_sum / residual_sum, dtype=torch.float64, device=model.device
        )
        return self

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``vim``: ``alpha ||(f - u) R|| - logsumexp(base logits)``."""
        features = context.backbone_features
        dtype = compute_dtype(features.dtype)
        residual = (features.to(dtype) - self.origin_.to(dtype)) @ self.residual_basis_.to(dtype)
        virtual = self.alpha_.to(dtype) * residual.norm(dim=-1)
        return {_NAME: virtual + energy(context.base_logits.to(dtype))}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, ViM)
