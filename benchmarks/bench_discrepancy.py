"""Benchmark: training the discrepancy heads on cached features against one backbone pass.

The discrepancy plugin trains two heads (pre-training, then fine-tuning with steps A and
B alternating) on the features the core caches, so its cost should be small beside the
one backbone pass over the same data that ``fit`` makes anyway. In one run this times:

* one backbone pass (``wrapped.extract_features``, what ``fit`` runs: eval mode, no
  gradients, batches of 256) over the labelled and the unlabelled data;
* ``wrapped.fit_features(...)`` with ``DiscrepancyHeads()`` at its defaults, on those
  cached features (both phases, all epochs).

Data: with ``../shared/data`` (or ``$WRAPCAL_SHARED_DATA``), the pretrained CIFAR-10
ResNet-20, 10000 CIFAR-10 training images as labelled data and 5000 CIFAR-10 test images
mixed with 5000 MNIST digits as unlabelled data (20000 images, as in the tests). Without
it, a randomly initialised timm resnet18 at 32x32 on scikit-learn's digits (1000
labelled; the other 797 digits and 800 Gaussian-noise images unlabelled): only the
timing is meaningful there.

Run: ``python benchmarks/bench_discrepancy.py [--repeats 3]``
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from _timing import median_seconds  # sibling module: the scripts run from benchmarks/
from torch import nn
from wrapcal_plugins.discrepancy import DiscrepancyHeads

import wrapcal

SHARED_DATA = Path(
    os.environ.get("WRAPCAL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
WEIGHTS = SHARED_DATA / "models" / "cifar10_resnet20.safetensors"
CIFAR = SHARED_DATA / "cifar10_jpeg.npz"
MNIST = SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz"


def resnet20_problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor, str]:
    """The pretrained ResNet-20, CIFAR train, and a CIFAR test + MNIST unlabelled mix."""
    from safetensors.torch import load_file

    from wrapcal.datasets import load_idx_images, load_npz_images, to_rgb32
    from wrapcal.models import CIFAR_MEAN, CIFAR_STD, cifar_resnet20

    model = cifar_resnet20(num_classes=10)
    model.load_state_dict(load_file(WEIGHTS), strict=True)
    x_train, y_train = load_npz_images(CIFAR, split="train", mean=CIFAR_MEAN, std=CIFAR_STD)
    x_test, _ = load_npz_images(CIFAR, split="test", mean=CIFAR_MEAN, std=CIFAR_STD)
    mnist = to_rgb32(load_idx_images(MNIST), mean=CIFAR_MEAN, std=CIFAR_STD)
    g = torch.Generator().manual_seed(0)
    cifar_half = torch.randperm(len(x_test), generator=g)[:5000]
    mnist_half = torch.randperm(len(mnist), generator=g)[:5000]
    unlabeled = torch.cat([x_test[cifar_half], mnist[mnist_half]])
    return model.eval(), (x_train, y_train), unlabeled, "ResNet-20 (pretrained), CIFAR-10 + MNIST"


def digits_problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor, str]:
    """A random-init timm resnet18 on the bundled digits, with noise in the unlabelled set."""
    import timm

    from wrapcal.datasets import digits

    data = digits()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(800, 3, 32, 32, generator=g)
    unlabeled = torch.cat([data.calibration[0], data.test[0], noise])
    model = timm.create_model("resnet18", num_classes=10).eval()
    return model, data.train, unlabeled, "timm resnet18 (random init), digits + noise at 32x32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    have_shared = all(p.is_file() for p in (WEIGHTS, CIFAR, MNIST))
    model, train, unlabeled, what = resnet20_problem() if have_shared else digits_problem()
    wrapped = wrapcal.wrap(model, [DiscrepancyHeads(progress=False)])
    n = len(train[0]) + len(unlabeled)
    print(f"{what}: {len(train[0])} labelled + {len(unlabeled)} unlabelled images")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

    cache: dict[str, wrapcal.cache.FeatureSet] = {}

    def backbone_pass() -> None:
        cache["train"] = wrapped.extract_features(train, "train", progress=False)
        cache["unlabeled"] = wrapped.extract_features(unlabeled, "unlabeled", progress=False)

    def fit_heads() -> None:
        wrapped.fit_features(
            train=(cache["train"].features, cache["train"].labels),
            unlabeled=cache["unlabeled"].features,
            progress=False,
        )

    t_pass = median_seconds(backbone_pass, args.repeats, warm_up=False)
    t_fit = median_seconds(fit_heads, args.repeats, warm_up=False)
    plugin = wrapped.get_plugin(DiscrepancyHeads)
    steps = -(-len(train[0]) // plugin.batch_size)
    print(
        f"one backbone pass over {n} images: {t_pass:8.2f} s "
        f"({n / t_pass:.0f} img/s, median of {args.repeats})"
    )
    print(
        f"discrepancy fit on cached features: {t_fit:8.2f} s "
        f"({plugin.epochs_pretrain} pre-training + {plugin.epochs} fine-tuning epochs, "
        f"{steps} labelled batches of {plugin.batch_size} each)"
    )
    print(f"ratio fit / backbone pass: {t_fit / t_pass:.3f}")


if __name__ == "__main__":
    main()
