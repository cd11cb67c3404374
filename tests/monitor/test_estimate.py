"""The accuracy estimate: NannyML's CBPE formula written out, its interval's coverage,
and the labelled path against scikit-learn and wrapcal's metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

import wrapcal
from wrapcal.metrics import ece
from wrapcal.monitoring.stats import ece_from_confidence


def cbpe_accuracy(probs: np.ndarray) -> float:
    """NannyML 0.13's CBPE multiclass accuracy, written out from its source
    (``MulticlassClassificationAccuracy._estimate``): the predictions one-hot encoded,
    times the (calibrated) class probabilities, the row maximum (the probability of the
    predicted class), averaged over the chunk's rows. ``y_pred`` is the argmax."""
    y_pred = probs.argmax(axis=1)
    onehot = np.eye(probs.shape[1])[y_pred]
    return float(np.mean(np.max(onehot * probs, axis=1)))


def test_estimate_is_cbpe_on_the_calibrated_probabilities(world, wrapped):
    windows = [world.sample(300, seed=s)[0] for s in (10, 11, 12)]
    result = wrapcal.monitor(wrapped, windows)
    t = float(wrapped.get_plugin("temperature").temperature_)
    assert t > 1.5  # the head was made overconfident
    for x, summary in zip(windows, result.windows, strict=True):
        pred = wrapped.predict(x)
        probs = pred.probs.double().numpy()
        assert summary.estimated_accuracy == pytest.approx(cbpe_accuracy(probs), abs=1e-6)
        # The calibrated probabilities, not the raw model's (logits * T undoes the fix).
        raw = cbpe_accuracy(torch.softmax(pred.logits.double() * t, dim=1).numpy())
        assert raw > summary.estimated_accuracy + 0.01


def test_nannyml_cbpe_gives_the_same_estimate(world, wrapped):
    """NannyML's own CBPE on the same calibrated probabilities, its calibrator off
    (wrapcal's probabilities are already calibrated). Runs where nannyml installs."""
    nml = pytest.importorskip("nannyml")
    pd = pytest.importorskip("pandas")
    from nannyml.calibration import NoopCalibrator

    x_ref, y_ref = world.sample(1000, seed=20)
    x, y = world.sample(1000, seed=21)

    def frame(xs, ys):
        pred = wrapped.predict(xs)
        cols = {f"p{k}": pred.probs[:, k].double().numpy() for k in range(pred.probs.shape[1])}
        return pd.DataFrame(
            {**cols, "y_pred": pred.label.numpy().astype(str), "y_true": ys.numpy().astype(str)}
        )

    ref, ana = frame(x_ref, y_ref), frame(x, y)
    estimator = nml.CBPE(
        y_pred_proba={str(k): f"p{k}" for k in range(4)},
        y_pred="y_pred",
        y_true="y_true",
        metrics=["accuracy"],
        problem_type="classification_multiclass",
        chunk_number=1,
        calibrator=NoopCalibrator(),
    ).fit(ref)
    estimated = float(
        estimator.estimate(ana).filter(period="analysis").to_df()[("accuracy", "value")].iloc[0]
    )
    ours = wrapcal.monitor(wrapped, [x]).windows[0].estimated_accuracy
    assert ours == pytest.approx(estimated, abs=1e-6)


def test_interval_covers_the_realised_accuracy_of_calibrated_windows(world, calibrated):
    """Labels drawn from the model's own calibrated probabilities make it exactly
    calibrated: the 95% interval must hold the realised accuracy in about 95% of windows."""
    g = torch.Generator().manual_seed(7)
    x = world.sample(200 * 120, seed=100)[0]
    probs = calibrated.predict(x, batch_size=len(x)).probs.double()
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)
    result = wrapcal.monitor(calibrated, (x, y), window_size=120, ood_score=None)
    assert len(result.windows) == 200
    inside = [
        w.estimated_accuracy_ci[0] <= w.accuracy <= w.estimated_accuracy_ci[1]
        for w in result.windows
    ]
    assert 0.91 <= np.mean(inside) <= 0.99, np.mean(inside)


def test_labelled_windows_against_sklearn_and_wrapcal_metrics(world, wrapped):
    windows = [world.sample(250, seed=s) for s in (30, 31)]
    result = wrapcal.monitor(wrapped, windows, names=["mon", "tue"], timestamps=["t0", "t1"])
    for (x, y), w in zip(windows, result.windows, strict=True):
        pred = wrapped.predict(x)
        assert w.accuracy == pytest.approx(accuracy_score(y.numpy(), pred.label.numpy()))
        assert w.ece == pytest.approx(ece(pred.probs.double(), y), abs=1e-9)
        assert w.estimate_error == pytest.approx(w.estimated_accuracy - w.accuracy)
    assert [(w.name, w.timestamp) for w in result.windows] == [("mon", "t0"), ("tue", "t1")]


def test_ece_from_confidence_is_the_binned_formula():
    """15 equal-width bins over (0, 1], weighted by their mass, written out."""
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(500, generator=g, dtype=torch.float64) * 0.9 + 0.1
    hit = torch.rand(500, generator=g, dtype=torch.float64) < conf**1.5
    expected = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            expected += mask.double().mean() * abs(conf[mask].mean() - hit[mask].double().mean())
    assert ece_from_confidence(conf, hit) == pytest.approx(float(expected), abs=1e-12)
