"""OOD metrics against scikit-learn (ties included), their defining properties, the
baseline scores against numpy formulas, and the AUROC bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from wrapcal.metrics import (
    OODMetrics,
    aupr_in,
    aupr_out,
    auroc,
    auroc_bootstrap,
    auroc_resampled,
    baseline_scores,
    fpr_at_tpr,
    ood_metrics,
    roc_curve,
)

# Integers give many ties; floats give none. Both must match scikit-learn.
score = st.one_of(
    st.integers(-4, 4).map(float), st.floats(-10, 10, allow_nan=False, allow_subnormal=False)
)
scores_1d = hnp.arrays(np.float64, st.integers(1, 50), elements=score)


def sklearn_reference(s_in, s_out):
    """ID positive, ranked by -score: the convention written out with scikit-learn."""
    is_in = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = sk_roc_curve(is_in, -s, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(is_in, -s),
        "aupr_in": average_precision_score(is_in, -s),
        "aupr_out": average_precision_score(1 - is_in, s),
        # The first ROC point whose TPR reaches 95% (ID accepted); its FPR.
        "fpr95": fpr[np.argmax(tpr >= 0.95 - 1e-12)],
    }


@settings(max_examples=100, deadline=None)
@given(scores_1d, scores_1d)
def test_matches_sklearn(s_in, s_out):
    got = ood_metrics(s_in, s_out)
    expected = sklearn_reference(s_in, s_out)
    assert got == pytest.approx(expected, abs=1e-9)


def test_matches_sklearn_with_heavy_ties_large():
    rng = np.random.default_rng(0)
    s_in = rng.integers(0, 20, 5000).astype(np.float32)
    s_out = rng.integers(5, 25, 3000).astype(np.float32)
    assert ood_metrics(s_in, s_out) == pytest.approx(sklearn_reference(s_in, s_out), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(scores_1d, scores_1d)
def test_roc_curve_matches_sklearn(s_in, s_out):
    is_in = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    fpr, tpr, thresholds = sk_roc_curve(is_in, -np.r_[s_in, s_out], drop_intermediate=False)
    got_fpr, got_tpr, got_thr = roc_curve(s_in, s_out)
    np.testing.assert_allclose(got_fpr.numpy(), fpr, atol=1e-12)
    np.testing.assert_allclose(got_tpr.numpy(), tpr, atol=1e-12)
    # sklearn thresholds are on -score (first is +inf); ours are on the score itself.
    np.testing.assert_array_equal(got_thr.numpy()[1:], -thresholds[1:])


@settings(max_examples=100, deadline=None)
@given(scores_1d, scores_1d)
def test_auroc_is_antisymmetric_and_bounded(a, b):
    assert 0 <= auroc(a, b) <= 1
    assert auroc(a, b) + auroc(b, a) == pytest.approx(1, abs=1e-12)
    for v in ood_metrics(a, b).values():
        assert 0 <= v <= 1


@settings(max_examples=60, deadline=None)
@given(scores_1d, scores_1d, st.randoms(use_true_random=False))
def test_invariant_to_sample_order(a, b, rnd):
    shuffled_a = np.array(rnd.sample(list(a), len(a)))
    shuffled_b = np.array(rnd.sample(list(b), len(b)))
    assert ood_metrics(shuffled_a, shuffled_b) == pytest.approx(ood_metrics(a, b), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(scores_1d, scores_1d, st.integers(1, 6))
def test_only_the_ranking_matters(a, b, k):
    # Scaling normal floats up by a power of two is exact: every order and tie is kept.
    expected = ood_metrics(a, b)
    assert ood_metrics(np.ldexp(a, k), np.ldexp(b, k)) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(scores_1d, scores_1d)
def test_swapping_roles_with_negated_scores(a, b):
    # OOD set b scored -b is "ID" to -a: AUROC is unchanged and AUPR-In, AUPR-Out swap.
    assert auroc(-b, -a) == pytest.approx(auroc(a, b), abs=1e-12)
    assert aupr_in(-b, -a) == pytest.approx(aupr_out(a, b), abs=1e-12)
    assert aupr_out(-b, -a) == pytest.approx(aupr_in(a, b), abs=1e-12)


def test_auroc_known_values():
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0  # every ID sample below every OOD one
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5  # all ties count 1/2
    assert auroc([0.0, 2.0], [1.0]) == 0.5


def test_fpr_at_tpr_threshold_convention():
    s_in = np.arange(100, dtype=np.float64)  # 95% of ID accepted <=> threshold = 94
    # OOD at 93 and at 94 (tied with the threshold) are accepted; 94.5 and 200 are not.
    assert fpr_at_tpr(s_in, [94.0, 94.5, 93.0, 200.0]) == 0.5
    assert fpr_at_tpr(s_in, [94.0], tpr=0.94) == 0.0  # threshold 93
    assert fpr_at_tpr(s_in, [99.0], tpr=1.0) == 1.0
    # 0.07 * 100 = 7.000000000000001 in floating point: still the 7th smallest (6.0).
    assert 0.07 * 100 != 7
    assert fpr_at_tpr(s_in, [6.0, 7.0], tpr=0.07) == 0.5
    with pytest.raises(ValueError, match="tpr must be in"):
        fpr_at_tpr(s_in, [1.0], tpr=0)


@pytest.mark.parametrize(
    ("s_in", "s_out", "message"),
    [
        (np.zeros((2, 2)), np.zeros(2), "1-D"),
        (np.zeros(0), np.zeros(2), "empty"),
        (np.zeros(2), np.array([0.0, np.inf]), "NaN or inf"),
    ],
)
def test_validation(s_in, s_out, message):
    with pytest.raises(ValueError, match=message):
        auroc(s_in, s_out)


def test_ood_metrics_class_equals_functional():
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(size=700), rng.normal(1, 1, size=300)
    metric = OODMetrics()
    with pytest.raises(RuntimeError, match="call update"):
        metric.compute()
    metric.update(s_in[:200], False)
    metric.update(torch.from_numpy(s_out[:100]), True)
    mixed = np.r_[s_in[200:], s_out[100:]]
    mask = np.r_[np.zeros(500, bool), np.ones(200, bool)]
    perm = rng.permutation(700)
    metric.update(mixed[perm], torch.from_numpy(mask[perm]))
    assert metric.compute() == pytest.approx(ood_metrics(s_in, s_out), abs=1e-12)
    metric.reset()
    metric.update(s_in, False)
    metric.update(s_out, True)
    assert metric.compute() == ood_metrics(s_in, s_out)
    with pytest.raises(ValueError, match="mask shaped like scores"):
        metric.update(s_in, np.zeros(3, bool))


def test_baseline_scores_match_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, size=(50, 7))
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    expected = {
        "msp": 1 - p.max(axis=1),
        "max_logit": -logits.max(axis=1),
        "entropy": -(p * np.log(p)).sum(axis=1),
        "energy": -(logits.max(axis=1) + np.log(np.exp(z).sum(axis=1))),
    }
    got = baseline_scores(torch.from_numpy(logits))
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name].numpy(), value, rtol=1e-10, atol=1e-12)


def test_baseline_scores_extreme_logits_and_direction():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]])
    scores = baseline_scores(logits)
    for name, value in scores.items():
        assert torch.isfinite(value).all(), name
        # The confident row must score as less OOD than the uniform one.
        assert value[0] < value[1], name
    assert scores["entropy"][1].item() == pytest.approx(math.log(3))


def test_auroc_resampled_equals_loop():
    rng = np.random.default_rng(3)
    s_in, s_out = rng.integers(0, 10, 80).astype(float), rng.integers(3, 13, 50).astype(float)
    gen = torch.Generator().manual_seed(0)
    idx_in, idx_out = (
        torch.randint(80, (6, 80), generator=gen),
        torch.randint(50, (6, 50), generator=gen),
    )
    got = auroc_resampled(s_in, s_out, idx_in, idx_out)
    expected = [
        auroc(s_in[i.numpy()], s_out[o.numpy()]) for i, o in zip(idx_in, idx_out, strict=True)
    ]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_auroc_bootstrap_methods_reflect_each_other():
    rng = np.random.default_rng(5)
    s_in, s_out = rng.normal(size=300), rng.normal(0.5, 1, size=200)
    low, high = auroc_bootstrap(s_in, s_out, n_resamples=200, seed=2)
    b_low, b_high = auroc_bootstrap(s_in, s_out, n_resamples=200, seed=2, method="basic")
    point = auroc(s_in, s_out)
    assert (b_low, b_high) == pytest.approx((2 * point - high, 2 * point - low), abs=1e-12)
    with pytest.raises(ValueError, match="method must be one of"):
        auroc_bootstrap(s_in, s_out, method="student")


def test_auroc_bootstrap_covers_the_true_value():
    # N(0, 1) ID vs N(1, 1) OOD: true AUROC = Phi(1 / sqrt 2) = 0.7602.
    true_auroc = 0.5 * (1 + math.erf(0.5))
    rng = np.random.default_rng(4)
    s_in, s_out = rng.normal(size=2000), rng.normal(1, 1, size=1500)
    low, high = auroc_bootstrap(s_in, s_out, n_resamples=400)
    assert low < auroc(s_in, s_out) < high
    assert low < true_auroc < high
    assert 0.01 < high - low < 0.06  # about 2 x 1.96 x 0.008, the standard error here
    assert (low, high) == auroc_bootstrap(s_in, s_out, n_resamples=400)
