"""Benchmark: fitting temperature scaling on 5000 x 100 logits, wrapcal beside every peer.

Data: the calibration half (``np.random.default_rng(0).permutation(10000)[:5000]``) of
``../shared/data/logits/cifar100_resnet20.npz`` when it is there, else seeded random
logits of the same shape whose labels follow them. Everyone gets the same float32 array.

What each row runs (what a user would otherwise write or call):

* ``wrapcal``: :func:`wrapcal.logits.temperature.fit_temperature` (safeguarded Newton in float64).
* ``torch L-BFGS on log T``: the textbook recipe, ``torch.optim.LBFGS`` with strong Wolfe
  line search on ``log T`` (so T stays positive), ``F.cross_entropy(logits / T, y)``.
* ``Guo et al. reference code``: gpleiss/temperature_scaling as published: L-BFGS on T
  itself from T = 1.5 with ``lr=0.01, max_iter=50`` and no line search. Shown, not
  asserted: it stops before the minimum (its T is printed with its gap).
* ``sklearn``: ``CalibratedClassifierCV(FrozenEstimator(clf), method="temperature")``,
  ``clf`` returning the cached logits; and its private solver ``_TemperatureScaling``.
* ``netcal``: ``netcal.scaling.TemperatureScaling().fit(softmax, y)`` (it takes
  probabilities and takes their log), given float64 softmax: with float32 softmax its
  finite-difference optimiser does not move from T = 1 (printed as a note).
* ``torch-uncertainty``: ``TemperatureScaler().fit(DataLoader(TensorDataset(logits,
  y), batch_size=1000))`` (L-BFGS on 1/T, ``lr=0.1``, no line search).

Agreement: each peer's T must equal wrapcal's to the relative tolerance it achieves
(``TOLERANCE``), and no peer's T may reach a lower NLL than wrapcal's (checked in
float64 to 1e-9). Timing: runs interleaved (wrapcal, peer, peer, ..., wrapcal, ...),
best of ``--repeats``, printed as ratios to wrapcal. torch and numpy's BLAS run on
``--threads`` threads (default 1: on a loaded 2-core machine two threads made every torch
baseline about 10x slower, which would flatter wrapcal).

Run: ``python benchmarks/bench_temperature.py [--repeats 5] [--threads 1] [--skip
netcal,torch-uncertainty,guo]``. Peers that are not installed are left out with a note.
Exits with status 1 when an agreement check fails.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable

import numpy as np
import sklearn
import torch
import torch.nn.functional as F
from _timing import SHARED_DATA, Checks, best_times, machine_line, threads
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV, _TemperatureScaling
from sklearn.frozen import FrozenEstimator

from wrapcal.logits.temperature import fit_temperature

LOGITS = SHARED_DATA / "logits" / "cifar100_resnet20.npz"
#: Relative tolerance on T each peer achieves on the CIFAR-100 ResNet-20 logits (measured:
#: torch L-BFGS 2e-6, sklearn 1e-5, netcal 2e-5, torch-uncertainty 6e-4), with margin.
TOLERANCE = {
    "torch L-BFGS on log T": 1e-4,
    "sklearn CalibratedClassifierCV": 1e-4,
    "sklearn _TemperatureScaling": 1e-4,
    "netcal TemperatureScaling": 1e-4,
    "torch-uncertainty TemperatureScaler": 2e-3,
}
#: Shown without an agreement check (the published settings stop early).
UNCHECKED = {"Guo et al. reference code"}
PEERS = ("guo", "netcal", "torch-uncertainty")


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


def mean_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / T)`` in float64 (the objective every method fits)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels]))


def torch_runs(logits: np.ndarray, labels: np.ndarray) -> dict[str, Callable[[], float]]:
    """The two plain-torch recipes a user writes: L-BFGS on log T, and Guo et al.'s code."""
    z, y = torch.from_numpy(logits), torch.from_numpy(labels)

    def lbfgs_log_t() -> float:
        log_t = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
        return float(log_t.exp())

    def guo_reference() -> float:
        # gpleiss/temperature_scaling, ModelWithTemperature.set_temperature, verbatim settings.
        temperature = torch.nn.Parameter(torch.ones(1) * 1.5)
        opt = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z / temperature, y)
            loss.backward()
            return loss

        opt.step(closure)
        return float(temperature)

    return {"torch L-BFGS on log T": lbfgs_log_t, "Guo et al. reference code": guo_reference}


