"""fit_abstention: Learn then Test with fixed-sequence testing against a scipy reference,
the choice of ranking, and the promise of issue 24 on the seven CIFAR-100 logit sets:
after temperature scaling (the README's chain), at risk 5% and delta 10%, the rule
accepts at least 0.9x what the best threshold chosen on the held-out half accepts, and
the error rate of its accepted predictions exceeds the target in at most delta of the
calibration draws.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from shared_data import SHARED_DATA

from wrapcal import DataError
from wrapcal.logits.abstention import (
    AbstentionRule,
    abstention_grid,
    fit_abstention,
    start_count,
)
from wrapcal.logits.temperature import fit_temperature
from wrapcal.plugin.probs import logits_to_probs

LOGITS_DIR = SHARED_DATA / "logits"
CIFAR100 = [
    "cifar100_resnet20",
    "cifar100_resnet32",
    "zoo_cifar100_mobilenetv2_x0_5",
    "zoo_cifar100_mobilenetv2_x0_75",
    "zoo_cifar100_repvgg_a0",
    "zoo_cifar100_shufflenetv2_x1_0",
    "zoo_cifar100_vgg11_bn",
]
requires_cifar100 = pytest.mark.skipif(
    not all((LOGITS_DIR / f"{name}.npz").is_file() for name in CIFAR100),
    reason=f"CIFAR-100 logit sets not found in {LOGITS_DIR}",
)
RISK, DELTA, DRAWS = 0.05, 0.1, 50


@functools.cache
def load(name: str) -> tuple[torch.Tensor, ...]:
    """Logits, labels, whether the prediction is right (temperature keeps the argmax)
    and the raw msp (``1 - max p`` before calibration) of a set."""
    with np.load(LOGITS_DIR / f"{name}.npz", allow_pickle=False) as f:
        logits, labels = torch.from_numpy(f["logits"]), torch.from_numpy(f["labels"]).long()
    probs = logits_to_probs(logits)
    return logits, labels, probs.argmax(1) == labels, 1 - probs.amax(1)


def scipy_fixed_sequence(score: np.ndarray, correct: np.ndarray, risk: float, delta: float):
    """Fixed-sequence Learn then Test written out with scipy, one threshold at a time."""
    n = len(score)
    start = next(
        m for m in range(1, n + 1) if stats.binom.cdf(math.floor(m * risk / 2), m, risk) <= delta
    )
    chosen, bound = -1.0, 1.0
    for lam in abstention_grid(1000).numpy():
        accepted = score <= lam
        m, k = int(accepted.sum()), int((~correct[accepted]).sum())
        if m < start:
            continue
        if stats.binom.cdf(k, m, risk) > delta:
            break
        chosen = lam
        bound = 1.0 if k == m else stats.beta.ppf(1 - delta, k + 1, m - k)
    return chosen, bound


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A score that ranks errors well, one that is noise, and correctness."""
    rng = np.random.default_rng(seed)
    good = rng.beta(0.5, 4, n)
    correct = rng.random(n) > good  # P(error | score) = score: a perfect ranking
    return good, rng.random(n), correct


# --- the procedure ---------------------------------------------------------------------


def test_start_count_is_the_smallest_m_scipy_finds():
    for risk, delta in [(0.05, 0.1), (0.01, 0.1), (0.2, 0.05), (0.1, 0.01)]:
        want = next(
            m for m in range(1, 6000) if stats.binom.cdf(math.floor(m * risk / 2), m, risk) <= delta
        )
        assert start_count(5000, risk, delta) == want
    assert start_count(10, 0.01, 0.1) == 11  # none reachable with 10 samples


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("risk", [0.02, 0.05, 0.2])
def test_fixed_sequence_matches_scipy(seed, risk):
    score, _, correct = synthetic(3000, seed)
    rule = fit_abstention(score, correct, risk=risk, delta=0.1)
    threshold, bound = scipy_fixed_sequence(score, correct, risk, 0.1)
    assert rule.method == "fixed_sequence" and rule.score == "msp"
    assert rule.threshold == threshold
    assert rule.bound == pytest.approx(bound, abs=1e-9)
    accepted = score <= threshold
    assert rule.accepted == accepted.mean()
    assert rule.calibration_risk == pytest.approx((~correct[accepted]).mean())
    assert rule.calibration_risk <= rule.bound <= risk


