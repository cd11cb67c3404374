"""Müller et al.'s Table 3 for the shared CIFAR-10 ResNet-20: label smoothing beside
temperature scaling, each with and without the other.

Model and data (``tests/shared_data.py``, reached through ``_timing``): the pretrained
CIFAR-10 ResNet-20 and its cached penultimate features.

* Retraining: the head only (``label_smoothing``, ``scope="head"``), on the cached
  features of ``--train`` CIFAR-10 JPEG training images (all 10000 by default; a smaller
  number takes a random subset, seed 0).
* The JPEG test set is put in random order once (seed 0): the first ``--cal`` images
  (5000) are the calibration set of the ``temperature`` plugin and of ``alpha="auto"``,
  the next ``--eval`` images (the other 5000) measure every row. Every row uses that split.
* Metrics on the evaluation images: accuracy, top-label ECE (15 bins) with a 95% basic
  bootstrap interval (``wrapcal.metrics.ece_bootstrap``, ``--resamples`` resamples, seed
  0), NLL and mean confidence.

Rows, each alone and followed by the ``temperature`` plugin (fitted on the calibration
images, after the head is retrained): the pretrained head; the head retrained with
alpha = 0 (the new data without smoothing), 0.05, 0.1 and ``"auto"`` (the default grid,
the lowest calibration NLL wins).

Agreement checks: the pretrained rows' logits are the model's own on the evaluation
images; every temperature is the NLL minimiser found by scipy's bounded Brent search on
log T (within 1e-4, relative); ``alpha="auto"`` kept the grid point with the lowest
calibration NLL, and that NLL is the one the fixed-alpha fit of the same alpha reaches.

Run: ``python benchmarks/label_smoothing_table.py [--train 10000] [--cal 5000]
[--eval 5000] [--resamples 1000] [--threads 1]``. Needs ``../shared/data`` (prints a line
and exits 0 without it). About 20 s on 2 cores. Exits with status 1 when an agreement
check fails.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch
from _timing import Checks, import_shared_data, machine_line, threads
from scipy.optimize import minimize_scalar

import wrapcal
from wrapcal.metrics import accuracy, ece, ece_bootstrap, nll

#: The alphas of the retrained-head rows, in the table's order.
ALPHAS: tuple[float | str, ...] = (0.0, 0.05, 0.1, "auto")
#: Relative agreement required between the plugin's temperature and scipy's.
T_RTOL = 1e-4


@dataclass
class Row:
    """One line of the table, measured on the evaluation images."""

    name: str
    temperature: float
    acc: float
    ece: float
    ece_ci: tuple[float, float]
    nll: float
    conf: float


def measure(
    name: str, temperature: float, logits: torch.Tensor, labels: torch.Tensor, resamples: int
) -> Row:
    """The metrics of one row from its final logits (float64 softmax)."""
    probs = torch.softmax(logits.double(), dim=1)
    return Row(
        name=name,
        temperature=temperature,
        acc=accuracy(probs, labels),
        ece=ece(probs, labels),
        ece_ci=ece_bootstrap(probs, labels, n_resamples=resamples, seed=0),
        nll=nll(probs, labels),
        conf=float(probs.max(dim=1).values.mean()),
    )


def mean_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean NLL of ``softmax(logits / T)`` in float64."""
    z = logits.double() / temperature
    return float(-torch.log_softmax(z, dim=1)[torch.arange(len(labels)), labels].mean())


