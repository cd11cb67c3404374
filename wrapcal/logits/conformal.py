"""Conformal prediction sets and abstention at a chosen risk, from logits you already have.

Split conformal prediction turns any classifier's probabilities into sets that hold the
true class with probability at least ``1 - alpha`` (at most ``1 - alpha + 1 / (n + 1)``
with ``n`` calibration samples and continuous scores) when the calibration and test
samples are exchangeable (Vovk et al. 2005). Three nonconformity scores of a class ``y``
(higher = less conforming), from the probabilities ``p`` sorted in decreasing order, with
``o(y)`` the 1-based rank of ``y`` and ``U`` uniform on [0, 1]:

- ``lac`` (Sadinle, Lei & Wasserman 2019): ``1 - p_y``. The smallest sets on average.
- ``aps`` (Romano, Sesia & Candes 2020): the mass ranked above ``y`` plus ``U p_y``.
  Sets grow with the difficulty of the input.
- ``raps`` (Angelopoulos, Bates, Malik & Jordan 2021): APS plus ``lam * (o(y) - k_reg)^+``,
  which penalises long tails of unlikely classes.

The threshold is the ``ceil((n + 1)(1 - alpha))``-th smallest calibration score (the
``ceil((n + 1)(1 - alpha)) / n`` quantile); a test set holds every class whose score is at
most it. ``classwise=True`` takes one threshold per class from that class's calibration
samples (Mondrian conformal prediction, Vovk et al. 2005): coverage ``1 - alpha`` holds
for every class separately.

The default is ``aps``: its sets grow with the difficulty of the input, which is what a
set is for, where LAC's are smallest on average but give hard inputs no more classes
than easy ones. The papers' sets may be **empty**, LAC's and the randomised APS/RAPS's
alike (``U p_top`` above the threshold leaves out even the top class: 0.6-2.3% of the
rows on the CIFAR-100 logits of ``../shared/data/logits``, 4.8-6.2% on the CIFAR-10
ones, APS at alpha 0.1). ``allow_empty=False`` scores the top class 0, in calibration and in
prediction alike, so every set holds it and the guarantee stays exact.

``U`` (the papers' randomisation, which makes the coverage exact instead of
conservative) is not drawn from a global generator: it is a seeded hash of the sample's
logits, ``tri(16 * sum_k w_k z_k / |z|)`` with ``w ~ N(0, 1)`` drawn once from ``seed``
and the triangle wave ``tri(x) = |2 frac(x / 2) - 1|`` (:data:`HASH_VERSION`). The same
input gets the same set in any batch, after save and load, and in an exported graph;
the wave has no jump and the norm keeps its slope small, so the rounding by which
another runtime's logits differ does not flip a set. A score that is a fixed function
of the input keeps the guarantee exactly, and the hash makes it continuous, so the upper
bound holds too; ``tests/logits/test_conformal.py`` measures that ``U`` is uniform and
unrelated to the probabilities on real logits.

Abstention at a chosen risk is :mod:`wrapcal.logits.abstention`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from wrapcal.errors import DataError
from wrapcal.plugin.probs import logits_to_probs
from wrapcal.plugin.torch_helpers import one_cpu_thread
from wrapcal.plugin.validation import check_labels, checked_logits

__all__ = [
    "ALL_CLASSES",
    "HASH_VERSION",
    "HASH_VERSIONS",
    "METHODS",
    "RAPS_LAMBDAS",
    "ConformalPredictor",
    "conformal_quantile",
    "conformal_scores",
    "conformal_sets",
    "conformal_uniforms",
    "fit_conformal",
    "hash_weights",
    "prediction_sets",
    "true_class_scores",
    "tune_raps",
]

METHODS = ("lac", "aps", "raps")
#: The lambda grid of the RAPS paper's automatic choice (its code's ``pick_lamda_size``).
RAPS_LAMBDAS = (0.001, 0.01, 0.1, 0.2, 0.5)
#: The threshold when too few calibration samples exist for ``alpha``: every class is in
#: the set. Finite, so a saved model holds no inf.
ALL_CLASSES = float(torch.finfo(torch.float64).max)
#: How ``U`` is drawn from the logits ``z``: 1 is ``frac(16 w . z)`` (wrapcal 0.2.0 and
#: files fitted before version 2), 2 is ``tri(16 w . z / |z|)`` with the triangle wave
#: ``tri(x) = |2 frac(x / 2) - 1|``. Version 2 is what float rounding cannot flip: the
#: triangle wave has no jump (``frac`` jumps from 1 to 0, and a logit rounded differently,
#: as ONNX Runtime's kernels round them, moved ``U`` across it), and dividing by the
#: row's norm makes ``U`` 10-50x less sensitive to the logits on real models.
HASH_VERSIONS = (1, 2)
HASH_VERSION = 2
#: Periods per unit of the hash's argument: real logits spread over many of them, so ``U``
#: is uniform, and unrelated to the probabilities (measured in the tests).
_HASH_SCALE = 16.0


# --- scores, quantiles, sets (the per-sample path is plain tensor operations) -----------
def hash_weights(num_logits: int, seed: int = 0) -> Tensor:
    """The hash's weights ``w`` ``[num_logits]`` (float64, CPU): ``N(0, 1)`` from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_logits, generator=generator, dtype=torch.float64)


