"""The evidence behind every built-in plugin's defaults, on the shared ResNet-20.

Protocol (the one the defaults were chosen on): cached penultimate features of the
pretrained CIFAR-10 ResNet-20; plugins that retrain use the 10000 training images;
``calibration`` is test[:2000]; ``unlabeled`` traffic for the discrepancy heads is
test[2000:3000] mixed with MNIST[:1000]; everything is measured on test[3000:] (7000
images) against MNIST[3000:] (7000 digits). Each row changes one parameter from its
default. Run: ``python benchmarks/defaults_resnet20.py`` (needs ../shared/data; about
two minutes on two cores).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from shared_data import pretrained_resnet20, resnet20_outputs

import wrapcal
from wrapcal.metrics import auroc, ece, fpr_at_tpr, nll


def data() -> dict:
    out = resnet20_outputs()
    test_f, test_y, mnist_f = out["test_features"], out["test_labels"], out["mnist_features"]
    return {
        "train": (out["train_features"], out["train_labels"]),
        "calibration": (test_f[:2000], test_y[:2000]),
        "unlabeled": torch.cat([test_f[2000:3000], mnist_f[:1000]]),
        "test": (test_f[3000:], test_y[3000:]),
        "ood": mnist_f[3000:],
    }


def measure(plugins: list, d: dict, score: str) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = wrapcal.wrap(pretrained_resnet20(), plugins)
        start = time.perf_counter()
        wrapped.fit_features(
            train=d["train"], calibration=d["calibration"], unlabeled=d["unlabeled"],
            progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    pred = wrapped.predict_features(d["test"][0])
    ood = wrapped.predict_features(d["ood"])
    labels = d["test"][1]
    return {
        "acc": float((pred.label == labels).float().mean()),
        "ece": ece(pred.probs, labels),
        "nll": nll(pred.probs, labels),
        "auroc": auroc(pred.scores[score], ood.scores[score]),
        "fpr95": fpr_at_tpr(pred.scores[score], ood.scores[score]),
        "fit_s": seconds,
    }


def table(title: str, rows: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    heads = ("acc", "ECE", "NLL", "AUROC", "FPR95")
    print(f"  {'setting':34s} " + " ".join(f"{h:>7s}" for h in heads) + f" {'fit s':>6s}")
    for name, r in rows.items():
        print(
            f"  {name:34s} {100 * r['acc']:6.2f}% {100 * r['ece']:6.2f}% {r['nll']:7.4f} "
            f"{100 * r['auroc']:6.2f}% {100 * r['fpr95']:6.2f}% {r['fit_s']:6.2f}"
        )


def main() -> None:
    d = data()
    table("baseline (no plugin; score msp)", {"bare": measure([], d, "msp")})
    table(
        "label_smoothing (score msp)",
        {
            f"alpha={a!r}": measure([("label_smoothing", {"alpha": a})], d, "msp")
            for a in ("auto", 0.0, 0.02, 0.05, 0.1)
        }
        | {
            "no calibration set (fallback)": measure(
                [("label_smoothing", {})], {**d, "calibration": None}, "msp"
            )
        },
    )
    table(
        "temperature (score msp)",
        {f"max_iter={m}": measure([("temperature", {"max_iter": m})], d, "msp") for m in (5, 100)},
    )
    mc = "mutual_information"
    table(
        "mc_dropout, scope='head' (score mutual_information)",
        {
            **{
                f"samples={t}, p=0.1": measure([("mc_dropout", {"samples": t})], d, mc)
                for t in (10, 30, 100)
            },
            **{
                f"samples=30, p={p}": measure([("mc_dropout", {"p": p})], d, mc)
                for p in (0.05, 0.2, 0.5)
            },
            **{
                f"finetune, epochs={e}": measure(
                    [("mc_dropout", {"finetune": True, "epochs": e})], d, mc
                )
                for e in (2, 5, 10)
            },
        },
    )
    table(
        "discrepancy (score discrepancy; MNIST is in the unlabeled traffic)",
        {
            "defaults (10+10 epochs, lr 1e-2, m 1.2)": measure(["discrepancy"], d, "discrepancy"),
            "epochs=5": measure([("discrepancy", {"epochs": 5})], d, "discrepancy"),
            "epochs=20": measure([("discrepancy", {"epochs": 20})], d, "discrepancy"),
            "lr=1e-3": measure([("discrepancy", {"lr": 1e-3})], d, "discrepancy"),
            "margin=0.5": measure([("discrepancy", {"margin": 0.5})], d, "discrepancy"),
            "margin=2.0": measure([("discrepancy", {"margin": 2.0})], d, "discrepancy"),
        },
    )


if __name__ == "__main__":
    main()
