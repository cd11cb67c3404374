"""Calibration metrics against scikit-learn, against plain numpy loops written out here,
and against their defining properties; plus the real CIFAR-100 logits."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from wrapcal.metrics import (
    ECE,
    CalibrationMetrics,
    OODMetrics,
    accuracy,
    adaptive_ece,
    aurc,
    brier,
    check_probs,
    classwise_ece,
    ece,
    ece_bootstrap,
    ece_resampled,
    mce,
    nll,
    reliability_bins,
    softmax_probs,
)
from wrapcal.metrics.bootstrap import auroc_bootstrap, auroc_resampled
from wrapcal.plugin.bootstrap import bootstrap_means, percentile_interval, resample_indices

SHARED_DATA = Path(
    os.environ.get("WRAPCAL_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data"
)
FUNCTIONS = {
    "accuracy": accuracy,
    "nll": nll,
    "brier": brier,
    "ece": ece,
    "adaptive_ece": adaptive_ece,
    "mce": mce,
    "classwise_ece": classwise_ece,
    "aurc": aurc,
}

# ---------------------------------------------------------------- numpy references


def np_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def ref_bin_masks(values: np.ndarray, n_bins: int) -> list[np.ndarray]:
    """Bin i holds (i/n, (i+1)/n]; a value of exactly 0 goes to bin 0."""
    masks = []
    for i in range(n_bins):
        mask = (values > i / n_bins) & (values <= (i + 1) / n_bins)
        if i == 0:
            mask |= values == 0
        masks.append(mask)
    return masks


def ref_ece(probs, labels, n_bins=15):
    conf, correct = probs.max(1), probs.argmax(1) == labels
    total = 0.0
    for m in ref_bin_masks(conf, n_bins):
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return total


def ref_mce(probs, labels, n_bins=15):
    conf, correct = probs.max(1), probs.argmax(1) == labels
    gaps = [abs(correct[m].mean() - conf[m].mean()) for m in ref_bin_masks(conf, n_bins) if m.any()]
    return max(gaps)


def ref_adaptive_ece(probs, labels, n_bins=15):
    conf, correct = probs.max(1), probs.argmax(1) == labels
    order = np.lexsort((correct, conf))  # by confidence, ties: errors first
    total = 0.0
    for group in np.array_split(order, n_bins):
        if len(group):
            total += len(group) / len(conf) * abs(correct[group].mean() - conf[group].mean())
    return total


def ref_classwise_ece(probs, labels, n_bins=15):
    per_class = []
    for k in range(probs.shape[1]):
        p, hit = probs[:, k], labels == k
        total = 0.0
        for m in ref_bin_masks(p, n_bins):
            if m.any():
                total += m.mean() * abs(hit[m].mean() - p[m].mean())
        per_class.append(total)
    return float(np.mean(per_class))


def ref_aurc_plain(conf, correct):
    """The definition, for one given order of the ties (stable, descending)."""
    order = np.argsort(-conf, kind="stable")
    errors = ~correct[order]
    return np.mean([errors[:i].mean() for i in range(1, len(conf) + 1)])


def ref_aurc(probs, labels):
    """Expected risk under random order of tied confidences, one coverage at a time."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    risks = []
    for i in range(1, len(conf) + 1):
        c = np.sort(conf)[::-1][i - 1]  # the confidence at coverage i
        above = conf > c
        tied = conf == c
        expected = (~correct[above]).sum() + (i - above.sum()) * (~correct[tied]).mean()
        risks.append(expected / i)
    return float(np.mean(risks))


def ref_brier(probs, labels):
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean([((probs[n] - onehot[n]) ** 2).sum() for n in range(len(labels))]))


REFERENCES = {
    "ece": ref_ece,
    "mce": ref_mce,
    "adaptive_ece": ref_adaptive_ece,
    "classwise_ece": ref_classwise_ece,
    "aurc": ref_aurc,
    "brier": ref_brier,
}

