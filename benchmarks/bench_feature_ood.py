"""Feature-space OOD detectors: k-NN search cost and Mahalanobis fitting memory.

Each figure beside its baseline, measured in the same run:

1. ``knn``: scoring a batch of 64 against a 50,000 x 512 bank (normalised random
   features; float32, and float16), as a ratio to one backbone pass of timm resnet18
   at 224 px on the same batch size (target: under 10%). Beside it, scikit-learn's
   exact ``NearestNeighbors`` (what pytorch-ood's KNN runs); both must agree.
2. ``mahalanobis``: ``fit`` on 1,000,000 x 512 features of 100 classes (generated in
   chunks into one float32 tensor, 2 GB, before the measurement): time and peak
   memory of the plugin's chunked float64 statistics beside a naive implementation
   that makes the ``N x D`` float64 copy (centred in place, per class, the least a
   float64 copy needs: +4 GB). Both give the same distances.

Memory is the peak resident set size during a phase minus the RSS when it started
(``benchmarks/bench_metrics.measure``).

    python benchmarks/bench_feature_ood.py               # a few minutes on 2 cores
    python benchmarks/bench_feature_ood.py --n 100000    # quick
"""

from __future__ import annotations

import argparse
import os

import timm
import torch
from _timing import median_seconds
from bench_metrics import measure
from sklearn.neighbors import NearestNeighbors
from torch import nn

import wrapcal
from wrapcal.features.extract import FeatureSet, FitData
from wrapcal.model.split import Split
from wrapcal_plugins.ood.knn import kth_nearest_distance, normalise


def bench_knn(bank_rows: int, width: int, batch: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    bank = normalise(torch.randn(bank_rows, width, generator=gen).relu())
    queries = normalise(torch.randn(batch, width, generator=gen).relu())
    model = timm.create_model("resnet18", num_classes=10).eval()
    images = torch.randn(batch, 3, 224, 224, generator=gen)
    with torch.inference_mode():
        backbone = median_seconds(lambda: model.forward_features(images), 3)
        ours = median_seconds(lambda: kth_nearest_distance(queries, bank, 50), repeats)
        half_bank = bank.half()
        half = median_seconds(lambda: kth_nearest_distance(queries, half_bank, 50), repeats)
        scores = kth_nearest_distance(queries, bank, 50)
        half_scores = kth_nearest_distance(queries, half_bank, 50)
    index = NearestNeighbors(n_neighbors=50, algorithm="brute").fit(bank.numpy())
    sklearn = median_seconds(lambda: index.kneighbors(queries.numpy()), repeats)
    reference = torch.from_numpy(index.kneighbors(queries.numpy())[0][:, -1]).float()
    print(f"\nknn: batch {batch} against a {bank_rows:,} x {width} bank, k = 50")
    print(f"{'':40}{'ms':>10}{'vs backbone':>13}")
    print(f"{'resnet18 backbone pass, 224 px':40}{1e3 * backbone:10.1f}{'1':>13}")
    for name, seconds in [
        ("wrapcal knn, float32 bank", ours),
        ("wrapcal knn, float16 bank", half),
        ("scikit-learn NearestNeighbors (brute)", sklearn),
    ]:
        print(f"{name:40}{1e3 * seconds:10.1f}{100 * seconds / backbone:12.1f}%")
    off_sklearn = (scores - reference).abs().max()
    off_half = (half_scores - scores).abs().max()
    print(f"max |distance difference|: scikit-learn {off_sklearn:.2e}, float16 bank {off_half:.2e}")
    megabytes = bank.numel() / 2**20
    print(f"bank memory: float32 {4 * megabytes:.0f} MB, float16 {2 * megabytes:.0f} MB")


def synthetic_features(n: int, width: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-structured features, written chunk by chunk into one float32 tensor."""
    gen = torch.Generator().manual_seed(1)
    centres = 3 * torch.randn(classes, width, generator=gen)
    mixing = torch.randn(width, width, generator=gen) / width**0.5
    labels = torch.randint(classes, (n,), generator=gen)
    features = torch.empty(n, width)
    for start in range(0, n, 65536):
        rows = labels[start : start + 65536]
        noise = torch.randn(len(rows), width, generator=gen) @ mixing
        features[start : start + 65536] = (centres[rows] + noise + 10).relu()
    return features, labels


def naive_mahalanobis(features: torch.Tensor, labels: torch.Tensor, classes: int):
    """An N x D float64 copy, centred per class in place, then one matmul and pinv."""
    x = features.double()
    means = torch.zeros(classes, x.shape[1], dtype=torch.float64)
    for c in range(classes):
        rows = labels == c
        means[c] = x[rows].mean(dim=0)
        x[rows] -= means[c]
    covariance = x.T @ x / len(x)
    return means, torch.linalg.pinv(covariance, hermitian=True)


def bench_mahalanobis(n: int, width: int, classes: int, skip_naive: bool) -> None:
    features, labels = synthetic_features(n, width, classes)
    split = Split(nn.Identity(), nn.Linear(width, classes))
    wrapped = wrapcal.wrap(None, split=split, plugins=["mahalanobis"])
    plugin = wrapped.get_plugin("mahalanobis")
    # The plugin's own fit, as wrapped.fit_features calls it (without the core's checks).
    data = FitData({"train": FeatureSet("train", features, labels)}, {"progress": False})
    _, t_ours, c_ours, m_ours, method = measure(lambda: plugin.fit(wrapped.view(0), data))
    plugin.fitted_ = True
    print(
        f"\nmahalanobis fit: {n:,} x {width} float32 features ({features.numel() * 4 / 2**30:.1f} "
        f"GB, held before the measurement), {classes} classes"
    )
    print(f"memory: peak RSS above the phase's starting RSS ({method}); CPU = process time")
    print(f"{'':44}{'wall (s)':>10}{'CPU (s)':>10}{'peak (MB)':>11}")
    print(f"{'wrapcal: chunked float64 sums':44}{t_ours:10.2f}{c_ours:10.2f}{m_ours:11.0f}")
    if skip_naive:
        return
    (means, precision), t_naive, c_naive, m_naive, _ = measure(
        lambda: naive_mahalanobis(features, labels, classes)
    )
    print(
        f"{'naive: N x D float64 copy, centred in place':44}{t_naive:10.2f}{c_naive:10.2f}"
        f"{m_naive:11.0f}"
    )
    queries = features[:256].double() * 1.1
    diff = queries[:, None, :] - means[None]
    naive_scores = torch.einsum("bcd,de,bce->bc", diff, precision, diff).amin(dim=1)
    logits = torch.zeros(len(queries), classes)
    context = wrapcal.OutputContext(
        queries[None].float(), logits[None], logits, logits, logits.softmax(dim=-1), {}
    )
    ours = plugin.outputs(context)["mahalanobis"].double()
    relative = ((ours - naive_scores) / naive_scores).abs().max()
    print(f"max relative difference of 256 scores: {relative:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="Mahalanobis rows")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--bank", type=int, default=50_000, help="k-NN bank rows")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-naive", action="store_true", help="skip the 4 GB naive fit")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {load:.1f}"
    )
    bench_knn(args.bank, args.width, args.batch, args.repeats)
    bench_mahalanobis(args.n, args.width, args.classes, args.skip_naive)


if __name__ == "__main__":
    main()
