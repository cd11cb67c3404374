"""Histogram binning and isotonic regression against references written out here
(Zadrozny & Elkan's one-vs-rest binning, Gupta & Ramdas's top-label binning), against
scikit-learn's IsotonicRegression and CalibratedClassifierCV, and against netcal 1.4.0
where it is installed; the knot lookups against numpy; what the outputs guarantee."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_softmax, logsumexp, softmax
from shared_data import SHARED_DATA
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.isotonic import IsotonicRegression

from wrapcal.logits.calibrators import fit_calibrator
from wrapcal_plugins.calibration._maps import interp_lookup, pad_knots, pad_steps, step_lookup
from wrapcal_plugins.calibration.binning import capped_shares

TINY = 1e-300  # a floor that changes nothing in float64: outputs compare exactly
LOGITS = SHARED_DATA / "logits" / "cifar10_resnet20.npz"


def data(n: int = 4000, k: int = 6, seed: int = 0):
    """float64 logits and labels (an overconfident model, 70-80% accurate), and the
    calibration/evaluation halves' probabilities."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, 5)) * 1.4
    latent = rng.integers(0, k, n)
    z = (centres[latent] + rng.normal(size=(n, 5))) @ centres.T
    p_true = softmax(z / 2.0, axis=1)
    y = (rng.random((n, 1)) > p_true.cumsum(1)).sum(1).clip(0, k - 1)
    return z, y


def real_or_synthetic():
    if LOGITS.is_file():
        with np.load(LOGITS, allow_pickle=False) as f:
            z, y = f["logits"].astype(np.float64), f["labels"]
        perm = np.random.default_rng(0).permutation(len(y))
        return z[perm], y[perm]
    return data(10_000, 10)


def ours(z, y, method, **params):
    half = len(y) // 2
    cal = fit_calibrator(z[:half], y[:half], method, min_prob=TINY, **params)
    return np.exp(cal.transform(z[half:]))


# --- references written out ------------------------------------------------------------


def reference_one_vs_rest_binning(p_cal, y_cal, p_ev, n_bins=15):
    """Per class: equal-width bins (i/n, (i+1)/n] of p_k, the share of y == k in each
    (its centre when empty), then the rows renormalised."""
    k = p_cal.shape[1]
    out = np.empty_like(p_ev)
    edges = np.arange(1, n_bins) / n_bins
    for c in range(k):
        idx_cal = np.searchsorted(edges, p_cal[:, c], side="left")
        values = np.array(
            [
                (y_cal[idx_cal == b] == c).mean() if np.any(idx_cal == b) else (b + 0.5) / n_bins
                for b in range(n_bins)
            ]
        )
        out[:, c] = values[np.searchsorted(edges, p_ev[:, c], side="left")]
    return out / out.sum(1, keepdims=True)


def reference_top_label_binning(p_cal, y_cal, p_ev, points_per_bin=50):
    """Gupta & Ramdas's HB_toplabel (their code, without the tie-breaking noise): for
    each predicted class with at least points_per_bin predictions, uniform-mass bins of
    the confidence (np.array_split, upper edges = each group's largest score), bin index
    = number of edges below the score, value = mean correctness (0.5 if empty); other
    classes unchanged. Returns the calibrated top-label confidence h."""
    conf, pred = p_cal.max(1), p_cal.argmax(1)
    correct = pred == y_cal
    conf_ev, pred_ev = p_ev.max(1), p_ev.argmax(1)
    h = conf_ev.copy()
    for c in range(p_cal.shape[1]):
        chosen = pred == c
        n_bins = int(chosen.sum()) // points_per_bin
        if n_bins == 0:
            continue
        groups = np.array_split(np.sort(conf[chosen]), n_bins)
        edges = np.array([g.max() for g in groups[:-1]])
        bins = (conf[chosen][:, None] > edges[None]).sum(1)
        values = np.array(
            [correct[chosen][bins == b].mean() if np.any(bins == b) else 0.5 for b in range(n_bins)]
        )
        mine = pred_ev == c
        h[mine] = values[(conf_ev[mine][:, None] > edges[None]).sum(1)]
    return h


