"""Residual off the principal subspace (Wang, Li, Zhang & Zhang, CVPR 2022): ``residual``.

The ViM paper ("ViM: Out-Of-Distribution with Virtual-logit Matching") scores, besides
ViM itself, the feature part of ViM alone, "Residual": the norm of the feature's
residual off the principal subspace of the training features, without the logit term
(higher = more OOD)::

    residual(f) = ||(f - u) R||

with the same origin ``u = -pinv(W) b`` (``W``, ``b``: the head's weights and bias) and
the same residual basis ``R`` as the ``vim`` plugin: the eigenvectors of ``1/N sum_i
(f_i - u)(f_i - u)^T`` beyond the top ``dim``, as the authors' code and OpenOOD's
``ResidualPostprocessor`` compute them. No ``alpha``: the scale does not change a
ranking.

* ``dim=None``: :func:`wrapcal_plugins.ood.vim.default_dim` of the feature width (the
  authors' 1000 / 512 for wide features, half the width below 768).
* Input: the model's features only (:attr:`~wrapcal.OutputContext.backbone_features`),
  no logits; the head (one ``nn.Linear``, as ``fit`` finds it) only places the origin.
* Statistics in float64, in chunks, summed over the ranks of a sharded set.
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
    compute_dtype,
    fit_set,
    residual_subspace,
)
from wrapcal_plugins.ood.vim import principal_dim

__all__ = ["Residual"]

_NAME = "residual"
_WHY = "the principal subspace of in-distribution features"
_F64 = (torch.float64,)


class Residual(Plugin):
    """Norm of the feature's residual off the training features' principal subspace.

    Args:
        dim: Dimension of the principal subspace, below the feature width; ``None``
            picks it from the width (:func:`~wrapcal_plugins.ood.vim.default_dim`).

    Attributes:
        origin_: ``[D]`` the origin ``u = -pinv(W) b`` (float64).
        residual_basis_: ``[D, D - dim]`` orthonormal basis of the residual space.
        dim_: The principal dimension used (resolved from ``dim`` at ``wrap``).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {"dim": [None, Interval(int, 1, None)]}

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.register_learned_buffer("origin_", ("num_features",), _F64)
        self.register_learned_buffer("residual_basis_", ("num_features", None), _F64)

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

    def fit(self, model: ModelView, data: FitData) -> Residual:
        """The origin from the head, the residual basis from the training set."""
        source = fit_set(data, _NAME, _WHY)
        self.origin_, self.residual_basis_ = residual_subspace(model, source, self.dim_, _NAME)
        return self

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``residual``: ``||(f - u) R||``."""
        features = context.backbone_features
        dtype = compute_dtype(features.dtype)
        residual = (features.to(dtype) - self.origin_.to(dtype)) @ self.residual_basis_.to(dtype)
        return {_NAME: residual.norm(dim=-1)}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, Residual)
