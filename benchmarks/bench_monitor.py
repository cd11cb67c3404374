"""Throughput of ``wrapcal.monitor`` beside a plain ``predict`` loop over the same images.

The pretrained CIFAR-10 ResNet-20 wrapped with ``temperature`` and ``knn`` (fitted from
the shared cached features), ``--n`` JPEG CIFAR-10 test images in windows of
``--window``, batches of ``--batch``: the plain loop calls ``wrapped.predict`` on each
batch and keeps nothing; the monitor makes the same calls and adds the per-window
summaries (estimate, OOD rate and binomial test, KS and PSI of every score against the
calibration set, alerts). Best of ``--repeats`` interleaved rounds, one torch thread
(the machine is shared). The reference is built before timing (from the cached
features: no backbone pass).

Run: ``python benchmarks/bench_monitor.py`` (needs ``../shared/data``; about a minute).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
from _timing import SHARED_DATA, best_times, import_shared_data, machine_line, threads

import wrapcal
from wrapcal.monitoring import Reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images monitored")
    parser.add_argument("--window", type=int, default=250, help="images per window")
    parser.add_argument("--batch", type=int, default=250, help="images per batch")
    parser.add_argument("--repeats", type=int, default=2)
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
    out = sd.resnet20_outputs()
    x_test, _ = sd.cifar10("test")
    perm = np.random.default_rng(0).permutation(len(x_test))
    a, b = perm[:5000], perm[5000 : 5000 + args.n]
    feats, labels = out["test_features"], out["test_labels"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = wrapcal.wrap(sd.pretrained_resnet20(), ["temperature", "knn"]).fit_features(
            train=(out["train_features"], out["train_labels"]), calibration=(feats[a], labels[a])
        )
    reference = Reference.from_prediction(wrapped, wrapped.predict_features(feats[a]), labels[a])
    images = x_test[b]
    windows = [images[i : i + args.window] for i in range(0, len(images), args.window)]

    def plain() -> None:
        for w in windows:
            for i in range(0, len(w), args.batch):
                wrapped.predict(w[i : i + args.batch])

    def monitored() -> None:
        wrapcal.monitor(wrapped, windows, reference=reference, batch_size=args.batch)

    times = best_times({"predict loop": plain, "monitor": monitored}, repeats=args.repeats)
    n = len(images)
    print(f"{n} images, {len(windows)} windows of {args.window}, batches of {args.batch}")
    for name, seconds in times.items():
        print(f"{name:>13}: {seconds:6.2f} s  {n / seconds:7.1f} images/s")
    ratio = times["monitor"] / times["predict loop"]
    print(f"monitor / predict loop: {ratio:.3f}x the time ({100 * (ratio - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
