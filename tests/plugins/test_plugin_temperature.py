"""Temperature scaling: the solver, its input checks, the plugin, and real models.

Cross-checks use implementations written here: the NLL and its derivative in numpy,
L-BFGS (strong Wolfe) on log T in torch, ``scipy.optimize.minimize_scalar``, scikit-learn's
``CalibratedClassifierCV(method="temperature")`` and an ECE formula in numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from references import ece_np, nll_np, scipy_temperature
from scipy.special import log_softmax, softmax
from shared_data import (
    SHARED_DATA,
    cifar10,
    pretrained_resnet20,
    requires_shared_data,
    resnet20_outputs,
)
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from torch import nn

import wrapcal
from wrapcal import DataError, NotFittedError, Plugin, Stage
from wrapcal.files.cifar_resnets import cifar_resnet20
from wrapcal.logits import temperature as calibrate_module
from wrapcal.logits.temperature import MIN_SAMPLES, fit_temperature
from wrapcal.metrics import ece as wrapcal_ece
from wrapcal_plugins.calibration.temperature import TemperatureScaler

LOGITS_DIR = SHARED_DATA / "logits"
LOGITS_FILES = ["cifar100_resnet20", "cifar100_resnet32", "cifar10_resnet20", "cifar10_resnet32"]
requires_logits = pytest.mark.skipif(
    not all((LOGITS_DIR / f"{name}.npz").is_file() for name in LOGITS_FILES),
    reason=f"logits files not found in {LOGITS_DIR}",
)


# --- independent references ---------------------------------------------------------


def dnll_dlogt(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """d NLL / d log T by a central difference (step 1e-5 in log T)."""
    h = 1e-5
    up = nll_np(logits, labels, temperature * np.exp(h))
    down = nll_np(logits, labels, temperature * np.exp(-h))
    return (up - down) / (2 * h)


def lbfgs_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The textbook recipe: L-BFGS with strong Wolfe line search on log T, float64."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels)
    if z.ndim == 1 or z.shape[1] == 1:
        z = torch.cat([torch.zeros_like(z.reshape(-1, 1)), z.reshape(-1, 1)], dim=1)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t],
        lr=1.0,
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


class LogitsClassifier(ClassifierMixin, BaseEstimator):
    """A 'fitted' classifier whose inputs are row indices into precomputed logits."""

    def __init__(self, logits: np.ndarray):
        self.logits = logits

    def fit(self, X=None, y=None):
        self.classes_ = np.arange(max(self.logits.shape[1], 2))
        return self

    def decision_function(self, X):
        out = self.logits[np.asarray(X, dtype=np.int64).reshape(-1)]
        return out[:, 0] if out.shape[1] == 1 else out

    def predict(self, X):
        out = self.decision_function(X)
        return (out > 0).astype(int) if out.ndim == 1 else out.argmax(axis=1)


def sklearn_temperature(logits, cal, labels_cal):
    """scikit-learn's temperature scaling on rows ``cal``: (T, calibrated classifier)."""
    frozen = FrozenEstimator(LogitsClassifier(logits).fit())
    calibrated = CalibratedClassifierCV(frozen, method="temperature")
    calibrated.fit(cal.reshape(-1, 1), labels_cal)
    beta = float(calibrated.calibrated_classifiers_[0].calibrators[0].beta_)
    # One binary logit x becomes the two logits (-x, x): sigmoid(2 beta x), so T = 1/(2 beta).
    return (0.5 if logits.shape[1] == 1 else 1.0) / beta, calibrated


