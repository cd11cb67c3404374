"""Post-hoc calibrators: the Calibrator contract, ``fit_calibrator`` and its input checks,
single-logit models, folds, saving and loading, tracing (``exportable``), composition
with the plugins before them, and the ResNet-20 scenario through a wrapped model."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from scipy.special import log_softmax
from shared_data import requires_shared_data, resnet20_outputs
from sklearn.linear_model import LogisticRegression
from torch import nn

import wrapcal
from wrapcal import DataError, NotFittedError, Plugin, PluginNotFoundError, Stage, get_tags
from wrapcal.logits.calibrators import fit_calibrator
from wrapcal.model.split import Split
from wrapcal.plugin.calibrator import Calibrator, calibrated_log_probs, stratified_folds

NAMES = [
    "temperature",
    "vector_scaling",
    "matrix_scaling",
    "dirichlet",
    "ensemble_temperature",
    "histogram_binning",
    "isotonic",
    "auto_calibration",
]
#: Settings that keep the tests short (fewer folds; auto over the cheap candidates).
FAST = {
    "matrix_scaling": {"cv": 2},
    "dirichlet": {"cv": 2},
    "auto_calibration": {"cv": 2, "candidates": ["temperature", "vector_scaling", "isotonic"]},
}


def synthetic(n: int = 2000, k: int = 5, seed: int = 0, t: float = 2.0):
    """float32 logits of a Gaussian mixture, labels drawn from softmax(z / t): t > 1 makes
    the logits overconfident, so every calibrator has something to correct."""
    z, y, _ = mixture(n, k, seed, t)
    return z, y


def mixture(n: int, k: int = 5, seed: int = 0, t: float = 2.0):
    """``synthetic`` with its 6-d features, for models with a head."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, 6, generator=g) * 1.5
    latent = torch.randint(0, k, (n,), generator=g)
    feats = centres[latent] + torch.randn(n, 6, generator=g)
    z = (feats @ centres.T).float()
    y = torch.multinomial(torch.softmax(z.double() / t, 1), 1, generator=g)[:, 0]
    return z, y, feats.float()


def nll(logits, labels) -> float:
    z = np.asarray(logits, dtype=np.float64)
    return float(-log_softmax(z, axis=1)[np.arange(len(labels)), np.asarray(labels)].mean())


# --- the family ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_calibrator_is_registered_and_declares_itself(name: str) -> None:
    info = wrapcal.plugin_registry()[name]
    assert info.package == "wrapcal" and info.description
    plugin = info.factory()
    assert isinstance(plugin, Calibrator)
    tags = get_tags(plugin)
    assert tags.stage is Stage.CALIBRATE and "calibration" in tags.fit_requires
    assert tags.exportable


@pytest.mark.parametrize("name", NAMES)
def test_fit_calibrator_lowers_held_out_nll(name: str) -> None:
    z, y = synthetic()
    cal = fit_calibrator(z[:1500].numpy(), y[:1500].numpy(), name, **FAST.get(name, {}))
    out = cal.transform(z[1500:].numpy())
    assert isinstance(out, np.ndarray) and out.shape == (500, 5) and out.dtype == np.float32
    assert np.isfinite(out).all()
    before, after = nll(z[1500:], y[1500:]), nll(out, y[1500:])
    assert after < before - 0.05, (before, after)
    if type(cal).probability_valued:  # log-probabilities: each row's exp sums to 1
        np.testing.assert_allclose(np.exp(out.astype(np.float64)).sum(1), 1, atol=1e-5)
    # The plugin path gives the same as transform(), in the logits' dtype and device.
    torch.testing.assert_close(cal.transform_logits(z[1500:]), torch.from_numpy(out))
    assert cal.transform(z[1500:].double()).dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_single_logit_binary_model(name: str) -> None:
    z, y = synthetic(n=1200, k=2, seed=3)
    margin = z[:, 1] - z[:, 0]  # one logit: log p1 / p0
    cal = fit_calibrator(margin[:900], y[:900], name, **FAST.get(name, {}))
    out = cal.transform(margin[900:])
    assert out.shape == (300,) and torch.isfinite(out).all()
    pair = torch.stack([torch.zeros(300), out], 1)
    assert nll(pair, y[900:]) < nll(torch.stack([torch.zeros(300), margin[900:]], 1), y[900:])


def test_vector_scaling_of_one_logit_is_platt_scaling() -> None:
    """On one binary logit, z * a + b with the pair [0, z] is logistic regression on z
    (Platt 1999): scikit-learn's, unpenalised, gives the same probabilities."""
    z, y = synthetic(n=1200, k=2, seed=3)
    margin = (z[:, 1] - z[:, 0]).double()
    ours = torch.sigmoid(fit_calibrator(margin, y, "vector_scaling").transform(margin))
    platt = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000)
    platt.fit(margin.numpy()[:, None], y.numpy())
    theirs = platt.predict_proba(margin.numpy()[:, None])[:, 1]
    np.testing.assert_allclose(ours.numpy(), theirs, atol=2e-6)