@pytest.mark.parametrize("name", ["cifar10_resnet20", "cifar100_resnet20"])
def test_fixed_sequence_matches_scipy_on_real_logits(name):
    if not (LOGITS_DIR / f"{name}.npz").is_file():
        pytest.skip(f"{name}.npz not found in {LOGITS_DIR}")
    _, _, correct, msp = load(name)
    msp, correct = msp[:5000].double().numpy(), correct[:5000].numpy()
    for risk in (0.01, 0.05, 0.2):
        rule = fit_abstention(msp, correct, risk=risk, delta=0.1)
        threshold, bound = scipy_fixed_sequence(msp, correct, risk, 0.1)
        assert rule.threshold == threshold
        assert rule.bound == pytest.approx(bound, abs=1e-9)


def test_stops_at_the_first_threshold_it_cannot_certify():
    # Errors only in the middle of the ranking: Bonferroni certifies beyond them (the
    # tail is clean again), the fixed sequence must stop before them.
    score = np.linspace(0, 1, 4000)
    correct = np.ones(4000, bool)
    correct[2000:2150] = False  # 3.75% errors over all: certified at delta / 1000 too
    fixed = fit_abstention(score, correct, risk=0.05, delta=0.1)
    union = fit_abstention(score, correct, risk=0.05, delta=0.1, method="bonferroni")
    assert fixed.threshold < score[2150] and (score <= fixed.threshold).sum() >= 2000
    assert union.threshold > fixed.threshold and union.accepted > 0.9


def test_more_power_than_bonferroni_and_same_results_for_numpy_and_torch():
    score, _, correct = synthetic(5000, 3)
    fixed = fit_abstention(score, correct, risk=0.05)
    union = fit_abstention(score, correct, risk=0.05, method="bonferroni")
    assert fixed.accepted > union.accepted > 0
    for values in (torch.from_numpy(score), torch.from_numpy(score).float(), score.tolist()):
        again = fit_abstention(values, torch.from_numpy(correct), risk=0.05)
        assert again.accepted == pytest.approx(fixed.accepted, abs=2e-4)
    assert fit_abstention(torch.from_numpy(score), correct, risk=0.05) == fixed


def test_nothing_certified_abstains_on_everything():
    score, _, _ = synthetic(500, 4)
    rule = fit_abstention(score, np.zeros(500, bool), risk=0.05)
    assert rule.threshold == -1 and rule.accepted == 0 and rule.bound == 1
    assert bool(rule.abstain(torch.from_numpy(score)).all())


# --- the ranking -----------------------------------------------------------------------


def test_the_better_ranking_is_chosen_and_applied():
    good, noise, correct = synthetic(5000, 5)
    rule = fit_abstention(noise, correct, risk=0.05, alternatives={"good": good})
    assert rule.score == "good"
    # Two rankings, each tested at delta / 2 (the union bound that covers the choice).
    alone = fit_abstention(good, correct, risk=0.05, delta=0.05)
    assert (rule.threshold, rule.accepted) == (alone.threshold, alone.accepted)
    assert rule.delta == 0.1
    # The other way round msp stays, and a bare array is named "alternative".
    assert fit_abstention(good, correct, risk=0.05, alternatives=noise).score == "msp"
    assert fit_abstention(noise, correct, risk=0.05, alternatives=good).score == "alternative"
    # A rule of 0.2.0's fields only still builds (the plugin's saved state).
    assert AbstentionRule(-1.0, 0.05, 0.1, 1.0, 0.0, 0.0, 10).score == "msp"


