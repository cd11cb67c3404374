"""The ``ood`` decision plugin: its formulas written out, its false-alarm guarantee on the
shared ResNet-20, its errors, save/load and export.

The model is the ResNet-20's head on an identity backbone (its inputs are the cached
penultimate features), with ``vim`` and ``mahalanobis`` beside the core's ``energy`` and
``max_logit``: the detectors and ``ood``'s references fit on the 10000 CIFAR-10 training
features, its p-value on 3000 test images, and the other 7000 test the guarantee.
"""

from __future__ import annotations

import math
import warnings
from functools import cache

import numpy as np
import pytest
import torch
from scipy.special import ndtri
from shared_data import requires_shared_data, resnet20_on_features, resnet20_outputs
from torch import nn

import wrapcal
from wrapcal import DataError, OutputKind
from wrapcal.model.split import Split
from wrapcal_plugins.decide.ood_decision import (
    COMBINATIONS,
    OODDecision,
    combine,
    conformal_pvalues,
    reference_pvalues,
)

N_CAL = 3000
ALPHAS = (0.01, 0.05, 0.1)
PLUGINS = ["vim", "mahalanobis", ("ood", {"max_reference": 2000})]


# --- the formulas, written out in numpy ------------------------------------------------------


def numpy_pvalue(reference: np.ndarray, s: float) -> float:
    """Bates et al. 2023, eq. (2): (1 + #{reference >= s}) / (n + 1)."""
    return (1 + np.sum(reference >= s)) / (len(reference) + 1)


def numpy_combination(p: np.ndarray, combination: str, n: int) -> np.ndarray:
    """The combinations of the plugin's docstring; p' = (1 + count) / (n + 2)."""
    inner = p * (n + 1) / (n + 2)
    if combination == "fisher":
        return -2 * np.log(p).sum(axis=1)
    if combination == "min_p":
        return -np.log(p.min(axis=1))
    if combination == "stouffer":
        return ndtri(1 - inner).sum(axis=1)
    return np.tan((0.5 - inner) * math.pi).sum(axis=1)


def test_reference_and_conformal_pvalues_equal_the_formula_with_ties() -> None:
    g = np.random.default_rng(0)
    reference = np.round(g.normal(size=(3, 50)), 1)  # rounded: many ties
    scores = np.round(g.normal(size=(40, 3)), 1)
    scores[0] = reference[:, 7]  # equal to a reference value: counted as >=
    got = reference_pvalues(torch.from_numpy(np.sort(reference, axis=1)), torch.from_numpy(scores))
    want = [[numpy_pvalue(reference[j], scores[b, j]) for j in range(3)] for b in range(40)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-15)
    calibration = reference[0]
    got = conformal_pvalues(torch.from_numpy(np.sort(calibration)), torch.from_numpy(scores[:, 0]))
    want = [numpy_pvalue(calibration, s) for s in scores[:, 0]]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_each_combination_equals_its_formula(combination: str) -> None:
    n = 99
    p = (1 + np.random.default_rng(1).integers(0, n + 1, size=(30, 4))) / (n + 1)
    got = combine(torch.from_numpy(p), combination, n).numpy()
    # Each term is rounded to a multiple of 2**-24: 4 terms, 2**-25 each at most.
    np.testing.assert_allclose(got, numpy_combination(p, combination, n), rtol=0, atol=1e-7)
    # Exact sums: any order of the scores gives the same T, bit for bit (ties between a
    # calibration image and a new one survive another runtime's order of addition).
    flipped = combine(torch.from_numpy(p[:, ::-1].copy()), combination, n).numpy()
    assert np.array_equal(flipped, got)


# --- the shared ResNet-20 ----------------------------------------------------------------------


@cache
def split() -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.from_numpy(np.random.default_rng(0).permutation(10000))
    return order[:N_CAL], order[N_CAL:]


@cache
def fitted() -> wrapcal.WrappedModel:
    out = resnet20_outputs()
    cal, _ = split()
    return resnet20_on_features(PLUGINS).fit_features(
        train=(out["train_features"], out["train_labels"]),
        calibration=(out["test_features"][cal], out["test_labels"][cal]),
        progress=False,
    )


@cache
def every_test_image() -> wrapcal.Prediction:
    return fitted().predict_features(resnet20_outputs()["test_features"])


def held_out() -> wrapcal.Prediction:
    return every_test_image().select_rows(split()[1])