def reference_capped_shares(p: np.ndarray, h: float, below: float = 1e-6) -> np.ndarray:
    """The rest 1 - h shared among the non-top classes in proportion to p, none above
    h (1 - below), written out as a loop: cap the largest share until the rest fits."""
    top = int(p.argmax())
    cap = h * (1 - below)
    others = [j for j in np.argsort(-p, kind="stable") if j != top]
    q = np.zeros_like(p)
    q[top] = h
    rest, capped = 1 - h, 0
    while capped < len(others):
        free = others[capped:]
        t = (rest - capped * cap) / p[free].sum()
        if t * p[free[0]] <= cap and rest - capped * cap >= 0:
            q[others[:capped]] = cap
            q[free] = t * p[free]
            return q
        capped += 1
    q[others] = rest / len(others)
    return q


class ProbaClassifier(ClassifierMixin, BaseEstimator):
    """Row indices -> cached probabilities; only predict_proba, so scikit-learn's
    calibration maps the probabilities (as netcal does)."""

    def __init__(self, probs: np.ndarray):
        self.probs = probs

    def fit(self, X=None, y=None):
        self.classes_ = np.arange(self.probs.shape[1])
        return self

    def predict_proba(self, X):
        return self.probs[np.asarray(X, dtype=np.int64).reshape(-1)]

    def predict(self, X):
        return self.predict_proba(X).argmax(1)


# --- one-vs-rest ------------------------------------------------------------------------


def test_one_vs_rest_binning_is_zadrozny_elkan() -> None:
    z, y = real_or_synthetic()
    half = len(y) // 2
    p = softmax(z, axis=1)
    want = reference_one_vs_rest_binning(p[:half], y[:half], p[half:])
    got = ours(z, y, "histogram_binning", mode="one_vs_rest")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-290)


def test_one_vs_rest_binning_matches_netcal() -> None:
    binning = pytest.importorskip("netcal.binning")
    z, y = real_or_synthetic()
    half = len(y) // 2
    p = softmax(z, axis=1)
    peer = binning.HistogramBinning(bins=15).fit(p[:half], y[:half])
    theirs = peer.transform(p[half:])
    np.testing.assert_allclose(
        ours(z, y, "histogram_binning", mode="one_vs_rest"), theirs, rtol=1e-9, atol=1e-12
    )


def test_isotonic_one_vs_rest_matches_sklearn_and_netcal() -> None:
    z, y = real_or_synthetic()
    half = len(y) // 2
    p = softmax(z, axis=1)
    got = ours(z, y, "isotonic", mode="one_vs_rest")
    # scikit-learn, written out: one IsotonicRegression per class, rows renormalised.
    cols = [
        IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")
        .fit(p[:half, c], y[:half] == c)
        .predict(p[half:, c])
        for c in range(p.shape[1])
    ]
    raw = np.stack(cols, 1)
    defined = raw.sum(1) > 0  # where every class maps to 0, scikit-learn gives uniform
    want = raw[defined] / raw[defined].sum(1, keepdims=True)
    np.testing.assert_allclose(got[defined], want, rtol=1e-9, atol=1e-12)
    # scikit-learn's own: CalibratedClassifierCV on a frozen model of the probabilities.
    calibrated = CalibratedClassifierCV(
        FrozenEstimator(ProbaClassifier(p).fit()), method="isotonic"
    )
    calibrated.fit(np.arange(half).reshape(-1, 1), y[:half])
    sk = calibrated.predict_proba(np.arange(half, len(y)).reshape(-1, 1))
    np.testing.assert_allclose(got[defined], sk[defined], rtol=1e-9, atol=1e-12)
    binning = pytest.importorskip("netcal.binning")
    with np.errstate(invalid="ignore", divide="ignore"):
        netcal = binning.IsotonicRegression().fit(p[:half], y[:half]).transform(p[half:])
    np.testing.assert_allclose(got[defined], netcal[defined], rtol=1e-9, atol=1e-12)


# --- top label --------------------------------------------------------------------------


def test_top_label_binning_is_gupta_ramdas() -> None:
    z, y = real_or_synthetic()
    half = len(y) // 2
    p = softmax(z, axis=1)
    h = reference_top_label_binning(p[:half], y[:half], p[half:])
    # Gupta & Ramdas's rule: one bin from points_per_bin predictions on, plain means.
    got = ours(z, y, "histogram_binning", fallback="identity", min_bins=1, shrinkage=0.0)
    top = p[half:].argmax(1)
    np.testing.assert_allclose(got[np.arange(len(h)), top], h, rtol=1e-12, atol=1e-15)
    assert np.array_equal(got.argmax(1), top)  # the prediction stays
    for i in range(0, len(h), 97):  # the rest of the mass, row by row
        np.testing.assert_allclose(
            got[i], reference_capped_shares(p[half + i], h[i]), rtol=1e-9, atol=1e-15
        )


