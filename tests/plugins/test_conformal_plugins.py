"""The conformal and abstain plugins: on the shared ResNet-20, saved and loaded, exported,
in the report; abstention's guarantee over 200 splits of real logits and its selection
against scipy.

The ResNet-20 protocol is the README's: calibration on half A of the JPEG CIFAR-10 test
set (seeded permutation), measurement on half B.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from shared_data import (
    load_logits,
    pretrained_resnet20,
    requires_logits,
    requires_shared_data,
    resnet20_outputs,
    splits,
)
from torch import nn

import wrapcal
from wrapcal import DataError, NotFittedError, OutputContext, Stage, get_tags
from wrapcal.logits.abstention import abstention_grid, fit_abstention, risk_coverage_curve
from wrapcal.logits.conformal import fit_conformal
from wrapcal.plugin.probs import logits_to_probs
from wrapcal_plugins.decide.abstain import Abstain
from wrapcal_plugins.decide.conformal import ConformalSets

ALPHA = 0.1


@pytest.fixture(scope="module")
def halves():
    out = resnet20_outputs()
    perm = torch.from_numpy(np.random.default_rng(0).permutation(10000))
    cal, ev = perm[:5000], perm[5000:]
    feats, labels = out["test_features"], out["test_labels"]
    return (feats[cal], labels[cal]), (feats[ev], labels[ev]), out


def fitted(plugins, cal, **sets):
    wrapped = wrapcal.wrap(pretrained_resnet20(), plugins)
    return wrapped.fit_features(calibration=cal, progress=False, **sets)


# --- conformal on the ResNet-20 --------------------------------------------------------


@requires_shared_data
@pytest.mark.parametrize(
    "options",
    [{"method": "lac"}, {"method": "aps"}, {"method": "raps", "classwise": True}],
    ids=["lac", "aps", "raps-classwise"],
)
def test_plugin_sets_are_the_logits_path_after_temperature(halves, options, tmp_path):
    (f_cal, y_cal), (f_ev, y_ev), _ = halves
    wrapped = fitted(["temperature", ("conformal", options)], (f_cal, y_cal))
    alone = fitted(["temperature"], (f_cal, y_cal))
    pred = wrapped.predict_features(f_ev)
    # wrapped(x) still returns the calibrated logits: the sets are extra outputs.
    assert torch.equal(wrapped.head_logits(f_ev), alone.head_logits(f_ev))
    assert pred.kinds["sets"].value == "set" and pred.kinds["set_size"].value == "uncertainty"
    assert pred.sets.dtype == torch.bool and pred.sets.shape == (5000, 10)
    assert torch.equal(pred.set_size, pred.sets.sum(1).float())
    # The same sets as the logits-only path on the temperature-scaled logits.
    reference = fit_conformal(alone.head_logits(f_cal), y_cal, **options)
    assert torch.equal(pred.sets, reference.sets(alone.head_logits(f_ev)))
    coverage = float(pred.sets[torch.arange(5000), y_ev].double().mean())
    assert abs(coverage - (1 - ALPHA)) < 4 * math.sqrt(ALPHA * (1 - ALPHA) * 2 / 5000)
    # Saved and loaded: learned values and outputs bit-identical.
    loaded = wrapcal.load(wrapped.save(tmp_path / "m.wrapcal"), model=pretrained_resnet20())
    again = loaded.predict_features(f_ev)
    assert torch.equal(again.sets, pred.sets) and torch.equal(again.set_size, pred.set_size)
    mine, theirs = wrapped.get_plugin("conformal"), loaded.get_plugin("conformal")
    assert torch.equal(mine.thresholds, theirs.thresholds)
    assert mine.get_state() == theirs.get_state() and mine.get_params() == theirs.get_params()


@requires_shared_data
@pytest.mark.slow
def test_images_and_features_give_the_same_sets(halves):
    from shared_data import cifar10

    (f_cal, y_cal), _, _ = halves
    wrapped = fitted(["temperature", "conformal", "abstain"], (f_cal, y_cal))
    images, _ = cifar10("test")
    with torch.no_grad():
        features = wrapped.backbone(images[:64])
    from_images, from_features = wrapped.predict(images[:64]), wrapped.predict_features(features)
    assert torch.equal(from_images.sets, from_features.sets)
    assert torch.equal(from_images.abstain, from_features.abstain)
    # One input alone gets the same set as in the batch: U is a hash of its logits.
    assert torch.equal(wrapped.predict(images[5:6]).sets, from_images.sets[5:6])


@requires_shared_data
def test_temperature_changes_the_set_sizes_as_measured(halves):
    """Set sizes with and without temperature scaling first (docs/conformal.md): this
    model is overconfident (T = 2.57); LAC sets shrink, APS sets grow (flatter
    probabilities need more classes to reach the same mass); every variant covers."""
    (f_cal, y_cal), (f_ev, y_ev), _ = halves
    sizes = {}
    for method in ("lac", "aps", "raps"):
        for plugins in (["conformal"], ["temperature", "conformal"]):
            plugins = [*plugins[:-1], ("conformal", {"method": method})]
            pred = fitted(plugins, (f_cal, y_cal)).predict_features(f_ev)
            coverage = float(pred.sets[torch.arange(5000), y_ev].double().mean())
            assert abs(coverage - (1 - ALPHA)) < 4 * math.sqrt(ALPHA * (1 - ALPHA) * 2 / 5000)
            sizes[method, len(plugins)] = float(pred.set_size.mean())
    assert sizes["lac", 2] < sizes["lac", 1]
    assert sizes["aps", 2] > sizes["aps", 1]


@requires_shared_data
@pytest.mark.filterwarnings("ignore:no plugin reads train=")
def test_conformal_fit_set_falls_back_to_calibration(halves):
    (f_cal, y_cal), (f_ev, _), _ = halves
    tags = get_tags(ConformalSets())
    assert tags.stage == Stage.DECIDE and tags.fit_reads == ("conformal", "calibration")
    # A separate conformal= set: temperature on one half of A, conformal on the other.
    split = fitted(
        ["temperature", "conformal"],
        (f_cal[:2500], y_cal[:2500]),
        conformal=(f_cal[2500:], y_cal[2500:]),
    )
    plugin = split.get_plugin("conformal")
    assert plugin.n_calibration_ == 2500
    reference = fit_conformal(split.head_logits(f_cal[2500:]), y_cal[2500:])
    assert torch.equal(split.predict_features(f_ev).sets, reference.sets(split.head_logits(f_ev)))
    with pytest.raises(
        DataError, match=r"conformal needs wrapped.fit\(conformal=... or calibration=...\)"
    ):
        wrapcal.wrap(pretrained_resnet20(), ["conformal"]).fit_features(
            train=(f_cal, y_cal), progress=False
        )


def test_standalone_plugin_and_errors():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 5, generator=gen) * 3
    labels = torch.multinomial(logits.softmax(1), 1, generator=gen)[:, 0]
    plugin = ConformalSets(alpha=0.2, method="lac")
    with pytest.raises(NotFittedError, match="ConformalSets is not fitted"):
        plugin.predict_sets(logits)
    assert plugin.fit_logits(logits[:1000], labels[:1000]) is plugin
    assert torch.equal(
        plugin.predict_sets(logits[1000:]),
        wrapcal.logits.conformal.conformal_sets(
            logits[:1000], labels[:1000], logits[1000:], alpha=0.2, method="lac"
        ),
    )
    with pytest.raises(ValueError, match=r"method='thr' is invalid; expected one of"):
        wrapcal.wrap(nn.Linear(4, 3), [("conformal", {"method": "thr"})])
    with pytest.raises(ValueError, match=r"alpha=1.5 is invalid"):
        ConformalSets(alpha=1.5).validate_params()


@pytest.mark.slow
def test_outputs_and_abstain_export_with_torch_export():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3000, 10, generator=gen) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=gen)[:, 0]
    conformal = ConformalSets(method="raps").fit_logits(logits[:2000], labels[:2000])
    probs = logits_to_probs(logits[:2000])
    abstain = Abstain(risk=0.2).fit_scores(1 - probs.amax(1), probs.argmax(1) == labels[:2000])
    # The raw ranking reads the combined logits (here 2z, as if a temperature of 2 were
    # applied to them for the final probabilities).
    raw_msp = 1 - logits_to_probs(2 * logits[:2000]).amax(1)
    raw = Abstain(risk=0.2, ranking="raw").fit_scores(
        1 - probs.amax(1), probs.argmax(1) == labels[:2000], raw_msp=raw_msp
    )
    assert raw.score_ == "raw_msp" and raw.threshold_ >= 0

    class Decide(nn.Module):
        def __init__(self):
            super().__init__()
            self.conformal, self.abstain, self.raw = conformal, abstain, raw

        def forward(self, z):
            p = logits_to_probs(z)
            ctx = OutputContext(z[None], z[None], 2 * z, z, p, {"msp": 1 - p.amax(-1)})
            out = self.conformal.outputs(ctx)
            return (
                out["sets"],
                out["set_size"],
                self.abstain.outputs(ctx)["abstain"],
                self.raw.outputs(ctx)["abstain"],
            )

    module = Decide()
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (logits[2000:],), dynamic_shapes={"z": {0: batch}})
    for got, want in zip(
        program.module()(logits[2000:2500]), module(logits[2000:2500]), strict=True
    ):
        assert torch.equal(got, want)
    test_raw = 1 - logits_to_probs(2 * logits[2000:2500]).amax(1)
    assert torch.equal(module(logits[2000:2500])[3], test_raw.double() > raw.threshold_)


# --- the report -----------------------------------------------------------------------


def test_report_metrics_in_evaluate(tmp_path):
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(3000, 12, generator=gen)
    with torch.no_grad():  # labels from the model's own softmax at T = 2: 88% accurate
        y = torch.multinomial(torch.softmax(model(x) / 2, 1), 1, generator=gen)[:, 0]
    wrapped = wrapcal.wrap(model, ["temperature", "conformal", ("abstain", {"risk": 0.05})])
    wrapped.fit(calibration=(x[:1500], y[:1500]), progress=False)
    report = wrapcal.evaluate(
        {"wrapped": wrapped}, test=(x[1500:], y[1500:]), progress=False, bootstrap=0
    )
    metrics = report.to_dict()["plugin_metrics"]["wrapped"]
    pred = wrapped.predict(x[1500:])
    sets, y_ev = pred.sets.numpy(), y[1500:].numpy()
    covered = sets[np.arange(1500), y_ev]
    conformal = metrics["conformal"]
    assert conformal["coverage"]["value"] == pytest.approx(covered.mean())
    low, high = conformal["coverage"]["ci"]
    assert low < covered.mean() < high and high - low < 0.06
    assert conformal["mean_set_size"]["value"] == pytest.approx(sets.sum(1).mean())
    by_class = [covered[y_ev == c].mean() for c in range(6)]
    assert conformal["coverage_by_class"]["coverage"] == pytest.approx(by_class)
    assert conformal["worst_class_coverage"]["value"] == pytest.approx(min(by_class))
    table = conformal["coverage_by_set_size"]
    assert sum(table["n"]) == 1500 and table["size"] == sorted(set(sets.sum(1).tolist()))
    accept = ~pred.abstain.numpy()
    assert 0.2 < accept.mean() < 0.9
    wrong = pred.label.numpy() != y_ev
    abstain = metrics["abstain"]
    assert abstain["accepted"]["value"] == pytest.approx(accept.mean())
    assert abstain["selective_risk"]["value"] == pytest.approx(wrong[accept].mean())
    curve = abstain["risk_coverage"]
    assert curve["coverage"][-1] == 1.0 and curve["risk"][-1] == pytest.approx(wrong.mean())
    # The same numbers in the JSON and the Markdown.
    text = report.to_markdown()
    size = f"{conformal['mean_set_size']['value']:.3f}"[:4]
    assert "mean_set_size" in text and "selective_risk" in text and size in text
    # Seeded bootstrap: the same intervals again.
    assert (
        wrapped.get_plugin("conformal").report_metrics(pred, y[1500:])["coverage"]
        == conformal["coverage"]
    )


# --- abstention -----------------------------------------------------------------------


def scipy_threshold(msp: np.ndarray, correct: np.ndarray, risk: float, delta: float, grid: int):
    """Learn then Test with Bonferroni, written out with scipy's binomial distribution."""
    chosen, bound = -1.0, 1.0
    for lam in abstention_grid(grid).numpy():
        accepted = msp <= lam
        m, k = accepted.sum(), (~correct[accepted]).sum()
        if m and stats.binom.cdf(k, m, risk) <= delta / grid:
            chosen = lam
            bound = 1.0 if k == m else stats.beta.ppf(1 - delta / grid, k + 1, m - k)
    return chosen, bound


