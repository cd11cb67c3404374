"""Core overheads, each figure beside its baseline measured in the same run.

1. Inference: a wrapped timm resnet18 with no plugins against the bare model
   (batch 64, 3x224x224, CPU). Target: at most 2% slower.
2. Fitting: backbone passes and backbone batches during ``fit`` with plugins that work
   on features, against the number of data sets. Target: one pass per data set.

Run: ``python benchmarks/bench_core.py [--batch 64] [--side 224] [--repeats 15]``. Exits
with status 1 when the fit does not run the backbone exactly once over each data set.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import wrapcal
from wrapcal import Plugin, Stage


def time_call(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


class FeatureUser(Plugin):
    """A plugin that reads every cached feature set (as the built-ins do)."""

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.TRAIN
        tags.fit_reads = ("train", "calibration", "unlabeled")
        return tags

    def fit(self, model, data):
        self.total_ = sum(float(s.features.sum()) for s in data.sets.values())
        return self


class OtherFeatureUser(FeatureUser):
    """A second plugin reading the same sets (a plugin may be listed once)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    model = timm.create_model("resnet18", num_classes=10).eval()
    wrapped = wrapcal.wrap(model, plugins=[]).eval()
    x = torch.randn(args.batch, 3, args.side, args.side)
    with torch.inference_mode():
        for _ in range(3):  # warm-up: allocator, oneDNN kernels
            model(x), wrapped(x)
        bare, wrap = [], []
        # Interleaved, so drifts in machine load hit both alike.
        for _ in range(args.repeats):
            bare.append(time_call(model, x))
            wrap.append(time_call(wrapped, x))
        assert torch.equal(model(x), wrapped(x))
    b, w = statistics.median(bare), statistics.median(wrap)
    print(f"inference, timm resnet18, batch {args.batch}, {args.side}px, median of {args.repeats}")
    print(f"  bare model      {b * 1000:8.1f} ms")
    overhead = 100 * (w / b - 1)
    print(f"  wrapped, no plugins {w * 1000:8.1f} ms   overhead {overhead:+.2f}% (target <= 2%)")

    small = timm.create_model("resnet18", num_classes=10).eval()
    wrapped = wrapcal.wrap(small, plugins=[FeatureUser(), OtherFeatureUser()])
    batches: list[int] = []
    wrapped.backbone.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    g = torch.Generator().manual_seed(0)
    sets = {
        "train": (
            torch.randn(300, 3, 32, 32, generator=g),
            torch.randint(0, 10, (300,), generator=g),
        ),
        "calibration": (
            torch.randn(200, 3, 32, 32, generator=g),
            torch.randint(0, 10, (200,), generator=g),
        ),
        "unlabeled": torch.randn(100, 3, 32, 32, generator=g),
    }
    start = time.perf_counter()
    wrapped.fit(**sets, batch_size=64, progress=False)
    fit_time = time.perf_counter() - start
    with torch.inference_mode():
        start = time.perf_counter()
        for data in sets.values():
            x = data[0] if isinstance(data, tuple) else data
            for i in range(0, len(x), 64):
                small(x[i : i + 64])
        one_pass = time.perf_counter() - start
    print("fit with two feature plugins on 3 data sets (600 images, 32px)")
    print(f"  backbone passes {wrapped.backbone_passes} for 3 data sets")
    print(f"  images through the backbone {sum(batches)} for 600 images")
    print(f"  fit {fit_time:.3f} s beside one inference pass over the same data {one_pass:.3f} s")
    print(f"  ratio {fit_time / one_pass:.2f}x")
    one_pass_each = wrapped.backbone_passes == 3 and sum(batches) == 600
    print(f"  [{'ok' if one_pass_each else 'FAIL'}] one backbone pass per data set")
    return 0 if one_pass_each else 1


if __name__ == "__main__":
    raise SystemExit(main())
