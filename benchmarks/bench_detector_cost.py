"""Cost per image of every OOD detector beside one forward pass of the model it wraps.

The shared CIFAR-10 ResNet-20; each detector wrapped alone at its defaults and fitted
with ``fit_features`` on the model's cached training features
(``tests/shared_data.resnet20_outputs()``, no backbone pass); then, on one batch of JPEG
CIFAR-10 test images, in one process: the model's plain forward pass (no gradients),
``wrapped.predict`` with no plugin, and ``wrapped.predict`` with each detector. Median of
``--repeats`` runs, in ms per image and as a ratio to the plain forward pass.

Run: ``python benchmarks/bench_detector_cost.py [--batch 256] [--repeats 5]
[--threads 1]`` (needs ``../shared/data``; about a minute).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _ood_sets import id_pixels, normalised
from _timing import SHARED_DATA, machine_line, median_seconds, threads
from openood_table import detectors
from shared_data import pretrained_resnet20, resnet20_outputs

import wrapcal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="0: leave torch's setting")
    args = parser.parse_args(argv)
    if not (SHARED_DATA / "cifar10_jpeg.npz").is_file():
        print(f"needs the shared data in {SHARED_DATA}; nothing to measure")
        return 0
    with threads(args.threads):
        return _measure(args)


def _measure(args: argparse.Namespace) -> int:
    print(machine_line())
    model = pretrained_resnet20()
    out = resnet20_outputs()
    train = (out["train_features"], out["train_labels"])
    x = normalised(id_pixels("test")[0][: args.batch])
    wrapped = {"no plugin": wrapcal.wrap(model, [])}
    for name in detectors():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The cached features are the wrapped model's backbone features: no pass.
            wrapped[name] = wrapcal.wrap(model, [name]).fit_features(train=train, progress=False)
    with torch.no_grad():
        forward = median_seconds(lambda: model(x), args.repeats)
    print(f"\nms per image, batch {args.batch} of 3x32x32 (ResNet-20)")
    print("| what | ms / image | x forward |")
    print("| --- | ---: | ---: |")
    print(f"| model forward (no_grad) | {1e3 * forward / args.batch:.3f} | 1.00 |")
    for name, w in wrapped.items():
        seconds = median_seconds(lambda w=w: w.predict(x, batch_size=args.batch), args.repeats)
        label = "wrapcal predict, no plugin" if name == "no plugin" else f"predict with `{name}`"
        print(f"| {label} | {1e3 * seconds / args.batch:.3f} | {seconds / forward:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