@requires_logits
@pytest.mark.parametrize("name", ["cifar10_resnet20", "cifar100_resnet20"])
def test_abstention_threshold_matches_scipy(name):
    logits, labels = load_logits(name)
    probs = logits_to_probs(logits[:5000])
    msp, correct = (1 - probs.amax(1)).numpy(), (probs.argmax(1) == labels[:5000]).numpy()
    for risk in (0.01, 0.05, 0.2):
        # 0.2.0's rule, now method="bonferroni" (the default is fixed-sequence testing,
        # checked against scipy in tests/logits/test_abstention.py).
        rule = fit_abstention(msp, correct, risk=risk, delta=0.1, method="bonferroni")
        threshold, bound = scipy_threshold(msp, correct, risk, 0.1, 100)
        assert rule.threshold == threshold
        assert rule.bound == pytest.approx(bound, abs=1e-9)
        if threshold >= 0:
            assert rule.calibration_risk <= rule.bound <= risk


@requires_shared_data
@requires_logits
@pytest.mark.parametrize("name", ["cifar10_resnet20", "cifar100_resnet20", "resnet20_jpeg"])
def test_abstention_guarantee_over_200_splits(name):
    """The error rate of accepted predictions on the whole pool (the population the
    splits are drawn from) exceeds the target in at most delta of the splits; and the
    accepted share is close to the best a fixed threshold of the grid could reach."""
    logits, labels = load_logits(name)
    probs = logits_to_probs(logits)
    msp, correct = 1 - probs.amax(1), probs.argmax(1) == labels
    risk, delta = (0.02, 0.1) if name.startswith("cifar10_") else (0.1, 0.1)
    grid = abstention_grid(100)
    accepted = msp[None, :].double() <= grid[:, None]
    pool_risk = ((~correct) & accepted).sum(1) / accepted.sum(1).clamp_min(1)
    oracle = float(accepted[pool_risk <= risk].double().mean(1).max())
    misses, shares = 0, []
    for perm in splits(len(labels), 200, seed=13):
        cal = perm[:5000]
        rule = fit_abstention(msp[cal], correct[cal], risk=risk, delta=delta)
        kept = msp.double() <= rule.threshold
        misses += bool(kept.any()) and float((~correct[kept]).double().mean()) > risk
        shares.append(float(kept.double().mean()))
    assert misses / 200 <= delta
    assert oracle - 0.15 < np.mean(shares) <= oracle