def test_top_label_fallback_pools_rare_classes() -> None:
    """A class predicted fewer than points_per_bin times uses the map pooled over all
    classes (``fallback="pooled"``): its confidences move as the pooled map says."""
    z, y = data(1200, 6, seed=2)
    cal = fit_calibrator(z[:600], y[:600], "histogram_binning", points_per_bin=120, min_bins=1)
    predicted = np.bincount(softmax(z[:600], 1).argmax(1), minlength=6)
    rare = predicted < 120
    assert rare.any() and (~rare).any()
    pooled_row = cal.values_.shape[0] - 1
    assert (cal.route_[torch.from_numpy(rare)] == pooled_row).all()
    assert not cal.keep_.any()
    identity = fit_calibrator(
        z[:600], y[:600], "histogram_binning", points_per_bin=120, fallback="identity", min_bins=1
    )
    assert torch.equal(identity.keep_, torch.from_numpy(rare))
    q = z[600:]
    mine = np.isin(softmax(q, 1).argmax(1), np.flatnonzero(rare))
    kept = np.exp(identity.transform(q))[mine]
    np.testing.assert_allclose(kept, softmax(q[mine], 1), atol=0.01)  # the floor only


def test_a_class_map_needs_two_bins_and_leans_on_the_pooled_map() -> None:
    """The default rule: a class gets its own map only with 2 * points_per_bin
    predictions, and each of its bins is (hits + ppb * mean pooled value) / (count + ppb),
    written out here with numpy."""
    z, y = data(3000, 6, seed=4)
    p = softmax(z, 1)
    conf, pred = p.max(1), p.argmax(1)
    correct = pred == y
    ppb = 200
    cal = fit_calibrator(z, y, "histogram_binning", points_per_bin=ppb, min_prob=TINY)
    counts = np.bincount(pred, minlength=6)
    own = counts >= 2 * ppb
    assert own.any() and (~own).any(), counts  # both kinds occur in this data
    pooled_row = cal.values_.shape[0] - 1
    assert (cal.route_.numpy()[~own] == pooled_row).all()
    # The pooled map: plain uniform-mass bins of all confidences.
    groups = np.array_split(np.sort(conf), len(conf) // ppb)
    pooled_edges = np.array([g[-1] for g in groups[:-1]])
    pooled_bin = np.searchsorted(pooled_edges, conf, side="left")
    pooled_values = np.bincount(pooled_bin, correct) / np.bincount(pooled_bin)
    np.testing.assert_allclose(cal.values_[pooled_row, : len(groups)], pooled_values)
    for c in np.flatnonzero(own):
        mine = pred == c
        n_bins = int(mine.sum()) // ppb
        groups = np.array_split(np.sort(conf[mine]), n_bins)
        edges = np.array([g[-1] for g in groups[:-1]])
        b = np.searchsorted(edges, conf[mine], side="left")
        prior = pooled_values[pooled_bin[mine]]
        want = (
            np.bincount(b, correct[mine], n_bins)
            + ppb * np.bincount(b, prior, n_bins) / np.bincount(b, minlength=n_bins)
        ) / (np.bincount(b, minlength=n_bins) + ppb)
        row = int(cal.route_[c])
        np.testing.assert_allclose(cal.values_[row, :n_bins], want, rtol=1e-12)
        np.testing.assert_allclose(cal.edges_[row, : n_bins - 1], edges)


def _held_out_nll(z, y, n_cal, **params):
    perm = np.random.default_rng(0).permutation(len(y))
    cal, ev = perm[:n_cal], perm[-4000:]
    out = fit_calibrator(z[cal], y[cal], "histogram_binning", **params).transform(z[ev])
    return float(-np.mean(out[np.arange(len(ev)), y[ev]] - logsumexp(out, axis=1)))


def test_top_label_binning_does_not_get_worse_with_more_data() -> None:
    """On the shared CIFAR-100 ShuffleNetV2 (issue 24), Gupta & Ramdas's rule gives
    ~55 classes a single bin from 5000 samples (one constant confidence each) and its
    held-out NLL jumps above the uncalibrated model's; the default rule stays flat."""
    path = SHARED_DATA / "logits" / "zoo_cifar100_shufflenetv2_x1_0.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with np.load(path, allow_pickle=False) as f:
        z, y = f["logits"].astype(np.float64), f["labels"]
    ev = np.random.default_rng(0).permutation(len(y))[-4000:]
    none = float(-np.mean(log_softmax(z[ev], axis=1)[np.arange(len(ev)), y[ev]]))
    ours_by_n = [_held_out_nll(z, y, n) for n in (3000, 4500, 6000)]
    assert max(ours_by_n) < none - 0.05, (ours_by_n, none)
    assert max(ours_by_n) - min(ours_by_n) < 0.01, ours_by_n  # flat: no jump with more data
    old = [_held_out_nll(z, y, n, min_bins=1, shrinkage=0.0) for n in (3000, 6000)]
    assert old[1] > old[0] + 0.03  # the old rule got worse with more data


def test_top_label_isotonic_is_per_class_isotonic_regression() -> None:
    z, y = real_or_synthetic()
    half = len(y) // 2
    p = softmax(z, axis=1)
    conf, pred = p[:half].max(1), p[:half].argmax(1)
    conf_ev, pred_ev = p[half:].max(1), p[half:].argmax(1)
    h = np.empty(len(conf_ev))
    pooled = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(conf, pred == y[:half])
    for c in range(p.shape[1]):
        chosen, mine = pred == c, pred_ev == c
        model = pooled
        if chosen.sum() >= 50:
            model = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")
            model.fit(conf[chosen], y[:half][chosen] == c)
        h[mine] = model.predict(conf_ev[mine])
    got = ours(z, y, "isotonic", mode="top_label")
    np.testing.assert_allclose(got[np.arange(len(h)), pred_ev], h, rtol=1e-9, atol=1e-12)


# --- what the outputs guarantee -----------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    probs=st.lists(st.floats(1e-6, 1.0), min_size=2, max_size=9),
    h=st.floats(0.0, 1.0),
)
def test_capped_shares_is_water_filling(probs, h) -> None:
    p = np.asarray(probs) / np.sum(probs)
    top = int(p.argmax())
    is_top = torch.arange(len(p)) == top
    shares = torch.from_numpy(p / (1 - p[top])).masked_fill(is_top, 0)[None]
    hh = torch.tensor([[h]], dtype=torch.float64)
    got = capped_shares(shares, is_top[None], 1 - hh, hh * (1 - 1e-6))[0].numpy()
    got[top] = h
    np.testing.assert_allclose(got, reference_capped_shares(p, h), rtol=1e-9, atol=1e-12)
    assert got.sum() == pytest.approx(1)


