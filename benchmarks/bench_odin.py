"""ODIN's cost per image beside one forward pass, and its agreement with pytorch-ood.

On the shared CIFAR-10 ResNet-20 (``../shared/data``), CIFAR-10 test images against
MNIST digits, in one process:

1. Cost per image, best of interleaved rounds (``_timing.best_times``): the model's own
   forward pass (``torch.no_grad``), ``wrapcal.wrap(model).predict`` (no plugin),
   ``predict`` with ``odin`` (the model's pass, then ODIN's forward with gradients,
   backward to the inputs and forward on the perturbed inputs), and
   ``pytorch_ood.detector.ODIN.predict`` (ODIN's three passes alone), each as a ratio to
   the forward pass.
2. Agreement: wrapcal's ``odin`` against ``1 +`` pytorch-ood's score (its score is
   ``-max softmax``, wrapcal's ``1 - max softmax``) on the same images, with ``eps`` in
   the model's input space (pytorch-ood's default) and in pixel space (the paper's:
   ``input_std`` / ``norm_std``), and the AUROC of each beside the core's ``msp`` and
   ``energy`` (in-distribution = CIFAR-10 test, the negative class here: AUROC of "OOD
   scores higher").

    python benchmarks/bench_odin.py                    # 256 + 256 images, ~1 min on 2 cores
    python benchmarks/bench_odin.py --n 64 --repeats 1 # quick
"""

from __future__ import annotations

import argparse

import torch
from _timing import Checks, best_times, import_shared_data, machine_line, threads
from pytorch_ood.detector import ODIN as ReferenceODIN
from sklearn.metrics import roc_auc_score

import wrapcal


def _batched(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="images per side (CIFAR, MNIST)")
    parser.add_argument("--batch", type=int, default=128, help="images per batch")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as set)")
    args = parser.parse_args(argv)
    shared = import_shared_data()
    checks = Checks()
    with threads(args.threads):
        print(machine_line())
        model = shared.pretrained_resnet20()
        x_in = shared.cifar10("test")[0][: args.n]
        x_out = shared.mnist_ood(args.n)
        x = torch.cat([x_in, x_out])
        is_ood = torch.cat([torch.zeros(len(x_in)), torch.ones(len(x_out))]).numpy()
        bare = wrapcal.wrap(model, [])
        odin = wrapcal.wrap(model, ["odin"])
        pixel = wrapcal.wrap(model, [("odin", {"input_std": list(shared.CIFAR_STD)})])
        reference = ReferenceODIN(model)
        reference_pixel = ReferenceODIN(model, norm_std=list(shared.CIFAR_STD))

        def forward(chunk: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(chunk)

        timing_x = x[: args.batch]
        runs = {
            "model forward (no_grad)": lambda: forward(timing_x),
            "wrapcal predict, no plugin": lambda: bare.predict(timing_x, batch_size=args.batch),
            "wrapcal predict with odin": lambda: odin.predict(timing_x, batch_size=args.batch),
            "pytorch-ood ODIN.predict": lambda: reference.predict(timing_x),
        }
        best = best_times(runs, args.repeats)
        base = best["model forward (no_grad)"]
        print(f"\ncost per image, batch {len(timing_x)} of 3x32x32 (ResNet-20)")
        print(f"{'':32}{'ms/image':>10}{'vs forward':>12}")
        for name, seconds in best.items():
            print(f"{name:32}{1e3 * seconds / len(timing_x):10.3f}{seconds / base:11.2f}x")

        pred = odin.predict(x, batch_size=args.batch)
        ours = pred.scores["odin"]
        theirs = _batched(reference.predict, x, args.batch)
        ours_pixel = pixel.predict(x, batch_size=args.batch).scores["odin"]
        theirs_pixel = _batched(reference_pixel.predict, x, args.batch)
        spread = float(ours.max() - ours.min())
        for label, a, b in (
            ("eps in input space (pytorch-ood default)", ours, theirs),
            ("eps in pixel space (input_std = norm_std)", ours_pixel, theirs_pixel),
        ):
            gap = float((a.double() - (1 + b.double())).abs().max())
            checks.check(
                f"odin = 1 + pytorch-ood ODIN, {label}",
                gap <= 1e-6,
                f"max |difference| {gap:.2e} (scores spread {spread:.2e})",
            )
        print(f"\nAUROC, CIFAR-10 test ({len(x_in)}) vs MNIST ({len(x_out)}), OOD positive")
        aurocs = {
            "odin (T=1000, eps=0.0014, input space)": roc_auc_score(is_ood, ours.numpy()),
            "pytorch-ood ODIN, same": roc_auc_score(is_ood, theirs.numpy()),
            "odin, eps in pixel space (paper)": roc_auc_score(is_ood, ours_pixel.numpy()),
            "msp (core)": roc_auc_score(is_ood, pred.scores["msp"].numpy()),
            "energy (core)": roc_auc_score(is_ood, pred.scores["energy"].numpy()),
        }
        for name, value in aurocs.items():
            print(f"  {name:42}{value:.4f}")
        first, second = list(aurocs.values())[:2]
        checks.check("same AUROC as pytorch-ood", abs(first - second) < 1e-9, f"{first:.4f}")
        leaks = [n for n, p in model.named_parameters() if p.grad is not None]
        checks.check("no gradient left in the model", not leaks, f"{len(leaks)} parameters")
    return checks.report()


if __name__ == "__main__":
    raise SystemExit(main())
