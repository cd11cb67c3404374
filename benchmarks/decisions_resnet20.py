"""Conformal sets and abstention on the shared ResNet-20, the README's protocol.

The pretrained CIFAR-10 ResNet-20 on the JPEG CIFAR-10 test set (cached logits,
``tests/shared_data.resnet20_outputs()``); calibration on half A, measured on half B,
the halves of ``examples/retrofit_resnet20.py`` (``np.random.default_rng(0)``'s
permutation of the 10000 test images). Prints, without and after temperature scaling
fitted on half A (as ``["temperature", "conformal"]`` does): coverage, mean set size and
the share of empty sets of LAC and APS (alpha 0.1, seed 0), APS with
``allow_empty=False``; and ``["temperature", ("abstain", {"risk": 0.05})]``'s rule
(Learn then Test, fixed sequence, the calibrated or the raw confidence ranking chosen at
``delta / 2`` each) beside 0.2.0's (union bound over 100 thresholds, calibrated ranking):
accepted share of half B and the error rate among the accepted.

Run: ``python benchmarks/decisions_resnet20.py`` (needs ``../shared/data``; seconds once
the logits are cached).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from shared_data import SHARED_DATA, resnet20_outputs

from wrapcal import fit_abstention, fit_conformal, fit_temperature


def main() -> int:
    if not (SHARED_DATA / "cifar10_jpeg.npz").is_file():
        print(f"needs the shared data in {SHARED_DATA}; nothing to measure")
        return 0
    out = resnet20_outputs()
    logits, labels = out["test_logits"].double(), out["test_labels"].long()
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    a, b = perm[:5000], perm[5000:]
    temperature = fit_temperature(logits[a], labels[a])
    print(
        f"ResNet-20, JPEG CIFAR-10: calibration half A, measured on half B; T = {temperature:.3f}"
    )
    print("| sets | calibration | coverage | mean size | empty sets |")
    print("| --- | --- | ---: | ---: | ---: |")
    rows = [
        ("LAC", {"method": "lac"}),
        ("APS", {}),
        ("APS, allow_empty=False", {"allow_empty": False}),
    ]
    for scaled, z in [("none", logits), ("temperature", logits / temperature)]:
        for name, options in rows:
            sets = fit_conformal(z[a], labels[a], alpha=0.1, **options).sets(z[b])
            size = sets.sum(1).double()
            covered = sets[torch.arange(len(b)), labels[b]].double().mean()
            print(
                f"| {name} | {scaled} | {100 * covered:.1f}% | {size.mean():.2f} | "
                f"{100 * (size == 0).double().mean():.2f}% |"
            )
    correct = logits.argmax(1) == labels
    raw = 1 - torch.softmax(logits, 1).amax(1)
    msp = 1 - torch.softmax(logits / temperature, 1).amax(1)
    print("\nabstention after temperature, risk 0.05, delta 0.1")
    print("| rule | ranking | accepted (half B) | error among accepted | bound on half A |")
    print("| --- | --- | ---: | ---: | ---: |")
    for label, method, alternatives in [
        ("Learn then Test, fixed sequence (0.3)", "fixed_sequence", {"raw_msp": raw[a]}),
        ("union bound over 100 thresholds (0.2.0)", "bonferroni", None),
    ]:
        rule = fit_abstention(
            msp[a], correct[a], risk=0.05, delta=0.1, alternatives=alternatives, method=method
        )
        score = msp if rule.score == "msp" else raw
        accept = score[b] <= rule.threshold
        error = (~correct[b][accept]).double().mean()
        print(
            f"| {label} | {rule.score} | {100 * accept.double().mean():.1f}% | "
            f"{100 * error:.2f}% | {100 * rule.bound:.2f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