def scipy_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL: scipy's bounded Brent search on log T.

    The independent reference for the ``temperature`` plugin's fit.
    """
    result = minimize_scalar(
        lambda log_t: mean_nll(logits, labels, float(np.exp(log_t))),
        bounds=(-5.0, 5.0),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return float(np.exp(result.x))


def format_table(rows: list[Row], args: argparse.Namespace) -> str:
    """The rows as the markdown table of ``docs/label_smoothing.md``, with its caption."""
    lines = [
        "| row | T | accuracy | ECE (95% bootstrap) | NLL | mean confidence |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        low, high = r.ece_ci
        lines.append(
            f"| {r.name} | {r.temperature:.3f} | {100 * r.acc:.2f}% | {100 * r.ece:.2f}% "
            f"({100 * low:.1f}-{100 * high:.1f}) | {r.nll:.4f} | {100 * r.conf:.2f}% |"
        )
    lines.append(
        f"\nResNet-20, cifar10_jpeg: head retrained on {args.train} train features; "
        f"evaluation on {args.eval} test images, calibration on {args.cal} others (seed 0). "
        f"Temperature from the temperature plugin; ECE bootstrap with {args.resamples} "
        "resamples."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, build and print the table; the exit status (1: a check failed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=10000, help="training features (random)")
    parser.add_argument("--cal", type=int, default=5000, help="calibration images (test set)")
    parser.add_argument("--eval", type=int, default=5000, help="evaluation images (test set)")
    parser.add_argument("--resamples", type=int, default=1000, help="ECE bootstrap resamples")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS threads (0: as they are)"
    )
    args = parser.parse_args(argv)
    for name in ("train", "cal", "eval", "resamples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    with threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    """The table itself, under ``main``'s thread settings; the exit status."""
    sd = import_shared_data()
    if not sd.HAVE_SHARED_DATA:
        print(f"needs the shared data ({sd.SHARED_DATA}); nothing to measure")
        return 0
    out = sd.resnet20_outputs()
    n_train, n_test = len(out["train_labels"]), len(out["test_labels"])
    if args.train > n_train or args.cal + args.eval > n_test:
        print(
            f"--train {args.train} exceeds the {n_train} training images, or --cal + --eval "
            f"{args.cal + args.eval} the {n_test} test images: lower them",
            file=sys.stderr,
        )
        return 2
    # All training features in their stored order at full size (the documented protocol);
    # a seeded random subset for the quick runs.
    pick = (
        torch.arange(n_train)
        if args.train == n_train
        else torch.randperm(n_train, generator=torch.Generator().manual_seed(0))[: args.train]
    )
    train = (out["train_features"][pick], out["train_labels"][pick])
    order = torch.randperm(n_test, generator=torch.Generator().manual_seed(0))
    cal_idx, eval_idx = order[: args.cal], order[args.cal : args.cal + args.eval]
    cal = (out["test_features"][cal_idx], out["test_labels"][cal_idx])
    f_eval, y_eval = out["test_features"][eval_idx], out["test_labels"][eval_idx]

    print(
        f"pretrained ResNet-20 on cifar10_jpeg: head retrained on {args.train} train features; "
        f"test set in random order (seed 0): calibration {args.cal}, evaluation {args.eval}"
    )
    print(machine_line())
    checks = Checks()
    rows: list[Row] = []
    grid_nll: dict[float, float] = {}
    fixed_cal_nll: dict[float, float] = {}
    auto_alpha: float | None = None

    for alpha in (None, *ALPHAS):
        plugins: list = [] if alpha is None else [("label_smoothing", {"alpha": alpha})]
        wrapped = wrapcal.wrap(sd.pretrained_resnet20(), [*plugins, "temperature"])
        wrapped.fit_features(
            train=None if alpha is None else train, calibration=cal, progress=False
        )
        with torch.no_grad():
            raw_eval, raw_cal = wrapped.head(f_eval), wrapped.head(cal[0])
            scaled = wrapped.head_logits(f_eval)
        t = float(wrapped.get_plugin("temperature").temperature_)
        t_scipy = scipy_temperature(raw_cal, cal[1])
        if alpha is None:
            name = "baseline (pretrained head)"
            gap = float((raw_eval - out["test_logits"][eval_idx]).abs().max())
            checks.check(
                "pretrained head on the cached features = the model's logits",
                gap <= 1e-4,
                f"max |diff| {gap:.1e} <= 1e-4",
            )
            rows.append(measure(name, 1.0, raw_eval, y_eval, args.resamples))
            rows.append(
                measure("baseline + temperature scaling", t, scaled, y_eval, args.resamples)
            )
        else:
            plugin = wrapped.get_plugin("label_smoothing")
            if alpha == "auto":
                auto_alpha = float(plugin.alpha_)
                grid_nll = {float(a): float(v) for a, v in plugin.grid_nll_}
                label = f"auto -> {auto_alpha:g}"
            else:
                fixed_cal_nll[float(alpha)] = mean_nll(raw_cal, cal[1])
                label = f"{alpha:g}" + (" (new data only)" if alpha == 0 else "")
            name = f"retrained head, alpha={label}"
            rows.append(measure(name, 1.0, raw_eval, y_eval, args.resamples))
            rows.append(measure(f"{name} + temperature", t, scaled, y_eval, args.resamples))
        checks.check(
            f"temperature of {name}: the plugin's = scipy's",
            abs(t - t_scipy) <= T_RTOL * t_scipy,
            f"{t:.6f} vs {t_scipy:.6f}",
        )

    best = min(grid_nll, key=grid_nll.get)
    checks.check(
        'alpha="auto" kept the grid point with the lowest calibration NLL',
        auto_alpha == best,
        f"chose {auto_alpha:g}, lowest {best:g} ({grid_nll[best]:.4f})",
    )
    for alpha, value in fixed_cal_nll.items():
        if alpha in grid_nll:
            checks.check(
                f'alpha="auto" grid NLL at {alpha:g} = the fixed-alpha fit\'s',
                abs(grid_nll[alpha] - value) <= 1e-4 * value,
                f"{grid_nll[alpha]:.6f} vs {value:.6f}",
            )
    print()
    print(format_table(rows, args))
    print()
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
