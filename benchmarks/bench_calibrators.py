"""Benchmark: every post-hoc calibrator on real logits, beside netcal and scikit-learn.

Scenarios (each split once, ``np.random.default_rng(0).permutation(10000)``: the first
5000 rows calibrate, the other 5000 are measured): the four logit sets in
``../shared/data/logits`` (CIFAR-10/100 ResNet-20/32, original test sets) and the shared
ResNet-20 on the CIFAR-10 JPEG test set (``tests/shared_data.resnet20_outputs()``; the
file is sorted by class, hence the random split). Every calibrator gets the same float32
logits; metrics are ``wrapcal.metrics`` (15-bin ECE, class-wise ECE, NLL, Brier) of the
calibrated probabilities in float64.

Part 1 prints, per scenario, accuracy, ECE, class-wise ECE, NLL, Brier and fit time of
each method, with the peers on the same logits: netcal 1.4.0's ``HistogramBinning`` and
``IsotonicRegression`` (one-vs-rest, as ours with ``mode="one_vs_rest"``), and
scikit-learn's ``CalibratedClassifierCV`` with ``method="temperature"`` and
``method="isotonic"``. It checks that the pairs agree (calibrated probabilities).

Part 2 times the fits on the CIFAR-100 ResNet-20 calibration half (5000 x 100),
interleaved with netcal's two fits and scikit-learn's in the same process, best of
``--repeats``, and prints each as a ratio to its peer and to netcal's histogram binning.
Matrix scaling and Dirichlet calibration are also timed with ``lambda`` and ``mu`` given
(no search). ``auto_calibration`` (seven candidates, cross-validated, nested where a
candidate tunes itself) is timed beside what a user would otherwise fit on the logits:
scikit-learn's unregularised multinomial ``LogisticRegression(penalty=None)`` with its
defaults (lbfgs, ``max_iter=100``: it stops there unconverged; converged, it takes
minutes on these logits, which have no finite unpenalised optimum), and, for the record,
its default L2-penalised one (``C=1``).

Run: ``python benchmarks/bench_calibrators.py [--repeats 5] [--threads 1] [--scenarios
...] [--markdown tables.md] [--skip-quality] [--skip-timing]``. netcal is optional
(``pip install -c constraints.txt --no-deps netcal``). Exits with status 1 when an
agreement check fails (temperature within 1e-6 of scikit-learn's, the one-vs-rest maps
within 1e-9 of netcal's and scikit-learn's).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _timing import SHARED_DATA, Checks, best_times, import_shared_data, machine_line, threads
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression

from wrapcal import metrics
from wrapcal.logits.calibrators import fit_calibrator

#: Largest probability difference accepted between wrapcal and a peer computing the
#: same map (temperature: two solvers' optima; the maps: the same arithmetic).
AGREE = {"temperature": 1e-6, "maps": 1e-9}
LOGIT_SETS = ["cifar10_resnet20", "cifar10_resnet32", "cifar100_resnet20", "cifar100_resnet32"]
#: (row label, registered name, parameters)
METHODS = [
    ("temperature", "temperature", {}),
    ("vector_scaling", "vector_scaling", {}),
    ("matrix_scaling (MS-ODIR)", "matrix_scaling", {}),
    ("dirichlet (Dir-ODIR)", "dirichlet", {}),
    ("ensemble_temperature", "ensemble_temperature", {}),
    ("histogram_binning top-label", "histogram_binning", {"mode": "top_label"}),
    ("histogram_binning one-vs-rest", "histogram_binning", {"mode": "one_vs_rest"}),
    ("isotonic one-vs-rest", "isotonic", {"mode": "one_vs_rest"}),
    ("isotonic top-label", "isotonic", {"mode": "top_label"}),
    ("auto_calibration (nll)", "auto_calibration", {}),
    ("auto_calibration (classwise_ece)", "auto_calibration", {"metric": "classwise_ece"}),
]


class ProbaClassifier(ClassifierMixin, BaseEstimator):
    """A 'fitted' classifier whose inputs are row indices into cached logits and whose
    only score is ``predict_proba``: scikit-learn then calibrates the probabilities, as
    netcal does."""

    def __init__(self, logits: np.ndarray):
        self.logits = logits

    def fit(self, X=None, y=None):
        self.classes_ = np.arange(self.logits.shape[1])
        return self

    def predict_proba(self, X):
        return softmax(self.logits[np.asarray(X, dtype=np.int64).reshape(-1)], axis=1)

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)


class LogitsClassifier(ProbaClassifier):
    """The same with ``decision_function``: scikit-learn calibrates the logits."""

    def decision_function(self, X):
        return self.logits[np.asarray(X, dtype=np.int64).reshape(-1)]


def sklearn_calibrated(logits: np.ndarray, cal: np.ndarray, y_cal: np.ndarray, method: str):
    """Probabilities of all rows from scikit-learn's CalibratedClassifierCV."""
    kind = ProbaClassifier if method == "isotonic" else LogitsClassifier
    base = kind(logits.astype(np.float64)).fit()
    model = CalibratedClassifierCV(FrozenEstimator(base), method=method)
    model.fit(cal.reshape(-1, 1), y_cal)
    return model.predict_proba(np.arange(len(logits)).reshape(-1, 1))


