"""Every documented logits-only function ("from logits you already have": README,
docs/calibration.md, docs/conformal.md) takes numpy arrays (numpy 2) and torch tensors,
float32 and float64, and gives the same result for the same values (issue 24, item 5).

The logits are float32 values, so the four kinds hold exactly the same numbers; results
are compared exactly where the function works in float64 inside, and to float32's
precision where it hands back the kind it was given.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

import wrapcal
from wrapcal.logits.abstention import risk_coverage_curve

KINDS = ["numpy-float32", "numpy-float64", "torch-float32", "torch-float64"]


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(600, 5)) * 2.5).astype(np.float32)
    labels = np.where(rng.random(600) < 0.75, logits.argmax(1), rng.integers(0, 5, 600))
    return logits, labels


def _as(kind: str, values: np.ndarray) -> Any:
    """``values`` as ``kind``: floats in its dtype, integers and bools as they are."""
    library, dtype = kind.split("-")
    if values.dtype.kind == "f":
        values = values.astype(dtype)
    return values if library == "numpy" else torch.from_numpy(values)


def _numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _each_kind(call) -> dict[str, Any]:
    logits, labels = _data()
    return {kind: call(_as(kind, logits), _as(kind, labels), kind) for kind in KINDS}


def test_fit_temperature():
    found = _each_kind(lambda z, y, _: wrapcal.fit_temperature(z, y))
    assert len(set(found.values())) == 1 and next(iter(found.values())) > 0


@pytest.mark.parametrize("method", ["temperature", "vector_scaling", "histogram_binning"])
def test_fit_calibrator_and_transform(method):
    def run(z, y, kind):
        calibrator = wrapcal.fit_calibrator(z, y, method=method)
        out = calibrator.transform(z)
        # transform hands back the kind it is given (docs/calibration.md).
        assert isinstance(out, torch.Tensor) == kind.startswith("torch"), kind
        assert str(out.dtype).endswith(kind.split("-")[1]), (kind, out.dtype)
        return _numpy(out).astype(np.float64)

    found = _each_kind(run)
    reference = found["torch-float64"]
    for kind, out in found.items():
        # float32 outputs carry float32's rounding of the same float64 map.
        np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-5, err_msg=kind)
    np.testing.assert_array_equal(found["numpy-float64"], reference)


@pytest.mark.parametrize(
    "options",
    [{}, {"method": "lac"}, {"method": "raps"}, {"classwise": True}, {"allow_empty": False}],
    ids=["aps", "lac", "raps", "classwise", "non-empty"],
)
def test_conformal_sets_and_fit_conformal(options):
    def run(z, y, _):
        fitted = wrapcal.fit_conformal(z, y, **options)
        sets = fitted.sets(z)
        assert torch.equal(wrapcal.conformal_sets(z, y, z, **options), sets)
        return fitted.thresholds, sets

    found = _each_kind(run)
    thresholds, sets = found["torch-float64"]
    assert sets.dtype == torch.bool and sets.shape == (600, 5)
    for kind, (t, s) in found.items():
        # numpy and torch: identical for the same dtype.
        same = found[kind.replace("numpy", "torch")]
        assert torch.equal(t, same[0]) and torch.equal(s, same[1]), kind
        # float32 and float64: the probabilities are computed in the input's dtype, so
        # the thresholds agree to float32's precision and the sets on all but the rows
        # whose score is that close to the threshold.
        torch.testing.assert_close(t, thresholds, rtol=0, atol=1e-6)
        assert int((s != sets).any(1).sum()) <= 2, kind


def test_fit_abstention_and_risk_coverage_curve():
    logits, labels = _data()
    probs = torch.softmax(torch.from_numpy(logits).double(), 1)
    msp = (1 - probs.amax(1)).numpy().astype(np.float32)  # float32 values: exact in all kinds
    correct = logits.argmax(1) == labels
    found = {}
    for kind in KINDS:
        m, c = _as(kind, msp), _as(kind, correct)
        rule = wrapcal.fit_abstention(m, c, risk=0.3)
        # rule.abstain gets a tensor here: numpy is test_abstain_takes_numpy's (xfail).
        withheld = rule.abstain(torch.as_tensor(_as(kind, msp)))
        found[kind] = (rule.threshold, withheld.tolist(), risk_coverage_curve(m, c))
    reference = found["torch-float64"]
    assert len(reference[1]) == 600 and len(reference[2]["coverage"]) == 101
    for kind, value in found.items():
        assert value == reference, kind


def test_abstain_takes_numpy():
    logits, labels = _data()
    msp = 1 - torch.softmax(torch.from_numpy(logits).double(), 1).amax(1).numpy()
    rule = wrapcal.fit_abstention(msp, logits.argmax(1) == labels, risk=0.3)
    assert _numpy(rule.abstain(msp)).tolist() == rule.abstain(torch.from_numpy(msp)).tolist()


# --- inputs (issue 30, item 6) --------------------------------------------------------------


def test_fit_temperature_warns_on_values_that_are_all_probabilities() -> None:
    logits, labels = _data()
    sigmoid = 1 / (1 + np.exp(-logits))  # per-class sigmoid outputs: rows do not sum to 1
    assert not np.allclose(sigmoid.sum(1), 1, atol=0.05)
    with pytest.warns(UserWarning, match=r"every calibration logit is in \[0, 1\].*sigmoid"):
        wrapcal.fit_temperature(sigmoid, labels)
    with pytest.raises(wrapcal.DataError, match="look like probabilities"):  # rows summing to 1
        wrapcal.fit_temperature(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real logits: nothing to warn about
        wrapcal.fit_temperature(logits, labels)


@pytest.mark.parametrize(
    ("max_iter", "error", "message"),
    [
        (0, ValueError, "at least 1, got 0"),
        (-5, ValueError, "at least 1, got -5"),
        (2.5, TypeError, "an int >= 1, got 2.5"),
        (True, TypeError, "an int >= 1, got True"),
        (None, TypeError, "an int >= 1, got None"),
    ],
)
def test_fit_temperature_refuses_an_iteration_count_that_runs_no_step(
    max_iter, error, message
) -> None:
    logits, labels = _data()
    with pytest.raises(error, match=rf"max_iter .*{message}"):
        wrapcal.fit_temperature(logits, labels, max_iter=max_iter)
    assert wrapcal.fit_temperature(logits, labels, max_iter=np.int64(50)) > 0