# --- input checks ----------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    z, y = synthetic(n=300)
    nan = z.clone()
    nan[7, 2] = float("nan")
    with pytest.raises(DataError, match=r"NaN or inf.*the first is row 7"):
        fit_calibrator(nan, y, "dirichlet")
    with pytest.raises(DataError, match="look like probabilities"):
        fit_calibrator(torch.softmax(z, 1), y, "isotonic")
    with pytest.raises(DataError, match=r"labels must be in \[0, 5\)"):
        fit_calibrator(z, y + 1, "vector_scaling")
    with pytest.raises(DataError, match="one class only"):
        fit_calibrator(z, torch.zeros_like(y), "histogram_binning")
    # Float labels must hold whole numbers (the one rule of wrapcal.plugin.validation,
    # which fit_temperature and the metrics follow too); scores or probabilities are refused.
    with pytest.raises(DataError, match="integer class indices"):
        fit_calibrator(z, y.float() + 0.5, "matrix_scaling")
    # One message for every logits-only entry point (fit_temperature's words).
    with pytest.raises(DataError, match="300 rows of logits but 299 labels"):
        fit_calibrator(z, y[:-1], "ensemble_temperature")
    with pytest.raises(DataError, match=r"shape \(2, 300, 5\)"):
        fit_calibrator(z[None].repeat(2, 1, 1), y, "dirichlet")
    with pytest.raises(TypeError, match="not a calibrator.*calibrators: .*dirichlet"):
        fit_calibrator(z, y, "knn")
    with pytest.raises(PluginNotFoundError, match="no plugin named 'dirichelt'"):
        fit_calibrator(z, y, "dirichelt")
    with pytest.raises(TypeError, match="no parameter 'folds'"):
        fit_calibrator(z, y, "dirichlet", folds=3)
    with pytest.raises(ValueError, match=r"cv=1 is invalid"):
        fit_calibrator(z, y, "matrix_scaling", cv=1)
    with pytest.raises(ValueError, match=r"mode='top' is invalid"):
        fit_calibrator(z, y, "isotonic", mode="top")
    with pytest.raises(ValueError, match="'auto_calibration' cannot be a candidate"):
        fit_calibrator(z, y, "auto_calibration", candidates=["auto_calibration"])
    with pytest.warns(UserWarning, match="on 40 samples"):
        fit_calibrator(z[:40], y[:40], "vector_scaling")
    cal = wrapcal.plugin_registry()["dirichlet"].factory()
    with pytest.raises(NotFittedError, match="DirichletCalibration is not fitted"):
        cal.transform(z)
    cal.fit_logits(z, y)
    with pytest.raises(DataError, match="look like probabilities"):
        cal.transform(torch.softmax(z, 1))


def test_a_wrapped_model_without_calibration_data_says_so() -> None:
    wrapped = wrapcal.wrap(None, split=Split(nn.Identity(), nn.Linear(6, 5)), plugins=["isotonic"])
    x = torch.randn(50, 6)
    with pytest.raises(DataError, match=r"isotonic needs wrapped.fit\(calibration=...\)"):
        wrapped.fit_features(train=(x, torch.arange(50) % 5), progress=False)
    with pytest.raises(DataError, match=r"isotonic needs labels for the 'calibration'"):
        wrapped.fit_features(calibration=x, progress=False)


# --- one validator: numpy (numpy 2 included) and torch inputs agree --------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["temperature", "vector_scaling", "dirichlet", "isotonic"])
def test_numpy_arrays_and_tensors_give_the_same_fit(name, dtype) -> None:
    z, y = synthetic(n=600)
    z_np, y_np = z.numpy().astype(dtype), y.numpy()
    z_t, y_t = torch.from_numpy(z_np), torch.from_numpy(y_np)
    from_numpy = fit_calibrator(z_np, y_np, name, **FAST.get(name, {}))
    from_torch = fit_calibrator(z_t, y_t, name, **FAST.get(name, {}))
    out = from_numpy.transform(z_np)
    assert isinstance(out, np.ndarray) and out.shape == (600, 5)
    np.testing.assert_array_equal(out, from_torch.transform(z_t).numpy())
    # The map changes the logits: equal outputs are not equal because nothing was fitted.
    assert np.abs(out - z_np).max() > 1e-3
    t = wrapcal.fit_temperature(z_np, y_np)
    assert t == wrapcal.fit_temperature(z_t, y_t) and 1.2 < t < 3.5  # drawn at t = 2
    assert t == wrapcal.fit_temperature(z_np, y_np.astype(np.float32))  # whole floats
    assert t == wrapcal.fit_temperature(z_np, y_np[:, None])  # [N, 1] is [N]