@requires_shared_data
def test_outputs_are_the_formula_on_the_real_model() -> None:
    """``ood`` is the Cauchy combination of the per-score p-values against the training
    scores; ``ood_pvalue`` the conformal p-value against the calibration statistics;
    ``is_ood`` is ``ood_pvalue <= alpha``: each recomputed here in numpy."""
    wrapped, pred = fitted(), held_out()
    plugin = wrapped.get_plugin("ood")
    assert plugin.scores_ == ["max_logit", "energy", "mahalanobis", "vim"]  # every OOD score
    assert plugin.n_reference_ == 2000 and plugin.n_calibration_ == N_CAL
    assert pred.kinds["ood"] is OutputKind.OOD_SCORE and "ood" in pred.scores
    assert pred.outputs["is_ood"].dtype == torch.bool
    reference = plugin.reference.numpy()
    rows = np.arange(0, len(pred), 97)
    table = np.stack([pred.scores[n].double().numpy()[rows] for n in plugin.scores_], axis=1)
    p = np.array([[numpy_pvalue(reference[j], s[j]) for j in range(4)] for s in table])
    statistic = numpy_combination(p, "cauchy", plugin.n_reference_)
    # float32 output of a float64 statistic
    np.testing.assert_allclose(pred.scores["ood"].numpy()[rows], statistic, rtol=1e-6, atol=1e-5)
    cal = plugin.calibration_statistics.numpy()
    pvalue = np.array([numpy_pvalue(cal, t) for t in statistic])
    np.testing.assert_allclose(pred.outputs["ood_pvalue"].numpy()[rows], pvalue, rtol=1e-6)
    assert (pred.outputs["is_ood"].numpy()[rows] == (pvalue <= 0.05)).all()


@requires_shared_data
def test_false_alarm_rate_is_alpha_over_random_calibration_draws() -> None:
    """The guarantee: over 200 random splits of the 10000 test images into 3000
    calibration and 7000 held out, the mean share of held-out images flagged is alpha
    (the statistic does not depend on the split: computed once, re-calibrated per split).

    The mean over splits of a valid p-value's rejection rate is floor(alpha (n+1)) /
    (n+1) <= alpha exactly; 200 splits of 7000 leave a standard error near 0.0005 at
    alpha 0.05. The per-split spread is the Beta law of the calibration quantile."""
    statistic = every_test_image().scores["ood"].double().numpy()
    g = np.random.default_rng(0)
    rates: dict[float, list[float]] = {alpha: [] for alpha in ALPHAS}
    for _ in range(200):
        order = g.permutation(len(statistic))
        cal, rest = np.sort(statistic[order[:N_CAL]]), statistic[order[N_CAL:]]
        pvalue = (1 + N_CAL - np.searchsorted(cal, rest, side="left")) / (N_CAL + 1)
        for alpha in ALPHAS:
            rates[alpha].append(float((pvalue <= alpha).mean()))
    for alpha, found in rates.items():
        exact = math.floor(alpha * (N_CAL + 1)) / (N_CAL + 1)
        assert abs(np.mean(found) - exact) < 0.1 * alpha + 0.001, (alpha, np.mean(found))
        assert np.std(found) < 0.3 * alpha + 0.002, (alpha, np.std(found))
    # The fitted model's own split: the share of its held-out images flagged.
    assert 0.035 <= float(held_out().outputs["is_ood"].double().mean()) <= 0.065


@requires_shared_data
def test_ood_data_is_flagged_and_ranked_near_the_best_score() -> None:
    """MNIST digits: ``ood`` ranks them within 0.01 AUROC of the best single score here,
    and flags most of them at alpha 0.05."""
    from sklearn.metrics import roc_auc_score

    mnist = fitted().predict_features(resnet20_outputs()["mnist_features"][:2000])
    pred = held_out()
    truth = np.r_[np.zeros(len(pred)), np.ones(len(mnist))]

    def auroc(name: str) -> float:
        return roc_auc_score(truth, np.r_[pred.scores[name].numpy(), mnist.scores[name].numpy()])

    singles = {n: auroc(n) for n in fitted().get_plugin("ood").scores_}
    assert auroc("ood") >= max(singles.values()) - 0.01, (auroc("ood"), singles)
    assert float(mnist.outputs["is_ood"].double().mean()) > 0.6


