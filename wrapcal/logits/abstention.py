"""Selective prediction: abstain so that accepted predictions err at most at a chosen rate.

:func:`fit_abstention` picks a threshold ``lam`` on a confidence score ``s`` (by default
``msp = 1 - max p``; accept a prediction when ``s <= lam``, abstain otherwise) with this
guarantee:

    With probability at least ``1 - delta`` over the draw of the ``n`` calibration
    samples, the selective risk ``R(lam) = P(Y != argmax p(X) | s(X) <= lam)`` of a new
    sample ``(X, Y)`` from the same distribution (calibration and test i.i.d.) is at most
    ``risk``.

It is Learn then Test (Angelopoulos, Bates, Candes, Jordan & Lei 2021) with the exact
binomial tail of Geifman & El-Yaniv (2017): for each threshold ``lam_j`` of a grid fixed
before seeing data (:func:`abstention_grid`), given that ``m_j`` calibration samples are
accepted, their errors ``k_j`` are ``Binomial(m_j, R(lam_j))``, so
``p_j = P(Binomial(m_j, risk) <= k_j)`` is a valid p-value of ``R(lam_j) > risk``.

``method="fixed_sequence"`` (the default) tests the thresholds in their fixed order from
the most conservative (accepting fewest) to the loosest, each at level ``delta``, and stops
at the first one it cannot certify; the loosest certified one is chosen. Fixed-sequence
testing controls the chance of certifying any threshold with ``R > risk`` at ``delta``
with no correction for the number of thresholds (LTT, section 4), so the grid can be
fine (1000 points) and each test runs at ``delta`` instead of ``delta / G``. A sequence
cannot start where a handful of samples is accepted (``m`` samples without an error give
``p = (1 - risk)^m``, above ``delta`` for small ``m``, which would stop it at once): it
starts at the first grid point accepting at least ``m_start`` calibration samples, the
smallest ``m`` at which an error rate of ``risk / 2`` among them is certified. The start
depends on the scores only, never on which predictions were right.

``method="bonferroni"`` is the rule of wrapcal 0.2.0: every threshold is tested at
``delta / G`` (Bonferroni over the ``G`` grid points) and the loosest certified one is
chosen; valid too, but at a 5% target on CIFAR-100 after temperature scaling it often
certifies nothing.

Which confidence ranks the inputs: the ranking decides what can be accepted at a given
risk, and temperature scaling changes it (it worsened the risk-coverage curve on most
models measured). Given ``alternatives`` (other scores of the same predictions, e.g. the
msp of the logits before calibration), the score whose risk-coverage curve on the
calibration data reaches the largest coverage at ``risk`` is used (ties: ``msp``); the
threshold is then chosen on that score as above. The choice reads the calibration data
once more, a selection among a few rankings: measured over 50 random splits of each of
the seven CIFAR-100 logit sets, the realised risk stays within the target (see
``docs/conformal.md``).

If no threshold is certified, every input is abstained on (the threshold is -1). Not
covered: the error rate measured on a finite test set, which fluctuates around ``R(lam)``,
and a test distribution unlike the calibration one.

Why not SGR's binary search (Geifman & El-Yaniv 2017): the thresholds it tests depend on
the outcomes of earlier tests on the same data, which its union bound over
``ceil(log2 n)`` tests does not account for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from wrapcal.errors import DataError
from wrapcal.plugin.torch_helpers import one_cpu_thread
from wrapcal.plugin.validation import check_values

__all__ = [
    "METHODS",
    "AbstentionRule",
    "abstention_grid",
    "binomial_cdf",
    "binomial_upper_bound",
    "fit_abstention",
    "risk_coverage_curve",
    "start_count",
]

#: The grid's smallest positive msp threshold: below it float32 confidences are 1.0.
_GRID_LOW = 1e-6
#: Bisection steps of the binomial upper bound.
_BISECTIONS = 42
#: Sample counts tried at once by :func:`start_count`.
_START_CHUNK = 256


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
    """A fitted abstention rule: accept when the score ``score`` is ``<= threshold``.

    Attributes:
        threshold: The chosen score threshold (-1: abstain on everything).
        risk: The target selective risk.
        delta: The allowed probability that the target is missed.
        bound: Upper bound on the selective risk at ``threshold`` (Clopper-Pearson), at
            confidence ``1 - delta`` for ``fixed_sequence``, ``1 - delta / G`` for
            ``bonferroni`` (1 when nothing is accepted).
        accepted: Share of the calibration samples accepted.
        calibration_risk: Their error rate among the accepted (0 when none is).
        n: Calibration samples.
        score: Which score the threshold applies to: ``"msp"`` (the first argument of
            :func:`fit_abstention`) or the name of one of its ``alternatives``.
        method: ``"fixed_sequence"`` or ``"bonferroni"``.
    """

    threshold: float
    risk: float
    delta: float
    bound: float
    accepted: float
    calibration_risk: float
    n: int
    score: str = "msp"
    method: str = "fixed_sequence"

    def abstain(self, score: Any) -> Tensor:
        """``[N]`` bool tensor: True where the prediction is withheld, from ``[N]`` values
        of the rule's ``score`` (the same score it was fitted on; numpy, torch or a list,
        checked by :func:`wrapcal.plugin.validation.check_values`)."""
        return check_values(score, self.score).to(torch.float64) > self.threshold


#: The threshold-selection procedures of :func:`fit_abstention`.
METHODS = ("fixed_sequence", "bonferroni")
#: Default grid sizes: fixed-sequence testing pays nothing for a fine grid; Bonferroni
#: pays ``delta / G``, so it keeps 0.2.0's 100 points.
_DEFAULT_GRID = {"fixed_sequence": 1000, "bonferroni": 100}


def _check(msp: Any, correct: Any, name: str = "msp") -> tuple[Tensor, Tensor]:
    """``msp`` as float64 ``[N]`` and ``correct`` as bool ``[N]`` on its device, checked
    by :func:`wrapcal.plugin.validation.check_values` (numpy, torch, lists alike)."""
    msp = check_values(msp, name)
    correct = check_values(correct, "correct", device=msp.device)
    if correct.shape != msp.shape:
        raise DataError(
            f"{name} and correct must be [N] with the same N; got {tuple(msp.shape)} and "
            f"{tuple(correct.shape)}"
        )
    if not msp.is_floating_point():
        raise DataError(f"{name} has dtype {msp.dtype}; expected floats (1 - the top probability)")
    return msp.to(torch.float64), correct.to(torch.bool)


def _scores(msp: Tensor, alternatives: Any) -> dict[str, Tensor]:
    """``{"msp": msp, **alternatives}`` checked: each ``[N]`` floats in [0, 1]."""
    if alternatives is None:
        named: dict[str, Any] = {}
    elif isinstance(alternatives, Mapping):
        named = dict(alternatives)
    else:
        named = {"alternative": alternatives}
    scores = {"msp": msp}
    for name, values in named.items():
        if not isinstance(name, str) or name == "msp":
            raise ValueError(f"alternatives are named by strings other than 'msp'; got {name!r}")
        score = check_values(values, name, device=msp.device)
        if score.shape != msp.shape or not score.is_floating_point():
            raise DataError(
                f"alternative score {name!r} must be [N] floats like msp "
                f"{tuple(msp.shape)}; got {tuple(score.shape)} {score.dtype}"
            )
        score = score.to(torch.float64)
        # The grid of thresholds is fixed on [0, 1]: a score elsewhere would make it
        # meaningless (pass 1 - a confidence, e.g. 1 - softmax(raw_logits).max(1)).
        if bool(((score < 0) | (score > 1)).any()):
            raise DataError(
                f"alternative score {name!r} has values outside [0, 1]; pass 1 - a "
                "confidence in [0, 1], e.g. 1 - softmax(raw_logits).amax(1)"
            )
        scores[name] = score
    return scores


def fit_abstention(
    msp: Any,
    correct: Any,
    *,
    risk: float = 0.05,
    delta: float = 0.1,
    grid: int | None = None,
    alternatives: Any = None,
    method: str = "fixed_sequence",
) -> AbstentionRule:
    """Choose the ranking and the threshold with the guarantee of the module docstring.

    Args:
        msp: ``[n]`` calibration ``1 - max p`` (the core's ``msp`` score).
        correct: ``[n]`` whether each prediction was right.
        risk: Target error rate of accepted predictions, in (0, 1).
        delta: Probability allowed for missing it, in (0, 0.5).
        grid: Grid points ``G`` (:func:`abstention_grid`); None: 1000 for
            ``fixed_sequence``, 100 for ``bonferroni``.
        alternatives: Other ``[n]`` scores of the same predictions in [0, 1] (higher =
            less confident), a mapping name -> values or one array (named
            ``"alternative"``), e.g. ``{"raw_msp": 1 - softmax(raw_logits).amax(1)}``
            for the confidence before calibration. Each score is tested at
            ``delta / (1 + number of alternatives)`` and the one whose certified threshold
            accepts most is used, so the guarantee covers the choice; the rule's ``score``
            says which, and :meth:`AbstentionRule.abstain` must be given that score.
        method: ``"fixed_sequence"`` (Learn then Test, fixed-sequence testing from the
            most conservative threshold) or ``"bonferroni"`` (0.2.0's rule).

    Raises:
        ValueError: ``risk``, ``delta``, ``grid`` or ``method`` out of range.
        DataError: Scores or ``correct`` of the wrong shape or type.
    """
    if not 0 < risk < 1 or not 0 < delta < 0.5:
        raise ValueError(f"risk must be in (0, 1) and delta in (0, 0.5); got {risk}, {delta}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid; expected one of {METHODS}")
    grid = _DEFAULT_GRID[method] if grid is None else grid
    msp, correct = _check(msp, correct)
    scores = _scores(msp, alternatives)
    with one_cpu_thread(msp.device):  # small operations: threads only wait on a shared CPU
        thresholds = abstention_grid(grid).to(msp.device)
        # Every ranking is tested at delta / (number of rankings): with probability
        # 1 - delta all their certified thresholds hold at once (a union bound), so the
        # one accepting most can be picked on the same calibration data and the
        # guarantee still holds. With msp alone this is the plain procedure at delta.
        level = delta / len(scores)
        fit = _bonferroni if method == "bonferroni" else _fixed_sequence
        rules = [
            fit(thresholds, *_counts(s, correct, thresholds), risk, level, len(msp), name)
            for name, s in scores.items()
        ]
        best = max(rules, key=lambda rule: rule.accepted)  # the first (msp) on ties
        return replace(best, delta=delta)


def _counts(score: Tensor, correct: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """Accepted samples ``m`` and their errors ``k`` at each threshold ``[G]``."""
    ascending, order = torch.sort(score, stable=True)
    errors = torch.cumsum((~correct[order]).to(torch.long), 0)
    m = torch.searchsorted(ascending, thresholds, right=True)
    k = torch.where(m > 0, errors[(m - 1).clamp_min(0)], torch.zeros_like(m))
    return m, k


def start_count(n: int, risk: float, delta: float) -> int:
    """Where the fixed sequence starts: the smallest ``m <= n`` with
    ``P(Binomial(m, risk) <= floor(m * risk / 2)) <= delta`` (an error rate of half the
    target among ``m`` accepted samples is certified), ``n + 1`` if there is none."""
    # In chunks from m = 1: the answer is small (about 130 at risk 5%, delta 10%), and
    # the binomial tails of every m up to n would cost n^2 * risk terms.
    for low in range(1, n + 1, _START_CHUNK):
        m = torch.arange(low, min(low + _START_CHUNK, n + 1), dtype=torch.float64)
        passed = torch.nonzero(binomial_cdf(torch.floor(m * risk / 2), m, risk) <= delta)
        if len(passed):
            return low + int(passed[0])
    return n + 1


def _rule(
    thresholds: Tensor, m: Tensor, k: Tensor, j: int | None, level: float, *args: Any
) -> AbstentionRule:
    risk, delta, n, name, method = args
    if j is None:
        return AbstentionRule(-1.0, risk, delta, 1.0, 0.0, 0.0, n, name, method)
    mj, kj = int(m[j]), int(k[j])
    return AbstentionRule(
        threshold=float(thresholds[j]),
        risk=risk,
        delta=delta,
        bound=binomial_upper_bound(kj, mj, level),
        accepted=mj / n,
        calibration_risk=kj / mj,
        n=n,
        score=name,
        method=method,
    )


def _p_values(m: Tensor, k: Tensor, risk: float, where: Tensor) -> Tensor:
    """``P(Binomial(m, risk) <= k)`` where ``where`` holds, 1 elsewhere. Only k < m * risk
    can pass: otherwise k is at least the binomial's median and the p-value at least
    1/2 > delta. Skipping them bounds the terms summed by n * risk."""
    hopeful = where & (m > 0) & (k < m * risk)
    p_values = torch.ones(m.shape, dtype=torch.float64, device=m.device)
    if bool(hopeful.any()):
        p_values[hopeful] = binomial_cdf(k[hopeful], m[hopeful], risk)
    return p_values


def _bonferroni(
    thresholds: Tensor, m: Tensor, k: Tensor, risk: float, delta: float, n: int, name: str
) -> AbstentionRule:
    level = delta / len(thresholds)
    passed = torch.nonzero(_p_values(m, k, risk, m > 0) <= level).flatten()
    j = int(passed[-1]) if len(passed) else None
    return _rule(thresholds, m, k, j, level, risk, delta, n, name, "bonferroni")


def _fixed_sequence(
    thresholds: Tensor, m: Tensor, k: Tensor, risk: float, delta: float, n: int, name: str
) -> AbstentionRule:
    tested = m >= start_count(n, risk, delta)
    failed = tested & (_p_values(m, k, risk, tested) > delta)
    # The sequence runs from the first tested threshold to the first failure (excluded).
    first = int(torch.nonzero(tested).flatten()[0]) if bool(tested.any()) else len(m)
    failures = torch.nonzero(failed).flatten()
    stop = int(failures[0]) if len(failures) else len(m)
    j = stop - 1 if stop > first else None
    return _rule(thresholds, m, k, j, delta, risk, delta, n, name, "fixed_sequence")


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