def conformal_uniforms(logits: Tensor, weights: Tensor, version: int = HASH_VERSION) -> Tensor:
    """The randomisation ``U`` ``[N]`` in [0, 1], in float64: ``tri(16 w . z / |z|)``, or
    with ``version=1`` ``frac(16 w . z)`` (:data:`HASH_VERSIONS`)."""
    z = logits.to(torch.float64)
    x = (z @ weights.to(logits.device)) * _HASH_SCALE
    if version == 1:
        return x - torch.floor(x)
    # |z| > 0 unless every logit is 0 (then x = 0 too, and U = 1).
    half = x / (2 * (z * z).sum(-1).sqrt().clamp_min(torch.finfo(torch.float64).tiny))
    return (2 * (half - torch.floor(half)) - 1).abs()


def _ranked_scores(probs: Tensor, uniforms: Tensor | None) -> tuple[Tensor, Tensor]:
    """APS scores in rank order ``[N, K]`` (float64) and the order that sorts the classes."""
    p = probs.to(torch.float64)
    ranked, order = torch.sort(p, dim=-1, descending=True, stable=True)
    # The mass ranked strictly above each class: an exclusive cumulative sum.
    above = F.pad(torch.cumsum(ranked, dim=-1)[..., :-1], (1, 0))
    u = torch.ones_like(p[..., :1]) if uniforms is None else uniforms.to(p)[..., None]
    return above + u * ranked, order


def _penalty(num_classes: int, k_reg: int, lam: float, device: torch.device) -> Tensor:
    """RAPS's ``lam * (o - k_reg)^+`` for the 1-based ranks ``o`` (float64 ``[K]``)."""
    rank = torch.arange(1, num_classes + 1, dtype=torch.float64, device=device)
    return lam * (rank - k_reg).clamp_min(0)


def conformal_scores(
    probs: Tensor,
    method: str,
    uniforms: Tensor | None = None,
    k_reg: int = 0,
    lam: float = 0.0,
) -> Tensor:
    """Nonconformity scores ``[N, K]`` (float64) of every class, higher = less conforming.

    Args:
        probs: ``[N, K]`` probabilities.
        method: ``"lac"``, ``"aps"`` or ``"raps"``.
        uniforms: ``U`` ``[N]`` for APS/RAPS; ``None`` gives the deterministic scores
            (``U = 1``: the whole mass up to and including the class), which cover more
            than ``1 - alpha``.
        k_reg: RAPS: ranks up to ``k_reg`` are not penalised.
        lam: RAPS: the penalty per rank beyond ``k_reg``.
    """
    if method == "lac":
        return 1 - probs.to(torch.float64)
    ranked, order = _ranked_scores(probs, uniforms)
    if method == "raps":
        ranked = ranked + _penalty(probs.shape[-1], k_reg, lam, probs.device)
    return torch.zeros_like(ranked).scatter(-1, order, ranked)


def true_class_scores(
    probs: Tensor,
    labels: Tensor,
    method: str,
    uniforms: Tensor | None = None,
    k_reg: int = 0,
    lam: float = 0.0,
) -> Tensor:
    """The score ``[N]`` of each sample's own class, without sorting (O(N K)).

    Equal to ``conformal_scores(...)[i, labels[i]]`` up to float64 rounding (the mass
    above the class is summed in class order, not rank order): the classes ranked above
    ``y`` are those with a larger probability, or an equal one and a smaller index, as
    in the stable sort.
    """
    p = probs.to(torch.float64)
    p_y = p.gather(-1, labels[..., None])
    if method == "lac":
        return 1 - p_y[..., 0]
    index = torch.arange(p.shape[-1], device=p.device)
    ahead = (p > p_y) | ((p == p_y) & (index < labels[..., None]))
    u = torch.ones_like(p_y[..., 0]) if uniforms is None else uniforms.to(p)
    score = (p * ahead).sum(-1) + u * p_y[..., 0]
    if method == "raps":
        score = score + lam * (ahead.sum(-1) + 1 - k_reg).clamp_min(0).to(score.dtype)
    return score