def _message(call) -> str:
    with pytest.raises(DataError) as caught:
        call()
    return str(caught.value)


def test_bad_inputs_give_one_message_from_numpy_torch_and_every_entry_point() -> None:
    z, y = synthetic(n=300)
    z, y = z.numpy(), y.numpy()
    nan, inf = z.copy(), z.copy()
    nan[7, 2], inf[9, 0] = np.nan, np.inf
    probs = torch.softmax(torch.from_numpy(z), 1).numpy()
    cases = {
        "nan": ((nan, y), r"NaN or inf values: 1 NaN and 0 inf \(1 rows, the first is row 7\)"),
        "inf": ((inf, y), r"0 NaN and 1 inf \(1 rows, the first is row 9\)"),
        "probabilities": ((probs, y), "look like probabilities, not logits.*log-probabilities"),
        "label too big": ((z, np.where(y == 0, 5, y)), r"labels must be in \[0, 5\); got min"),
        "negative label": ((z, y - 1), r"labels must be in \[0, 5\); got min -1"),
        "binary label 2": ((z[:, :1], np.minimum(y, 2)), r"\[0, 2\) for a single binary"),
        "empty": ((z[:0], y[:0]), r"calibration logits have shape \(0, 5\)"),
        "length": ((z, y[:-1]), "300 rows of logits but 299 labels"),
        "one-hot": ((z, np.eye(5)[y]), r"one-hot\? pass labels.argmax"),
        "float labels": ((z, y + 0.5), "non-integer values; expected integer class indices"),
        "one class": ((z, np.full_like(y, 3)), r"one class only \(3\)"),
    }
    entry_points = {
        "fit_temperature": wrapcal.fit_temperature,
        "fit_calibrator": lambda a, b: fit_calibrator(a, b, "dirichlet"),
        "fit_conformal": wrapcal.fit_conformal,
    }
    for case, ((logits, labels), expected) in cases.items():
        messages = {}
        for entry, fit in entry_points.items():
            if case == "one class" and entry == "fit_conformal":
                continue  # one class is a valid conformal calibration set
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the single-logit case warns too
                from_numpy = _message(lambda f=fit, a=logits, b=labels: f(a, b))
                from_torch = _message(
                    lambda f=fit, a=logits, b=labels: f(torch.from_numpy(a), torch.from_numpy(b))
                )
            assert from_numpy == from_torch, (case, entry)
            # The one-class message names what is fitted; the rest of it is shared.
            messages[entry] = from_numpy.replace("dirichlet", "temperature scaling")
        assert len(set(messages.values())) == 1, (case, messages)  # one set of messages
        assert re.search(expected, from_numpy), (case, from_numpy)
    # The same rules at inference: transform refuses what fit refuses, in the same words.
    cal = fit_calibrator(z, y, "dirichlet")
    assert _message(lambda: cal.transform(probs)) == _message(
        lambda: cal.transform(torch.from_numpy(probs))
    )


# --- helpers --------------------------------------------------------------------------


