"""Simplified Hopfield energy (Zhang et al., ICLR 2023): the detector score ``she``.

"Out-of-Distribution Detection based on In-Distribution Data Patterns Memorization with
Modern Hopfield Energy" stores one pattern per class, ``S_k``: the mean penultimate
feature of the training samples of class ``k`` that the model classifies correctly.
An input's in-distribution score is the inner product of its feature with the stored
pattern of its predicted class (the simplified Hopfield energy); the score ``she`` is
its negative (higher = more OOD)::

    S_k = mean { f(x') : y' = k and argmax z(x') = k },   (x', y') in the fit set
    she(x) = -f(x) . S_yhat,   yhat = argmax z(x)

It follows ``pytorch_ood.detector.SHE`` and OpenOOD's ``SHE`` postprocessor (the same
formula; equal on the same features, see the test), with these choices:

* Input: the model's features ``f`` (:attr:`~wrapcal.OutputContext.backbone_features`)
  and the head's own logits (:attr:`~wrapcal.OutputContext.base_logits`) for the
  predicted class; at ``fit``, the fit set's features and ``model.head`` of them. Not
  calibrated logits, not extra heads or dropout samples: so ``she`` scores the same
  alone and beside calibrators, samplers and the other detectors.
* The fit set: ``train=`` (the paper's), else ``calibration=``; it needs labels.
* Every class needs at least one correctly classified fit sample, as in
  ``pytorch_ood`` (OpenOOD would store a NaN pattern): otherwise ``fit`` raises a
  ``DataError`` naming the classes.
* The patterns are averaged in float64, chunk by chunk (memory: ``K x D`` sums), and
  summed over the ranks under ``torch.distributed``. Cost per input: ``D``
  multiply-adds beside the model's own logits.
* A single binary logit ``z`` counts as the two logits ``[0, z]``: the predicted class
  is 1 where ``z > 0``.
"""

from __future__ import annotations

from typing import Any

import torch

from wrapcal.plugin import (
    DataError,
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
    base_logits,
    compute_dtype,
    feature_chunks,
    fit_set,
)

__all__ = ["SHE", "predicted_class"]

_NAME = "she"
_WHY = "the mean feature of the correctly classified training samples of each class"
_F64 = (torch.float64,)


def predicted_class(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of ``[B, K]`` logits; one binary logit ``z`` predicts 1 where ``z > 0``
    (the argmax of ``[0, z]``)."""
    if logits.shape[-1] == 1:
        return (logits[..., 0] > 0).long()
    return logits.argmax(dim=-1)


class SHE(Plugin):
    """Negated inner product of the feature with its predicted class's stored pattern.

    A detector: it changes nothing of the model (see the module docstring).

    Attributes:
        patterns_: ``[K, D]`` float64: the mean feature of the correctly classified fit
            samples of each class (``K = 2`` for one binary logit).
    """

    def __init__(self) -> None:
        super().__init__()
        # (None, ...): one binary logit has two patterns.
        self.register_learned_buffer("patterns_", (None, "num_features"), _F64)

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.fit_reads = FIT_SETS
        tags.fits_from_shards = True  # the sums and counts are all-reduced over the ranks
        tags.exportable = True
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def fit(self, model: ModelView, data: FitData) -> SHE:
        """The patterns: mean features of the correctly classified rows, by class."""
        source = fit_set(data, _NAME, _WHY)
        source.require_labels(_NAME)
        classes = max(model.num_classes, 2)
        width = model.num_features
        sums = torch.zeros(classes, width, dtype=torch.float64, device=model.device)
        counts = torch.zeros(classes, dtype=torch.float64, device=model.device)
        for features, labels in feature_chunks(model, source):
            assert labels is not None  # require_labels above
            labels = labels.to(sums.device).long()
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
                raise DataError(
                    f"plugin {_NAME}: the {source.name!r} labels must be class indices in "
                    f"[0, {classes}); found {int(labels.min())}..{int(labels.max())}"
                )
            correct = predicted_class(base_logits(model, features)).to(sums.device) == labels
            sums.index_add_(0, labels[correct], features.to(sums.device, torch.float64)[correct])
            counts += torch.bincount(labels[correct], minlength=classes).to(counts.dtype)
        sums, counts = source.sum_over_shards(sums), source.sum_over_shards(counts)
        missing = torch.nonzero(counts == 0)[:, 0].tolist()
        if missing:
            shown = ", ".join(str(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DataError(
                f"plugin {_NAME}: no {source.name!r} sample is classified correctly in "
                f"class(es) {shown}, so there is no pattern to store for them; fit on data "
                "with correctly classified samples of every class (more data, or the "
                "training set)"
            )
        self.patterns_ = sums / counts[:, None]
        return self

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``she``: ``-f . S_yhat`` of the model's features and predicted class."""
        features = context.backbone_features
        dtype = compute_dtype(features.dtype)
        patterns = self.patterns_.to(dtype)[predicted_class(context.base_logits)]
        return {_NAME: -(features.to(dtype) * patterns).sum(dim=-1)}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, SHE)
