"""``auto_calibration``: the table it chooses from is out-of-fold and reproducible by hand,
the choice follows the metric among calibrators no worse than identity on NLL, identity is
kept (with a warning) when nothing helps, and on real logits it never ships a worse NLL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, softmax
from shared_data import SHARED_DATA, resnet20_outputs

from wrapcal import metrics
from wrapcal.logits.calibrators import fit_calibrator
from wrapcal.logits.temperature import fit_temperature
from wrapcal.plugin.calibrator import stratified_folds
from wrapcal_plugins.calibration.auto_calibration import DEFAULT_CANDIDATES, METRICS

CHEAP = ["temperature", "vector_scaling", "ensemble_temperature", "isotonic"]


def mixture(n: int = 1500, k: int = 5, seed: int = 0, t: float = 1.8):
    """float64 logits, labels from softmax(z @ M / t): miscalibrated per class."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 2.5
    mix = np.eye(k) + rng.normal(size=(k, k)) * 0.2
    p = softmax(z @ mix.T / t, axis=1)
    y = (rng.random((n, 1)) > p.cumsum(1)).sum(1).clip(0, k - 1)
    return z, y


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_choice_follows_the_metric_among_calibrators_no_worse_than_identity(metric) -> None:
    z, y = mixture()
    auto = fit_calibrator(z, y, "auto_calibration", candidates=CHEAP, metric=metric, cv=3)
    table = auto.table_
    assert [row["method"] for row in table] == ["identity", *CHEAP]
    assert json.loads(json.dumps(table)) == table  # JSON-able, saved with the model
    identity = table[0]["nll"]
    eligible = [row for row in table[1:] if row["nll"] <= identity]
    assert eligible, "every calibrator should help on these miscalibrated logits"
    assert auto.chosen_ == min(eligible, key=lambda row: row[metric])["method"]
    chosen = auto.calibrators[auto.chosen_]
    np.testing.assert_array_equal(auto.transform(z), chosen.transform(z))


def test_the_table_is_out_of_fold_and_reproducible_by_hand() -> None:
    z, y = mixture(seed=1)
    auto = fit_calibrator(z, y, "auto_calibration", candidates=["temperature"], cv=4, seed=3)
    out = np.empty_like(z)
    for held in stratified_folds(torch.from_numpy(y), 4, seed=3):
        held = held.numpy()
        train = np.setdiff1d(np.arange(len(y)), held)
        out[held] = log_softmax(z[held] / fit_temperature(z[train], y[train]), axis=1)
    p, labels = torch.from_numpy(np.exp(out)), torch.from_numpy(y)
    row = auto.table_[1]
    for name, fn in METRICS.items():
        assert row[name] == pytest.approx(float(fn(p, labels)), rel=1e-9, abs=1e-12), name
    assert row["accuracy"] == pytest.approx(metrics.accuracy(p, labels))
    ident = torch.from_numpy(softmax(z, axis=1))
    assert auto.table_[0]["nll"] == pytest.approx(metrics.nll(ident, labels), rel=1e-12)


def test_identity_is_kept_with_a_warning_when_nothing_helps() -> None:
    """Labels drawn from softmax(z) itself: the logits are calibrated, and a one-vs-rest
    binning of 4 classes from 300 samples can only lose NLL."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=(300, 4)) * 2
    y = (rng.random((300, 1)) > softmax(z, 1).cumsum(1)).sum(1).clip(0, 3)
    with pytest.warns(UserWarning, match="no calibrator lowers the cross-validated NLL"):
        auto = fit_calibrator(z, y, "auto_calibration", candidates=["histogram_binning"], cv=3)
    assert auto.chosen_ == "identity" and auto.chosen is None
    assert auto.table_[1]["nll"] > auto.table_[0]["nll"]
    np.testing.assert_array_equal(auto.transform(z), z)


def test_every_built_in_calibrator_is_a_default_candidate() -> None:
    auto = fit_calibrator(*mixture(n=600), "auto_calibration", cv=2)
    assert list(auto.calibrators) == list(DEFAULT_CANDIDATES)
    assert [row["method"] for row in auto.table_] == ["identity", *DEFAULT_CANDIDATES]
    assert all(c.fitted_ for c in auto.calibrators.values())  # inspectable after the choice


# --- real logits -----------------------------------------------------------------------------


def real_sets():
    sets = {}
    for name in ("cifar10_resnet20", "cifar10_resnet32", "cifar100_resnet20", "cifar100_resnet32"):
        path = SHARED_DATA / "logits" / f"{name}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as f:
                sets[name] = (f["logits"], f["labels"])
    return sets


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10_resnet32", "cifar100_resnet20", "resnet20_jpeg"])
def test_auto_never_ships_a_worse_held_out_nll_on_real_logits(name: str) -> None:
    if name == "resnet20_jpeg":
        o = resnet20_outputs()  # skips when ../shared/data is absent
        logits, labels = o["test_logits"].numpy(), o["test_labels"].numpy()
    else:
        sets = real_sets()
        if name not in sets:
            pytest.skip("logit sets not found")
        logits, labels = sets[name]
    perm = np.random.default_rng(0).permutation(len(labels))
    cal, ev = perm[:5000], perm[5000:]
    auto = fit_calibrator(logits[cal], labels[cal], "auto_calibration")
    p = torch.softmax(auto.transform(torch.from_numpy(logits[ev]).double()), 1)
    before = metrics.nll(torch.softmax(torch.from_numpy(logits[ev]).double(), 1), labels[ev])
    after = metrics.nll(p, labels[ev])
    assert after < before
    best_cv = min(auto.table_[1:], key=lambda row: row["nll"])["method"]
    assert auto.chosen_ == best_cv
