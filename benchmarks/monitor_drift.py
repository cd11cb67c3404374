"""``wrapcal.monitor`` on a drift sequence built from the shared data: estimated against
realised accuracy, OOD rate and alerts per window.

The pretrained CIFAR-10 ResNet-20 wrapped with ``temperature`` and ``knn`` (and the
``ood`` decision when that plugin is installed), fitted on the JPEG CIFAR-10 training
images (knn) and on half A of the JPEG test set (calibration; ``np.random.default_rng(0)``'s
permutation, as the other ResNet-20 benchmarks). The monitor's reference is half A.
Windows of ``--window`` images from half B, in this order: clean; Gaussian blur, additive
Gaussian noise and lowered contrast at three strengths each; MNIST digits mixed in at 5,
10, 20 and 40%; uniform noise images mixed in at 20%. Per window it prints the
calibrated estimate, the uncalibrated model's (mean softmax confidence of the raw logits,
the same pass), the truth (OOD inputs count as errors), both errors, the OOD rate and
the alerts; then the largest error on clean windows for each, the error under each
corruption, and the false alerts over ``--clean-windows`` smaller clean windows of half B.

Run: ``python benchmarks/monitor_drift.py`` (needs ``../shared/data``; about two minutes
on two CPU cores). ``--markdown FILE`` also writes the table, ``--report DIR`` the
monitor's report (HTML, Markdown, JSON, figures).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from _timing import SHARED_DATA, import_shared_data, machine_line, threads

import wrapcal
from wrapcal.files.cifar_resnets import CIFAR_MEAN, CIFAR_STD
from wrapcal.monitoring import AlertRules, Window

_MEAN = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    return (x * _STD + _MEAN).clamp(0, 1)


def to_inputs(p: torch.Tensor) -> torch.Tensor:
    return ((p.clamp(0, 1) - _MEAN) / _STD).float()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return to_inputs(TF.gaussian_blur(to_pixels(x), kernel_size=5, sigma=sigma))


def noise(x: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return to_inputs(to_pixels(x) + std * torch.randn(x.shape, generator=g))


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    p = to_pixels(x)
    mean = p.mean(dim=(1, 2, 3), keepdim=True)
    return to_inputs(mean + factor * (p - mean))


def mixed(x: torch.Tensor, y: torch.Tensor, ood: torch.Tensor, share: float, seed: int):
    """``x`` with a share of its rows replaced by OOD images (label -1: always wrong)."""
    g = torch.Generator().manual_seed(seed)
    k = round(share * len(x))
    rows = torch.randperm(len(x), generator=g)[:k]
    x, y = x.clone(), y.clone()
    x[rows] = ood[torch.randperm(len(ood), generator=g)[:k]]
    y[rows] = -1
    return x, y


def build_windows(held_x, held_y, mnist, size: int):
    """(name, kind, inputs, labels with -1 for OOD, labelled for the monitor)."""
    n_held = len(held_x)

    def part(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = (i * size) % (n_held - size + 1)
        return held_x[start : start + size], held_y[start : start + size]

    windows, i = [], 0
    for _ in range(n_held // size):
        x, y = part(i)
        windows.append((f"clean {i}", "clean", x, y))
        i += 1
    for sigma in (0.5, 1.0, 1.5):
        x, y = part(i)
        windows.append((f"blur {sigma}", "blur", blur(x, sigma), y))
        i += 1
    for std in (0.04, 0.08, 0.16):
        x, y = part(i)
        windows.append((f"noise {std}", "noise", noise(x, std, i), y))
        i += 1
    for factor in (0.6, 0.4, 0.2):
        x, y = part(i)
        windows.append((f"contrast {factor}", "contrast", contrast(x, factor), y))
        i += 1
    for share in (0.05, 0.1, 0.2, 0.4):
        x, y = part(i)
        windows.append((f"mnist {share:.0%}", "mnist", *mixed(x, y, mnist, share, i)))
        i += 1
    g = torch.Generator().manual_seed(99)
    uniform = to_inputs(torch.rand(size, 3, 32, 32, generator=g))
    x, y = part(i)
    windows.append(("uniform 20%", "uniform", *mixed(x, y, uniform, 0.2, i)))
    return windows


def main(argv: list[str] | None = None) -> int:
    # One torch thread: on a shared 2-core machine a second one slowed ResNet-20 from
    # 180 to 94 images/s (measured); say --threads 0 to leave torch's default.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=1000, help="images per window")
    parser.add_argument(
        "--clean-windows", type=int, default=20, help="small clean windows for false alerts"
    )
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--report", type=Path, help="also save the monitor's report here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if not (SHARED_DATA / "cifar10_jpeg.npz").is_file():
        print(f"needs the shared data in {SHARED_DATA}; nothing to measure")
        return 0
    with threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    sd = import_shared_data()
    print(machine_line())
    x_test, y_test = sd.cifar10("test")
    mnist = sd.mnist_ood()
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y_test)))
    a, b = perm[:5000], perm[5000:]
    with_decision = "ood" in wrapcal.plugin_registry()
    plugins = ["temperature", "knn", *(["ood"] if with_decision else [])]
    start = time.perf_counter()
    # The fit reads the features of the shared cache (tests/shared_data): the same
    # backbone pass fit would make, done once for every test and benchmark.
    out = sd.resnet20_outputs()
    feats, labels = out["test_features"], out["test_labels"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = wrapcal.wrap(sd.pretrained_resnet20(), plugins).fit_features(
            train=(out["train_features"], out["train_labels"]),
            calibration=(feats[a], labels[a]),
        )
    temperature = float(wrapped.get_plugin("temperature").temperature_)
    print(f"plugins {plugins}; T = {temperature:.3f}; fit {time.perf_counter() - start:.1f} s")
    reference = wrapcal.monitoring.Reference.from_prediction(
        wrapped, wrapped.predict_features(feats[a]), labels[a]
    )
    windows = build_windows(x_test[b], y_test[b], mnist, args.window)

    # Truth and the uncalibrated estimate from the same pass (on_batch), per window.
    truth: dict[int, list[torch.Tensor]] = {}
    raw: dict[int, list[torch.Tensor]] = {}
    offsets: dict[int, int] = {}

    def on_batch(index: int, pred, _labels) -> None:
        at = offsets.get(index, 0)
        y = windows[index][3][at : at + len(pred)]
        offsets[index] = at + len(pred)
        truth.setdefault(index, []).append((pred.label.cpu() == y).double())
        raw_conf = torch.softmax(pred.logits.double() * temperature, dim=-1).amax(dim=-1)
        raw.setdefault(index, []).append(raw_conf.cpu())

    # Labelled for the monitor where every label is a CIFAR class (not the mixed ones).
    traffic = [
        Window((x, y) if bool((y >= 0).all()) else x, name=name) for name, _, x, y in windows
    ]
    start = time.perf_counter()
    result = wrapcal.monitor(
        wrapped, traffic, reference=reference, rules=AlertRules(), on_batch=on_batch
    )
    seconds = time.perf_counter() - start
    n_images = sum(len(w[2]) for w in windows)
    print(f"monitor: {n_images} images in {seconds:.1f} s ({n_images / seconds:.0f} img/s)")
    ood = result.settings["ood"]
    how = f"{ood['output']}" + ("" if ood["threshold"] is None else f" > {ood['threshold']:.4g}")
    print(f"OOD counted by {how}, expected in distribution: {ood['expected']:.1%}")

    lines = [
        "| window | estimate (%) | uncalibrated (%) | truth (%) | error (pts) | "
        "uncal. error (pts) | OOD rate (%) | alerts |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    rows = []
    for s, (name, kind, _, _) in zip(result.windows, windows, strict=True):
        t = float(torch.cat(truth[s.index]).mean())
        u = float(torch.cat(raw[s.index]).mean())
        e = s.estimated_accuracy
        rows.append((kind, e - t, u - t))
        alerts = ", ".join(a.rule for a in s.alerts) or "-"
        ood = f"{100 * s.ood['rate']:.1f}" if s.ood else "-"
        lines.append(
            f"| {name} | {100 * e:.1f} | {100 * u:.1f} | {100 * t:.1f} | {100 * (e - t):+.1f} "
            f"| {100 * (u - t):+.1f} | {ood} | {alerts} |"
        )
        if s.accuracy is not None:
            assert abs(s.accuracy - t) < 1e-9, (s.accuracy, t)  # the monitor's own truth
    print()
    print("\n".join(lines))
    clean = [r for r in rows if r[0] == "clean"]
    print()
    print(
        "clean windows, largest |error|: calibrated "
        f"{100 * max(abs(r[1]) for r in clean):.2f} pts, uncalibrated "
        f"{100 * max(abs(r[2]) for r in clean):.2f} pts"
    )
    for kind in ("blur", "noise", "contrast", "mnist", "uniform"):
        errs = [100 * r[1] for r in rows if r[0] == kind]
        print(f"{kind}: calibrated estimate's error {', '.join(f'{e:+.1f}' for e in errs)} pts")
    clean_alerts = sum(
        bool(s.alerts) for s, w in zip(result.windows, windows, strict=True) if w[1] == "clean"
    )
    heavy = [
        s
        for s, w in zip(result.windows, windows, strict=True)
        if w[1] in ("mnist", "uniform") and float(w[0].split()[-1].rstrip("%")) >= 20
    ]
    print(f"clean windows with an alert: {clean_alerts} of {len(clean)}")
    print(
        "windows with >= 20% OOD inputs and an ood_rate alert: "
        f"{sum(any(a.rule == 'ood_rate' for a in s.alerts) for s in heavy)} of {len(heavy)}"
    )
    if args.clean_windows:
        size = len(b) // args.clean_windows
        small = wrapcal.monitor(
            wrapped, (x_test[b], y_test[b]), reference=reference, window_size=size
        )
        fired = [s for s in small.windows if s.alerts]
        rules = sorted({a.rule for s in fired for a in s.alerts})
        print(
            f"false alerts: {len(fired)} of {len(small.windows)} clean windows of {size} "
            f"images ({', '.join(rules) or 'none'}); worst clean error "
            f"{100 * max(abs(s.estimate_error) for s in small.windows):.1f} pts"
        )
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.report:
        print(f"report: {result.save(args.report) / 'monitor.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
