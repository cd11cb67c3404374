"""Ensemble temperature scaling (Zhang, Kailkhura & Han 2020, "Mix-n-Match", ICML).

The calibrated distribution is a convex mixture of three::

    p = w1 softmax(z / T) + w2 softmax(z) + w3 / K,   w >= 0, w1 + w2 + w3 = 1

with ``T`` the NLL-optimal temperature (:func:`wrapcal.logits.temperature.fit_temperature`) and
the weights fitted afterwards by NLL on the same data, as in the paper (its code fits
both by mean squared error by default; NLL is the objective of every wrapcal
calibrator). Each component ranks the classes like ``z``, so the mixture keeps the
arg-max: accuracy never changes. The output is ``log p``, computed as a log-sum-exp of
the components' log-probabilities (exportable: no branch, nothing in place).
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from wrapcal import PluginTags, fit_temperature, hookimpl
from wrapcal.plugin import Calibrator, Interval

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["EnsembleTemperature", "mixture_weights"]

_NEWTON_STEPS = 100
_GRADIENT_TOL = 1e-12


def _objective(q: np.ndarray, w: np.ndarray) -> float:
    mix = q @ w
    return math.inf if np.any(mix <= 0) else float(-np.log(mix).mean())


def _face_minimum(q: np.ndarray) -> np.ndarray:
    """Minimiser of ``-mean log(q @ w)`` over the open simplex of ``q``'s columns, by
    damped Newton in ``m - 1`` coordinates (the last weight is ``1 - sum``); a point
    that creeps towards the face's border is returned as it is (a smaller face holds
    the true minimiser then, and is tried too)."""
    m = q.shape[1]
    w = np.full(m, 1.0 / m)
    if m == 1:
        return w
    basis = np.vstack([np.eye(m - 1), -np.ones((1, m - 1))])  # dw = basis @ du
    value = _objective(q, w)
    if not math.isfinite(value):  # a label with probability 0 under every component here
        return w
    for _ in range(_NEWTON_STEPS):
        mix = q @ w
        gradient = basis.T @ (-(q / mix[:, None]).mean(0))
        if np.abs(gradient).max() <= _GRADIENT_TOL:
            break
        scaled = q / mix[:, None]
        hessian = basis.T @ (scaled.T @ scaled / len(q)) @ basis
        try:
            step = basis @ np.linalg.solve(hessian, -gradient)
        except np.linalg.LinAlgError:
            step = basis @ -gradient
        t = 1.0
        while t > 1e-12:
            trial = w + t * step
            if np.all(trial > 0) and (new := _objective(q, trial)) <= value:
                break
            t *= 0.5
        else:
            break
        w, value = trial, new
    return w


def mixture_weights(q: np.ndarray) -> np.ndarray:
    """The weights ``w`` on the simplex that minimise ``-mean log(q @ w)``.

    The objective is convex, so its minimum over the simplex is the best of the
    minima over the simplex's faces (every vertex, edge, ..., the interior), each found
    by :func:`_face_minimum`: exact, with no step size or penalty to tune (the paper
    uses SLSQP).

    Args:
        q: ``[N, M]`` non-negative: each component's probability of each sample's label.
    """
    m = q.shape[1]
    best, best_value = None, math.inf
    for size in range(1, m + 1):
        for face in itertools.combinations(range(m), size):
            w = np.zeros(m)
            w[list(face)] = _face_minimum(q[:, face])
            value = _objective(q, w)
            if value < best_value:
                best, best_value = w, value
    if best is None:
        raise ValueError("no mixture weights give every label a positive probability")
    return best


class EnsembleTemperature(Calibrator):
    """Ensemble temperature scaling: a mixture of the tempered, the original and the
    uniform distributions (Zhang et al. 2020).

    Args:
        max_iter: Maximum solver steps of the temperature.

    Attributes:
        temperature_: The fitted temperature; buffer ``temperature``.
        weights_: The mixture weights ``[w_tempered, w_original, w_uniform]``; buffer
            ``weights``.
    """

    calibrator_name = "ensemble_temperature"
    probability_valued = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "max_iter": [Interval(int, 1, 100_000)]
    }

    def __init__(self, max_iter: int = 100) -> None:
        super().__init__()
        self.max_iter = max_iter
        self.register_buffer("temperature", torch.ones((), dtype=torch.float64))
        self.register_buffer("weights", torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.exportable = True
        return tags

    @property
    def temperature_(self) -> float:
        """The fitted temperature T > 0."""
        self.check_is_fitted()
        return float(self.temperature)

    @property
    def weights_(self) -> list[float]:
        """The fitted mixture weights (tempered, original, uniform)."""
        self.check_is_fitted()
        return [float(w) for w in self.weights]

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        temperature = fit_temperature(logits, labels, max_iter=self.max_iter)
        z = logits.cpu().numpy()
        y = labels.cpu().numpy()
        rows = np.arange(len(y))
        tempered = torch.log_softmax(torch.from_numpy(z / temperature), dim=1).numpy()
        original = torch.log_softmax(torch.from_numpy(z), dim=1).numpy()
        q = np.stack(
            [
                np.exp(tempered[rows, y]),
                np.exp(original[rows, y]),
                np.full(len(y), 1.0 / z.shape[1]),
            ],
            axis=1,
        )
        self.temperature.fill_(temperature)
        self.weights.copy_(torch.from_numpy(mixture_weights(q)))

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        temperature = self.temperature.to(device=logits.device, dtype=logits.dtype)
        weights = self.weights.to(device=logits.device, dtype=logits.dtype)
        # A zero weight's log would be -inf in the graph: the smallest normal number's
        # log drops that component just as well (its terms are below rounding).
        log_w = weights.clamp_min(torch.finfo(logits.dtype).tiny).log()
        k = torch.tensor(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        parts = torch.stack(
            [
                log_w[0] + torch.log_softmax(logits / temperature, dim=-1),
                log_w[1] + torch.log_softmax(logits, dim=-1),
                (log_w[2] - k.log()).expand_as(logits),
            ]
        )
        return torch.logsumexp(parts, dim=0)

    def validate_state(self) -> None:
        super().validate_state()
        w = self.weights
        if not (float(self.temperature) > 0 and bool((w >= 0).all())):
            raise ValueError("the temperature must be > 0 and the weights >= 0")
        if abs(float(w.sum()) - 1) > 1e-9:
            raise ValueError(f"the mixture weights sum to {float(w.sum())}, not 1")


@hookimpl
def wrapcal_register_plugins(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("ensemble_temperature", EnsembleTemperature)
