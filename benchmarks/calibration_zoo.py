"""Benchmark: every calibrator on the fourteen shared logit sets, with the spread over splits.

The claims ``docs/calibration.md`` and the README make about which calibrator wins are
counted here, on every model in ``../shared/data/logits`` (four CIFAR ResNets and ten
models of a public zoo: seven CIFAR-10 and seven CIFAR-100 sets), not on one or two.

Each set (``logits`` float32 ``[10000, K]``, ``labels``) is split by
``np.random.default_rng(seed).permutation(10000)`` for each ``--seeds`` value: the first
``--n`` rows (default 5000) calibrate, the next ``--n`` are measured. Every calibrator is
fitted through the public API (``wrapcal.fit_calibrator(logits, labels, method)``, default
parameters) on the calibration half and measured on the held-out half with
``wrapcal.metrics`` on float64 probabilities: accuracy, top-label ECE (15 equal-width
bins), class-wise ECE (15 bins, averaged over classes), NLL and Brier, beside the
uncalibrated softmax.

It prints a table per set (mean over the splits, ``±`` half the range across them), a
table per family (CIFAR-10, CIFAR-100: the mean over its sets, and on how many sets each
method has the lowest held-out NLL), and one summary line per pairwise claim::

    CIFAR-100: matrix_scaling beats temperature on held-out NLL on 5 of 7 sets (11 of 14 splits)

A set counts as a win when the mean over its splits is lower; a split when that split's
figure is lower. It also counts ``auto_calibration``'s promise (held-out NLL at most the
uncalibrated one's and at most temperature's + 0.005).

Check (exit status 1 when it fails): on every split wrapcal's temperature equals the root
of the NLL's derivative found by scipy's ``brentq`` in float64, to a relative 1e-4.

Run: ``python benchmarks/calibration_zoo.py [--seeds 0 1] [--n 5000] [--sets NAME ...]
[--methods NAME ...] [--threads 1] [--jobs 1]``. ``--jobs N`` runs the splits in N
processes (each on ``--threads`` threads). On the shared 2-core machine the default run
takes several minutes: the ODIR calibrators and ``auto_calibration`` cross-validate.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _timing import SHARED_DATA, Checks, machine_line, threads
from scipy.optimize import brentq
from scipy.special import log_softmax, softmax

import wrapcal
from wrapcal import metrics

#: Where the logit sets are; a test points it elsewhere to check the skip.
LOGITS_DIR = SHARED_DATA / "logits"
METHODS = [
    "temperature",
    "vector_scaling",
    "matrix_scaling",
    "dirichlet",
    "ensemble_temperature",
    "histogram_binning",
    "isotonic",
    "auto_calibration",
]
METRICS = ["accuracy", "ece", "cw_ece", "nll", "brier"]
#: Pairwise claims counted per family: (challenger, baseline, metric).
CLAIMS = [
    ("matrix_scaling", "temperature", "nll"),
    ("dirichlet", "temperature", "nll"),
    ("vector_scaling", "temperature", "nll"),
    ("matrix_scaling", "temperature", "cw_ece"),
    ("dirichlet", "temperature", "cw_ece"),
    ("vector_scaling", "temperature", "cw_ece"),
]
METRIC_NAMES = {"nll": "held-out NLL", "cw_ece": "class-wise ECE", "ece": "ECE"}
#: Relative tolerance between wrapcal's temperature and scipy's root.
T_TOLERANCE = 1e-4
#: auto_calibration's promise (issue 24): NLL at most temperature's plus this.
AUTO_SLACK = 0.005


def family(name: str) -> str:
    """``CIFAR-100`` or ``CIFAR-10`` from a set's file name."""
    return "CIFAR-100" if "cifar100" in name else "CIFAR-10"


def available_sets(names: Sequence[str] | None) -> list[Path]:
    """The ``.npz`` files to run: ``names`` (file stems) or all in ``LOGITS_DIR``.

    Raises:
        SystemExit: A named set is not there.
    """
    if not LOGITS_DIR.is_dir():
        return []
    found = {p.stem: p for p in sorted(LOGITS_DIR.glob("*.npz"))}
    if not names:
        return list(found.values())
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(
            f"no logit set {', '.join(missing)} in {LOGITS_DIR}; there are: {', '.join(found)}"
        )
    return [found[n] for n in names]


def scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The held-out metrics of float64 probabilities (rows renormalised)."""
    p = torch.from_numpy(probs / probs.sum(1, keepdims=True))
    y = torch.from_numpy(labels)
    return {
        "accuracy": metrics.accuracy(p, y),
        "ece": metrics.ece(p, y, n_bins=15),
        "cw_ece": metrics.classwise_ece(p, y, n_bins=15),
        "nll": metrics.nll(p, y),
        "brier": metrics.brier(p, y),
    }


def scipy_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """T minimising the mean NLL of ``softmax(z / T)``, by a float64 root of its derivative.

    With ``b = 1 / T`` the derivative of the mean NLL is ``mean(E_p[z] - z_y)``, increasing
    in ``b`` (the NLL is convex in ``b``), so ``brentq`` on a bracket finds the optimum.
    """
    z = logits.astype(np.float64)
    z_y = z[np.arange(len(labels)), labels]

    def slope(b: float) -> float:
        return float(np.mean((softmax(b * z, axis=1) * z).sum(1) - z_y))

    low, high = 1e-3, 1e3
    return 1.0 / brentq(slope, low, high, xtol=1e-14, rtol=1e-13, maxiter=500)


def run_split(path: Path, seed: int, n: int, methods: Sequence[str], n_threads: int) -> dict:
    """Fit every method on one split of one set; return its held-out metrics.

    Returns:
        ``{"set", "seed", "rows": {method: metrics}, "extra": {method: note}, "seconds",
        "t_wrapcal", "t_scipy", "errors": {method: message}}``.
    """
    with threads(n_threads), np.load(path, allow_pickle=False) as f:
        logits, labels = f["logits"], f["labels"].astype(np.int64)
        if 2 * n > len(labels):
            raise SystemExit(f"--n {n}: {path.name} has only {len(labels)} rows (needs 2n)")
        perm = np.random.default_rng(seed).permutation(len(labels))
        cal, ev = perm[:n], perm[n : 2 * n]
        z_cal, y_cal, z_ev, y_ev = logits[cal], labels[cal], logits[ev], labels[ev]
        rows = {"uncalibrated": scores(softmax(z_ev.astype(np.float64), axis=1), y_ev)}
        extra: dict[str, str] = {}
        errors: dict[str, str] = {}
        seconds: dict[str, float] = {}
        t_wrapcal = float("nan")
        for method in methods:
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    # Small-sample and "kept identity" warnings are expected on tiny runs.
                    warnings.simplefilter("ignore")
                    cal_ = wrapcal.fit_calibrator(z_cal, y_cal, method)
                    out = np.asarray(cal_.transform(torch.from_numpy(z_ev).double()))
            except Exception as e:  # one broken method must not hide the rest
                errors[method] = f"{type(e).__name__}: {e}"
                continue
            seconds[method] = time.perf_counter() - start
            # Softmax, not exp: scaling methods give logits, the others log-probabilities.
            rows[method] = scores(np.exp(log_softmax(out, axis=1)), y_ev)
            if method == "temperature":
                t_wrapcal = float(cal_.temperature_)
            if method in ("matrix_scaling", "dirichlet"):
                extra[method] = f"lambda {cal_.reg_lambda_:g}, mu {cal_.reg_mu_:g}"
            if method == "auto_calibration":
                extra[method] = f"chose {cal_.chosen_}"
        t_scipy = scipy_temperature(z_cal, y_cal) if "temperature" in methods else float("nan")
    return {
        "set": path.stem,
        "seed": seed,
        "rows": rows,
        "extra": extra,
        "errors": errors,
        "seconds": seconds,
        "t_wrapcal": t_wrapcal,
        "t_scipy": t_scipy,
    }


def _fmt(metric: str, value: float) -> str:
    if metric in ("accuracy", "ece"):
        return f"{100 * value:.2f}"
    if metric == "cw_ece":
        return f"{100 * value:.3f}"
    return f"{value:.4f}"


def _cell(metric: str, values: list[float]) -> str:
    """Mean over splits, then ``±`` half the range across them (with one split, the mean)."""
    mean = _fmt(metric, float(np.mean(values)))
    if len(values) < 2:
        return mean
    half = (max(values) - min(values)) / 2
    return f"{mean} ±{_fmt(metric, half)}"


HEADER = (
    "| method | acc (%) | ECE (%) | cw-ECE x100 | NLL | Brier |\n|---|---:|---:|---:|---:|---:|"
)


def set_table(name: str, splits: list[dict], order: list[str]) -> list[str]:
    """The markdown table of one set: every method's mean ± half-range over the splits."""
    seeds = ", ".join(str(s["seed"]) for s in splits)
    lines = [f"\n### {name} ({family(name)}; seeds {seeds}; n = {splits[0]['n']})\n", HEADER]
    for method in order:
        if any(method not in s["rows"] for s in splits):
            continue
        cells = [_cell(m, [s["rows"][method][m] for s in splits]) for m in METRICS]
        notes = sorted({s["extra"][method] for s in splits if method in s["extra"]})
        label = method + (f" [{'; '.join(notes)}]" if notes else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def set_means(results: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{set: {method: {metric: mean over splits}}}`` for methods every split has."""
    by_set: dict[str, list[dict]] = {}
    for r in results:
        by_set.setdefault(r["set"], []).append(r)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, splits in by_set.items():
        # In the first split's order (uncalibrated, then --methods), so ties break alike.
        common = [m for m in splits[0]["rows"] if all(m in s["rows"] for s in splits)]
        out[name] = {
            method: {m: float(np.mean([s["rows"][method][m] for s in splits])) for m in METRICS}
            for method in common
        }
    return out


def family_table(fam: str, means: dict, order: list[str]) -> list[str]:
    """Mean over a family's sets (min-max across sets) and best-NLL counts."""
    names = [n for n in means if family(n) == fam]
    lines = [
        f"\n### {fam}: mean over {len(names)} sets (min-max across sets)\n",
        "| method | acc (%) | ECE (%) | cw-ECE x100 | NLL | lowest NLL on |\n"
        "|---|---:|---:|---:|---:|---:|",
    ]
    # auto_calibration ships one of the others, so it is not a contestant; a tie goes to
    # the method listed first (temperature before ensemble_temperature, say).
    best = {
        n: min((m for m in means[n] if m != "auto_calibration"), key=lambda m: means[n][m]["nll"])
        for n in names
    }
    for method in order:
        have = [n for n in names if method in means[n]]
        if len(have) < len(names):
            continue
        cells = []
        for m in ("accuracy", "ece", "cw_ece", "nll"):
            vals = [means[n][method][m] for n in names]
            cells.append(
                f"{_fmt(m, float(np.mean(vals)))} ({_fmt(m, min(vals))}-{_fmt(m, max(vals))})"
            )
        wins = f"{sum(best[n] == method for n in names)} of {len(names)}"
        if method == "auto_calibration":
            wins = "(picks one)"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {wins} |")
    return lines


def claim_lines(results: list[dict], means: dict) -> list[str]:
    """One summary line per pairwise claim and family, and over all sets."""
    lines = []
    groups = {fam: [n for n in means if family(n) == fam] for fam in ("CIFAR-10", "CIFAR-100")}
    groups["all"] = list(means)
    for a, b, metric in CLAIMS:
        for group, names in groups.items():
            names = [n for n in names if a in means[n] and b in means[n]]
            splits = [r for r in results if r["set"] in names and a in r["rows"] and b in r["rows"]]
            if not names:
                continue
            sets_won = sum(means[n][a][metric] < means[n][b][metric] for n in names)
            splits_won = sum(r["rows"][a][metric] < r["rows"][b][metric] for r in splits)
            lines.append(
                f"{group}: {a} beats {b} on {METRIC_NAMES[metric]} on {sets_won} of "
                f"{len(names)} sets ({splits_won} of {len(splits)} splits)"
            )
    auto = [r for r in results if {"auto_calibration", "temperature"} <= set(r["rows"])]
    if auto:
        le_none = sum(
            r["rows"]["auto_calibration"]["nll"] <= r["rows"]["uncalibrated"]["nll"] for r in auto
        )
        le_temp = sum(
            r["rows"]["auto_calibration"]["nll"] <= r["rows"]["temperature"]["nll"] + AUTO_SLACK
            for r in auto
        )
        worst = max(
            r["rows"]["auto_calibration"]["nll"] - r["rows"]["temperature"]["nll"] for r in auto
        )
        lines.append(
            f"all: auto_calibration's held-out NLL <= uncalibrated in {le_none} of {len(auto)} "
            f"splits, <= temperature + {AUTO_SLACK} in {le_temp} of {len(auto)} "
            f"(largest excess over temperature {worst:+.4f})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 when a check fails)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n", type=int, default=5000, help="rows per half (default 5000)")
    parser.add_argument("--sets", nargs="+", help="logit set names (file stems); default all")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS threads (0: as they are)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="splits run in parallel processes")
    args = parser.parse_args(argv)
    paths = available_sets(args.sets)
    if not paths:
        print(f"calibration_zoo needs the shared data: no logit sets in {LOGITS_DIR}; skipped")
        return 0
    with threads(args.threads):
        print(machine_line())
    start = time.perf_counter()
    tasks = [(p, seed, args.n, args.methods, args.threads) for p in paths for seed in args.seeds]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(run_split, *zip(*tasks, strict=True)))
    else:
        results = [run_split(*t) for t in tasks]
    for r in results:
        r["n"] = args.n
    elapsed = time.perf_counter() - start
    checks = Checks()
    order = ["uncalibrated", *args.methods]
    for path in paths:
        splits = [r for r in results if r["set"] == path.stem]
        print("\n".join(set_table(path.stem, splits, order)))
    means = set_means(results)
    for fam in ("CIFAR-10", "CIFAR-100"):
        if any(family(n) == fam for n in means):
            print("\n".join(family_table(fam, means, order)))
    print("\nsummary (a set wins when its mean over the splits is lower):")
    for line in claim_lines(results, means):
        print(line)
    for r in results:
        for method, message in r["errors"].items():
            checks.check(f"{r['set']} seed {r['seed']}: {method} fits", False, message)
        if "temperature" in args.methods and "temperature" not in r["errors"]:
            gap = abs(r["t_wrapcal"] - r["t_scipy"]) / r["t_scipy"]
            checks.check(
                f"{r['set']} seed {r['seed']}: temperature vs scipy brentq: same T",
                gap <= T_TOLERANCE,
                f"T {r['t_wrapcal']:.6f} vs {r['t_scipy']:.6f} (relative gap {gap:.1e})",
            )
    print(
        f"\n{len(paths)} sets x {len(args.seeds)} seeds, n = {args.n} per half, "
        f"{len(args.methods)} methods: {elapsed:.0f} s"
    )
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
