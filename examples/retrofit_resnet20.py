"""Retrofit a published CIFAR-10 ResNet-20 with every built-in plugin; write the report.

The model: third-party weights (``../shared/data/models/cifar10_resnet20.safetensors``)
loaded into ``wrapcal.files.cifar_resnets.cifar_resnet20``. The data: the JPEG copy of CIFAR-10 (a
real distribution shift from what the model was trained on) and MNIST as far OOD.

Protocol (fixed permutations, seed 0):

* ``train``: the 10000 CIFAR-10 training images of ``cifar10_jpeg.npz`` (labelled);
* ``calibration``: half A of the CIFAR-10 test set (5000, labelled);
* ``unlabeled`` ("production traffic", for the discrepancy heads): half A's images
  mixed with half A of MNIST (5000 + 5000, no labels);
* evaluation: half B of the CIFAR-10 test set; OOD: half B of MNIST (never seen),
  Gaussian noise and half B with its pixels shuffled (kinds the traffic did not hold).

Every variant shares one backbone pass per data set (the feature cache), and fits only
the data sets its plugins read. Run from the repository root::

    python examples/retrofit_resnet20.py --out resnet20-report

It prints the results table (Markdown) that the README shows. ``--fast`` runs the same
protocol on a fifth of the images (what the test suite runs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import wrapcal
from wrapcal.datasets import load_idx_images, load_npz_images, to_rgb32
from wrapcal.files.cifar_resnets import CIFAR_MEAN, CIFAR_STD, cifar_resnet20
from wrapcal.model.fitting import read_sets

SETUPS: dict[str, list] = {
    "temperature": ["temperature"],
    "mc_dropout (finetune)": [("mc_dropout", {"finetune": True})],
    "label_smoothing": ["label_smoothing"],
    "discrepancy": ["discrepancy"],
    "knn": ["knn"],
    "mahalanobis": ["mahalanobis"],
    "mahalanobis (relative)": [("mahalanobis", {"relative": True})],
    "vim": ["vim"],
    "react + temperature": ["react", "temperature"],
    "all": ["label_smoothing", "discrepancy", "mc_dropout", "knn", "temperature", "conformal"],
}
# The score each setup is judged by for OOD detection (higher = more OOD).
PRIMARY_SCORE = {
    "baseline": "msp",
    "temperature": "msp",
    "mc_dropout (finetune)": "mutual_information",
    "label_smoothing": "msp",
    "discrepancy": "discrepancy",
    "knn": "knn",
    "mahalanobis": "mahalanobis",
    "mahalanobis (relative)": "mahalanobis",
    "vim": "vim",
    "react + temperature": "react",
    "all": "knn",
}


def load_data(shared: Path, fast: bool = False) -> dict[str, torch.Tensor]:
    """Normalised tensors of the protocol's data sets (a fifth of each with ``fast``)."""
    npz = shared / "cifar10_jpeg.npz"
    x_train, y_train = load_npz_images(npz, split="train", mean=CIFAR_MEAN, std=CIFAR_STD)
    x_test, y_test = load_npz_images(npz, split="test", mean=CIFAR_MEAN, std=CIFAR_STD)
    mnist = to_rgb32(
        load_idx_images(shared / "mnist" / "t10k-images-idx3-ubyte.gz"),
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
    )
    rng = np.random.default_rng(0)
    test_perm = torch.from_numpy(rng.permutation(len(y_test)))
    mnist_perm = torch.from_numpy(rng.permutation(len(mnist)))
    a, b = test_perm[:5000], test_perm[5000:]
    g = torch.Generator().manual_seed(0)
    eval_images = x_test[b]
    pixel_order = torch.randperm(32 * 32, generator=g)
    shuffled = eval_images.flatten(2)[:, :, pixel_order].reshape(eval_images.shape)
    keep = 5 if fast else 1  # every 5th row of every set
    train_order = torch.from_numpy(rng.permutation(len(y_train)))[::keep]
    return {
        "train": (x_train[train_order], y_train[train_order]),
        "calibration": (x_test[a][::keep], y_test[a][::keep]),
        "unlabeled": torch.cat([x_test[a][::keep], mnist[mnist_perm[:5000]][::keep]]),
        "test": (eval_images[::keep], y_test[b][::keep]),
        "ood": {
            "MNIST": mnist[mnist_perm[5000:]][::keep],
            "Gaussian noise": torch.randn(eval_images.shape, generator=g)[::keep],
            "shuffled pixels": shuffled[::keep],
        },
    }


def markdown_table(report: wrapcal.Report) -> str:
    """Accuracy, ECE, NLL and, per OOD set, AUROC / FPR@95 of each setup's main score."""
    data = report.to_dict()
    sets = list(data["data"]["ood"])
    head = "| model | OOD score | accuracy | ECE | NLL | " + " | ".join(
        f"{s} AUROC / FPR@95" for s in sets
    )
    lines = [head + " |", "|" + " --- |" * (5 + len(sets))]
    for model, cal in data["calibration"].items():
        score = PRIMARY_SCORE.get(model, "msp")
        cells = [
            model,
            f"`{score}`",
            f"{100 * cal['accuracy']:.2f}%",
            f"{100 * cal['ece']:.2f}%",
            f"{cal['nll']:.3f}",
        ]
        for s in sets:
            m = data["ood"][model][s][score]
            cells.append(f"{100 * m['auroc']:.1f}% / {100 * m['fpr95']:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> wrapcal.Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--shared", type=Path, default=default_shared)
    parser.add_argument("--out", default="resnet20-report")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--fast", action="store_true", help="a fifth of the images")
    args = parser.parse_args(argv)
    progress = not args.no_progress

    start = time.perf_counter()
    model = cifar_resnet20()
    model.load_state_dict(load_file(str(args.shared / "models" / "cifar10_resnet20.safetensors")))
    model.eval()
    data = load_data(args.shared, fast=args.fast)
    models: dict[str, torch.nn.Module] = {"baseline": model}
    for name, plugins in SETUPS.items():
        t0 = time.perf_counter()
        wrapped = wrapcal.wrap(model, plugins=plugins)
        reads, _ = read_sets(wrapped)  # fit only what its plugins read
        sets = {k: data[k] for k in ("train", "calibration", "unlabeled") if k in reads}
        wrapped.fit(**sets, progress=progress)
        models[name] = wrapped
        print(f"fitted {name} in {time.perf_counter() - t0:.1f} s")
    report = wrapcal.evaluate(models, test=data["test"], ood=data["ood"], progress=progress)
    out = report.save(args.out)
    print()
    print(markdown_table(report))
    conformal = report.to_dict()["plugin_metrics"]["all"]["conformal"]
    print(
        f"\nall: conformal coverage {100 * conformal['coverage']['value']:.1f}%, mean set "
        f"size {conformal['mean_set_size']['value']:.2f} (alpha 0.1)"
    )
    total = time.perf_counter() - start
    print(f"\nreport: {Path(out).resolve() / 'report.html'}; total {total:.0f} s")
    return report


if __name__ == "__main__":
    main()