def synthetic(n: int, k: int, true_t: float, seed: int = 0):
    """Logits whose labels are drawn from softmax(logits / true_t): the true T is known."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, 16)) * 1.5
    labels_latent = rng.integers(0, k, n)
    features = centres[labels_latent] + rng.normal(size=(n, 16))
    logits = features @ centres.T  # an honest, overconfident-able linear score
    logits = logits / logits.std() * 4.0
    if k == 1:
        logits = rng.normal(0.0, 3.0, size=(n, 1))  # balanced classes
        probs = 1 / (1 + np.exp(-logits[:, 0] / true_t))
        labels = (rng.random(n) < probs).astype(np.int64)
        return logits.astype(np.float32), labels
    probs = softmax(logits / true_t, axis=1)
    labels = (rng.random((n, 1)) > np.cumsum(probs, axis=1)).sum(axis=1)
    return logits.astype(np.float32), np.minimum(labels, k - 1).astype(np.int64)


# --- the solver ----------------------------------------------------------------------


@pytest.mark.parametrize(("k", "true_t"), [(1, 0.5), (2, 2.0), (10, 1.7), (100, 0.8)])
def test_fit_is_the_true_minimiser(k, true_t):
    logits, labels = synthetic(4000, k, true_t, seed=k)
    t = fit_temperature(logits, labels)
    # Stationary point: the NLL's slope in log T vanishes (central difference ~1e-10).
    assert abs(dnll_dlogt(logits, labels, t)) < 1e-7
    # The same minimiser from three independent solvers on the same objective.
    assert t == pytest.approx(scipy_temperature(logits, labels), rel=1e-6)
    assert t == pytest.approx(lbfgs_temperature(logits, labels), rel=1e-6)
    # Neighbours are worse: it is a minimum, not a maximum.
    best = nll_np(logits, labels, t)
    assert best < nll_np(logits, labels, t * 1.01) and best < nll_np(logits, labels, t / 1.01)
    # With labels drawn at temperature true_t, the fit recovers it (sampling noise ~5%).
    assert t == pytest.approx(true_t, rel=0.1)


def test_binary_single_logit_matches_two_columns_and_sklearn():
    logits, labels = synthetic(3000, 1, 0.5, seed=3)
    t = fit_temperature(logits, labels)
    assert fit_temperature(logits[:, 0], labels) == t  # [N] and [N, 1] are the same
    # softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]: the multiclass path gives the same T.
    two = np.concatenate([np.zeros_like(logits), logits], axis=1)
    assert fit_temperature(two, labels) == pytest.approx(t, rel=1e-9)
    t_sk, _ = sklearn_temperature(logits.astype(np.float64), np.arange(len(labels)), labels)
    assert t == pytest.approx(t_sk, rel=1e-5)
    assert fit_temperature(logits, labels.astype(bool)) == t


def test_inputs_numpy_torch_lists_and_log_probabilities_agree():
    logits, labels = synthetic(2000, 10, 1.5, seed=1)
    t = fit_temperature(logits, labels)
    assert fit_temperature(torch.from_numpy(logits), torch.from_numpy(labels)) == t
    as_grad = torch.from_numpy(logits).requires_grad_(True) * 1.0
    assert fit_temperature(as_grad, torch.from_numpy(labels)) == t
    assert fit_temperature(logits.tolist(), labels.tolist()) == t
    assert fit_temperature(logits.astype(np.float64), labels) == pytest.approx(t, rel=1e-6)
    assert fit_temperature(torch.from_numpy(logits).half(), labels) == pytest.approx(t, rel=3e-3)
    # A per-row shift leaves softmax alone: log-probabilities give the same T.
    log_probs = log_softmax(logits.astype(np.float64), axis=1)
    assert fit_temperature(log_probs, labels) == pytest.approx(t, rel=1e-6)
    # Float labels that are whole numbers are class indices too.
    assert fit_temperature(logits, labels.astype(np.float32)) == t
    # The input is not modified (the solver shifts a copy in place).
    before = logits.copy()
    fit_temperature(logits.astype(np.float64), labels)
    np.testing.assert_array_equal(logits, before)


def test_solver_needs_few_evaluations(monkeypatch):
    """The fit costs a handful of passes over the logits; benchmarks/bench_temperature.py
    times it beside scikit-learn (a timed test would only measure the machine's load)."""
    logits, labels = synthetic(5000, 100, 1.4, seed=2)
    calls = []
    evaluate = calibrate_module._Objective.__call__

    def counted(self, beta):
        calls.append(beta)
        return evaluate(self, beta)

    monkeypatch.setattr(calibrate_module._Objective, "__call__", counted)
    fit_temperature(logits, labels)
    assert 2 <= len(calls) <= 8


# --- bad input ------------------------------------------------------------------------


def _bad_inputs():
    logits, labels = synthetic(200, 5, 1.0, seed=4)
    nan, inf = logits.copy(), logits.copy()
    nan[7, 2], inf[9, 0] = np.nan, np.inf
    probs = softmax(logits.astype(np.float64), axis=1)
    return {
        "nan": (nan, labels, r"1 NaN and 0 inf .* first is row 7"),
        "inf": (inf, labels, r"0 NaN and 1 inf .* first is row 9"),
        "label too big": (logits, np.where(labels == 0, 5, labels), r"\[0, 5\).*max 5"),
        "label negative": (logits, labels - 1, r"\[0, 5\).*min -1"),
        "binary label 2": (logits[:, :1], np.minimum(labels, 2), r"\[0, 2\).*single binary"),
        "3-D logits": (logits[None], labels, r"shape \(1, 200, 5\).*combine_members"),
        "empty": (np.zeros((0, 5)), np.zeros(0, dtype=int), r"shape \(0, 5\)"),
        "length mismatch": (logits, labels[:-1], r"200 rows of logits but 199 labels"),
        "one-hot labels": (logits, np.eye(5)[labels], r"one-hot\? pass labels.argmax"),
        "non-integer labels": (logits, labels + 0.5, r"non-integer values"),
        "string logits": (np.full((200, 5), "a"), labels, r"dtype <U1"),
        "one class": (logits, np.full(200, 3), r"one class only \(3\)"),
        "probabilities": (probs, labels, r"probabilities, not logits.*log-probabilities"),
        "float32 probabilities": (probs.astype(np.float32), labels, r"probabilities"),
        "worse than chance": (logits, logits.argmin(axis=1), r"no better than chance"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises_a_clear_error(case):
    logits, labels, message = _bad_inputs()[case]
    with pytest.raises(DataError, match=message):
        fit_temperature(logits, labels)


def test_small_calibration_set_warns_but_fits():
    logits, labels = synthetic(MIN_SAMPLES - 10, 5, 1.0, seed=5)
    with pytest.warns(UserWarning, match=r"40 samples.*fewer than 50"):
        t = fit_temperature(logits, labels)
    assert t == pytest.approx(scipy_temperature(logits, labels), rel=1e-5)


def test_separable_data_warns_and_clips():
    logits, _ = synthetic(300, 5, 1.0, seed=6)
    with pytest.warns(UserWarning, match=r"every calibration sample is classified correctly"):
        t = fit_temperature(logits, logits.argmax(axis=1))
    assert t == calibrate_module.TEMPERATURE_BOUNDS[0]


def test_single_logit_that_looks_like_probabilities_warns():
    rng = np.random.default_rng(7)
    p = rng.random(300)
    with pytest.warns(UserWarning, match=r"log\(p / \(1 - p\)\)"):
        fit_temperature(p, (rng.random(300) < p).astype(int))


# --- the plugin -----------------------------------------------------------------------


class ScaleHead(Plugin):
    """Test plugin: a TRAIN-stage 'retraining' that learns to double the head's logits."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.TRAIN
        return tags

    def fit(self, model, data):
        self.scale.fill_(2.0)  # "learned" during the same fit call, before temperature
        return self

    def members(self, features, inner):
        return inner(features) * self.scale


class DoubleLogits(Plugin):
    """Test plugin: a logit transform that doubles the logits, needs no fit."""

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.TRAIN
        tags.requires_fit = False
        return tags

    def transform_logits(self, logits):
        return 2 * logits


def small_model_and_data(seed: int = 0):
    """A small MLP classifier and labels drawn from its own (tempered) softmax."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 6))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.8)
    x = torch.randn(1500, 12, generator=gen)
    with torch.no_grad():
        probs = torch.softmax(model(x) / 2.5, dim=1)  # the model is overconfident: T ~ 2.5
    y = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return model.eval(), x, y


def test_plugin_fits_divides_and_keeps_the_argmax(tmp_path):
    model, x, y = small_model_and_data()
    wrapped = wrapcal.wrap(model, ["temperature"])
    with pytest.raises(NotFittedError, match=r"temperature.*wrapped.fit"):
        wrapped(x)
    with pytest.raises(NotFittedError, match=r"TemperatureScaler is not fitted"):
        _ = wrapped.get_plugin("temperature").temperature_
    wrapped.fit(calibration=(x[:1000], y[:1000]), progress=False)
    plugin = wrapped.get_plugin("temperature")
    assert isinstance(plugin, TemperatureScaler)
    with torch.no_grad():
        bare = model(x[1000:])
    t = plugin.temperature_
    assert t == fit_temperature(model(x[:1000]).detach(), y[:1000])
    assert t == pytest.approx(2.5, rel=0.15)
    out = wrapped(x[1000:])
    torch.testing.assert_close(out, bare / t)
    assert torch.equal(out.argmax(1), bare.argmax(1))
    pred = wrapped.predict(x[1000:])
    assert torch.equal(pred.label, bare.argmax(1))
    # Calibration helps on held-out data: lower NLL than the bare model's.
    y_eval = y[1000:].numpy()
    assert nll_np(bare.numpy(), y_eval, t) < nll_np(bare.numpy(), y_eval, 1.0)
    # Save/load: T is in the weights file, outputs are identical.
    loaded = wrapcal.load(wrapped.save(tmp_path / "m.wrapcal"), model=model)
    assert loaded.get_plugin("temperature").temperature_ == t
    assert torch.equal(loaded(x[1000:]), out)


def test_plugin_on_a_single_logit_binary_model():
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).eval()
    x = torch.randn(1200, 8, generator=gen)
    with torch.no_grad():
        z = model(x) * 20  # a confident single logit
        model[2].weight.mul_(20)
        model[2].bias.mul_(20)
    y = torch.bernoulli(torch.sigmoid(z[:, 0] / 3.0), generator=gen).long()
    wrapped = wrapcal.wrap(model, ["temperature"]).fit(calibration=(x, y), progress=False)
    t = wrapped.get_plugin("temperature").temperature_
    assert t == pytest.approx(scipy_temperature(z.numpy(), y.numpy()), rel=1e-5)
    assert t == pytest.approx(3.0, rel=0.2)
    pred = wrapped.predict(x)
    assert pred.logits.shape == (1200, 1) and pred.probs.shape == (1200, 2)
    torch.testing.assert_close(pred.probs[:, 1], torch.sigmoid(z[:, 0] / t))


def test_plugin_errors_name_the_missing_data():
    model, x, y = small_model_and_data()
    with pytest.raises(DataError, match=r"temperature needs wrapped.fit\(calibration=...\)"):
        wrapcal.wrap(model, ["temperature"]).fit(train=(x, y), progress=False)
    with pytest.raises(DataError, match=r"temperature needs labels for the 'calibration'"):
        wrapcal.wrap(model, ["temperature"]).fit(calibration=x, progress=False)


def test_plugin_standalone_fit_and_params():
    logits, labels = synthetic(1000, 10, 1.5, seed=8)
    scaler = TemperatureScaler(max_iter=50)
    assert scaler.get_params() == {"max_iter": 50}
    assert scaler.fit_logits(logits, labels) is scaler
    assert scaler.temperature_ == fit_temperature(logits, labels)
    z = torch.from_numpy(logits)
    torch.testing.assert_close(scaler(z), z / scaler.temperature_)
    assert "temperature" in wrapcal.plugin_registry()


@pytest.mark.parametrize("doubler", [ScaleHead, DoubleLogits])
def test_temperature_composes_after_other_plugins_in_any_order(doubler):
    model, x, y = small_model_and_data(seed=1)
    cal = (x[:1000], y[:1000])
    alone = wrapcal.wrap(model, ["temperature"]).fit(calibration=cal, progress=False)
    t_alone = alone.get_plugin("temperature").temperature_
    outputs, temperatures = [], []
    for plugins in (["temperature", doubler()], [doubler(), "temperature"]):
        wrapped = wrapcal.wrap(model, plugins).fit(calibration=cal, progress=False)
        temperatures.append(wrapped.get_plugin("temperature").temperature_)
        outputs.append(wrapped(x[1000:]))
    # Fitted on doubled logits, T doubles: NLL(2z / T) = NLL(z / (T / 2)).
    assert temperatures[0] == pytest.approx(2 * t_alone, rel=1e-7)
    assert temperatures[0] == temperatures[1]
    assert torch.equal(outputs[0], outputs[1])
    # And the calibrated output is the same model: 2z / (2T) = z / T.
    torch.testing.assert_close(outputs[0], alone(x[1000:]), rtol=1e-5, atol=1e-6)


@requires_shared_data
@pytest.mark.filterwarnings("ignore:mc_dropout")
def test_temperature_fits_on_the_mc_dropout_mean():
    # A real sampling plugin below it: T is fitted on the MC mean (log-mean-probabilities).
    out = resnet20_outputs()
    perm = torch.from_numpy(np.random.default_rng(0).permutation(10000))
    cal, ev = perm[:5000], perm[5000:]
    feats, labels = out["test_features"], out["test_labels"]
    mc = ("mc_dropout", {"samples": 10})
    mc_only = wrapcal.wrap(pretrained_resnet20(), [mc])
    mc_only.fit_features(calibration=(feats[cal], labels[cal]), progress=False)
    both = wrapcal.wrap(pretrained_resnet20(), ["temperature", mc])
    both.fit_features(calibration=(feats[cal], labels[cal]), progress=False)
    t = both.get_plugin("temperature").temperature_
    assert t == fit_temperature(mc_only.head_logits(feats[cal]), labels[cal])
    torch.testing.assert_close(both.head_logits(feats[ev]), mc_only.head_logits(feats[ev]) / t)
    # Averaging samples already softens the output: less temperature is left to fit.
    assert 1 < t < fit_temperature(out["test_logits"][cal], labels[cal])


# --- real logits of published CIFAR ResNets ------------------------------------------


def split_logits(name: str):
    with np.load(LOGITS_DIR / f"{name}.npz", allow_pickle=False) as f:
        logits, labels = f["logits"], f["labels"]
    perm = np.random.default_rng(0).permutation(10000)
    return logits, labels, perm[:5000], perm[5000:]


@requires_logits
@pytest.mark.parametrize("name", LOGITS_FILES)
def test_real_logits_calibrate_like_sklearn(name):
    logits, labels, cal, ev = split_logits(name)
    t = fit_temperature(logits[cal], labels[cal])
    assert abs(dnll_dlogt(logits[cal], labels[cal], t)) < 1e-7
    t_sk, calibrated = sklearn_temperature(logits.astype(np.float64), cal, labels[cal])

    z_ev, y_ev = logits[ev].astype(np.float64), labels[ev]
    before, after = softmax(z_ev, axis=1), softmax(z_ev / t, axis=1)
    ece_before, ece_after = ece_np(before, y_ev), ece_np(after, y_ev)
    assert wrapcal_ece(before, y_ev) == pytest.approx(ece_before, abs=1e-9)
    assert wrapcal_ece(after, y_ev) == pytest.approx(ece_after, abs=1e-9)
    nll_before, nll_after = nll_np(z_ev, y_ev, 1.0), nll_np(z_ev, y_ev, t)
    sk_probs = calibrated.predict_proba(ev.reshape(-1, 1))
    nll_sk = float(-np.mean(np.log(sk_probs[np.arange(len(y_ev)), y_ev])))
    assert abs(nll_after - nll_sk) < 1e-3
    assert t == pytest.approx(t_sk, rel=1e-4)
    assert nll_after < nll_before and ece_after < ece_before
    assert np.array_equal(after.argmax(1), before.argmax(1))
    if name == "cifar100_resnet20":
        assert ece_after < ece_before / 4


# --- end to end on the pretrained ResNet-20 ------------------------------------------


@pytest.mark.slow
@requires_shared_data
def test_resnet20_end_to_end(tmp_path):
    images, labels = cifar10("test")
    # channels_last runs the CPU convolutions ~1.3-1.8x faster; the wrapped copy keeps it.
    images = images.contiguous(memory_format=torch.channels_last)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(10000))
    cal, ev = perm[:5000], perm[5000:]
    model = pretrained_resnet20().to(memory_format=torch.channels_last)
    wrapped = wrapcal.wrap(model, ["temperature"])
    wrapped.fit(calibration=(images[cal], labels[cal]), progress=False, batch_size=500)
    assert wrapped.backbone_passes == 1
    t = wrapped.get_plugin("temperature").temperature_

    with torch.no_grad():
        bare = torch.cat([model(images[ev[i : i + 500]]) for i in range(0, 5000, 500)])
    pred = wrapped.predict(images[ev], batch_size=500)
    assert torch.equal(pred.label, bare.argmax(1))
    torch.testing.assert_close(pred.logits, bare / t, rtol=1e-5, atol=1e-5)

    y_ev = labels[ev].numpy()
    z_bare = bare.double().numpy()
    acc_before = float((z_bare.argmax(1) == y_ev).mean())
    acc_after = float((pred.probs.argmax(1).numpy() == y_ev).mean())
    ece_before = ece_np(softmax(z_bare, axis=1), y_ev)
    ece_after = ece_np(softmax(z_bare / t, axis=1), y_ev)
    assert wrapcal_ece(pred.probs, labels[ev]) == pytest.approx(ece_after, abs=1e-3)
    nll_before, nll_after = nll_np(z_bare, y_ev, 1.0), nll_np(z_bare, y_ev, t)
    assert acc_after == acc_before and 0.78 < acc_before < 0.84
    assert 0.09 < ece_before < 0.16  # published: about 12.5%
    assert ece_after < ece_before / 3 and nll_after < nll_before
    assert t > 1  # the model is overconfident under the JPEG shift

    # Save/load into an untrained ResNet-20: T and the weights come from the file.
    loaded = wrapcal.load(wrapped.save(tmp_path / "resnet20.wrapcal"), model=cifar_resnet20())
    assert loaded.get_plugin("temperature").temperature_ == t
    assert torch.equal(loaded(images[ev[:200]]), wrapped(images[ev[:200]]))