def prediction_sets(
    logits: Tensor,
    probs: Tensor,
    thresholds: Tensor,
    weights: Tensor,
    method: str,
    k_reg: int = 0,
    lam: float = 0.0,
    randomized: bool = True,
    allow_empty: bool = True,
    hash_version: int = HASH_VERSION,
) -> Tensor:
    """The sets ``[N, K]`` (bool): classes whose score is at most their class's threshold,
    and with ``allow_empty=False`` the top class too (the first on ties, as the sort)."""
    randomized = randomized and method != "lac"
    uniforms = conformal_uniforms(logits, weights, hash_version) if randomized else None
    scores = conformal_scores(probs, method, uniforms, k_reg, lam)
    sets = scores <= thresholds.to(scores.device)
    if not allow_empty:
        # The top class's score is 0 with allow_empty=False (its thresholds were
        # calibrated so): it is in every set.
        top = torch.arange(probs.shape[-1], device=sets.device) == probs.argmax(-1, keepdim=True)
        sets = sets | top
    return sets


def _rank(n: Tensor, alpha: float) -> Tensor:
    """``ceil((n + 1)(1 - alpha))`` in exact integer arithmetic: ``alpha`` is read as the
    decimal it was written as (0.1 is 1/10), so rounding never moves the rank."""
    fraction = Fraction(repr(float(alpha)))
    num, den = fraction.numerator, fraction.denominator
    return -((-(n + 1) * (den - num)) // den)


def conformal_quantile(
    scores: Tensor, alpha: float, labels: Tensor | None = None, num_classes: int | None = None
) -> Tensor:
    """The split-conformal threshold(s) of calibration scores, batched over leading dims.

    Args:
        scores: ``[..., n]`` the calibration samples' scores of their true class.
        alpha: Miscoverage level in (0, 1).
        labels: ``[..., n]`` their classes, for class-conditional thresholds.
        num_classes: ``K`` with ``labels``.

    Returns:
        ``[...]`` the ``ceil((n + 1)(1 - alpha))``-th smallest score, or with ``labels``
        ``[..., K]`` the same within each class; :data:`ALL_CLASSES` where the rank
        exceeds the count (fewer than ``1 / alpha - 1`` samples).
    """
    n = scores.shape[-1]
    if labels is None:
        k = int(_rank(torch.tensor(n), alpha))
        if k > n:
            return torch.full(
                scores.shape[:-1], ALL_CLASSES, dtype=scores.dtype, device=scores.device
            )
        return torch.kthvalue(scores, k, dim=-1).values
    if num_classes is None:
        raise ValueError("classwise thresholds need num_classes")
    ascending, index = torch.sort(scores, dim=-1)
    by_class, regroup = torch.sort(labels.gather(-1, index), dim=-1, stable=True)
    grouped = ascending.gather(-1, regroup)  # class by class, ascending within a class
    counts = torch.zeros((*scores.shape[:-1], num_classes), dtype=torch.long, device=scores.device)
    counts.scatter_add_(-1, by_class, torch.ones_like(by_class))
    starts = torch.cumsum(counts, dim=-1) - counts
    ranks = _rank(counts, alpha)
    picked = grouped.gather(-1, (starts + ranks - 1).clamp(0, max(n - 1, 0)))
    return torch.where(ranks <= counts, picked, torch.full_like(picked, ALL_CLASSES))


def tune_raps(
    probs: Tensor,
    labels: Tensor,
    uniforms: Tensor | None,
    alpha: float,
    k_reg: int | None = None,
    lam: float | None = None,
) -> tuple[int, float]:
    """The RAPS paper's data-driven ``k_reg`` and ``lam`` on a tuning split.

    As its code (``pick_kreg``, ``pick_lamda_size``): ``k_reg`` is 1 + the
    ``1 - alpha`` quantile (numpy's ``"higher"``) of the true label's 0-based rank;
    ``lam`` is the value of :data:`RAPS_LAMBDAS` whose conformal sets, calibrated and
    measured on the same tuning samples, are smallest on average (the first on ties).
    Values given are kept.
    """
    ranked, order = _ranked_scores(probs, uniforms)
    rank = (order == labels[:, None]).to(torch.int8).argmax(dim=-1)  # 0-based
    if k_reg is None:
        ranks = torch.sort(rank).values
        k_reg = int(ranks[math.ceil((1 - alpha) * (len(ranks) - 1))]) + 1
    if lam is None:
        best = math.inf
        for candidate in RAPS_LAMBDAS:
            # Set sizes need no class identities: count in rank order, no scatter.
            scores = ranked + _penalty(probs.shape[-1], k_reg, candidate, probs.device)
            q = conformal_quantile(scores.gather(1, rank[:, None])[:, 0], alpha)
            size = float((scores <= q).sum()) / len(labels)
            if size < best:
                best, lam = size, candidate
    return int(k_reg), float(lam)  # type: ignore[arg-type]


@dataclass
class ConformalPredictor:
    """A fitted split-conformal predictor (:func:`fit_conformal`).

    Attributes:
        method: ``"lac"``, ``"aps"`` or ``"raps"``.
        thresholds: ``[K]`` float64, one per class (all equal unless classwise).
        weights: The hash's weights for ``U`` ``[num_logits]``.
        k_reg: RAPS's unpenalised ranks (0 for the other methods).
        lam: RAPS's penalty (0 for the other methods).
        randomized: Whether the scores use ``U``.
        n: Calibration samples behind the thresholds.
        n_tune: Calibration samples spent on tuning RAPS (not in ``n``).
        allow_empty: ``False``: every set holds at least the top class.
        hash_version: How ``U`` is drawn (:data:`HASH_VERSIONS`; 1 for models fitted by
            wrapcal 0.2.0).
    """

    method: str
    thresholds: Tensor
    weights: Tensor
    k_reg: int = 0
    lam: float = 0.0
    randomized: bool = True
    n: int = 0
    n_tune: int = 0
    allow_empty: bool = True
    hash_version: int = HASH_VERSION

    def sets(self, logits: Any, probs: Tensor | None = None) -> Tensor:
        """Prediction sets ``[N, K]`` (bool) of logits (``probs``: their probabilities
        as the model reports them, default ``softmax(logits)``)."""
        logits = checked_logits(logits)
        with one_cpu_thread(logits.device):  # row-wise work: threads only wait on a shared CPU
            probs = logits_to_probs(logits) if probs is None else probs
            return prediction_sets(
                logits, probs, self.thresholds, self.weights, self.method, self.k_reg, self.lam,
                self.randomized, self.allow_empty, self.hash_version,
            )  # fmt: skip


def fit_conformal(
    logits: Any,
    labels: Any,
    *,
    alpha: float = 0.1,
    method: str = "aps",
    classwise: bool = False,
    seed: int = 0,
    k_reg: int | None = None,
    lam: float | None = None,
    randomized: bool = True,
    tune_fraction: float = 0.3,
    probs: Tensor | None = None,
    allow_empty: bool = True,
) -> ConformalPredictor:
    """Calibrate split-conformal prediction sets on held-out labelled logits.

    Args:
        logits: ``[n, K]`` calibration logits (``[n, 1]`` for one binary logit).
        labels: ``[n]`` their classes.
        alpha: Miscoverage: sets hold the true class with probability >= ``1 - alpha``.
        method: ``"lac"``, ``"aps"`` (default: sets that grow with the difficulty of
            the input, with exact coverage) or ``"raps"``.
        classwise: One threshold per class (coverage ``1 - alpha`` within each class).
        seed: Seed of the hash that draws ``U`` (and of the RAPS tuning split).
        k_reg: RAPS: unpenalised ranks; ``None`` chooses it as the RAPS paper does.
        lam: RAPS: penalty per rank; ``None`` chooses it as the RAPS paper does.
        randomized: Use ``U`` (exact coverage); ``False`` gives deterministic, larger sets.
        tune_fraction: RAPS with a ``None`` parameter: this share of the calibration
            samples (a seeded random subset) tunes it and the rest calibrates, so the
            guarantee is kept (the paper's code uses 0.3).
        probs: The probabilities of ``logits`` as the model reports them (default
            ``softmax(logits)``); the scores use these, ``U`` the logits.
        allow_empty: ``True`` (default): a set may be empty, as the papers' sets (LAC
            when no class is likely enough; randomised APS/RAPS when ``U p_top`` exceeds
            the threshold: 5-6% of the rows on the shared CIFAR-10 logits at alpha 0.1).
            ``False``: the top class is always in the set: its score is taken as 0 in
            calibration and prediction, a fixed function of the input like the others,
            so coverage stays in [1 - alpha, 1 - alpha + 1 / (n + 1)]; the threshold
            the other classes meet is a little lower (measured in ``docs/conformal.md``).

    Raises:
        DataError: Logits that are not finite logits, labels that do not fit them.
        ValueError: Bad ``alpha``, ``method`` or ``tune_fraction``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not isinstance(allow_empty, bool):
        raise ValueError(f"allow_empty must be True or False; got {allow_empty!r}")
    if not 0 < alpha < 1 or not 0 < tune_fraction < 1:
        raise ValueError(f"alpha and tune_fraction must be in (0, 1); got {alpha}, {tune_fraction}")
    z = checked_logits(logits, "calibration logits")
    probs = logits_to_probs(z) if probs is None else probs
    y = check_labels(
        labels,
        len(z),
        probs.shape[1],
        single_logit=z.shape[1] == 1,
        rows="rows of logits",
        device=z.device,
    )
    # Small row-wise operations: extra threads only wait on a shared CPU.
    with one_cpu_thread(z.device):
        predictor = _fit(
            z, y, probs, alpha, method, classwise, seed, k_reg, lam, randomized, tune_fraction,
            allow_empty,
        )  # fmt: skip
    if bool((predictor.thresholds == ALL_CLASSES).any()):
        warnings.warn(
            f"too few calibration samples for alpha={alpha}"
            f"{' in some classes' if classwise else ''}: with n samples the sets can "
            f"reach 1 - alpha only if n >= 1/alpha - 1 = {math.ceil(1 / alpha - 1)}; "
            "those sets hold every class. Give more calibration data or a larger alpha",
            UserWarning,
            stacklevel=2,
        )
    return predictor


def _fit(
    logits: Tensor,
    labels: Tensor,
    probs: Tensor,
    alpha: float,
    method: str,
    classwise: bool,
    seed: int,
    k_reg: int | None,
    lam: float | None,
    randomized: bool,
    tune_fraction: float,
    allow_empty: bool = True,
) -> ConformalPredictor:
    """:func:`fit_conformal` on checked logits ``[n, K]`` and labels ``[n]``."""
    weights = hash_weights(logits.shape[-1], seed)
    uniforms = conformal_uniforms(logits, weights) if randomized and method != "lac" else None
    n_tune = 0
    if method == "raps" and (k_reg is None or lam is None):
        n_tune = math.ceil(tune_fraction * len(labels))
        if not 0 < n_tune < len(labels):
            raise DataError(f"{len(labels)} calibration samples are too few to tune RAPS")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        tune, rest = order[:n_tune].to(labels.device), order[n_tune:].to(labels.device)
        u_tune = None if uniforms is None else uniforms[tune]
        k_reg, lam = tune_raps(probs[tune], labels[tune], u_tune, alpha, k_reg, lam)
        probs, labels = probs[rest], labels[rest]
        uniforms = None if uniforms is None else uniforms[rest]
    k_reg, lam = (int(k_reg or 0), float(lam or 0.0)) if method == "raps" else (0, 0.0)
    true = true_class_scores(probs, labels, method, uniforms, k_reg, lam)
    if not allow_empty:
        # The score with the top class's set to 0 (always in the set): a fixed function
        # of (x, y, U) like the others, so calibrating on it keeps the guarantee exact.
        true = true.masked_fill(labels == probs.argmax(-1), 0.0)
    k = probs.shape[1]
    q = conformal_quantile(true, alpha, labels if classwise else None, k)
    thresholds = q.expand(k).clone() if q.ndim == 0 else q
    return ConformalPredictor(
        method, thresholds, weights, k_reg, lam, randomized, len(labels), n_tune, allow_empty,
        HASH_VERSION,
    )  # fmt: skip


def conformal_sets(cal_logits: Any, cal_labels: Any, test_logits: Any, **options: Any) -> Tensor:
    """Prediction sets ``[N_test, K]`` (bool) from calibration and test logits in one call.

    ``options`` are those of :func:`fit_conformal` (``alpha=0.1``, ``method="aps"``,
    ``classwise=False``, ``seed=0``, ``allow_empty=True``, ...). Example::

        sets = wrapcal.conformal_sets(cal_logits, cal_labels, test_logits, alpha=0.1)
        covered = sets[torch.arange(len(sets)), test_labels]  # ~90% True
    """
    return fit_conformal(cal_logits, cal_labels, **options).sets(test_logits)