# ---------------------------------------------------------------- strategies


@st.composite
def prob_batches(draw, max_n=60):
    """float64 probabilities [N, K] from logits with many ties, and labels [N]."""
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(2, 6))
    logit = st.one_of(st.integers(-3, 3).map(float), st.floats(-6, 6, allow_nan=False))
    logits = draw(hnp.arrays(np.float64, (n, k), elements=logit))
    labels = draw(hnp.arrays(np.int64, n, elements=st.integers(0, k - 1)))
    return np_softmax(logits), labels


def calibrated_sample(n, k, seed, sharpen=1.0):
    """Labels drawn from the probabilities: perfectly calibrated when sharpen == 1."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(k, 0.5), size=n)
    cum = probs.cumsum(axis=1)
    labels = (rng.random((n, 1)) > cum).sum(axis=1).clip(max=k - 1)
    shown = probs**sharpen
    return shown / shown.sum(axis=1, keepdims=True), labels


# ---------------------------------------------------------------- cross-checks


@settings(max_examples=60, deadline=None)
@given(prob_batches())
def test_matches_numpy_loops(batch):
    probs, labels = batch
    for name, ref in REFERENCES.items():
        assert FUNCTIONS[name](probs, labels) == pytest.approx(ref(probs, labels), abs=1e-12), name


def test_nll_matches_sklearn_log_loss():
    # Imported here, not at the top: the spawned distributed workers import this module.
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(7), size=500)
    labels = rng.integers(0, 7, 500)
    expected = log_loss(labels, probs, labels=range(7))
    assert nll(probs, labels) == pytest.approx(expected, abs=1e-12)
    # float32 input: same value to float32 precision.
    assert nll(probs.astype(np.float32), labels) == pytest.approx(expected, abs=1e-6)


def test_nll_clamps_zero_probability():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    value = nll(probs, torch.tensor([1, 0]))
    expected = (-np.log(torch.finfo(torch.float32).tiny) - np.log(0.5)) / 2
    assert np.isfinite(value) and value == pytest.approx(expected, rel=1e-12)


def test_brier_binary_is_twice_sklearn():
    from sklearn.metrics import brier_score_loss

    # For K = 2: (p0 - y0)^2 + (p1 - y1)^2 = 2 (p1 - y1)^2, since p0 = 1 - p1, y0 = 1 - y1;
    # so the multiclass Brier score is 2 x sklearn's binary brier_score_loss on p_1.
    rng = np.random.default_rng(2)
    p1 = rng.random(1000)
    labels = rng.integers(0, 2, 1000)
    probs = np.stack([1 - p1, p1], axis=1)
    assert brier(probs, labels) == pytest.approx(2 * brier_score_loss(labels, p1), abs=1e-12)


def test_accuracy():
    probs = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    assert accuracy(probs, [0, 1, 1, 0]) == 0.5


def test_bins_are_closed_on_the_right():
    # Confidence exactly 6/15 belongs to bin 5 = (5/15, 6/15], not bin 6.
    probs = torch.tensor([[6 / 15, 5 / 15, 4 / 15]], dtype=torch.float64)
    counts = reliability_bins(probs, torch.tensor([0]))["count"]
    assert counts[5] == 1 and counts.sum() == 1
    assert ece(probs, [0]) == pytest.approx(1 - 6 / 15, abs=1e-15)


def test_aurc_ties_average_over_orderings():
    # Three tied predictions (one error) between a correct and a wrong one: AURC must be
    # the mean of the plain definition over every order of the tied samples.
    conf = np.array([0.95, 0.7, 0.7, 0.7, 0.55])  # top-label: all >= 1/2 for K = 2
    correct = np.array([True, True, False, True, False])
    plain = []
    for perm in itertools.permutations([1, 2, 3]):
        order = np.array([0, *perm, 4])
        plain.append(ref_aurc_plain(conf[order], correct[order]))
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = np.where(correct, 0, 1)
    assert aurc(probs, labels) == pytest.approx(np.mean(plain), abs=1e-15)
    assert len(set(np.round(plain, 12))) > 1  # the ordering matters, so the test bites


# ---------------------------------------------------------------- properties


@settings(max_examples=50, deadline=None)
@given(prob_batches())
def test_bounds(batch):
    probs, labels = batch
    values = {name: f(probs, labels) for name, f in FUNCTIONS.items()}
    for name in ("accuracy", "ece", "adaptive_ece", "mce", "classwise_ece", "aurc"):
        assert 0 <= values[name] <= 1, name
    assert 0 <= values["brier"] <= 2
    assert values["nll"] >= 0
    assert values["ece"] <= values["mce"] + 1e-12


@settings(max_examples=50, deadline=None)
@given(prob_batches(), st.randoms(use_true_random=False))
def test_invariant_to_sample_order(batch, rnd):
    probs, labels = batch
    perm = np.array(rnd.sample(range(len(labels)), len(labels)))
    for name, f in FUNCTIONS.items():
        assert f(probs[perm], labels[perm]) == pytest.approx(f(probs, labels), abs=1e-12), name


@settings(max_examples=40, deadline=None)
@given(prob_batches(max_n=80), st.lists(st.integers(1, 30), min_size=1, max_size=5))
def test_batched_updates_equal_one_update(batch, cuts):
    probs, labels = batch
    one = CalibrationMetrics()
    one.update(probs, labels)
    single = one.compute()
    # One update: exactly the functional forms.
    for name, f in FUNCTIONS.items():
        assert single[name] == f(probs, labels), name
    assert single["n"] == len(labels)
    many, ece_metric = CalibrationMetrics(), ECE()
    n = len(labels)
    edges = sorted({0, n, *(int(c) for c in np.cumsum(cuts) if c < n)})
    for lo, hi in itertools.pairwise(edges):
        many.update(torch.as_tensor(probs[lo:hi]), torch.as_tensor(labels[lo:hi]))
        ece_metric.update(probs[lo:hi], labels[lo:hi])
    batched = many.compute()
    for name in FUNCTIONS:
        assert batched[name] == pytest.approx(single[name], abs=1e-12), name
    assert ece_metric.compute() == pytest.approx(single["ece"], abs=1e-12)


def test_reset_and_compute_before_update():
    metric = CalibrationMetrics()
    with pytest.raises(RuntimeError, match="call update"):
        metric.compute()
    metric.update(np.array([[0.9, 0.1]]), np.array([1]))
    metric.reset()
    probs, labels = calibrated_sample(200, 3, seed=0)
    metric.update(probs, labels)
    assert metric.compute()["ece"] == ece(probs, labels)
    with pytest.raises(ValueError, match="call reset"):
        metric.update(np.full((2, 4), 0.25), np.array([0, 1]))


def test_state_tensors_are_summable():
    probs, labels = calibrated_sample(1000, 5, seed=3)
    a, b, whole = CalibrationMetrics(), CalibrationMetrics(), CalibrationMetrics()
    a.update(probs[:400], labels[:400])
    b.update(probs[400:], labels[400:])
    whole.update(probs, labels)
    # What all_reduce(SUM) + all_gather would do, by hand.
    for name, tensor in a.state_tensors().items():
        tensor += b.state_tensors()[name]
        assert torch.allclose(tensor, whole.state_tensors()[name], rtol=0, atol=1e-9)
    for name, tensor in b.sample_tensors().items():
        a._samples[name].append(tensor)
    assert a.compute() == pytest.approx(whole.compute(), abs=1e-12)


def test_perfectly_calibrated_data_has_ece_near_zero():
    probs, labels = calibrated_sample(100_000, 10, seed=4)
    assert ece(probs, labels) < 0.01
    assert classwise_ece(probs, labels) < 0.01
    assert adaptive_ece(probs, labels) < 0.01
    # The same data made over-confident is clearly miscalibrated: the test can fail.
    sharp, _ = calibrated_sample(100_000, 10, seed=4, sharpen=2.0)
    assert ece(sharp, labels) > 0.05


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_calibrated_samples_any_seed(seed):
    probs, labels = calibrated_sample(20_000, 4, seed=seed)
    assert ece(probs, labels) < 0.025


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        (np.full(4, 0.25), [0], "must be 2-D"),
        (np.zeros((0, 3)), [], "empty"),
        (np.full((2, 2), 0.5), [0], "labels must be 1-D with N = 2"),
        (np.full((2, 2), 0.5), [0.0, 0.5], "integer class indices"),
        (np.full((2, 2), 0.5), [0, 2], r"labels must be in \[0, 2\); got min 0, max 2"),
        (np.full((2, 2), 0.5), [-1, 0], "index the columns"),
        (np.array([[0.5, np.nan], [0.5, 0.5]]), [0, 1], "NaN or inf"),
        (np.array([[3.0, -1.0], [0.5, 0.5]]), [0, 1], "softmax_probs"),
        (np.array([[0.2, 0.2], [0.5, 0.5]]), [0, 1], "rows summing to 1"),
        (np.array([[1, 0], [0, 1]]), [0, 1], "floating point"),
    ],
)
def test_validation_names_problem_and_fix(probs, labels, message):
    with pytest.raises(ValueError, match=message):
        ece(probs, labels)


def test_inputs_numpy_torch_half_agree():
    probs, labels = calibrated_sample(300, 4, seed=5)
    p32 = torch.as_tensor(probs, dtype=torch.float32)
    assert ece(p32, torch.as_tensor(labels)) == pytest.approx(ece(probs, labels), abs=1e-6)
    checked, y = check_probs(p32.half(), labels)
    assert checked.dtype == torch.float32 and y.dtype == torch.int64
    with pytest.raises(ValueError, match="n_bins"):
        ece(probs, labels, n_bins=0)


# ---------------------------------------------------------------- bootstrap


def test_ece_resampled_equals_loop_of_ece():
    probs, labels = calibrated_sample(500, 5, seed=6, sharpen=1.5)
    index = torch.randint(500, (7, 500), generator=torch.Generator().manual_seed(0))
    values = ece_resampled(probs, labels, index)
    expected = [ece(probs[i.numpy()], labels[i.numpy()]) for i in index]
    assert values.tolist() == pytest.approx(expected, abs=1e-12)


def test_ece_bootstrap_is_the_reflected_percentile_interval():
    probs, labels = calibrated_sample(300, 4, seed=5, sharpen=2.0)
    n, b, seed = len(labels), 250, 11
    # One chunk: the function draws exactly this index matrix.
    index = torch.randint(n, (b, n), generator=torch.Generator().manual_seed(seed))
    values = np.array([ece(probs[i.numpy()], labels[i.numpy()]) for i in index])
    q_low, q_high = np.percentile(values, [2.5, 97.5])
    point = ece(probs, labels)
    got = ece_bootstrap(probs, labels, n_resamples=b, seed=seed, method="percentile")
    assert got == pytest.approx((q_low, q_high), abs=1e-9)
    got = ece_bootstrap(probs, labels, n_resamples=b, seed=seed)  # "basic" by default
    assert got == pytest.approx((max(0, 2 * point - q_high), 2 * point - q_low), abs=1e-9)
    with pytest.raises(ValueError, match="method must be one of"):
        ece_bootstrap(probs, labels, method="bca")
    with pytest.raises(ValueError, match="level"):
        ece_bootstrap(probs, labels, level=95)


def overconfident_sample(n, gap, gen):
    """Top-label confidences in [0.55, 1) whose accuracy is ``gap`` below them: the true
    top-label calibration error is exactly ``gap``, binned or not."""
    conf = 0.55 + 0.45 * torch.rand(n, generator=gen, dtype=torch.float64)
    correct = torch.rand(n, generator=gen, dtype=torch.float64) < conf - gap
    # Two classes carry the top label's probability; the rest share what is left.
    probs = torch.empty(n, 3, dtype=torch.float64)
    probs[:, 0], probs[:, 1], probs[:, 2] = conf, (1 - conf) / 2, (1 - conf) / 2
    return probs, torch.where(correct, 0, 1)


def test_ece_bootstrap_coverage_of_the_true_calibration_error():
    """Why ECE defaults to the basic interval: over many simulated test sets of a slightly
    overconfident model, it covers the true error about 95% of the time; the percentile
    interval, shifted up by the estimator's bias, almost never does."""
    gen, true_gap, trials = torch.Generator().manual_seed(0), 0.02, 120
    covered = {"basic": 0, "percentile": 0}
    for trial in range(trials):
        probs, labels = overconfident_sample(400, true_gap, gen)
        for method in covered:
            low, high = ece_bootstrap(probs, labels, n_resamples=300, seed=trial, method=method)
            covered[method] += low <= true_gap <= high
    rates = {m: c / trials for m, c in covered.items()}
    assert rates["basic"] >= 0.85
    assert rates["percentile"] <= 0.2


