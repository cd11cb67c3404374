"""Benchmark: label smoothing's head retraining against one backbone pass, same run.

``scope="head"`` retrains the classifier head on cached features, so its cost should
be a fraction of the one backbone pass ``wrapped.fit`` makes over the training data
anyway. This script times both on the same training set, interleaved (pass, head fit,
pass, head fit, ...) so load from other processes hits both alike, and prints the best
and median of ``--repeats`` runs and their ratio.

Data and model: the pretrained CIFAR-10 ResNet-20 on the 10000 training images of
``../shared/data/cifar10_jpeg.npz`` when it is there; else timm's ``resnet18``
(random weights, 10 classes) at 32x32 on the 1000 training images of the bundled
digits data. ``--auto`` also times ``alpha="auto"`` (one head fit per grid point plus
the calibration NLLs; the calibration features are cached once, outside the timing).

Run: ``python benchmarks/bench_label_smoothing.py [--repeats 3] [--auto]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import wrapcal
from wrapcal.cache import FeatureSet

SHARED_DATA = Path(
    os.environ.get("WRAPCAL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
CIFAR_NPZ = SHARED_DATA / "cifar10_jpeg.npz"
WEIGHTS = SHARED_DATA / "models" / "cifar10_resnet20.safetensors"


def load_setup() -> tuple[str, torch.nn.Module, tuple, tuple]:
    """(description, model in eval mode, train (X, y), calibration (X, y))."""
    if CIFAR_NPZ.is_file() and WEIGHTS.is_file():
        from safetensors.torch import load_file

        from wrapcal.datasets import load_npz_images
        from wrapcal.models import CIFAR_MEAN, CIFAR_STD, cifar_resnet20

        model = cifar_resnet20(num_classes=10)
        model.load_state_dict(load_file(WEIGHTS), strict=True)
        train = load_npz_images(CIFAR_NPZ, split="train", mean=CIFAR_MEAN, std=CIFAR_STD)
        test = load_npz_images(CIFAR_NPZ, split="test", mean=CIFAR_MEAN, std=CIFAR_STD)
        cal = (test[0][:5000], test[1][:5000])
        return "pretrained ResNet-20, cifar10_jpeg train (10000 images)", model.eval(), train, cal
    import timm

    from wrapcal.datasets import digits

    data = digits()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("resnet18", num_classes=10)
    return (
        "timm resnet18 (random init), digits train at 32x32",
        model.eval(),
        data.train,
        (data.calibration),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--auto", action="store_true", help='also time alpha="auto"')
    args = parser.parse_args(argv)

    what, model, train, cal = load_setup()
    n = len(train[0])
    print(f"{what}; torch {torch.__version__}, {torch.get_num_threads()} threads", end="")
    if hasattr(os, "getloadavg"):
        print(f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", end="")
    print()

    cal_set: FeatureSet | None = None
    if args.auto:
        probe = wrapcal.wrap(model, [])
        cal_set = probe.extract_features(cal, "calibration", batch_size=500, progress=False)

    passes, fits, autos = [], [], []
    for _ in range(args.repeats):
        wrapped = wrapcal.wrap(model, [("label_smoothing", {"alpha": args.alpha})])
        start = time.perf_counter()
        features = wrapped.extract_features(train, "train", batch_size=500, progress=False)
        passes.append(time.perf_counter() - start)

        start = time.perf_counter()
        wrapped.fit_features(train=(features.features, features.labels), progress=False)
        fits.append(time.perf_counter() - start)
        assert wrapped.backbone_passes == 1  # the head fit made no backbone pass

        if cal_set is not None:
            auto = wrapcal.wrap(model, [("label_smoothing", {"alpha": "auto"})])
            start = time.perf_counter()
            auto.fit_features(
                train=(features.features, features.labels),
                calibration=(cal_set.features, cal_set.labels),
                progress=False,
            )
            autos.append(time.perf_counter() - start)
            chosen = auto.get_plugin("label_smoothing").alpha_

    def show(name: str, times: list[float]) -> None:
        print(f"  {name:<48} best {min(times):7.2f} s   median {statistics.median(times):7.2f} s")

    print(f"{args.repeats} interleaved runs on {n} training images:")
    show("one backbone pass over the training set", passes)
    show(f'scope="head" retraining, alpha={args.alpha:g} (L-BFGS)', fits)
    if autos:
        show(f'scope="head" retraining, alpha="auto" (-> {chosen:g})', autos)
    ratio = min(fits) / min(passes)
    print(f"head retraining / backbone pass (best of each): {ratio:.2f}")
    if autos:
        print(f'alpha="auto" / backbone pass (best of each): {min(autos) / min(passes):.2f}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
