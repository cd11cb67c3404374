"""The solver behind vector scaling, matrix scaling and Dirichlet calibration.

All three fit calibrated logits ``x @ W.T + b`` by minimising the mean negative
log-likelihood of the labels plus Kull et al.'s (2019) ODIR penalty (Off-Diagonal and
Intercept Regularisation)::

    NLL(W, b) + lambda / (K (K - 1)) * sum_{i != j} W_ij^2 + mu / K * sum_j b_j^2

where ``x`` is the logits (vector and matrix scaling) or the log-probabilities
(Dirichlet calibration), and ``W`` is diagonal for vector scaling (no penalty at all, as
in Guo et al. 2017). The objective is convex and smooth. It is minimised by L-BFGS
(:func:`lbfgs`) on variables scaled by ``1 / sqrt`` of the Hessian's diagonal at the
start (a Jacobi preconditioner: on the CIFAR-100 ResNet-20 logits it cuts a matrix fit
at lambda = 1e4 from about 480 evaluations to 45), with hand-written gradients (no
autograd graph): each evaluation is two ``[N, K] x [K, K]`` products.

:func:`select_odir` chooses ``lambda`` and ``mu`` by cross-validated NLL, as Kull et
al. do, on a decade grid walked from strong to weak regularisation with warm starts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from wrapcal import fit_temperature

__all__ = [
    "ODIR_GRID",
    "LinearFit",
    "ODIRSearch",
    "fit_linear",
    "heldout_nll",
    "lbfgs",
    "select_odir",
]

#: The decade grid of lambda and mu, walked from strong to weak regularisation (Kull et
#: al. search 1e-5..1e6 for 10 classes and 1e-2..1e6 for 100).
ODIR_GRID = tuple(10.0**e for e in range(6, -6, -1))
# The preconditioner's diagonal is floored at this fraction of its largest entry, so a
# class that is never likely cannot make a variable's scale explode.
_DIAGONAL_FLOOR = 1e-10
#: Stopping tolerance on the largest preconditioned gradient entry: for a final fit,
#: and for the many fits of the cross-validation (which only rank grid points).
TOL_FINAL, TOL_SEARCH = 1e-9, 1e-5
#: A grid point must lower the cross-validated mean NLL by this much (nats per sample)
#: to be preferred to a stronger regularisation: smaller differences are noise.
MIN_GAIN = 1e-4


@dataclass
class LinearFit:
    """A fitted ``x @ W.T + b`` (``W`` ``[K, K]``, or ``[K]`` when diagonal)."""

    weight: torch.Tensor
    bias: torch.Tensor
    evaluations: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated logits of inputs ``x`` ``[N, K]`` (float64 work, x's device)."""
        if self.weight.ndim == 1:
            return x * self.weight + self.bias
        return torch.addmm(self.bias, x, self.weight.T)