def test_ece_bootstrap_interval():
    probs, labels = calibrated_sample(2000, 5, seed=7, sharpen=1.5)
    point = ece(probs, labels)
    low, high = ece_bootstrap(probs, labels, n_resamples=300)
    # sharpen=1.5 makes a clearly miscalibrated model: the bias is small beside the error.
    assert low < point < high
    assert (low, high) == ece_bootstrap(probs, labels, n_resamples=300)  # seeded
    assert (low, high) != ece_bootstrap(probs, labels, n_resamples=300, seed=1)
    # Small chunks (many batched draws) still give a similar interval.
    low_c, high_c = ece_bootstrap(probs, labels, n_resamples=300, chunk_elements=50_000)
    assert abs(low_c - low) < 0.01 and abs(high_c - high) < 0.01
    # Four times the data: about half the width.
    big = calibrated_sample(8000, 5, seed=8, sharpen=1.5)
    low_b, high_b = ece_bootstrap(*big, n_resamples=300)
    assert 0.3 < (high_b - low_b) / (high - low) < 0.75


def _old_chunked_draws(sizes, n_resamples, seed, chunk_elements):
    """The index draw each bootstrap wrote out before they shared one (kept here to pin the
    numbers): chunks of max(1, chunk // sum(sizes)) resamples, one randint per size."""
    gen = torch.Generator().manual_seed(seed)
    step = max(1, chunk_elements // sum(sizes))
    chunks = []
    for lo in range(0, n_resamples, step):
        b = min(step, n_resamples - lo)
        chunks.append(tuple(torch.randint(n, (b, n), generator=gen) for n in sizes))
    return chunks


def test_metrics_and_plugins_share_one_bootstrap():
    probs, labels = calibrated_sample(300, 4, seed=5, sharpen=2.0)
    n, b, seed, chunk = len(labels), 70, 3, 4 * 300  # 4 resamples per chunk: 18 chunks
    draws = _old_chunked_draws((n,), b, seed, chunk)
    assert len(draws) == 18
    shared = list(resample_indices((n,), b, seed, "cpu", chunk))
    assert all(torch.equal(a[0], c[0]) for a, c in zip(draws, shared, strict=True))
    index = torch.cat([d[0] for d in draws])
    values = ece_resampled(probs, labels, index)
    # The same numbers as before: the interval of the old draws' ECEs, read as before.
    q_low, q_high = np.percentile(values.numpy(), [2.5, 97.5])
    got = ece_bootstrap(
        probs, labels, n_resamples=b, seed=seed, method="percentile", chunk_elements=chunk
    )
    assert got == pytest.approx((q_low, q_high), abs=1e-12)
    assert percentile_interval(values) == pytest.approx([q_low, q_high], abs=1e-12)
    # The plugins' means draw the same rows from the same seed (one chunk of 70 here).
    correct = torch.from_numpy(probs.argmax(1) == labels).double()
    means = bootstrap_means(correct[:, None], b, seed)
    one_chunk = torch.randint(n, (b, n), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(means[:, 0], correct[one_chunk].mean(dim=1))
    # AUROC resamples ID and OOD rows separately from one generator, ID first.
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(size=120), rng.normal(0.8, 1, size=80)
    draws = _old_chunked_draws((120, 80), 50, seed, 1000)
    aurocs = torch.cat([auroc_resampled(s_in, s_out, i, o) for i, o in draws])
    q_low, q_high = np.percentile(aurocs.numpy(), [2.5, 97.5])
    got = auroc_bootstrap(s_in, s_out, n_resamples=50, seed=seed, chunk_elements=1000)
    assert got == pytest.approx((q_low, q_high), abs=1e-12)
    with pytest.raises(ValueError, match="n_resamples must be >= 1"):
        next(resample_indices((n,), 0, seed, "cpu"))


# ---------------------------------------------------------------- real data


def _cifar100_logits():
    path = SHARED_DATA / "logits" / "cifar100_resnet20.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found (set WRAPCAL_SHARED_DATA to the shared data directory)")
    with np.load(path, allow_pickle=False) as f:
        return f["logits"], f["labels"]


def test_cifar100_resnet20_against_float64_reference():
    logits, labels = _cifar100_logits()
    ref_probs = np_softmax(logits)
    ref_e = ref_ece(ref_probs, labels)
    ref_nll = -np.mean(np.log(ref_probs[np.arange(len(labels)), labels]))
    got_e, got_nll = ece(ref_probs, labels), nll(ref_probs, labels)
    assert got_e == pytest.approx(ref_e, abs=1e-6)
    assert got_nll == pytest.approx(ref_nll, abs=1e-6)
    assert accuracy(ref_probs, labels) == pytest.approx(0.6883)  # the data's README
    # float32 probabilities straight from torch: the reference on the same numbers.
    p32 = softmax_probs(torch.from_numpy(logits))
    p32_64 = p32.numpy().astype(np.float64)
    assert ece(p32, labels) == pytest.approx(ref_ece(p32_64, labels), abs=1e-6)
    assert nll(p32, labels) == pytest.approx(ref_nll, abs=1e-6)
    # One pass of the class: the same numbers, and within the usual range of a ResNet.
    metric = CalibrationMetrics()
    for lo in range(0, len(labels), 2048):
        metric.update(p32[lo : lo + 2048], labels[lo : lo + 2048])
    result = metric.compute()
    assert result["ece"] == pytest.approx(ece(p32, labels), abs=1e-12)
    assert result["classwise_ece"] == pytest.approx(ref_classwise_ece(p32_64, labels), abs=1e-9)
    assert 0.05 < result["ece"] < 0.2


# ---------------------------------------------------------------- torch.distributed


def _distributed_worker(rank, world, init_file, out_file, probs, labels, scores, is_ood):
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a dead peer fails the test, not hangs it
    )
    try:
        part = slice(0, 300) if rank == 0 else slice(300, None)  # unequal: gather must pad
        calib, top, ood = CalibrationMetrics(), ECE(), OODMetrics()
        calib.update(probs[part], labels[part])
        top.update(probs[part], labels[part])
        ood.update(scores[part], is_ood[part])
        for metric in (calib, top, ood):
            metric.sync()
        result = {"calib": calib.compute(), "ece": top.compute(), "ood": ood.compute()}
        Path(f"{out_file}.{rank}").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(150)
