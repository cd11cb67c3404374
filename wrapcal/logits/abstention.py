"""Selective prediction: abstain so that accepted predictions err at most at a chosen rate.

:func:`fit_abstention` picks a threshold ``lam`` on ``msp = 1 - max p`` (accept a
prediction when ``msp <= lam``, abstain otherwise) with this guarantee:

    With probability at least ``1 - delta`` over the draw of the ``n`` calibration
    samples, the selective risk ``R(lam) = P(Y != argmax p(X) | msp(X) <= lam)`` of a new
    sample ``(X, Y)`` from the same distribution (calibration and test i.i.d.) is at most
    ``risk``.

It is Learn then Test (Angelopoulos, Bates, Candes, Jordan & Lei 2021) with the exact
binomial tail of Geifman & El-Yaniv (2017): for each threshold ``lam_j`` of a grid fixed
before seeing data (:func:`abstention_grid`), given that ``m_j`` calibration samples are
accepted, their errors ``k_j`` are ``Binomial(m_j, R(lam_j))``, so
``p_j = P(Binomial(m_j, risk) <= k_j)`` is a valid p-value of ``R(lam_j) > risk``.
Thresholds with ``p_j <= delta / G`` are certified (Bonferroni over the ``G`` grid
points: the chance that any certified threshold has ``R > risk`` is at most ``delta``),
and the loosest certified one is chosen. If none is certified, every input is abstained
on (the threshold is -1). Not covered: the error rate measured on a finite test set,
which fluctuates around ``R(lam)``, and a test distribution unlike the calibration one.

Why not SGR's binary search (Geifman & El-Yaniv 2017): the thresholds it tests depend on
the outcomes of earlier tests on the same data, which its union bound over
``ceil(log2 n)`` tests does not account for. The fixed grid is valid as stated, and its
level ``delta / 100`` costs about what SGR's ``delta / 13`` (n = 5000) does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from wrapcal.errors import DataError
from wrapcal.plugin.torch_helpers import one_cpu_thread
from wrapcal.plugin.validation import check_values

__all__ = [
    "AbstentionRule",
    "abstention_grid",
    "binomial_cdf",
    "binomial_upper_bound",
    "fit_abstention",
    "risk_coverage_curve",
]

#: The grid's smallest positive msp threshold: below it float32 confidences are 1.0.
_GRID_LOW = 1e-6
#: Bisection steps of the binomial upper bound.
_BISECTIONS = 42


def abstention_grid(points: int = 100) -> Tensor:
    """The thresholds tried on ``msp`` (float64, ascending): 0 (accept only inputs with
    confidence exactly 1), then ``points - 1`` geometrically spaced from 1e-6 to 1
    (accept everything). Fixed before any data is seen, as the guarantee needs."""
    if points < 2:
        raise ValueError(f"the grid needs at least 2 points; got {points}")
    return torch.cat(
        [
            torch.zeros(1, dtype=torch.float64),
            torch.logspace(math.log10(_GRID_LOW), 0, points - 1, dtype=torch.float64),
        ]
    )


def binomial_cdf(k: Tensor, m: Tensor, p: Tensor | float) -> Tensor:
    """``P(Binomial(m, p) <= k)`` elementwise (float64), summed in log space.

    Args:
        k: Integer counts ``0 <= k <= m`` (any shape).
        m: Integer numbers of trials, the same shape.
        p: Success probability in (0, 1), broadcastable to ``k``.
    """
    k, m = k.to(torch.float64), m.to(torch.float64)
    p = torch.as_tensor(p, dtype=torch.float64, device=k.device).expand_as(k)
    j = torch.arange(int(k.max()) + 1 if k.numel() else 1, dtype=torch.float64, device=k.device)
    kk, mm, pp = k[..., None], m[..., None], p[..., None]
    log_pmf = (
        torch.lgamma(mm + 1)
        - torch.lgamma(j + 1)
        - torch.lgamma((mm - j).clamp_min(0) + 1)
        + j * torch.log(pp)
        + (mm - j) * torch.log1p(-pp)
    )
    log_pmf = torch.where(j <= kk, log_pmf, torch.full_like(log_pmf, -math.inf))
    return torch.logsumexp(log_pmf, dim=-1).exp().clamp(0, 1)


def binomial_upper_bound(k: int, m: int, level: float) -> float:
    """The largest ``b`` with ``P(Binomial(m, b) <= k) >= level``: the one-sided
    Clopper-Pearson upper bound on an error rate at confidence ``1 - level`` (Geifman &
    El-Yaniv's ``B*``), rounded up by less than 1e-12. 1 when ``m == 0`` or ``k == m``."""
    if m == 0 or k >= m:
        return 1.0
    j = torch.arange(k + 1, dtype=torch.float64)
    log_choose = math.lgamma(m + 1) - torch.lgamma(j + 1) - torch.lgamma(m - j + 1)
    low, high = k / m, 1.0
    # Bisection: the CDF falls as b grows; 42 halvings leave a bracket under 1e-12.
    for _ in range(_BISECTIONS):
        mid = (low + high) / 2
        log_pmf = log_choose + j * math.log(mid) + (m - j) * math.log1p(-mid)
        if float(torch.logsumexp(log_pmf, dim=0).exp()) >= level:
            low = mid
        else:
            high = mid
    return high


@dataclass
class AbstentionRule:
    """A fitted abstention rule: accept when ``msp <= threshold``.

    Attributes:
        threshold: The chosen msp threshold (-1: abstain on everything).
        risk: The target selective risk.
        delta: The allowed probability that the target is missed.
        bound: Upper bound on the selective risk at ``threshold``, at confidence
            ``1 - delta / G`` (1 when nothing is accepted).
        accepted: Share of the calibration samples accepted.
        calibration_risk: Their error rate among the accepted (0 when none is).
        n: Calibration samples.
    """

    threshold: float
    risk: float
    delta: float
    bound: float
    accepted: float
    calibration_risk: float
    n: int

    def abstain(self, msp: Tensor) -> Tensor:
        """``[N]`` bool: True where the prediction is withheld."""
        return msp.to(torch.float64) > self.threshold


def _check(msp: Any, correct: Any) -> tuple[Tensor, Tensor]:
    """``msp`` as float64 ``[N]`` and ``correct`` as bool ``[N]`` on its device, checked
    by :func:`wrapcal.plugin.validation.check_values` (numpy, torch, lists alike)."""
    msp = check_values(msp, "msp")
    correct = check_values(correct, "correct", device=msp.device)
    if correct.shape != msp.shape:
        raise DataError(
            f"msp and correct must be [N] with the same N; got {tuple(msp.shape)} and "
            f"{tuple(correct.shape)}"
        )
    if not msp.is_floating_point():
        raise DataError(f"msp has dtype {msp.dtype}; expected floats (1 - the top probability)")
    return msp.to(torch.float64), correct.to(torch.bool)


def fit_abstention(
    msp: Any, correct: Any, *, risk: float = 0.05, delta: float = 0.1, grid: int = 100
) -> AbstentionRule:
    """Choose the msp threshold with the guarantee of the module docstring.

    Args:
        msp: ``[n]`` calibration ``1 - max p`` (the core's ``msp`` score).
        correct: ``[n]`` whether each prediction was right.
        risk: Target error rate of accepted predictions, in (0, 1).
        delta: Probability allowed for missing it, in (0, 0.5).
        grid: Grid points ``G`` (:func:`abstention_grid`).
    """
    if not 0 < risk < 1 or not 0 < delta < 0.5:
        raise ValueError(f"risk must be in (0, 1) and delta in (0, 0.5); got {risk}, {delta}")
    msp, correct = _check(msp, correct)
    with one_cpu_thread(msp.device):  # small operations: threads only wait on a shared CPU
        return _fit(msp, correct, risk, delta, grid)


def _fit(msp: Tensor, correct: Tensor, risk: float, delta: float, grid: int) -> AbstentionRule:
    thresholds = abstention_grid(grid).to(msp.device)
    ascending, order = torch.sort(msp, stable=True)
    errors = torch.cumsum((~correct[order]).to(torch.long), 0)
    m = torch.searchsorted(ascending, thresholds, right=True)
    k = torch.where(m > 0, errors[(m - 1).clamp_min(0)], torch.zeros_like(m))
    # Only k < m * risk can pass: otherwise k is at least the binomial's median and the
    # p-value at least 1/2 > delta. Skipping them bounds the terms summed by n * risk.
    hopeful = (m > 0) & (k < m * risk)
    p_values = torch.ones_like(thresholds)
    if bool(hopeful.any()):
        p_values[hopeful] = binomial_cdf(k[hopeful], m[hopeful], risk)
    level = delta / grid
    passed = torch.nonzero(p_values <= level).flatten()
    if len(passed) == 0:
        return AbstentionRule(-1.0, risk, delta, 1.0, 0.0, 0.0, len(msp))
    j = int(passed[-1])
    mj, kj = int(m[j]), int(k[j])
    return AbstentionRule(
        threshold=float(thresholds[j]),
        risk=risk,
        delta=delta,
        bound=binomial_upper_bound(kj, mj, level),
        accepted=mj / len(msp),
        calibration_risk=kj / mj,
        n=len(msp),
    )


def risk_coverage_curve(msp: Any, correct: Any, points: int = 101) -> dict[str, list[float]]:
    """The risk-coverage curve: accept the most confident share ``c`` of the samples and
    measure their error rate, at ``points`` shares from ``1/N`` to 1 (ties in msp split
    in sample order). Returns ``{"coverage": [...], "risk": [...]}``."""
    msp, correct = _check(msp, correct)
    n = len(msp)
    errors = torch.cumsum((~correct[torch.sort(msp, stable=True).indices]).double(), 0)
    counts = torch.unique(torch.linspace(1, n, min(points, n)).round().long())
    return {
        "coverage": (counts.double() / n).tolist(),
        "risk": (errors[counts - 1] / counts).tolist(),
    }