def test_bad_alternatives_and_parameters_are_refused_with_the_fix():
    good, noise, correct = synthetic(100, 6)
    with pytest.raises(DataError, match=r"'energy' has values outside \[0, 1\]; pass 1 - a"):
        fit_abstention(good, correct, alternatives={"energy": -5 * good})
    with pytest.raises(DataError, match=r"'raw' must be \[N\] floats like msp"):
        fit_abstention(good, correct, alternatives={"raw": good[:50]})
    with pytest.raises(ValueError, match="other than 'msp'"):
        fit_abstention(good, correct, alternatives={"msp": noise})
    with pytest.raises(ValueError, match=r"method='sgr' is invalid; expected one of"):
        fit_abstention(good, correct, method="sgr")


# --- the promise on the CIFAR-100 sets -------------------------------------------------


def chain(name: str, cal: torch.Tensor):
    """The README's chain on calibration rows ``cal``: temperature fitted on them, then
    abstention given the calibrated and the raw msp. Returns the rule, the accept mask
    and correctness on every row, and both scores."""
    logits, labels, correct, raw = load(name)
    temperature = fit_temperature(logits[cal], labels[cal])
    msp = 1 - logits_to_probs(logits / temperature).amax(1)
    rule = fit_abstention(
        msp[cal], correct[cal], risk=RISK, delta=DELTA, alternatives={"raw_msp": raw[cal]}
    )
    score = msp if rule.score == "msp" else raw
    return rule, score.double() <= rule.threshold, correct, (msp, raw)


def best_coverage(score: torch.Tensor, correct: torch.Tensor) -> float:
    """The largest share a threshold on ``score`` accepts with an error rate <= RISK."""
    wrong = (~correct[torch.sort(score, stable=True).indices]).double()
    counts = torch.arange(1, len(score) + 1, dtype=torch.float64)
    ok = torch.cumsum(wrong, 0) <= RISK * counts
    return float(counts[ok].max()) / len(score) if bool(ok.any()) else 0.0


@requires_cifar100
@pytest.mark.slow
@pytest.mark.parametrize("name", CIFAR100)
def test_after_temperature_coverage_is_at_least_0_9x_the_held_out_best(name):
    """50 random 5000/5000 splits: the mean accepted share of the evaluation half is at
    least 0.9x the best threshold chosen on that half (on either ranking), and the error
    rate there stays within the target on average."""
    labels = load(name)[1]
    gen = torch.Generator().manual_seed(24)
    ratios, risks = [], []
    for _ in range(DRAWS):
        perm = torch.randperm(len(labels), generator=gen)
        cal, ev = perm[:5000], perm[5000:]
        _, accept, correct, (msp, raw) = chain(name, cal)
        oracle = max(best_coverage(msp[ev], correct[ev]), best_coverage(raw[ev], correct[ev]))
        ratios.append(float(accept[ev].double().mean()) / oracle)
        risks.append(float((~correct[ev][accept[ev]]).double().mean()))
    assert np.mean(ratios) >= 0.9
    assert np.mean(risks) <= RISK


@requires_cifar100
@pytest.mark.slow
@pytest.mark.parametrize("name", CIFAR100)
def test_realised_risk_exceeds_the_target_in_at_most_delta_of_draws(name):
    """The guarantee as stated: the 10000 rows are the population, each calibration set
    is 5000 i.i.d. draws from it, and the rule's selective risk on the population exceeds
    RISK in at most DELTA of 50 draws (plus two binomial standard deviations)."""
    labels = load(name)[1]
    gen = torch.Generator().manual_seed(124)
    realised = []
    for _ in range(DRAWS):
        cal = torch.randint(len(labels), (5000,), generator=gen)
        rule, accept, correct, _ = chain(name, cal)
        assert rule.threshold >= 0
        realised.append(float((~correct[accept]).double().mean()))
    realised = np.array(realised)
    assert realised.mean() <= RISK
    assert (realised > RISK).sum() <= DELTA * DRAWS + 2 * math.sqrt(DRAWS * DELTA * (1 - DELTA))