def test_stratified_folds_partition_and_balance() -> None:
    y = torch.cat([torch.zeros(103), torch.ones(41), torch.full((7,), 2)]).long()
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    folds = stratified_folds(y, 5, seed=0)
    everything = torch.cat(folds).sort().values
    assert torch.equal(everything, torch.arange(len(y)))  # disjoint and complete
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for cls in range(3):
        counts = [int((y[f] == cls).sum()) for f in folds]
        assert max(counts) - min(counts) <= 1, (cls, counts)
    assert all(torch.equal(a, b) for a, b in zip(folds, stratified_folds(y, 5, 0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(folds, stratified_folds(y, 5, 1), strict=True))
    with pytest.raises(ValueError, match="cannot split 3 samples into 5"):
        stratified_folds(y[:3], 5, 0)


def test_calibrated_log_probs_floor_and_renormalise() -> None:
    probs = torch.tensor([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    out = calibrated_log_probs(probs, 1e-3)
    want = np.maximum(probs.numpy(), 1e-3)
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(out.exp().numpy(), want, rtol=1e-12)
    assert torch.isfinite(out).all()


# --- persistence and export -------------------------------------------------------------


def _features_model(plugins: list) -> wrapcal.WrappedModel:
    torch.manual_seed(1)
    return wrapcal.wrap(None, split=Split(nn.Identity(), nn.Linear(6, 5)), plugins=plugins)


@pytest.mark.parametrize("name", NAMES)
def test_saved_and_loaded_outputs_are_bit_identical(name: str, tmp_path) -> None:
    _, y, x = mixture(900)
    params = {"cv": 2} if name == "auto_calibration" else FAST.get(name, {})
    wrapped = _features_model([(name, params)])
    wrapped.fit_features(calibration=(x[:600], y[:600]), progress=False)
    path = wrapped.save(tmp_path / "m.wrapcal")
    loaded = wrapcal.load(path, split=Split(nn.Identity(), nn.Linear(6, 5)))
    q = x[600:]
    with torch.no_grad():
        assert torch.equal(loaded(q), wrapped(q))
    before, after = wrapped.get_plugin(name), loaded.get_plugin(name)
    assert after.get_state() == before.get_state()
    assert json.dumps(after.get_state())  # plain JSON
    for key, tensor in before.state_dict().items():
        assert torch.equal(after.state_dict()[key], tensor), key


def test_auto_calibration_refuses_a_tampered_choice() -> None:
    z, y = synthetic(n=600)
    auto = fit_calibrator(z, y, "auto_calibration", **FAST["auto_calibration"])
    state = auto.get_state()
    fresh = wrapcal.plugin_registry()["auto_calibration"].factory(**FAST["auto_calibration"])
    fresh.set_state({**state, "chosen_": "dirichlet"})
    with pytest.raises(ValueError, match="chosen_ 'dirichlet' is not a candidate"):
        fresh.validate_state()
    with pytest.raises(ValueError, match="saved candidates"):
        fresh.set_state({**state, "candidate_states_": {}})


class _Transform(nn.Module):
    def __init__(self, calibrator: Calibrator) -> None:
        super().__init__()
        self.calibrator = calibrator

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.calibrator.transform_logits(logits)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_transform_exports_with_torch_export(name: str) -> None:
    z, y = synthetic(n=900)
    module = _Transform(fit_calibrator(z[:600], y[:600], name, **FAST.get(name, {}))).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (z[600:],), dynamic_shapes={"logits": {0: batch}})
    assert torch.equal(program.module()(z[600:700]), module(z[600:700]))


# --- composition with the plugins before ---------------------------------------------------


class Stretch(Plugin):
    """A feature-stage plugin before the calibrators: scales the features by 3."""

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.FEATURES
        tags.requires_fit = False
        return tags

    def features(self, inputs, inner):
        return inner(inputs) * 3


@pytest.mark.parametrize("name", ["dirichlet", "isotonic", "ensemble_temperature"])
def test_calibrators_fit_on_the_logits_the_plugins_before_them_give(name: str) -> None:
    _, y, x = mixture(900)
    params = FAST.get(name, {})
    wrapped = _features_model([Stretch(), (name, params)])
    wrapped.fit_features(calibration=(x[:600], y[:600]), progress=False)
    with torch.no_grad():
        stretched = wrapped.head(x * 3)
    alone = fit_calibrator(stretched[:600], y[:600], name, **params)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x[600:]), alone.transform(stretched[600:]))


# --- the ResNet-20 scenario ----------------------------------------------------------------


@requires_shared_data
@pytest.mark.parametrize("name", ["matrix_scaling", "histogram_binning"])
def test_resnet20_wrapped_plugin_equals_the_logits_only_path(name: str) -> None:
    """The shared ResNet-20's head on cached features, calibrated on half the CIFAR-10
    JPEG test images (the file is sorted by class, so the halves are a seeded random
    split, as in the other ResNet-20 tests): the plugin inside a wrapped model and
    fit_calibrator on the cached logits learn the same map."""
    o = resnet20_outputs()
    head = nn.Linear(64, 10)
    with torch.no_grad():
        head.weight.copy_(o["weight"])
        head.bias.copy_(o["bias"])
    perm = torch.from_numpy(np.random.default_rng(0).permutation(10000))
    cal, ev = perm[:5000], perm[5000:]
    feats, labels = o["test_features"], o["test_labels"]
    wrapped = wrapcal.wrap(None, split=Split(nn.Identity(), head), plugins=[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real data of this size: nothing to warn about
        wrapped.fit_features(calibration=(feats[cal], labels[cal]), progress=False)
    with torch.no_grad():
        logits = head(feats)
    alone = fit_calibrator(logits[cal], labels[cal], name)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(feats[ev]), alone.transform(logits[ev]))
    # The cached logits (the full model's own pass) give the same map within rounding.
    cached = fit_calibrator(o["test_logits"][cal], labels[cal], name)
    torch.testing.assert_close(
        cached.transform(o["test_logits"][ev]), alone.transform(logits[ev]), rtol=1e-4, atol=1e-4
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("name", NAMES)
def test_fits_and_runs_on_cuda_unchanged(name: str) -> None:
    z, y = synthetic(n=900)
    cpu = fit_calibrator(z[:600], y[:600], name, **FAST.get(name, {}))
    gpu = fit_calibrator(z[:600].cuda(), y[:600].cuda(), name, **FAST.get(name, {}))
    out = gpu.transform(z[600:].cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), cpu.transform(z[600:]), rtol=1e-4, atol=1e-4)
