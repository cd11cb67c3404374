"""KL matching (Hendrycks et al., ICML 2022): the detector score ``kl_matching``.

"Scaling Out-of-Distribution Detection for Real-World Settings" keeps, for each class
``k``, a template posterior ``d_k``: the mean softmax output of the in-distribution
samples the model *predicts* as ``k`` (no labels needed). An input's score is the KL
divergence from its posterior to the closest template (higher = more OOD)::

    d_k = mean { softmax(z(x')) : argmax z(x') = k },   x' in the fit set
    kl_matching(x) = min_k KL(p(x) || d_k),   p(x) = softmax(z(x))

the minimum over the classes predicted for at least one fit sample (OpenOOD's ``KLM``
gives the others a one-hot template, which no softmax output comes close to: the same
minimum in practice).

It follows ``pytorch_ood.detector.KLMatching`` (equal on the same logits, see the
test), with these choices:

* Input: the head's own logits (:attr:`~wrapcal.OutputContext.base_logits`) at
  inference, and ``model.head`` of the fit set's features at ``fit``: the same logits.
  Not calibrated logits, not extra heads or dropout samples: so ``kl_matching`` scores
  the same alone and beside calibrators, samplers and the other detectors.
* The fit set: ``train=`` if given, else ``calibration=``, as every detector (the
  paper estimates the templates on held-out validation data, whose posteriors are less
  confident than the training set's: MNIST AUROC 0.777 from 2,000 held-out images
  against 0.764 from the training set on the shared ResNet-20). Train first keeps the
  calibration set out of every detector's fit, which the ``ood`` decision's conformal
  p-values need: a score fitted on the calibration set is smaller there than on new
  in-distribution inputs, and the false-alarm rate would exceed ``alpha``. To follow
  the paper, fit it alone on held-out data given as ``train=``. Labels are not read.
* The templates are averaged in float64, chunk by chunk (memory: ``K x K`` sums), and
  summed over the ranks under ``torch.distributed``. ``log d_k`` is floored at
  ``log(1e-300)`` where a template holds an exact 0 (every sample predicted as ``k``
  gave that class a probability that underflowed): the score stays finite (about 690
  times the input's probability of that class) where ``pytorch_ood`` puts
  ``float.min`` there, an infinite divergence.
* ``KL(p || d) = sum p log p - sum p log d``, with ``0 log 0 = 0`` and ``log p`` from
  ``log_softmax``: one ``[B, K] x [K, C]`` matmul per batch, ``B x C`` memory (no
  ``B x C x K`` tensor). Cost per input: ``C x K`` multiply-adds.
* A single binary logit ``z`` counts as the two logits ``[0, z]``.
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

__all__ = ["KLMatching", "kl_to_templates"]

_NAME = "kl_matching"
_WHY = "the mean posterior of the in-distribution samples predicted as each class"
_F64 = (torch.float64,)
#: Floor of a template's probabilities inside the log (keeps the score finite).
_FLOOR = 1e-300


def _two_logits(logits: torch.Tensor) -> torch.Tensor:
    """One binary logit ``z`` as ``[0, z]`` (the same softmax); others unchanged."""
    if logits.shape[-1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], dim=-1)
    return logits


def kl_to_templates(logits: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """``min_k KL(softmax(logits) || templates[k])`` per row.

    Args:
        logits: ``[B, K]`` (``K = 1``: one binary logit, read as ``[0, z]``).
        templates: ``[C, K']`` probability rows (``K' = 2`` for one binary logit).

    Returns:
        ``[B]`` the divergence to the closest template.
    """
    log_p = _two_logits(logits).log_softmax(dim=-1)
    p = log_p.exp()
    # 0 log 0 = 0: where p underflows to 0, log_p is finite anyway; where a logit is
    # -inf, log_p is -inf and p * log_p would be NaN.
    p_log_p = torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1, keepdim=True)
    log_d = templates.clamp_min(_FLOOR).log().to(p.dtype)
    return (p_log_p - p @ log_d.T).min(dim=-1).values


class KLMatching(Plugin):
    """KL divergence of the posterior to the closest class template (Hendrycks et al.).

    A detector: it changes nothing of the model (see the module docstring).

    Attributes:
        templates_: ``[C, K]`` float64: the mean posterior of the fit samples predicted
            as each of the ``C`` classes predicted at least once (in class order).
        template_classes_: ``[C]`` the class each template belongs to (int64).
    """

    def __init__(self) -> None:
        super().__init__()
        # (None, None): one binary logit has two-column templates.
        self.register_learned_buffer("templates_", (None, None), _F64)
        self.register_learned_buffer("template_classes_", (None,), (torch.int64,))

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.fit_reads = FIT_SETS
        tags.fits_from_shards = True  # the sums and counts are all-reduced over the ranks
        tags.exportable = True
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def fit(self, model: ModelView, data: FitData) -> KLMatching:
        """The templates: mean posteriors of the fit set's rows, by predicted class."""
        source = fit_set(data, _NAME, _WHY)
        width = max(model.num_classes, 2)
        sums = torch.zeros(width, width, dtype=torch.float64, device=model.device)
        counts = torch.zeros(width, dtype=torch.float64, device=model.device)
        for features, _ in feature_chunks(model, source):
            logits = _two_logits(base_logits(model, features).to(torch.float64))
            probs = logits.softmax(dim=-1).to(sums.device)
            predicted = probs.argmax(dim=-1)
            sums.index_add_(0, predicted, probs)
            counts += torch.bincount(predicted, minlength=width).to(counts.dtype)
        sums, counts = source.sum_over_shards(sums), source.sum_over_shards(counts)
        present = counts > 0
        if not bool(present.any()):
            raise DataError(f"plugin {_NAME}: the {source.name!r} set has no rows to fit on")
        self.templates_ = sums[present] / counts[present, None]
        self.template_classes_ = torch.nonzero(present)[:, 0]
        return self

    def validate_state(self) -> None:
        """Templates are probability rows: finite, in ``[0, 1]``, one per class."""
        super().validate_state()
        templates = self.templates_
        if templates.numel() and (templates.min() < 0 or templates.max() > 1):
            raise ValueError("learned tensor templates_ holds values outside [0, 1]")
        if templates.shape[0] != self.template_classes_.shape[0]:
            raise ValueError("learned tensors templates_ and template_classes_ differ in length")

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``kl_matching``: the KL divergence to the closest template."""
        logits = context.base_logits
        return {_NAME: kl_to_templates(logits.to(compute_dtype(logits.dtype)), self.templates_)}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, KLMatching)