@pytest.mark.parametrize("mode", ["top_label", "one_vs_rest"])
@pytest.mark.parametrize("method", ["histogram_binning", "isotonic"])
def test_outputs_are_log_probabilities_that_may_reorder_classes(method: str, mode: str) -> None:
    z, y = data()
    cal = fit_calibrator(z[:2000], y[:2000], method, mode=mode)
    out = cal.transform(z[2000:].astype(np.float32))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(logsumexp(out.astype(np.float64), axis=1), 0, atol=1e-5)
    k = z.shape[1]
    # The floor held: every probability >= floor / (sum of the floored values <= K).
    assert out.min() >= np.log(0.01 / k / k) - 1e-5
    # One-vs-rest maps can reorder classes (the docs say which methods can), and on
    # this overconfident model they do; top label keeps every prediction whose
    # calibrated confidence is above chance (1 / K).
    top = z[2000:].argmax(1)
    moved = (out.argmax(1) != top).mean()
    before = (z[2000:].argmax(1) == y[2000:]).mean()
    after = (out.argmax(1) == y[2000:]).mean()
    if mode == "top_label":
        h = np.exp(out[np.arange(len(top)), top].astype(np.float64))
        assert np.all(h[out.argmax(1) != top] < 1 / k + 0.01 / k)
    else:
        assert moved > 0 and after > before - 0.02