def test_sync_across_two_processes(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    from wrapcal.metrics import ood_metrics

    probs, labels = calibrated_sample(1000, 5, seed=9, sharpen=1.5)
    rng = np.random.default_rng(9)
    is_ood = rng.random(1000) < 0.3
    scores = rng.normal(size=1000) + is_ood
    args = (2, tmp_path / "init", tmp_path / "out", probs, labels, scores, torch.from_numpy(is_ood))
    # Rank 1 in a spawned process, rank 0 here: one interpreter start instead of two.
    peer = torch.multiprocessing.get_context("spawn").Process(
        target=_distributed_worker, args=(1, *args)
    )
    peer.start()
    try:
        _distributed_worker(0, *args)
    finally:
        peer.join(timeout=90)
    assert peer.exitcode == 0
    whole = CalibrationMetrics()
    whole.update(probs, labels)
    for rank in range(2):
        result = json.loads((tmp_path / f"out.{rank}").read_text())
        assert result["calib"] == pytest.approx(whole.compute(), abs=1e-12)
        assert result["ece"] == pytest.approx(ece(probs, labels), abs=1e-12)
        assert result["ood"] == pytest.approx(
            ood_metrics(scores[~is_ood], scores[is_ood]), abs=1e-12
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    from wrapcal.metrics import auroc_bootstrap, ood_metrics

    probs, labels = calibrated_sample(5000, 10, seed=10, sharpen=1.5)
    p, y = torch.from_numpy(probs).float(), torch.from_numpy(labels)
    on_cpu, on_gpu = CalibrationMetrics(), CalibrationMetrics()
    on_cpu.update(p, y)
    on_gpu.update(p.cuda(), y.cuda())
    assert on_gpu.compute() == pytest.approx(on_cpu.compute(), abs=1e-9)
    assert on_gpu.state_tensors()["top"].device.type == "cuda"
    s_in, s_out = torch.randn(3000), torch.randn(2000) + 1
    assert ood_metrics(s_in.cuda(), s_out.cuda()) == pytest.approx(ood_metrics(s_in, s_out))
    low, high = auroc_bootstrap(s_in.cuda(), s_out.cuda(), n_resamples=200)
    assert low < ood_metrics(s_in, s_out)["auroc"] < high
    assert ece_bootstrap(p.cuda(), y.cuda(), n_resamples=200)[0] < ece(p, y)


def _failing_rank_worker(rank, world, init_file, out_file):
    import datetime

    import torch.distributed as dist

    from wrapcal import distributed

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a hang fails the test, after a minute
    )
    result = {}
    try:
        # Bool per-sample state travels (as uint8) and comes back bool, rows in rank order.
        flags = torch.tensor([True, False]) if rank == 0 else torch.tensor([True])
        gathered = distributed.gather_rows(flags)
        result["flags"] = [gathered.dtype == torch.bool, gathered.tolist()]
        metric = ECE()
        metric.update(torch.tensor([[0.9, 0.1]]), torch.tensor([rank]))

        def step():
            if rank == 1:
                raise ValueError("bad batch on rank 1")
            return metric.sync()

        try:
            distributed.agree(step, "syncing the metric")
            result["sync"] = "synced"
        except Exception as err:  # the test reads the message
            result["sync"] = f"{type(err).__name__}: {err}"
        Path(f"{out_file}.{rank}").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(150)
def test_sync_reports_a_failed_rank_instead_of_waiting(tmp_path):
    """``sync`` gathers through wrapcal.distributed, whose collectives start with the
    failure-status exchange: inside ``agree``, a rank that failed before ``sync`` makes
    the others fail with its message (its own all_gather used to wait for it)."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    args = (2, tmp_path / "init", tmp_path / "out")
    peer = torch.multiprocessing.get_context("spawn").Process(
        target=_failing_rank_worker, args=(1, *args)
    )
    peer.start()
    try:
        _failing_rank_worker(0, *args)
    finally:
        peer.join(timeout=90)
    assert peer.exitcode == 0
    first, second = (json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2))
    assert first["flags"] == second["flags"] == [True, [True, False, True]]
    assert first["sync"] == (
        "DistributedError: rank 1 failed while syncing the metric: ValueError: bad batch on rank 1"
    )
    assert second["sync"] == "ValueError: bad batch on rank 1"
