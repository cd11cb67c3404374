"""Independent numpy/scipy references for NLL, ECE and the temperature, written out from
their definitions and shared by the tests so that each is written (and checked) once."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax


def nll_np(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean NLL of softmax(logits / T) in float64; one column = binary sigmoid."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if z.ndim == 1 or z.shape[1] == 1:
        z = z.reshape(-1)
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))  # Bernoulli, logit z
    return float(-np.mean(log_softmax(z, axis=1)[np.arange(len(labels)), labels]))


def ece_np(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label L1 ECE: bins (b/n, (b+1)/n] (the first also takes 0), weighted by mass."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        mask = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if mask.any():
            gap = (pred[mask] == labels[mask]).mean() - conf[mask].mean()
            total += mask.mean() * abs(gap)
    return float(total)


def scipy_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising ``nll_np``: Brent's bounded search on log T."""
    result = minimize_scalar(
        lambda log_t: nll_np(logits, labels, np.exp(log_t)),
        bounds=(-5.0, 5.0),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return float(np.exp(result.x))