@pytest.mark.parametrize("method", ["temperature", "ensemble_temperature"])
def test_temperature_methods_never_reorder_classes(method: str) -> None:
    z, y = data()
    out = fit_calibrator(z[:2000], y[:2000], method).transform(z[2000:])
    assert np.array_equal(out.argmax(1), z[2000:].argmax(1))


# --- the lookups --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    knots=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=12, unique=True),
    queries=st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=1, max_size=20),
    seed=st.integers(0, 1000),
)
def test_interp_lookup_is_numpy_interp(knots, queries, seed) -> None:
    x = np.sort(np.asarray(knots))
    y = np.sort(np.random.default_rng(seed).random(len(x)))
    xs, ys = pad_knots([(x, y), (np.array([0.5]), np.array([0.25]))])
    q = torch.tensor([queries, queries], dtype=torch.float64)
    got = interp_lookup(xs, ys, q)
    np.testing.assert_allclose(got[0].numpy(), np.interp(queries, x, y), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got[1].numpy(), 0.25)


def test_step_lookup_bins_closed_on_the_right() -> None:
    edges, values = pad_steps(
        [(np.array([0.2, 0.5]), np.array([0.1, 0.4, 0.9])), (np.array([]), np.array([0.3]))]
    )
    q = torch.tensor([[0.0, 0.2, 0.2001, 0.5, 0.7, 1.0]] * 2, dtype=torch.float64)
    got = step_lookup(edges, values, q)
    assert got[0].tolist() == [0.1, 0.1, 0.4, 0.4, 0.9, 0.9]
    assert got[1].tolist() == [0.3] * 6


# --- isotonic_map is scikit-learn's IsotonicRegression, knot for knot ----------------------


def _sklearn_knots(scores: np.ndarray, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    model.fit(scores, hits.astype(np.float64))
    return model.X_thresholds_, model.y_thresholds_


def test_isotonic_map_equals_sklearn_knots_with_ties_and_near_ties() -> None:
    from wrapcal_plugins.calibration._maps import isotonic_map

    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(2, 400))
        # Exact ties, scores 1e-16 apart (which scikit-learn merges), tiny probabilities
        # and ordinary ones, mixed.
        base = rng.choice([0.0, 1e-20, 3e-16, 1e-15, 0.2, 0.5, 0.9], size=n)
        scores = base + rng.choice([0.0, 1e-16, 4e-16, 1e-3], size=n) * rng.integers(0, 3, n)
        if trial % 2:
            scores = rng.random(n)
        hits = rng.random(n) < np.clip(scores, 0.05, 0.95)
        x, y = isotonic_map(scores, hits)
        sx, sy = _sklearn_knots(scores, hits)
        np.testing.assert_array_equal(x, sx)
        np.testing.assert_array_equal(y, sy)


def test_isotonic_map_equals_sklearn_knots_on_the_shared_logit_sets() -> None:
    from wrapcal_plugins.calibration._maps import isotonic_map

    paths = sorted((SHARED_DATA / "logits").glob("*.npz"))
    if not paths:
        pytest.skip("no logit sets in ../shared/data/logits")
    maps = 0
    for path in paths:
        with np.load(path, allow_pickle=False) as f:
            z, y = f["logits"][:2000].astype(np.float64), f["labels"][:2000]
        p = softmax(z, axis=1)
        columns = [(p[:, k], y == k) for k in range(0, p.shape[1], max(1, p.shape[1] // 10))]
        for scores, hits in [*columns, (p.max(1), p.argmax(1) == y)]:
            x, fitted = isotonic_map(scores, hits)
            sx, sy = _sklearn_knots(scores, hits)
            np.testing.assert_array_equal(x, sx)
            np.testing.assert_array_equal(fitted, sy)
            maps += 1
    assert maps >= 11 * len(paths)


@pytest.mark.parametrize("method", ["histogram_binning", "isotonic"])
def test_a_fitted_map_moves_like_any_module(method: str) -> None:
    # Regression: the maps' lookup was named ``_apply``, which overrode nn.Module._apply,
    # so .to(), .double() and .cuda() on the calibrator (or a model holding it) raised.
    z, y = data()
    cal = fit_calibrator(z[:2000], y[:2000], method)
    before = cal.transform(z[2000:].astype(np.float32))
    assert cal.to(torch.float64) is cal and cal.double() is cal and cal.to("cpu") is cal
    np.testing.assert_allclose(cal.transform(z[2000:].astype(np.float32)), before, atol=1e-6)
