"""Benchmark: fitting temperature scaling on 5000 x 100 cached logits, wrapcal vs sklearn.

Data: the calibration half (``np.random.default_rng(0).permutation(10000)[:5000]``) of
``../shared/data/logits/cifar100_resnet20.npz`` when it is there, else seeded random
logits of the same shape whose labels follow them. Both libraries get the same float32
array. scikit-learn runs its public temperature method,
``CalibratedClassifierCV(FrozenEstimator(clf), method="temperature")``, where ``clf``
returns the cached logits from ``decision_function``; its private solver
(``_TemperatureScaling``, no cross-validation plumbing) is timed beside it for
reference. Runs are interleaved (wrapcal, sklearn, sklearn core, wrapcal, ...) so
load from other processes hits all of them alike; the best of ``--repeats`` counts.

Run: ``python benchmarks/bench_temperature.py [--repeats 20]``. Exits with status 1
if wrapcal is slower than scikit-learn's public method.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sklearn
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV, _TemperatureScaling
from sklearn.frozen import FrozenEstimator

from wrapcal.calibrate import fit_temperature

SHARED_DATA = Path(
    os.environ.get("WRAPCAL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
LOGITS = SHARED_DATA / "logits" / "cifar100_resnet20.npz"


class LogitsClassifier(ClassifierMixin, BaseEstimator):
    """A 'fitted' classifier whose inputs are row indices into cached logits."""

    def __init__(self, logits: np.ndarray):
        self.logits = logits

    def fit(self, X=None, y=None):
        self.classes_ = np.arange(self.logits.shape[1])
        return self

    def decision_function(self, X):
        return self.logits[np.asarray(X, dtype=np.int64).reshape(-1)]

    def predict(self, X):
        return self.decision_function(X).argmax(axis=1)


def load_logits() -> tuple[np.ndarray, np.ndarray, str]:
    """The 5000 x 100 calibration logits and labels, and where they came from."""
    if LOGITS.is_file():
        with np.load(LOGITS, allow_pickle=False) as f:
            logits, labels = f["logits"], f["labels"]
        cal = np.random.default_rng(0).permutation(len(labels))[:5000]
        return logits[cal], labels[cal], f"{LOGITS.name}, calibration half"
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(5000, 100)).astype(np.float32)
    # Labels drawn from softmax(logits / 2): an overconfident model, T near 2.
    probs = np.exp(logits / 2 - (logits / 2).max(axis=1, keepdims=True))
    cdf = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    labels = np.minimum((rng.random((5000, 1)) > cdf).sum(axis=1), 99)
    return logits, labels, "random logits (../shared/data not found)"


def best_times(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Best wall time of each run over interleaved repeats (after one warm-up each)."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per method")
    args = parser.parse_args(argv)

    logits, labels, source = load_logits()
    rows = np.arange(len(labels)).reshape(-1, 1)
    frozen = FrozenEstimator(LogitsClassifier(logits).fit())

    def run_wrapcal() -> float:
        return fit_temperature(logits, labels)

    def run_sklearn() -> float:
        calibrated = CalibratedClassifierCV(frozen, method="temperature").fit(rows, labels)
        return 1.0 / float(calibrated.calibrated_classifiers_[0].calibrators[0].beta_)

    def run_sklearn_core() -> float:
        return 1.0 / float(_TemperatureScaling().fit(logits, labels).beta_)

    runs = {"wrapcal": run_wrapcal, "sklearn": run_sklearn, "sklearn core": run_sklearn_core}
    temperatures = {name: run() for name, run in runs.items()}
    best = best_times(runs, args.repeats)

    n, k = logits.shape
    print(f"temperature scaling on {n} x {k} {logits.dtype} logits ({source})")
    print(f"best of {args.repeats} interleaved runs")
    names = {
        "wrapcal": "wrapcal.calibrate.fit_temperature",
        "sklearn": f"sklearn {sklearn.__version__} CalibratedClassifierCV(temperature)",
        "sklearn core": "sklearn _TemperatureScaling (private, reference)",
    }
    for name in runs:
        print(f"  {names[name]:<58} {1e3 * best[name]:8.2f} ms   T = {temperatures[name]:.6f}")
    ratio = best["sklearn"] / best["wrapcal"]
    core_ratio = best["sklearn core"] / best["wrapcal"]
    print(f"  speed-up: {ratio:.1f}x over CalibratedClassifierCV, {core_ratio:.1f}x over its core")
    if ratio < 1:
        print("FAIL: wrapcal is slower than scikit-learn", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
