"""Calibration and OOD metrics: functional forms (Python floats out) and torchmetrics-style
classes (``update`` / ``compute`` / ``reset``) whose state sums across processes.

Conventions: ECE is top-label, L1, 15 equal-width bins on (0, 1], weighted by bin mass
(Guo et al. 2017). OOD scores are "higher = more OOD" and in-distribution is the positive
class; FPR@95TPR is the share of OOD samples accepted when 95% of ID samples are accepted.
"""

from wrapcal.metrics.bootstrap import (
    auroc_bootstrap,
    auroc_resampled,
    ece_bootstrap,
    ece_resampled,
)
from wrapcal.metrics.calibration import (
    ECE,
    CalibrationMetrics,
    accuracy,
    adaptive_ece,
    aurc,
    brier,
    classwise_ece,
    ece,
    mce,
    nll,
    reliability_bins,
)
from wrapcal.metrics.inputs import check_probs, softmax_probs
from wrapcal.metrics.ood import (
    OODMetrics,
    acceptance_rank,
    acceptance_threshold,
    aupr_in,
    aupr_out,
    auroc,
    baseline_scores,
    check_scores,
    fpr_at_tpr,
    ood_metrics,
    roc_curve,
)
from wrapcal.metrics.state import SummableMetric

__all__ = [
    "ECE",
    "CalibrationMetrics",
    "OODMetrics",
    "SummableMetric",
    "acceptance_rank",
    "acceptance_threshold",
    "accuracy",
    "adaptive_ece",
    "aupr_in",
    "aupr_out",
    "aurc",
    "auroc",
    "auroc_bootstrap",
    "auroc_resampled",
    "baseline_scores",
    "brier",
    "check_probs",
    "check_scores",
    "classwise_ece",
    "ece",
    "ece_bootstrap",
    "ece_resampled",
    "fpr_at_tpr",
    "mce",
    "nll",
    "ood_metrics",
    "reliability_bins",
    "roc_curve",
    "softmax_probs",
]
