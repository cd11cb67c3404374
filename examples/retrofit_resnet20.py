"""Retrofit a published CIFAR-10 ResNet-20 with every built-in plugin; write the report.

The model: third-party weights (``../shared/data/models/cifar10_resnet20.safetensors``)
loaded into ``wrapcal.models.cifar_resnet20``. The data: the JPEG copy of CIFAR-10 (a
real distribution shift from what the model was trained on) and MNIST as far OOD.

Protocol (fixed permutations, seed 0):

* ``train``: the 10000 CIFAR-10 training images of ``cifar10_jpeg.npz`` (labelled);
* ``calibration``: half A of the CIFAR-10 test set (5000, labelled);
* ``unlabeled`` ("production traffic", for the discrepancy heads): half A's images
  mixed with half A of MNIST (5000 + 5000, no labels);
* evaluation: half B of the CIFAR-10 test set; OOD: half B of MNIST (never seen),
  Gaussian noise and half B with its pixels shuffled (kinds the traffic did not hold).

Run from the repository root (about 4 minutes on 2 CPU cores)::

    python examples/retrofit_resnet20.py --out resnet20-report

It prints the results table (Markdown) that the README shows.
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
from wrapcal.models import CIFAR_MEAN, CIFAR_STD, cifar_resnet20

SETUPS: dict[str, list] = {
    "temperature": ["temperature"],
    "mc_dropout": [("mc_dropout", {"finetune": True})],
    "label_smoothing (auto)": [("label_smoothing", {"alpha": "auto"})],
    "discrepancy": ["discrepancy"],
    "all four": [
        ("label_smoothing", {"alpha": "auto"}),
        "discrepancy",
        ("mc_dropout", {"finetune": True}),
        "temperature",
    ],
}
# The score each setup is judged by for OOD detection (higher = more OOD).
PRIMARY_SCORE = {
    "baseline": "msp",
    "temperature": "msp",
    "mc_dropout": "mutual_information",
    "label_smoothing (auto)": "msp",
    "discrepancy": "discrepancy",
    "all four": "discrepancy",
}


def load_data(shared: Path) -> dict[str, torch.Tensor]:
    """Normalised tensors of the protocol's data sets."""
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
    return {
        "train": (x_train, y_train),
        "calibration": (x_test[a], y_test[a]),
        "unlabeled": torch.cat([x_test[a], mnist[mnist_perm[:5000]]]),
        "test": (eval_images, y_test[b]),
        "ood": {
            "MNIST": mnist[mnist_perm[5000:]],
            "Gaussian noise": torch.randn(eval_images.shape, generator=g),
            "shuffled pixels": shuffled,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--shared", type=Path, default=default_shared)
    parser.add_argument("--out", default="resnet20-report")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    progress = not args.no_progress

    start = time.perf_counter()
    model = cifar_resnet20()
    model.load_state_dict(load_file(str(args.shared / "models" / "cifar10_resnet20.safetensors")))
    model.eval()
    data = load_data(args.shared)
    models: dict[str, torch.nn.Module] = {"baseline": model}
    for name, plugins in SETUPS.items():
        t0 = time.perf_counter()
        wrapped = wrapcal.wrap(model, plugins=plugins)
        wrapped.fit(
            train=data["train"],
            calibration=data["calibration"],
            unlabeled=data["unlabeled"],
            progress=progress,
        )
        models[name] = wrapped.eval()
        print(f"fitted {name} in {time.perf_counter() - t0:.1f} s")
    report = wrapcal.evaluate(models, test=data["test"], ood=data["ood"], progress=progress)
    out = report.save(args.out)
    print()
    print(markdown_table(report))
    total = time.perf_counter() - start
    print(f"\nreport: {Path(out).resolve() / 'report.html'}; total {total:.0f} s")


if __name__ == "__main__":
    main()
