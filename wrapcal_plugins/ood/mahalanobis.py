"""Mahalanobis distance to the class means (Lee et al. 2018), or relative (Ren et al. 2021).

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks" (NeurIPS 2018) fits one Gaussian per class on the
penultimate features, with class means ``mu_c`` and one covariance shared by the
classes, ``Sigma = 1/N sum_c sum_{i in c} (f_i - mu_c)(f_i - mu_c)^T``; the confidence is
``max_c -(f - mu_c)^T Sigma^-1 (f - mu_c)``. The score ``mahalanobis`` here is its
negative, the squared distance to the nearest class mean (higher = more OOD):

    ``d(f) = min_c (f - mu_c)^T Sigma^+ (f - mu_c)``

Ren et al., "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection"
(2021), subtract the distance under one background Gaussian fitted to all the features
(mean ``mu_0``, covariance ``Sigma_0``): with ``relative=True`` the score is

    ``min_c [d_c(f) - d_0(f)]  =  min_c d_c(f) - d_0(f)``.

These are the conventions of OpenOOD's ``mds`` / ``rmds`` postprocessors (MLE
covariances, divided by ``N``; pseudo-inverse precision as scikit-learn's
``EmpiricalCovariance``), with the sign flipped to "higher = more OOD". Lee et al.'s input
perturbation and multi-layer ensemble are not included: they need gradients through the
backbone, and the comparison papers (Ren et al., OpenOOD) leave them out too.

What it reads: the model's features ``f`` (:attr:`~wrapcal.OutputContext.backbone_features`:
the backbone's output through any ``FEATURES``-stage plugin, one deterministic row per
input), at inference as at ``fit`` (the ``fit`` data's features); no logits, no
sampler's samples. So it scores the same alone and beside any plugin but one that
changes the model's features or backbone.

How it is computed:

* ``fit`` reads ``train`` (else ``calibration``) in chunks: per-class sums and one
  ``D x D`` sum of outer products, in float64, shifted by the first chunk's mean so
  that the covariance, a difference of sums, keeps its digits. Memory: the chunk plus
  ``(C + D) x D`` float64, never an ``N x D`` float64 copy (the out-of-memory failure
  pytorch-ood's users report).
* The pseudo-inverse comes from a float64 eigendecomposition as a whitening ``W``
  (``W W^T = Sigma^+``, eigenvalues below ``D eps max`` dropped). Inference then
  computes ``||(f - m) W - (mu_c - m) W||^2`` for all classes with one matmul (``m``:
  the global mean, so the expansion does not cancel digits), in float32 (float64 for a
  float64 model).
* Classes with no training rows have no mean and are left out of the minimum.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from wrapcal.plugin import (
    FitData,
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
    Moments,
    compute_dtype,
    feature_chunks,
    fit_set,
    pinv_factor,
)

__all__ = ["Mahalanobis", "squared_distances"]

_NAME = "mahalanobis"
_WHY = "class means and covariance of labelled in-distribution features"
_F64 = (torch.float64,)


def squared_distances(whitened: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``||w_b - c_j||^2`` for rows ``[B, r]`` and centres ``[C, r]`` -> ``[B, C]``."""
    cross = whitened @ centres.T
    own = (whitened * whitened).sum(dim=-1, keepdim=True)
    return (own - 2 * cross + (centres * centres).sum(dim=-1)).clamp_min(0)


class Mahalanobis(Plugin):
    """Squared Mahalanobis distance to the nearest class mean; score ``mahalanobis``.

    Args:
        relative: Subtract the distance to the background Gaussian of all training
            features (Ren et al. 2021's relative Mahalanobis distance).

    Attributes:
        center_: ``[D]`` mean of the training features (float64).
        whitening_: ``[D, r]`` with ``W W^T`` the pseudo-inverse of the shared
            covariance.
        means_: ``[C, r]`` the class means, whitened: ``(mu_c - center_) W``.
        background_whitening_: ``[D, r0]`` the same for the covariance of all features
            (``relative=True``; empty otherwise).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {"relative": [bool]}

    def __init__(self, relative: bool = False) -> None:
        super().__init__()
        self.relative = relative
        self.register_learned_buffer("center_", ("num_features",), _F64)
        self.register_learned_buffer("whitening_", ("num_features", None), _F64)
        self.register_learned_buffer("means_", (None, None), _F64)
        self.register_learned_buffer("background_whitening_", ("num_features", None), _F64)

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.fit_reads = FIT_SETS
        tags.fits_from_shards = True  # the sums are all-reduced over the ranks
        tags.exportable = True
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def fit(self, model: ModelView, data: FitData) -> Mahalanobis:
        """Class means and the shared (and background) covariance, in one chunked pass."""
        source = fit_set(data, _NAME, _WHY)
        source.require_labels(_NAME)
        moments = Moments(classes=max(model.num_classes, 2))
        for features, labels in feature_chunks(model, source):
            moments.update(features, labels)
        moments.combine_shards(source, model.num_features, model.device)
        means, _ = moments.class_means()
        center = moments.mean()
        whitening = pinv_factor(moments.within_class_covariance())
        self.center_ = center
        self.whitening_ = whitening
        self.means_ = (means - center) @ whitening
        width = center.shape[0]
        self.background_whitening_ = (
            pinv_factor(moments.covariance()) if self.relative else center.new_zeros(width, 0)
        )
        return self

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``mahalanobis``: ``min_c d_c``, minus ``d_0`` with ``relative=True``."""
        features = context.backbone_features
        dtype = compute_dtype(features.dtype)
        centred = features.to(dtype) - self.center_.to(dtype)
        whitened = centred @ self.whitening_.to(dtype)
        score = squared_distances(whitened, self.means_.to(dtype)).amin(dim=-1)
        if self.relative:
            background = centred @ self.background_whitening_.to(dtype)
            score = score - (background * background).sum(dim=-1)
        return {_NAME: score}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, Mahalanobis)
