"""Operating points measured at fit time, which travel with the model (save, export).

After every plugin is fitted, the wrapped model predicts its calibration set once (from
the cached features) and keeps, for each score, the threshold that accepts a chosen share
of those in-distribution samples (``score <= threshold`` is accepted, the convention of
FPR@95), and the calibration metrics. They are measured on the data the calibrators were
fitted on, so the metrics are in-sample: a check of the fit, not an estimate of
performance.

The shares are the user's: ``wrapped.fit(..., accept_rates=(0.95, 0.99))`` (default
``(0.95,)``). The form (a JSON object, saved and exported as is)::

    {"data": "calibration", "n": N,
     "accept_rate": 0.95,                # the first rate chosen
     "thresholds": {score: threshold},   # at that rate: the form of every earlier file
     "metrics": {"accuracy": ..., "ece": ..., "nll": ...},
     # with more than one rate only:
     "accept_rates": [0.95, 0.99],
     "thresholds_at": {"0.95": {score: threshold}, "0.99": {score: threshold}}}

With one rate (the default) the object is exactly what wrapcal 0.2.0 and 0.3.0 wrote,
so their files load, and code that reads ``thresholds`` keeps working at any rate.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch

from wrapcal.metrics import acceptance_threshold, accuracy, ece, nll
from wrapcal.plugin.prediction import Prediction

__all__ = [
    "ACCEPT_RATE",
    "check_accept_rates",
    "is_operating_points",
    "measure_operating_points",
    "rate_key",
]

#: The share of in-distribution calibration samples each threshold accepts by default.
ACCEPT_RATE = 0.95
#: The keys of the one-rate form (every file before accept rates were a choice).
_KEYS = {"data", "n", "accept_rate", "thresholds", "metrics"}
#: The keys added with more than one rate.
_MORE = {"accept_rates", "thresholds_at"}


def rate_key(rate: float) -> str:
    """A rate as a key of ``thresholds_at``: its shortest repr (``0.99`` -> ``"0.99"``)."""
    return repr(float(rate))


def check_accept_rates(rates: Any) -> tuple[float, ...]:  # Any: duck-typed, see below
    """The acceptance rates, checked: one or more distinct numbers in (0, 1].

    Raises:
        ValueError: Anything else, with an example of what is accepted.
    """
    if isinstance(rates, (int, float)) and not isinstance(rates, bool):
        rates = (rates,)
    fix = "give one or more shares in (0, 1], e.g. accept_rates=(0.95, 0.99)"
    try:
        numbers = [r for r in rates if isinstance(r, Real) and not isinstance(r, bool)]
        values = tuple(float(r) for r in numbers)
        ok = len(values) == len(rates) > 0
    except TypeError:  # not a sequence
        ok, values = False, ()
    if not ok or not all(0 < v <= 1 for v in values):
        raise ValueError(f"accept_rates {rates!r} is not accepted: {fix}")
    if len({rate_key(v) for v in values}) != len(values):
        raise ValueError(f"accept_rates {rates!r} repeats a rate: {fix}")
    return values


def _thresholds(prediction: Prediction, rate: float) -> dict[str, float]:
    return {
        name: acceptance_threshold(score, rate)
        for name, score in prediction.scores.items()
        if bool(torch.isfinite(score).all())
    }


def measure_operating_points(
    prediction: Prediction,
    labels: torch.Tensor | None,
    accept_rates: object = (ACCEPT_RATE,),
) -> dict[str, Any]:
    """Thresholds of every score at each acceptance rate and, with labels, accuracy / ECE
    / NLL of the prediction (the module docstring gives the form)."""
    rates = check_accept_rates(accept_rates)
    points: dict[str, Any] = {
        "data": "calibration",
        "n": len(prediction),
        "accept_rate": rates[0],
        "thresholds": _thresholds(prediction, rates[0]),
        "metrics": {},
    }
    if len(rates) > 1:
        points["accept_rates"] = list(rates)
        points["thresholds_at"] = {
            rate_key(rate): dict(points["thresholds"]) if i == 0 else _thresholds(prediction, rate)
            for i, rate in enumerate(rates)
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


def is_operating_points(value: object) -> bool:
    """Whether a value read from a saved file has the form :func:`measure_operating_points`
    gives (finite numbers only): the one-rate form of every file, or the form with
    several rates, whose first rate's thresholds are ``thresholds``."""

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def table(t: object) -> bool:
        return isinstance(t, dict) and all(isinstance(k, str) and number(v) for k, v in t.items())

    if value is None:
        return True
    if not (
        isinstance(value, dict)
        and set(value) in (_KEYS, _KEYS | _MORE)
        and value["data"] == "calibration"
        and isinstance(value["n"], int)
        and number(value["accept_rate"])
        and table(value["thresholds"])
        and table(value["metrics"])
    ):
        return False
    if "accept_rates" not in value:
        return True
    rates, at = value["accept_rates"], value["thresholds_at"]
    try:
        checked = check_accept_rates(rates) if isinstance(rates, list) else None
    except ValueError:
        return False
    return (
        checked is not None
        and len(checked) > 1
        and isinstance(at, dict)
        and list(at) == [rate_key(r) for r in checked]
        and all(table(t) for t in at.values())
        and checked[0] == value["accept_rate"]
        and at[rate_key(checked[0])] == value["thresholds"]
    )
