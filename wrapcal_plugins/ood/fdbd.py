"""Fast decision-boundary distance (Liu & Qin, ICML 2024): the detector score ``fdbd``.

"Fast Decision Boundary based Out-of-Distribution Detector" measures, in the
penultimate feature space, how far an input's feature ``f`` lies from the decision
boundaries between its predicted class ``c`` and every other class ``j``: for a linear
head the distance to boundary ``(c, j)`` has the closed form ``|l_c - l_j| / ||w_c -
w_j||``. In-distribution inputs lie further from the boundaries than OOD inputs at the
same distance from the training mean ``mu``, so the mean distance is divided by
``||f - mu||``. The score is its negative (higher = more OOD)::

    fdbd(f) = -1 / (K - 1) * sum_{j != c} |l_c(f) - l_j(f)| / ||w_c - w_j||  /  ||f - mu||

as the authors' code (litianliu/fDBD-OOD), OpenOOD's ``fDBDPostprocessor`` and
pytorch-ood's ``fDBD`` compute it (OpenOOD omits the constant ``1 / (K - 1)``, which
ranks inputs identically). No hyperparameter; ``normaliser="norm"`` divides by
``||f||`` instead, the variant OpenOOD may select on validation data.

What it reads, and what it learns:

* The model's features (:attr:`~wrapcal.OutputContext.backbone_features`) and the
  head's own logits of them (:attr:`~wrapcal.OutputContext.base_logits`). Not sampled
  features, extra heads or calibrated logits.
* At ``fit``: ``mu``, the mean of the ``train`` (else ``calibration``) features
  (float64, in chunks), and the ``K x K`` matrix of ``||w_c - w_j||`` of the model's
  head as ``fit`` finds it (one ``nn.Linear``; its diagonal is 1, as in the authors'
  code, and never read since ``l_c - l_c = 0``). A head whose two classes have the same
  weights has no boundary between them: refused.
* A single binary logit ``z`` counts as the two logits ``[0, z]`` (weights ``[0, w]``):
  the score is then ``-|z| / ||w|| / ||f - mu||``.
* The distance ``||f - mu||`` is floored at ``1e-12`` (an input at the mean).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from wrapcal.plugin import (
    DataError,
    FitData,
    ModelView,
    Options,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    hookimpl,
)
from wrapcal_plugins.ood._feature_stats import FIT_SETS, compute_dtype, feature_mean, linear_head

__all__ = ["FDBD", "boundary_norms"]

_NAME = "fdbd"
_WHY = "the distances are normalised by the distance to the mean in-distribution feature"
_F64 = (torch.float64,)
NORMALISERS = ("mean_distance", "norm")


def boundary_norms(weight: torch.Tensor) -> torch.Tensor:
    """``[K, K]`` the norms ``||w_c - w_j||`` of the rows of ``weight`` (diagonal 1),
    computed difference by difference (not from a Gram matrix, which cancels digits)."""
    norms = torch.cdist(weight, weight, compute_mode="donot_use_mm_for_euclid_dist")
    return norms.fill_diagonal_(1.0)


class FDBD(Plugin):
    """Minus the mean distance to the decision boundaries over the distance to the mean.

    A detector: it changes nothing of the model (see the module docstring).

    Args:
        normaliser: ``"mean_distance"`` (``||f - mu||``, the paper) or ``"norm"``
            (``||f||``).

    Attributes:
        mean_: ``[D]`` the mean training feature ``mu`` (float64).
        norms_: ``[K, K]`` the norms ``||w_c - w_j||`` of the head (float64).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "normaliser": [Options(str, NORMALISERS)]
    }

    def __init__(self, normaliser: str = "mean_distance") -> None:
        super().__init__()
        self.normaliser = normaliser
        self.register_learned_buffer("mean_", ("num_features",), _F64)
        self.register_learned_buffer("norms_", (None, None), _F64)

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.fit_reads = FIT_SETS
        tags.fits_from_shards = True  # the feature sum is all-reduced over the ranks
        tags.exportable = True
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def attach(self, model: ModelView) -> None:
        """Check the head is one linear layer (the boundaries' closed form needs it)."""
        linear_head(model.head, _NAME)

    def fit(self, model: ModelView, data: FitData) -> FDBD:
        """The training mean and the head's pairwise weight-difference norms."""
        mean = feature_mean(model, data, _NAME, _WHY)
        head = linear_head(model.head, _NAME)
        weight = head.weight.detach().to(device=mean.device, dtype=torch.float64)
        if weight.shape[0] == 1:  # [0, z]: the weights [0, w]
            weight = torch.cat([torch.zeros_like(weight), weight])
        norms = boundary_norms(weight)
        if bool((norms == 0).any()):
            pairs = (norms == 0).nonzero().tolist()
            raise DataError(
                f"plugin {_NAME}: the head's classes {pairs[0]} have identical weights, so no "
                "decision boundary between them; fdbd needs a head whose classes differ"
            )
        self.mean_ = mean
        self.norms_ = norms
        return self

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``fdbd``: minus the mean boundary distance over ``||f - mu||``."""
        features = context.backbone_features
        dtype = compute_dtype(features.dtype)
        logits = context.base_logits.to(dtype)
        if logits.shape[-1] == 1:
            logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
        top, predicted = logits.max(dim=-1)
        gaps = (top[:, None] - logits).abs()  # 0 at the predicted class
        distances = (gaps / self.norms_.to(dtype)[predicted]).sum(dim=-1) / (logits.shape[-1] - 1)
        f = features.to(dtype)
        if self.normaliser == "mean_distance":
            f = f - self.mean_.to(dtype)
        return {_NAME: -distances / f.norm(dim=-1).clamp_min(1e-12)}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, FDBD)
