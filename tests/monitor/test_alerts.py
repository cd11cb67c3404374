"""Alert rules: each one on hand-made summaries at its boundary, then the false-alert
rate on many clean windows and the OOD alert on windows with 20% OOD inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import wrapcal
from wrapcal.monitoring import AlertRules, check_rules


def summary(**changes):
    base = {
        "index": 3,
        "name": "w3",
        "n": 500,
        "estimated_accuracy": 0.90,
        "baseline_accuracy": 0.92,
        "ood": {"output": "knn", "rate": 0.05, "flagged": 25, "expected": 0.05, "pvalue": 0.5},
        "drift": {"msp": {"ks": 0.02, "pvalue": 0.6, "psi": 0.01}},
    }
    return {**base, **changes}


def rules_of(s, **kw):
    return [a.rule for a in check_rules(s, AlertRules(**kw))]


def test_accuracy_rules_at_their_bounds():
    assert rules_of(summary(), min_accuracy=0.9) == []  # not below: equal
    assert rules_of(summary(estimated_accuracy=0.8999), min_accuracy=0.9) == ["accuracy_below"]
    assert rules_of(summary(estimated_accuracy=0.871)) == []  # dropped 4.9 points
    found = check_rules(summary(estimated_accuracy=0.869), AlertRules())
    assert [a.rule for a in found] == ["accuracy_drop"]
    assert found[0].limit == pytest.approx(0.87) and found[0].window == 3
    assert rules_of(summary(estimated_accuracy=0.5), max_drop=None) == []  # switched off
    assert rules_of(summary(baseline_accuracy=None, estimated_accuracy=0.5)) == []


def test_ood_rule_is_the_binomial_test():
    # 36 of 500 at 5% expected: scipy's one-sided p-value decides, at the rule's level.
    p = stats.binomtest(36, 500, 0.05, "greater").pvalue
    s = summary(ood={"output": "knn", "rate": 0.072, "flagged": 36, "expected": 0.05, "pvalue": p})
    assert 0.01 < p < 0.05
    assert rules_of(s) == [] and rules_of(s, ood_alpha=0.05) == ["ood_rate"]
    assert rules_of(s, ood_alpha=None, drift_alpha=None) == []
    assert rules_of(summary(ood=None)) == []


def test_drift_rule_is_bonferroni_over_the_scores():
    drift = {
        "msp": {"ks": 0.1, "pvalue": 0.0051, "psi": 0.1},
        "energy": {"ks": 0.05, "pvalue": 0.3, "psi": 0.02},
    }
    assert rules_of(summary(drift=drift)) == []  # 0.0051 >= 0.01 / 2
    drift["msp"]["pvalue"] = 0.0049
    alerts = check_rules(summary(drift=drift), AlertRules())
    assert [a.rule for a in alerts] == ["drift"] and "msp" in alerts[0].message
    assert alerts[0].limit == pytest.approx(0.005)
    assert rules_of(summary(drift={})) == []


def test_rules_refuse_bad_thresholds():
    with pytest.raises(ValueError, match="ood_alpha"):
        AlertRules(ood_alpha=0)
    with pytest.raises(ValueError, match="max_drop"):
        AlertRules(max_drop=1.5)
    with pytest.raises(TypeError, match="min_accuracy"):
        AlertRules(min_accuracy="high")


def test_false_alert_rate_on_clean_windows(world, calibrated, calibration):
    """400 clean windows of 200 fresh inputs, every rule on (OOD: msp past its operating
    point): the share raising any alert stays at the documented rate, at most about
    ood_alpha + drift_alpha = 2% (4%: the bound plus the draw's noise at 400 windows)."""
    reference = wrapcal.monitoring.Reference.from_data(calibrated, calibration)
    x, y = world.sample(400 * 200, seed=50)
    result = wrapcal.monitor(
        calibrated, (x, y), window_size=200, reference=reference, ood_score="msp"
    )
    fired = np.mean([bool(w.alerts) for w in result.windows])
    print(f"false-alert rate on clean windows: {fired:.4f} ({len(result.windows)} windows)")
    assert len(result.windows) == 400 and result.settings["ood"]["output"] == "msp"
    assert fired <= 0.04
    # The estimate on clean windows: within the interval's scale of the truth.
    errors = np.array([w.estimate_error for w in result.windows])
    assert abs(errors.mean()) < 0.01


def test_windows_with_a_fifth_of_ood_inputs_alert(world, wrapped, calibration):
    reference = wrapcal.monitoring.Reference.from_data(wrapped, calibration)
    windows = []
    for s in range(10):
        x = world.sample(200, seed=70 + s)[0]
        x[:40] = world.far(40, seed=s)  # 20% far from every class
        windows.append(x)
    result = wrapcal.monitor(wrapped, windows, reference=reference)
    assert all(any(a.rule == "ood_rate" for a in w.alerts) for w in result.windows)
    assert all(w.ood["output"] == "knn" and w.ood["rate"] >= 0.15 for w in result.windows)
    assert result.alerts and {a.rule for a in result.alerts} >= {"ood_rate", "drift"}