def scenarios(names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name in names:
        if name == "resnet20_cifar10_jpeg":
            shared = import_shared_data()
            if shared.HAVE_SHARED_DATA:
                o = shared.resnet20_outputs()
                out[name] = (o["test_logits"].numpy(), o["test_labels"].numpy())
            continue
        path = SHARED_DATA / "logits" / f"{name}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as f:
                out[name] = (f["logits"], f["labels"])
    return out


def row(probs: np.ndarray, labels: np.ndarray, seconds: float) -> dict[str, float]:
    p = torch.from_numpy(probs.astype(np.float64))
    p = p / p.sum(1, keepdim=True)
    y = torch.from_numpy(labels)
    return {
        "accuracy": metrics.accuracy(p, y),
        "ece": metrics.ece(p, y),
        "cw_ece": metrics.classwise_ece(p, y),
        "nll": metrics.nll(p, y),
        "brier": metrics.brier(p, y),
        "seconds": seconds,
    }


def quality(
    name: str, logits: np.ndarray, labels: np.ndarray, checks: Checks
) -> list[tuple[str, dict]]:
    perm = np.random.default_rng(0).permutation(len(labels))
    cal, ev = perm[:5000], perm[5000:]
    z_cal, y_cal, z_ev, y_ev = logits[cal], labels[cal], logits[ev], labels[ev]
    rows = [("uncalibrated", row(softmax(z_ev.astype(np.float64), axis=1), y_ev, 0.0))]
    ours = {}
    for label, method, params in METHODS:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calibrator = fit_calibrator(z_cal, y_cal, method, **params)
        seconds = time.perf_counter() - start
        out = calibrator.transform(torch.from_numpy(z_ev).double()).numpy()
        probs = softmax(out, axis=1)
        ours[label] = probs
        extra = ""
        if method in ("matrix_scaling", "dirichlet"):
            extra = f" [lambda {calibrator.reg_lambda_:g}, mu {calibrator.reg_mu_:g}]"
        if method == "auto_calibration":
            extra = f" [chose {calibrator.chosen_}]"
        rows.append((label + extra, row(probs, y_ev, seconds)))
    # Peers on the same logits.
    z64 = logits.astype(np.float64)
    start = time.perf_counter()
    sk_t = sklearn_calibrated(z64, cal, y_cal, "temperature")[ev]
    rows.append(
        ("sklearn CalibratedClassifierCV temperature", row(sk_t, y_ev, time.perf_counter() - start))
    )
    start = time.perf_counter()
    sk_iso = sklearn_calibrated(z64, cal, y_cal, "isotonic")[ev]
    rows.append(
        ("sklearn CalibratedClassifierCV isotonic", row(sk_iso, y_ev, time.perf_counter() - start))
    )
    # The agreement checks use our one-vs-rest maps without the floor (min_prob tiny),
    # which the peers do not have.
    for label, method in [
        ("isotonic one-vs-rest", "isotonic"),
        ("histogram_binning one-vs-rest", "histogram_binning"),
    ]:
        exact = fit_calibrator(z_cal, y_cal, method, mode="one_vs_rest", min_prob=1e-300)
        ours[label] = np.exp(exact.transform(torch.from_numpy(z_ev).double()).numpy())
    agree = {
        "temperature vs sklearn": np.abs(ours["temperature"] - sk_t).max(),
        "isotonic one-vs-rest vs sklearn": _gap(ours["isotonic one-vs-rest"], sk_iso),
    }
    try:
        from netcal.binning import HistogramBinning, IsotonicRegression
    except ImportError:
        print("netcal is not installed: its rows are left out")
    else:
        p_cal, p_ev = softmax(z64[cal], axis=1), softmax(z64[ev], axis=1)
        for label, peer, ourname in [
            (
                "netcal HistogramBinning (15 bins)",
                HistogramBinning(bins=15),
                "histogram_binning one-vs-rest",
            ),
            ("netcal IsotonicRegression", IsotonicRegression(), "isotonic one-vs-rest"),
        ]:
            start = time.perf_counter()
            peer.fit(p_cal, y_cal)
            seconds = time.perf_counter() - start
            with np.errstate(invalid="ignore", divide="ignore"):
                probs = peer.transform(p_ev)
            defined = np.isfinite(probs).all(1) & (probs.sum(1) > 0)
            probs = np.where(defined[:, None], probs, 1.0 / probs.shape[1])
            rows.append(
                (label + f" [{int((~defined).sum())} rows undefined]", row(probs, y_ev, seconds))
            )
            agree[f"{ourname} vs netcal"] = _gap(ours[ourname], probs, defined)
    for what, gap in agree.items():
        bound = AGREE["temperature" if what.startswith("temperature") else "maps"]
        checks.check(f"{name}: {what}", gap <= bound, f"max |p - p_peer| = {gap:.2e}")
    return rows


def _gap(ours: np.ndarray, theirs: np.ndarray, where: np.ndarray | None = None) -> float:
    """Largest probability difference, on rows where the peer's output is defined
    (every class mapped to 0 leaves netcal 0/0 and scikit-learn a uniform row)."""
    mask = theirs.sum(1) > 0 if where is None else where
    return float(np.abs(ours[mask] - theirs[mask]).max())


def timing(repeats: int) -> None:
    path = SHARED_DATA / "logits" / "cifar100_resnet20.npz"
    if not path.is_file():
        print("\nPart 2 needs ../shared/data/logits/cifar100_resnet20.npz")
        return
    with np.load(path, allow_pickle=False) as f:
        logits, labels = f["logits"], f["labels"]
    cal = np.random.default_rng(0).permutation(len(labels))[:5000]
    z, y = logits[cal], labels[cal]
    z64 = z.astype(np.float64)
    p = softmax(z64, axis=1)
    runs: dict[str, Callable[[], object]] = {
        label: (lambda m=method, kw=params: fit_calibrator(z, y, m, **kw))
        for label, method, params in METHODS
        if not label.startswith("auto_calibration (classwise")
    }
    runs["matrix_scaling, lambda and mu given"] = lambda: fit_calibrator(
        z, y, "matrix_scaling", reg_lambda=1e5, reg_mu=1e5
    )
    runs["dirichlet, lambda and mu given"] = lambda: fit_calibrator(
        z, y, "dirichlet", reg_lambda=1e5, reg_mu=1e5
    )
    peers: dict[str, Callable[[], object]] = {
        "sklearn temperature": lambda: sklearn_calibrated(z64, np.arange(5000), y, "temperature"),
        "sklearn LogisticRegression(penalty=None)": lambda: LogisticRegression(penalty=None).fit(
            z64, y
        ),
        "sklearn LogisticRegression (L2, C=1)": lambda: LogisticRegression().fit(z64, y),
    }
    try:
        from netcal.binning import HistogramBinning, IsotonicRegression

        peers["netcal HistogramBinning"] = lambda: HistogramBinning(bins=15).fit(p, y)
        peers["netcal IsotonicRegression"] = lambda: IsotonicRegression().fit(p, y)
    except ImportError:
        pass
    everything = {**runs, **peers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best = best_times(everything, repeats)
    baseline = {
        "temperature": "sklearn temperature",
        "auto_calibration (nll)": "sklearn LogisticRegression(penalty=None)",
        "histogram_binning top-label": "netcal HistogramBinning",
        "histogram_binning one-vs-rest": "netcal HistogramBinning",
        "isotonic one-vs-rest": "netcal IsotonicRegression",
        "isotonic top-label": "netcal IsotonicRegression",
    }
    unit = best.get("netcal HistogramBinning")
    print(f"\nPart 2: fit times on 5000 x 100 (CIFAR-100 ResNet-20), best of {repeats}")
    print(machine_line())
    print("| method | fit (s) | peer | peer (s) | ratio | / netcal HB |")
    print("|---|---:|---|---:|---:|---:|")
    for label in everything:
        peer = baseline.get(label)
        peer_s = best.get(peer) if peer else None
        ratio = f"{best[label] / peer_s:.2f}" if peer_s else ""
        per_unit = f"{best[label] / unit:.1f}" if unit else ""
        print(
            f"| {label} | {best[label]:.3f} | {peer or ''} | "
            f"{'' if peer_s is None else f'{peer_s:.3f}'} | {ratio} | {per_unit} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS threads (0: as they are)"
    )
    parser.add_argument("--scenarios", nargs="*", default=[*LOGIT_SETS, "resnet20_cifar10_jpeg"])
    parser.add_argument("--markdown", type=Path, help="also write part 1's tables here")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    with threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    print(machine_line())
    checks = Checks()
    lines = []
    chosen = [] if args.skip_quality else args.scenarios
    for name, (logits, labels) in scenarios(chosen).items():
        lines += [
            f"\n### {name}\n",
            "| method | acc | ECE | cw-ECE x100 | NLL | Brier | fit (s) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label, r in quality(name, logits, labels, checks):
            lines.append(
                f"| {label} | {100 * r['accuracy']:.2f} | {100 * r['ece']:.2f} | "
                f"{100 * r['cw_ece']:.3f} | {r['nll']:.4f} | {r['brier']:.4f} | "
                f"{r['seconds']:.2f} |"
            )
        print("\n".join(lines[-len(METHODS) - 8 :]), flush=True)
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    if not args.skip_timing:
        timing(args.repeats)
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