@requires_shared_data
def test_abstain_plugin_on_the_resnet20(halves, tmp_path):
    (f_cal, y_cal), (f_ev, y_ev), _ = halves
    wrapped = fitted(["temperature", ("abstain", {"risk": 0.05})], (f_cal, y_cal))
    plugin = wrapped.get_plugin("abstain")
    head = pretrained_resnet20().linear
    with torch.no_grad():  # the raw msp: the head's logits before the temperature
        raw_cal, raw_ev = (1 - logits_to_probs(head(f)).amax(1) for f in (f_cal, f_ev))
    cal_pred = wrapped.predict_features(f_cal)
    correct = cal_pred.label == y_cal
    rule = fit_abstention(
        cal_pred.scores["msp"], correct, risk=0.05, delta=0.1, alternatives={"raw_msp": raw_cal}
    )
    assert plugin.score_ == rule.score and plugin.rule_ == rule
    assert plugin.threshold_ == rule.threshold and plugin.risk_bound_ == rule.bound
    pred = wrapped.predict_features(f_ev)
    score = raw_ev if rule.score == "raw_msp" else pred.scores["msp"]
    assert torch.equal(pred.abstain, score.double() > rule.threshold)
    accepted = ~pred.abstain
    assert 0.4 < float(accepted.double().mean()) < 0.8
    assert float((pred.label[accepted] != y_ev[accepted]).double().mean()) < 0.05
    loaded = wrapcal.load(wrapped.save(tmp_path / "a.wrapcal"), model=pretrained_resnet20())
    assert torch.equal(loaded.predict_features(f_ev).abstain, pred.abstain)
    assert loaded.get_plugin("abstain").get_state() == plugin.get_state()
    curve = risk_coverage_curve(pred.scores["msp"], pred.label == y_ev)
    assert curve["risk"][0] <= curve["risk"][-1] and len(curve["coverage"]) == 101
    # ranking="calibrated" with method="bonferroni" is 0.2.0's rule on the calibrated msp;
    # the default accepts more at the same target.
    old = fitted(
        ["temperature", ("abstain", {"ranking": "calibrated", "method": "bonferroni"})],
        (f_cal, y_cal),
    ).get_plugin("abstain")
    msp_only = fit_abstention(cal_pred.scores["msp"], correct, method="bonferroni", grid=100)
    assert old.score_ == "msp" and old.threshold_ == msp_only.threshold
    assert plugin.accepted_ > old.accepted_


