"""Every built-in plugin fitted from a disk cache of synthetic features: time and memory.

Writes ``--rows`` x ``--width`` synthetic features (``--classes`` Gaussian classes, in
chunks, never all in memory) into a :class:`~wrapcal.features.disk_arrays.DiskWriter` folder,
then fits each built-in plugin from those :class:`~wrapcal.features.disk_arrays.DiskFeatures`
in its own process, and prints its time and the peak resident memory it added above the
process's start (model and Python included in the start). The same fits from
in-memory features at ``--memory-rows`` (the largest size this machine holds
comfortably) are printed beside them. Defaults: 1,000,000 x 2048, float16 on disk.

Run: ``python benchmarks/bench_scale.py [--rows 1000000 --width 2048 --dir /tmp/x]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

#: Plugin -> parameters for the benchmark (fewer epochs for the heads trained by
#: mini-batches over a million rows; a bounded KNN bank).
PLUGINS: dict[str, dict] = {
    "temperature": {},
    "vector_scaling": {},
    "histogram_binning": {},
    "isotonic": {},
    "label_smoothing": {"alpha": 0.05, "epochs": 2},
    "discrepancy": {"epochs_pretrain": 1, "epochs": 1, "batch_size": 1024},
    "mc_dropout": {"finetune": True, "epochs": 1},
    "react": {},
    "knn": {"bank_size": 50_000},
    "mahalanobis": {},
    "vim": {},
    "conformal": {},
    "abstain": {},
}


def class_means(classes: int, width: int) -> torch.Tensor:
    """The synthetic classes' means (also the head's weights: a classifier that works)."""
    return torch.randn(classes, width, generator=torch.Generator().manual_seed(0)) * 0.5


def write_features(folder: Path, rows: int, width: int, classes: int, dtype: str) -> None:
    from wrapcal.features.disk_arrays import DiskWriter

    generator = torch.Generator().manual_seed(1)
    means = class_means(classes, width)
    writer = DiskWriter(folder, dtype)
    for start in range(0, rows, 65536):
        n = min(65536, rows - start)
        labels = torch.randint(0, classes, (n,), generator=generator)
        features = means[labels] + torch.randn(n, width, generator=generator)
        writer.append(torch.relu(features), labels)
    writer.finish({"probe": None})


def child(args: argparse.Namespace) -> None:
    """One plugin's fit, in this process: prints JSON with seconds and peak RSS."""
    import warnings

    import numpy as np

    import wrapcal
    from wrapcal.features.disk_arrays import DiskFeatures

    meta = json.loads((args.dir / "meta.json").read_text())
    features = DiskFeatures(args.dir / "features.bin", meta["rows"], meta["width"], meta["storage"])
    labels = torch.from_numpy(np.fromfile(args.dir / "labels.bin", dtype=np.int64))
    if args.memory:
        features = features[: args.memory]
        labels = labels[: args.memory]
    head = torch.nn.Linear(meta["width"], args.classes)
    with torch.no_grad():  # nearest-mean scores: an informative, imperfect classifier
        means = class_means(args.classes, meta["width"]).relu()
        head.weight.copy_(means)
        head.bias.copy_(-0.5 * means.pow(2).sum(1))
    split = wrapcal.Split(backbone=torch.nn.Identity(), head=head)
    calibration = (features[-10_000:], labels[-10_000:])  # read into memory: 10k rows
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = wrapcal.wrap(None, [(args.plugin, PLUGINS[args.plugin])], split=split)
        reads, _ = wrapcal.model.fitting.read_sets(wrapped)
        given = {"train": (features, labels), "calibration": calibration, "unlabeled": features}
        wrapped.fit_features(**{k: v for k, v in given.items() if k in reads}, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": (peak - start_rss) / 1024}))


def run(plugin: str, args: argparse.Namespace, memory: int | None) -> dict:
    cmd = [
        sys.executable, __file__, "--child", plugin, "--dir", str(args.dir),
        "--classes", str(args.classes),
    ] + (["--memory", str(memory)] if memory else [])  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--memory-rows", type=int, default=200_000)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--plugins", default=",".join(PLUGINS))
    parser.add_argument("--child")
    parser.add_argument("--memory", type=int)
    args = parser.parse_args()
    if args.child:
        args.plugin = args.child
        child(args)
        return
    keep = args.dir is not None
    args.dir = args.dir or Path(tempfile.mkdtemp(prefix="wrapcal-scale-")) / "features"
    if not (args.dir / "meta.json").exists():
        t0 = time.perf_counter()
        write_features(args.dir, args.rows, args.width, args.classes, args.dtype)
        size = (args.dir / "features.bin").stat().st_size / 2**30
        print(f"wrote {args.rows} x {args.width} {args.dtype} ({size:.1f} GiB) in "
              f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    print(f"{'plugin':18s} {'disk s':>8s} {'disk +MB':>9s} | {'memory rows':>11s} "
          f"{'memory s':>9s} {'memory +MB':>10s}")  # fmt: skip
    for plugin in args.plugins.split(","):
        disk = run(plugin, args, None)
        memory = run(plugin, args, args.memory_rows)
        if "error" in disk or "error" in memory:
            print(f"{plugin:18s} error: {disk.get('error') or memory.get('error')}")
            continue
        line = f"{plugin:18s} {disk['seconds']:8.1f} {disk['peak_mb']:9.0f} | "
        line += f"{args.memory_rows:11d} {memory['seconds']:9.1f} {memory['peak_mb']:10.0f}"
        print(line)
    if not keep:
        import shutil

        shutil.rmtree(args.dir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