def _inverse_sqrt(diagonal: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt`` of a Hessian diagonal, floored relative to its largest entry.

    When every probability is exactly 0 or 1 (separable calibration data at a large
    starting temperature) the diagonal is all zeros: the variables are left unscaled
    instead of being multiplied by ``inf``.
    """
    top = float(diagonal.max())
    if not (math.isfinite(top) and top > 0):
        return torch.ones_like(diagonal)
    return diagonal.clamp_min(_DIAGONAL_FLOOR * top).rsqrt()


class _Objective:
    """The penalised NLL and its gradient in the preconditioned variables."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        reg_lambda: float,
        reg_mu: float,
        diagonal: bool,
    ) -> None:
        self.x, self.y, self.diagonal = x, y, diagonal
        n, k = x.shape
        self.n = n
        self.target = y[:, None]
        self.minus_one = torch.full((n, 1), -1.0 / n, dtype=x.dtype, device=x.device)
        # Penalty coefficients as in Kull et al.: normalised by the number of entries.
        self.c_lambda = 0.0 if diagonal else reg_lambda / (k * (k - 1))
        self.c_mu = reg_mu / k
        # The off-diagonal mask of W (a full W only).
        self.off = (
            torch.empty(0) if diagonal else 1.0 - torch.eye(k, dtype=x.dtype, device=x.device)
        )
        self._scale_w: torch.Tensor | None = None
        self._scale_b: torch.Tensor | None = None
        self.evaluations = 0

    @property
    def scale_w(self) -> torch.Tensor:
        """The weight's preconditioning scale (set by :meth:`precondition`)."""
        if self._scale_w is None:
            raise RuntimeError("call precondition() before evaluating the objective")
        return self._scale_w

    @property
    def scale_b(self) -> torch.Tensor:
        """The bias's preconditioning scale (set by :meth:`precondition`)."""
        if self._scale_b is None:
            raise RuntimeError("call precondition() before evaluating the objective")
        return self._scale_b

    def logits(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.diagonal:
            return torch.addcmul(bias, self.x, weight)
        return torch.addmm(bias, self.x, weight.T)

    def precondition(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Scale the variables by ``1 / sqrt(diag H)`` at ``(weight, bias)``."""
        a = self.logits(weight, bias)
        p = torch.softmax(a, dim=1)
        v = p * (1 - p)  # the diagonal of each sample's softmax Hessian
        if self.diagonal:
            d_w = (v * self.x.square()).mean(0)
        else:
            d_w = (v.T @ self.x.square()) / self.n + 2 * self.c_lambda * self.off
        d_b = v.mean(0) + 2 * self.c_mu
        self._scale_w = _inverse_sqrt(d_w)
        self._scale_b = _inverse_sqrt(d_b)

    def __call__(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The objective and its gradient at the preconditioned variables ``theta``
        (``W = u * scale_w``, ``b = v * scale_b``, ``theta = [u, v]`` flattened)."""
        self.evaluations += 1
        split = self.scale_w.numel()
        weight = theta[:split].view_as(self.scale_w) * self.scale_w
        bias = theta[split:] * self.scale_b
        a = self.logits(weight, bias)
        true = a.gather(1, self.target)
        top = a.amax(dim=1, keepdim=True)
        e = a.sub_(top).exp_()  # in a's memory: no second [N, K] temporary
        total = e.sum(dim=1, keepdim=True)
        nll = float((top + total.log() - true).sum()) / self.n
        # (softmax - onehot) / n
        g = e.div_(total * self.n).scatter_add_(1, self.target, self.minus_one)
        grad_b = g.sum(0) + 2 * self.c_mu * bias
        penalty = self.c_mu * float(bias.square().sum())
        if self.diagonal:
            grad_w = (g * self.x).sum(0)
        else:
            off = weight * self.off
            grad_w = g.T @ self.x + 2 * self.c_lambda * off
            penalty += self.c_lambda * float(off.square().sum())
        grad = torch.cat([(grad_w * self.scale_w).flatten(), grad_b * self.scale_b])
        return nll + penalty, grad


def fit_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    reg_lambda: float = 0.0,
    reg_mu: float = 0.0,
    *,
    diagonal: bool = False,
    init: LinearFit | None = None,
    max_iter: int = 1000,
    tol: float = TOL_FINAL,
) -> LinearFit:
    """Minimise the penalised NLL of ``softmax(x @ W.T + b)`` (float64 ``x``, int64 ``y``).

    Args:
        x: ``[N, K]`` inputs (logits or log-probabilities), float64.
        y: ``[N]`` labels.
        reg_lambda: ODIR weight of the off-diagonal entries of ``W``.
        reg_mu: ODIR weight of the intercepts.
        diagonal: Fit a diagonal ``W`` (vector scaling).
        init: Warm start; default ``W = I / T`` with ``T`` the NLL-optimal temperature
            of ``x``, ``b = 0``.
        max_iter: Maximum L-BFGS iterations.
        tol: Stop when every preconditioned gradient entry is below this.
    """
    k = x.shape[1]
    if init is None:
        with warnings.catch_warnings():
            # The caller checked the data and warned about it once; the start point of a
            # fold need not warn again (few samples, a clipped temperature).
            warnings.simplefilter("ignore")
            beta = 1.0 / fit_temperature(x, y)
        eye = torch.ones(k, dtype=x.dtype, device=x.device)
        weight0 = eye * beta if diagonal else torch.diag(eye * beta)
        bias0 = torch.zeros(k, dtype=x.dtype, device=x.device)
    else:
        weight0, bias0 = init.weight.to(x), init.bias.to(x)
    objective = _Objective(x, y, reg_lambda, reg_mu, diagonal)
    objective.precondition(weight0, bias0)
    theta = torch.cat([(weight0 / objective.scale_w).flatten(), bias0 / objective.scale_b])
    theta = lbfgs(objective, theta, max_iter=max_iter, tol=tol)
    split = objective.scale_w.numel()
    weight = theta[:split].view_as(objective.scale_w) * objective.scale_w
    bias = theta[split:] * objective.scale_b
    # Softmax ignores a constant added to every logit: centre the intercepts so the
    # learned values are canonical (the outputs move by rounding only).
    return LinearFit(weight, bias - bias.mean(), objective.evaluations)


def lbfgs(
    fun: Callable[[torch.Tensor], tuple[float, torch.Tensor]],
    x: torch.Tensor,
    max_iter: int,
    tol: float,
    history: int = 20,
) -> torch.Tensor:
    """Minimise a smooth convex ``fun`` (value, gradient) from ``x`` by L-BFGS.

    Why not ``torch.optim.LBFGS``: constructing any ``torch.optim`` optimiser imports
    ``torch._dynamo`` (seconds, once per process), which would dominate a calibrator
    fitted on cached logits. This is the textbook method (Nocedal & Wright, Alg. 7.4 and
    7.5): two-loop recursion with ``H0 = s'y / y'y``, a backtracking Armijo line search
    from the unit step with quadratic interpolation (for a convex objective the
    curvature ``s'y`` is never negative; pairs with none are skipped), on the device of
    ``x``. It stops when every gradient entry is at most ``tol``, when a step no longer
    changes the objective (relative ``10 * eps`` of the dtype), or after ``max_iter`` iterations.
    """
    still = 10 * torch.finfo(x.dtype).eps  # a relative change below rounding
    f, g = fun(x)
    steps: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    for _ in range(max_iter):
        if float(g.abs().max()) <= tol:
            break
        q = g.clone()
        alphas = []
        for s, y, rho in reversed(steps):
            alpha = rho * float(s @ q)
            q.sub_(y, alpha=alpha)
            alphas.append(alpha)
        if steps:
            s, y, rho = steps[-1]
            q.mul_(1.0 / (rho * float(y @ y)))
        for (s, y, rho), alpha in zip(steps, reversed(alphas), strict=True):
            q.add_(s, alpha=alpha - rho * float(y @ q))
        direction = q.neg_()
        slope = float(g @ direction)
        if slope >= 0:  # not a descent direction (rounding): restart from the gradient
            steps.clear()
            direction, slope = -g, -float(g @ g)
        t = 1.0
        while True:
            x_new = x + t * direction
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * t * slope or t < 1e-12:
                break
            if not math.isfinite(f_new):
                # An overflowing step (separable data: the objective has no minimum and
                # the parameters grow): shrink it. NaN in the quadratic below would make
                # t NaN and this loop endless.
                t *= 0.1
                continue
            # Minimiser of the quadratic through f, slope and f_new, kept in [0.1, 0.5] t.
            t_quad = -slope * t * t / (2 * (f_new - f - slope * t))
            t = min(max(t_quad, 0.1 * t), 0.5 * t)
        if not (math.isfinite(f_new) and f_new <= f):
            break  # no step lowers the objective: x is as good as it gets
        s, y = x_new - x, g_new - g
        curvature = float(s @ y)
        if curvature > 1e-12 * float(y @ y):
            steps.append((s, y, 1.0 / curvature))
            if len(steps) > history:
                steps.pop(0)
        done = abs(f - f_new) <= still * max(abs(f), abs(f_new), 1.0)
        x, f, g = x_new, f_new, g_new
        if done:
            break
    return x


def heldout_nll(fit: LinearFit, x: torch.Tensor, y: torch.Tensor) -> float:
    """Summed NLL of ``y`` under ``softmax(fit.logits(x))``, accumulated in float64."""
    a = fit.logits(x).double()
    return float((torch.logsumexp(a, dim=1) - a.gather(1, y[:, None])[:, 0]).sum())


@dataclass
class ODIRSearch:
    """What :func:`select_odir` found.

    Attributes:
        reg_lambda, reg_mu: The chosen ODIR weights.
        table: Every point tried, in order, with its cross-validated mean NLL (over the
            folds it was fitted on before it was abandoned: ``folds``).
        start: The chosen point's fold fits averaged (float64): the final fit's start.
        fold_fits: The chosen point's fit on each fold's complement (float32, to the
            search's tolerance), in the order of the folds.
        points: Every point scored on all the folds -> its fold fits averaged.
    """

    reg_lambda: float
    reg_mu: float
    table: list[dict[str, Any]]
    start: LinearFit
    fold_fits: list[LinearFit]
    points: dict[tuple[float, float], LinearFit]


class _Search:
    """Cross-validated NLL of ODIR grid points, warm-started, abandoned when hopeless.

    The search only ranks points, so its fits run in float32 (half the cost of float64
    on a CPU; the held-out NLL is summed in float64) to :data:`TOL_SEARCH`.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        folds: list[torch.Tensor],
        warm: dict[tuple[float, float], LinearFit] | None = None,
    ) -> None:
        self.x = x.float()
        self.warm = warm or {}
        self.y = y
        self.n = x.shape[0]
        self.folds = folds
        self.train = [_complement(fold, self.n) for fold in folds]
        self.table: list[dict[str, Any]] = []
        self.fits: dict[tuple[float, float], list[LinearFit]] = {}
        self.sums: dict[tuple[float, float], list[float]] = {}
        self.best: tuple[float, float] | None = None

    def score(
        self, point: tuple[float, float], start: list[LinearFit] | None, margin: float
    ) -> bool:
        """Score ``point``: whether the walk goes on past it.

        The walk goes on if the point's cross-validated mean NLL is below the best's
        minus ``margin`` (``margin < 0`` tolerates a plateau); the point becomes the best
        if it is lower by :data:`MIN_GAIN` (ties go to the point tried first, the more
        regularised). It is abandoned after any fold where its held-out NLL summed so
        far already misses that bar on the same folds: the first point past the best is
        the most expensive to fit (weaker penalty), and it is there that the walk stops.
        """
        fits: list[LinearFit] = []
        sums: list[float] = []
        best = None if self.best is None else self.sums[self.best]
        seen = 0
        for f, (tr, te) in enumerate(zip(self.train, self.folds, strict=True)):
            init = self.warm.get(point) if start is None else start[f]
            fit = fit_linear(self.x[tr], self.y[tr], *point, init=init, tol=TOL_SEARCH)
            fits.append(fit)
            sums.append(heldout_nll(fit, self.x[te], self.y[te]))
            seen += te.numel()
            if best is not None and sum(sums) > sum(best[: f + 1]) - margin * seen:
                break
        row = {"reg_lambda": point[0], "reg_mu": point[1], "cv_nll": sum(sums) / seen}
        self.table.append({**row, "folds": len(sums)})
        self.fits[point] = fits
        if len(sums) < len(self.folds):
            return False
        self.sums[point] = sums
        if best is None or sum(sums) < sum(best) - MIN_GAIN * self.n:
            self.best = point
        return True

    def walk(
        self, points: list[tuple[float, float]], start: list[LinearFit] | None, margin: float
    ) -> None:
        """Score ``points`` in order, each warm-started from the one before, until the
        walk should stop (see :meth:`score`)."""
        for point in points:
            if not self.score(point, start, margin):
                return
            start = self.fits[point]

    def average(self, point: tuple[float, float] | None = None) -> LinearFit:
        """A point's fold solutions averaged, in float64 (the best point's by default:
        the final fit's start)."""
        if point is None:
            if self.best is None:
                raise ValueError("no point has been scored yet: nothing to average")
            point = self.best
        fits = self.fits[point]
        weight = torch.stack([f.weight for f in fits]).double().mean(0)
        bias = torch.stack([f.bias for f in fits]).double().mean(0)
        return LinearFit(weight, bias, 0)


def select_odir(
    x: torch.Tensor,
    y: torch.Tensor,
    folds: list[torch.Tensor],
    grid: tuple[float, ...] = ODIR_GRID,
    reg_lambda: float | None = None,
    reg_mu: float | None = None,
    warm: dict[tuple[float, float], LinearFit] | None = None,
) -> ODIRSearch:
    """Choose ODIR's ``lambda`` and ``mu`` by cross-validated NLL.

    Two walks over ``grid``, each fold warm-started from its previous solution: first
    ``lambda = mu`` from strong to weak regularisation (Kull et al. tie them when ``mu``
    is not tuned), across the plateau of the strong end and on until the
    cross-validated NLL rises :data:`MIN_GAIN` above the best (the curve is smooth and
    single-dipped in practice, and the weak end is the slow and overfitting one); then
    ``mu`` alone, outward from the chosen ``lambda`` in both directions, each direction
    going on only while the NLL falls by :data:`MIN_GAIN`. A point must beat the best by
    :data:`MIN_GAIN` to replace it. A value given by the user is kept and only the
    other is searched.

    ``warm`` (point -> fit) starts a walk's first point from a fit of the same point on
    similar data (nested cross-validation starts each outer fold's search from the
    search on all the data): the objective is convex, so a start changes how long a fit
    takes, not where it ends (to the search's tolerance).
    """
    search = _Search(x, y, folds, warm)
    lambdas = list(grid) if reg_lambda is None else [reg_lambda]
    # The strong end is a plateau (the off-diagonal entries are all but zero there, the
    # vector scaling limit): walk across it, stopping only where the NLL clearly rises.
    tied = [(lam, lam if reg_mu is None else reg_mu) for lam in lambdas]
    search.walk(tied, None, margin=-MIN_GAIN)
    assert search.best is not None  # the first point is always the best so far
    if reg_mu is None and len(grid) > 1:
        lam, mu0 = search.best
        position = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / mu0)))
        centre = search.best
        for side in (grid[position + 1 :], grid[:position][::-1]):
            # The intercepts' penalty rarely matters: go on only while it clearly helps.
            search.walk([(lam, mu) for mu in side], search.fits[centre], margin=MIN_GAIN)
    lam, mu = search.best
    complete = {point: search.average(point) for point in search.sums}
    return ODIRSearch(lam, mu, search.table, search.average(), search.fits[search.best], complete)


def _complement(fold: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool, device=fold.device)
    keep[fold] = False
    return torch.nonzero(keep).flatten()