@requires_shared_data
def test_save_load_round_trip(tmp_path) -> None:
    wrapped = fitted()
    loaded = wrapcal.load(
        wrapped.save(tmp_path / "m.wrapcal"), split=Split(nn.Identity(), nn.Linear(64, 10))
    )
    plugin, again = wrapped.get_plugin("ood"), loaded.get_plugin("ood")
    assert again.get_params() == plugin.get_params()
    assert again.scores_ == plugin.scores_ and again.n_calibration_ == N_CAL
    x = resnet20_outputs()["test_features"][split()[1][:300]]
    want, got = wrapped.predict_features(x), loaded.predict_features(x)
    for name in ("ood", "ood_pvalue", "is_ood"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)


def _small(plugins: list, **fit: object) -> wrapcal.WrappedModel:
    torch.manual_seed(0)
    x, y = torch.randn(400, 6), torch.randint(0, 3, (400,))
    wrapped = wrapcal.wrap(None, split=Split(nn.Identity(), nn.Linear(6, 3)), plugins=plugins)
    sets = {"train": (x[:200], y[:200]), "calibration": (x[200:], y[200:])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return wrapped.fit_features(**{k: sets[k] for k in fit.get("sets", sets)}, progress=False)


def test_export_outputs_equal_predict(tmp_path) -> None:
    """ONNX and .pt2 carry ``ood``, ``ood_pvalue``, ``is_ood`` (the exporter finds them
    itself) and the plugin's alpha, scores and calibration size in their metadata."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    from wrapcal.export import export, read_metadata

    wrapped = _small(["mahalanobis", ("ood", {"alpha": 0.1})])
    wrapped.input_shape = (6,)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(3)) * 1.5
    want = wrapped.predict(x)
    onnx_path = export(wrapped, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(onnx_path))
    names = [o.name for o in session.get_outputs()]
    assert {"ood", "ood_pvalue", "is_ood"} <= set(names)
    got = dict(
        zip(names, session.run(None, {session.get_inputs()[0].name: x.numpy()}), strict=True)
    )
    np.testing.assert_allclose(got["ood"], want.scores["ood"].numpy(), rtol=1e-5)
    np.testing.assert_array_equal(got["ood_pvalue"], want.outputs["ood_pvalue"].numpy())
    np.testing.assert_array_equal(got["is_ood"], want.outputs["is_ood"].numpy())
    assert want.outputs["is_ood"].any() and not want.outputs["is_ood"].all()
    meta = read_metadata(onnx_path)
    entry = meta["plugins"]["ood"]
    assert entry["params"]["alpha"] == 0.1 and entry["state"]["scores_"] == [
        "max_logit",
        "energy",
        "mahalanobis",
    ]
    assert entry["state"]["n_calibration_"] == 200
    program = torch.export.load(export(wrapped, tmp_path / "m.pt2", "torch"))
    names = [o["name"] for o in read_metadata(tmp_path / "m.pt2")["outputs"]]
    result = dict(zip(names, program.module()(x), strict=True))
    torch.testing.assert_close(result["ood"], want.scores["ood"])
    torch.testing.assert_close(result["is_ood"], want.outputs["is_ood"])


# --- errors --------------------------------------------------------------------------------


def test_one_data_set_is_refused_with_the_fix() -> None:
    with pytest.raises(DataError, match=r"ood needs wrapped.fit\(train=\.\.\.\)"):
        _small(["ood"], sets=["calibration"])
    with pytest.raises(DataError, match=r"calibration=.*split your in-distribution data in two"):
        _small(["ood"], sets=["train"])


def test_bad_parameters_and_unknown_scores() -> None:
    for bad in ({"alpha": 0}, {"alpha": 1.5}, {"scores": []}, {"scores": ["a", "a"]},
                {"combination": "mean"}, {"max_reference": 0}):  # fmt: skip
        with pytest.raises(ValueError, match="ood"):
            wrapcal.wrap(None, split=Split(nn.Identity(), nn.Linear(6, 3)), plugins=[("ood", bad)])
    with pytest.raises(DataError, match=r"scores \['knn'\] are not among the model's scores"):
        _small([("ood", {"scores": ["knn"]})])
    with pytest.raises(wrapcal.NotFittedError, match="train=.*calibration="):
        OODDecision().check_is_fitted()


def test_named_scores_may_be_uncertainty_scores() -> None:
    wrapped = _small([("ood", {"scores": ["msp", "entropy"], "combination": "min_p"})])
    plugin = wrapped.get_plugin("ood")
    assert plugin.scores_ == ["msp", "entropy"] and plugin.reference.shape == (2, 200)