def test_abstain_state_of_0_2_0_without_score_loads_as_msp():
    plugin = Abstain().fit_scores(torch.linspace(0, 0.5, 400), torch.arange(400) < 380)
    state = plugin.get_state()
    assert state["score_"] == "msp"
    del state["score_"]  # what 0.2.0 saved
    again = Abstain()
    again.set_state(state)
    assert again.score_ == "msp" and again.threshold_ == plugin.threshold_
    with pytest.raises(ValueError, match="score_"):
        Abstain().set_state({**state, "score_": "energy"})
    with pytest.raises(ValueError, match="ranking='raw' needs raw_msp"):
        Abstain(ranking="raw").fit_scores(torch.zeros(10), torch.ones(10, dtype=torch.bool))


# --- conformal: stated defaults and allow_empty=False (issue 24, item 3; helper H3) -----


def test_conformal_defaults_are_stated():
    """The defaults the docs state: randomised APS at alpha 0.1, empty sets allowed."""
    plugin = ConformalSets()
    assert (plugin.method, plugin.alpha, plugin.randomized) == ("aps", 0.1, True)
    assert plugin.allow_empty is True
    with pytest.raises(ValueError, match=r"allow_empty=1 is invalid"):
        ConformalSets(allow_empty=1).validate_params()


@requires_shared_data
def test_allow_empty_false_on_the_resnet20(halves, tmp_path):
    """On the shared ResNet-20 the default APS sets are empty on some rows (0.96% in
    docs/conformal.md); ``allow_empty=False`` gives none, equals the logits path with the
    same option, keeps coverage and survives save and load."""
    (f_cal, y_cal), (f_ev, y_ev), _ = halves
    default = fitted(["conformal"], (f_cal, y_cal)).predict_features(f_ev)
    wrapped = fitted([("conformal", {"allow_empty": False})], (f_cal, y_cal))
    pred = wrapped.predict_features(f_ev)
    assert float((default.set_size == 0).double().mean()) > 0.005
    assert int((pred.set_size == 0).sum()) == 0
    assert bool(pred.sets[torch.arange(5000), pred.probs.argmax(1)].all())
    reference = fit_conformal(wrapped.head_logits(f_cal), y_cal, allow_empty=False)
    assert torch.equal(pred.sets, reference.sets(wrapped.head_logits(f_ev)))
    coverage = float(pred.sets[torch.arange(5000), y_ev].double().mean())
    assert coverage >= 1 - ALPHA - 4 * math.sqrt(ALPHA * (1 - ALPHA) / 5000)
    loaded = wrapcal.load(wrapped.save(tmp_path / "m.wrapcal"), model=pretrained_resnet20())
    plugin = loaded.get_plugin("conformal")
    assert plugin.allow_empty is False and plugin.hash_version_ == 2
    assert torch.equal(loaded.predict_features(f_ev).sets, pred.sets)