def peer_runs(
    logits: np.ndarray, labels: np.ndarray, skip: set[str], notes: list[str]
) -> dict[str, Callable[[], float]]:
    """Every baseline that is installed and not skipped, each returning its T."""
    runs: dict[str, Callable[[], float]] = {}
    plain = torch_runs(logits, labels)
    runs["torch L-BFGS on log T"] = plain["torch L-BFGS on log T"]
    if "guo" not in skip:
        runs["Guo et al. reference code"] = plain["Guo et al. reference code"]

    rows = np.arange(len(labels)).reshape(-1, 1)
    frozen = FrozenEstimator(LogitsClassifier(logits).fit())

    def sklearn_public() -> float:
        calibrated = CalibratedClassifierCV(frozen, method="temperature").fit(rows, labels)
        return 1.0 / float(calibrated.calibrated_classifiers_[0].calibrators[0].beta_)

    runs["sklearn CalibratedClassifierCV"] = sklearn_public
    runs["sklearn _TemperatureScaling"] = lambda: (
        1.0 / float(_TemperatureScaling().fit(logits, labels).beta_)
    )

    if "netcal" not in skip:
        try:
            from netcal import __version__ as netcal_version
            from netcal.scaling import TemperatureScaling
        except ImportError as e:
            notes.append(f"netcal left out: {e}")
        else:
            probs64 = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()

            def netcal_fit(probs: np.ndarray = probs64) -> float:
                scaler = TemperatureScaling()
                scaler.fit(probs, labels)
                return 1.0 / float(scaler._sites["weights"]["values"][0])

            runs["netcal TemperatureScaling"] = netcal_fit
            probs32 = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
            t32 = netcal_fit(probs32)
            notes.append(
                f"netcal {netcal_version} given float32 softmax (what a model outputs) "
                f"returns T = {t32:.6f}: its finite-difference L-BFGS-B sees a zero gradient "
                "in float32 and stops; the row above gives it float64 softmax"
            )
    if "torch-uncertainty" not in skip:
        try:
            from torch.utils.data import DataLoader, TensorDataset
            from torch_uncertainty.post_processing import TemperatureScaler
        except ImportError as e:
            notes.append(f"torch-uncertainty left out: {e}")
        else:
            from importlib.metadata import version

            loader = DataLoader(
                TensorDataset(torch.from_numpy(logits), torch.from_numpy(labels)),
                batch_size=1000,
            )

            def tu_fit() -> float:
                scaler = TemperatureScaler()
                scaler.fit(loader, progress=False)
                return float(scaler.temperature[0])

            runs["torch-uncertainty TemperatureScaler"] = tu_fit
            notes.append(f"torch-uncertainty {version('torch-uncertainty')}")
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS threads (0: as they are)"
    )
    parser.add_argument(
        "--skip", default="", help=f"comma-separated peers to leave out, of {', '.join(PEERS)}"
    )
    args = parser.parse_args(argv)
    root = logging.getLogger()
    level = root.level
    try:
        with threads(args.threads):
            return run(args)
    finally:
        root.setLevel(level)  # run() quietens torch-uncertainty's per-fit warnings


def run(args: argparse.Namespace) -> int:
    """The benchmark itself, under ``main``'s thread settings; the exit status."""
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    # torch-uncertainty logs a warning on every fit without a model: noise here.
    logging.getLogger().setLevel(logging.ERROR)

    logits, labels, source = load_logits()
    notes: list[str] = []
    runs: dict[str, Callable[[], float]] = {"wrapcal": lambda: fit_temperature(logits, labels)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peers' deprecation noise
        runs.update(peer_runs(logits, labels, skip, notes))
        temperatures = {name: run() for name, run in runs.items()}
        best = best_times(runs, args.repeats, warm_up=False)

    n, k = logits.shape
    print(f"temperature scaling on {n} x {k} {logits.dtype} logits ({source})")
    print(f"{machine_line()}; sklearn {sklearn.__version__}")
    print(f"best of {args.repeats} interleaved rounds; ratio = time / wrapcal's time")
    ours_t, ours_nll = temperatures["wrapcal"], mean_nll(logits, labels, temperatures["wrapcal"])
    checks = Checks()
    print(f"  {'method':<38} {'time':>10} {'ratio':>8}  {'T':>9} {'|dT|/T':>8} {'dNLL':>9}")
    for name, t in temperatures.items():
        gap = abs(t - ours_t) / ours_t
        excess = mean_nll(logits, labels, t) - ours_nll
        ratio = best[name] / best["wrapcal"]
        print(
            f"  {name:<38} {1e3 * best[name]:7.2f} ms {ratio:7.1f}x  {t:9.6f} {gap:8.1e} "
            f"{excess:9.1e}"
        )
        if name == "wrapcal":
            continue
        checks.check(
            f"{name}: NLL at its T >= wrapcal's",
            excess >= -1e-9,
            f"{excess:+.2e} nats (wrapcal's T is the minimiser)",
        )
        if name not in UNCHECKED:
            tol = TOLERANCE[name]
            checks.check(f"{name}: same T", gap <= tol, f"|dT|/T {gap:.1e} <= {tol:.0e}")
        else:
            print(f"    ({name}: lr=0.01, max_iter=50 stop {gap:.1%} short; not asserted)")
    for note in notes:
        print(f"  note: {note}")
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
