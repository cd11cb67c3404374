"""Benchmark: conformal prediction sets from 10000 x 100 logits, wrapcal vs MAPIE.

Speed: fitting (calibrating) and predicting sets with ``wrapcal.logits.conformal.fit_conformal``
and ``ConformalPredictor.sets`` beside MAPIE's ``SplitConformalClassifier``
(``conformalize`` + ``predict_set``, ``prefit=True`` on a classifier that returns the
same float64 probabilities) for LAC, APS and RAPS (automatic ``k_reg`` / ``lam`` on both
sides). Data: the 10000 x 100 logits of ``../shared/data/logits/cifar100_resnet20.npz``
(calibrated on all 10000 rows, sets predicted for the same 10000 rows), else seeded random
logits of that shape. Runs are interleaved and the best of ``--repeats`` counts. Both
sides are checked: LAC sets must be identical (up to MAPIE's 1e-8 tolerance), APS and RAPS
coverage and mean set size close (other random numbers, another RAPS tuning split).

Efficiency (``--efficiency``): on each of the four logit sets and the shared ResNet-20's
JPEG CIFAR-10 test logits, over ``--splits`` random 5000 / 5000 calibration/test splits,
mean coverage and mean set size of every method, marginal and class-conditional, on the
raw logits and after temperature scaling fitted on the calibration half, with MAPIE's
marginal sets on the raw logits beside them.

Run: ``python benchmarks/bench_conformal.py [--repeats 10] [--threads N] [--efficiency
--splits 10]``.
Exits with status 1 if wrapcal is slower than MAPIE or the two disagree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from wrapcal.logits.conformal import fit_conformal
from wrapcal.logits.temperature import fit_temperature
from wrapcal.plugin.probs import logits_to_probs

SHARED_DATA = Path(
    os.environ.get("WRAPCAL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
LOGITS = SHARED_DATA / "logits"
SETS = ["cifar10_resnet20", "cifar10_resnet32", "cifar100_resnet20", "cifar100_resnet32"]
ALPHA = 0.1


def load(name: str = "cifar100_resnet20") -> tuple[torch.Tensor, torch.Tensor, str]:
    """Logits and labels of a shared logit set (seeded random ones when absent)."""
    path = LOGITS / f"{name}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return torch.from_numpy(f["logits"]), torch.from_numpy(f["labels"]), path.name
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10000, 100, generator=gen) * 3
    labels = torch.multinomial(torch.softmax(logits / 2, 1), 1, generator=gen)[:, 0]
    return logits, labels, "random logits (../shared/data not found)"


def mapie_sets(probs: np.ndarray, labels: np.ndarray, cal, test, score: str, seed: int = 0):
    """MAPIE's split conformal sets ``[n_test, K]`` on fixed probabilities."""
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Fixed(ClassifierMixin, BaseEstimator):
        """A fitted classifier whose inputs are row indices into ``probs``."""

        def fit(self, X=None, y=None):
            self.classes_ = np.arange(probs.shape[1])
            return self

        def predict_proba(self, X):
            return probs[np.asarray(X).reshape(-1)]

        def predict(self, X):
            return self.predict_proba(X).argmax(1)

    model = SplitConformalClassifier(
        Fixed().fit(), confidence_level=1 - ALPHA, conformity_score=score, random_state=seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.conformalize(np.asarray(cal).reshape(-1, 1), labels[cal])
        params = {} if score == "lac" else {"include_last_label": "randomized"}
        sets = model.predict_set(np.asarray(test).reshape(-1, 1), conformity_score_params=params)
    return sets[1][:, :, 0]


def speed(repeats: int) -> bool:
    import mapie

    logits, labels, source = load()
    probs = logits_to_probs(logits)
    p64, y = probs.double().numpy(), labels.numpy()
    rows = np.arange(len(y))
    print(f"fit + predict sets, alpha = {ALPHA}, on {tuple(logits.shape)} logits ({source})")
    print(
        f"best of {repeats} interleaved runs; wrapcal ({torch.get_num_threads()} torch threads)"
        f" vs MAPIE {mapie.__version__}"
    )
    ok = True
    for method in ("lac", "aps", "raps"):
        runs = {
            "wrapcal": lambda m=method: fit_conformal(logits, labels, method=m).sets(logits),
            "mapie": lambda m=method: torch.from_numpy(mapie_sets(p64, y, rows, rows, m)),
        }
        results = {name: run() for name, run in runs.items()}
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        cover = {
            k: float(v[torch.arange(len(y)), labels].double().mean()) for k, v in results.items()
        }
        size = {k: float(v.sum(1).double().mean()) for k, v in results.items()}
        ratio = best["mapie"] / best["wrapcal"]
        ours, theirs = 1e3 * best["wrapcal"], 1e3 * best["mapie"]
        print(
            f"  {method:<5} wrapcal {ours:7.1f} ms   MAPIE {theirs:7.1f} ms"
            f"   {ratio:4.1f}x   coverage {cover['wrapcal']:.4f} / {cover['mapie']:.4f}"
            f"   mean size {size['wrapcal']:.3f} / {size['mapie']:.3f}"
        )
        if method == "lac":
            q = float(fit_conformal(logits, labels, method="lac").thresholds[0])
            near = torch.from_numpy(np.abs((1 - p64) - q) <= 1e-8)
            agree = torch.equal(results["wrapcal"][~near], results["mapie"][~near])
        else:
            agree = abs(size["wrapcal"] - size["mapie"]) <= 0.1 * size["mapie"]
        ok &= agree and ratio >= 1
    return ok


def efficiency(splits: int) -> None:
    names = [n for n in SETS if (LOGITS / f"{n}.npz").is_file()]
    data = {n: load(n)[:2] for n in names}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    try:
        from shared_data import HAVE_SHARED_DATA, resnet20_outputs

        if HAVE_SHARED_DATA:
            out = resnet20_outputs()
            data["resnet20_jpeg"] = (out["test_logits"], out["test_labels"])
    except ImportError:
        pass
    print(f"\nmean coverage / mean set size, alpha = {ALPHA}, {splits} splits 5000 / 5000")
    header = "data set            method  MAPIE          raw           temperature   "
    print(header + "raw classwise  temp. classwise")
    for name, (logits, labels) in data.items():
        gen = torch.Generator().manual_seed(0)
        cells: dict[str, list[tuple[float, float]]] = {}
        for method in ("lac", "aps", "raps"):
            for split in range(splits):
                perm = torch.randperm(len(labels), generator=gen)
                cal, test = perm[:5000], perm[5000:]
                t = fit_temperature(logits[cal], labels[cal])
                for key, z, classwise in (
                    ("raw", logits, False),
                    ("temperature", logits / t, False),
                    ("raw classwise", logits, True),
                    ("temp. classwise", logits / t, True),
                ):
                    fitted = fit_conformal(
                        z[cal], labels[cal], method=method, classwise=classwise, seed=split
                    )
                    sets = fitted.sets(z[test])
                    hit = float(sets[torch.arange(len(test)), labels[test]].double().mean())
                    cells.setdefault(f"{method} {key}", []).append(
                        (hit, float(sets.sum(1).double().mean()))
                    )
                try:
                    probs = logits_to_probs(logits).double().numpy()
                    sets = mapie_sets(
                        probs, labels.numpy(), cal.numpy(), test.numpy(), method, split
                    )
                    hit = float(sets[np.arange(len(test)), labels[test].numpy()].mean())
                    cells.setdefault(f"{method} MAPIE", []).append((hit, float(sets.sum(1).mean())))
                except ImportError:
                    cells.setdefault(f"{method} MAPIE", []).append((float("nan"), float("nan")))
            row = f"{name:<19} {method:<7}"
            for key in ("MAPIE", "raw", "temperature", "raw classwise", "temp. classwise"):
                hit, size = np.mean(cells[f"{method} {key}"], axis=0)
                row += f" {hit:.3f} / {size:6.3f}"
            print(row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per method")
    parser.add_argument("--efficiency", action="store_true", help="also the set-size table")
    parser.add_argument("--splits", type=int, default=10, help="splits of the size table")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default; numpy is 1)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ok = speed(args.repeats)
    if args.efficiency:
        efficiency(args.splits)
    if not ok:
        print("FAIL: wrapcal is slower than MAPIE or disagrees with it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
