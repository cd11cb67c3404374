"""Abstention after temperature scaling on the shared CIFAR-100 logit sets: coverage
against the best held-out threshold, and the realised risk against the target.

The README's chain: temperature fitted on a calibration half, then
``fit_abstention`` (Learn then Test, fixed sequence) given the calibrated ``msp`` and the
raw ``msp`` of the logits before calibration (each tested at ``delta / 2``). Per set:

* random 5000 / 5000 splits: the accepted share of the evaluation half, beside 0.2.0's
  rule (calibrated msp, union bound over 100 thresholds) and the oracle (the best
  threshold chosen on the evaluation half itself, on either ranking), and the error
  rate of the accepted evaluation rows;
* the guarantee as stated: the 10000 rows as the population, calibration sets of 5000
  i.i.d. draws from it, and the rule's selective risk on the population.

Run: ``python benchmarks/abstention_zoo.py [--draws 50] [--sets zoo_cifar100_vgg11_bn,...]``
(needs ``../shared/data``; about a minute).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from wrapcal import fit_abstention, fit_temperature

SHARED = Path(
    os.environ.get("WRAPCAL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


def best_coverage(score: torch.Tensor, correct: torch.Tensor, risk: float) -> float:
    """The largest share a threshold on ``score`` accepts with an error rate <= risk."""
    wrong = (~correct[torch.sort(score, stable=True).indices]).double()
    counts = torch.arange(1, len(score) + 1, dtype=torch.float64)
    ok = torch.cumsum(wrong, 0) <= risk * counts
    return float(counts[ok].max()) / len(score) if bool(ok.any()) else 0.0


def chain(logits, labels, raw, correct, cal, risk, delta, method="fixed_sequence"):
    temperature = fit_temperature(logits[cal], labels[cal])
    msp = 1 - torch.softmax(logits / temperature, 1).amax(1)
    alternatives = {"raw_msp": raw[cal]} if method == "fixed_sequence" else None
    rule = fit_abstention(
        msp[cal], correct[cal], risk=risk, delta=delta, alternatives=alternatives, method=method
    )
    score = msp if rule.score == "msp" else raw
    return rule, score <= rule.threshold, msp


def measure(name: str, draws: int, risk: float, delta: float) -> dict[str, float]:
    data = np.load(SHARED / "logits" / f"{name}.npz")
    logits = torch.from_numpy(data["logits"]).double()
    labels = torch.from_numpy(data["labels"]).long()
    correct = logits.argmax(1) == labels
    raw = 1 - torch.softmax(logits, 1).amax(1)
    gen = torch.Generator().manual_seed(24)
    ours, old, oracle, ratio, risks, raw_chosen = [], [], [], [], [], 0
    for _ in range(draws):
        perm = torch.randperm(len(labels), generator=gen)
        cal, ev = perm[:5000], perm[5000:]
        rule, accept, msp = chain(logits, labels, raw, correct, cal, risk, delta)
        _, accept_old, _ = chain(logits, labels, raw, correct, cal, risk, delta, "bonferroni")
        best = max(
            best_coverage(msp[ev], correct[ev], risk), best_coverage(raw[ev], correct[ev], risk)
        )
        ours.append(float(accept[ev].double().mean()))
        old.append(float(accept_old[ev].double().mean()))
        oracle.append(best)
        ratio.append(ours[-1] / best)
        risks.append(float((~correct[ev][accept[ev]]).double().mean()))
        raw_chosen += rule.score == "raw_msp"
    gen = torch.Generator().manual_seed(124)
    population = []
    for _ in range(draws):
        cal = torch.randint(len(labels), (5000,), generator=gen)
        _, accept, _ = chain(logits, labels, raw, correct, cal, risk, delta)
        population.append(float((~correct[accept]).double().mean()))
    return {
        "ours": np.mean(ours),
        "old": np.mean(old),
        "oracle": np.mean(oracle),
        "ratio": np.mean(ratio),
        "worst": np.min(ratio),
        "raw": raw_chosen,
        "risk": np.mean(risks),
        "risk_over": np.mean(np.array(risks) > risk),
        "pop": np.mean(population),
        "pop_over": np.mean(np.array(population) > risk),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--sets", default="")
    parser.add_argument("--risk", type=float, default=0.05)
    parser.add_argument("--delta", type=float, default=0.1)
    args = parser.parse_args(argv)
    if not (SHARED / "logits").is_dir():
        print(f"needs the shared data in {SHARED}; nothing to measure")
        return 0
    names = (
        args.sets.split(",")
        if args.sets
        else sorted(p.stem for p in (SHARED / "logits").glob("*cifar100*.npz"))
    )
    torch.set_num_threads(1)
    print(f"risk {args.risk}, delta {args.delta}, {args.draws} draws per set, temperature first")
    print(
        "| set | ours | 0.2.0's rule | oracle | ours / oracle (worst) | raw_msp chosen |"
        " eval risk: mean / share > target | population risk: mean / share > target |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    failed = False
    for name in names:
        r = measure(name, args.draws, args.risk, args.delta)
        print(
            f"| {name} | {r['ours']:.3f} | {r['old']:.3f} | {r['oracle']:.3f} | "
            f"{r['ratio']:.3f} ({r['worst']:.3f}) | {r['raw']}/{args.draws} | "
            f"{100 * r['risk']:.2f}% / {r['risk_over']:.2f} | "
            f"{100 * r['pop']:.2f}% / {r['pop_over']:.2f} |"
        )
        failed |= r["pop"] > args.risk
    print(
        "[FAIL] a population risk above the target"
        if failed
        else "[ok] population risk within the target on every set"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
