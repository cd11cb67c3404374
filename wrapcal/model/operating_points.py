"""Operating points measured at fit time, which travel with the model (save, export).

After every plugin is fitted, the wrapped model predicts its calibration set once (from
the cached features) and keeps, for each score, the threshold that accepts 95% of those
in-distribution samples (``score <= threshold`` is accepted, the convention of FPR@95),
and the calibration metrics. They are measured on the data the calibrators were fitted
on, so the metrics are in-sample: a check of the fit, not an estimate of performance.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from wrapcal.metrics import acceptance_threshold, accuracy, ece, nll
from wrapcal.plugin.prediction import Prediction

__all__ = ["ACCEPT_RATE", "is_operating_points", "measure_operating_points"]

#: The share of in-distribution calibration samples each threshold accepts.
ACCEPT_RATE = 0.95


def measure_operating_points(prediction: Prediction, labels: torch.Tensor | None) -> dict[str, Any]:
    """Thresholds of every score and, with labels, accuracy / ECE / NLL of the prediction."""
    points: dict[str, Any] = {
        "data": "calibration",
        "n": len(prediction),
        "accept_rate": ACCEPT_RATE,
        "thresholds": {
            name: acceptance_threshold(score, ACCEPT_RATE)
            for name, score in prediction.scores.items()
            if bool(torch.isfinite(score).all())
        },
        "metrics": {},
    }
    if labels is not None:
        # Low-precision models (bfloat16) give rows that sum to 1 only roughly.
        probs = prediction.probs.cpu().double()
        probs, labels = probs / probs.sum(dim=-1, keepdim=True), labels.cpu()
        points["metrics"] = {
            "accuracy": accuracy(probs, labels),
            "ece": ece(probs, labels),
            "nll": nll(probs, labels),
        }
    return points


def is_operating_points(value: Any) -> bool:
    """Whether a value read from a saved file has the form :func:`measure_operating_points`
    gives (finite numbers only)."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if value is None:
        return True
    return (
        isinstance(value, dict)
        and set(value) == {"data", "n", "accept_rate", "thresholds", "metrics"}
        and value["data"] == "calibration"
        and isinstance(value["n"], int)
        and number(value["accept_rate"])
        and all(
            isinstance(table, dict)
            and all(isinstance(k, str) and number(v) for k, v in table.items())
            for table in (value["thresholds"], value["metrics"])
        )
    )
