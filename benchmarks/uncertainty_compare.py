"""MC dropout, last-layer Laplace, temperature and deep ensembles, side by side.

Two models, each evaluated on CIFAR-10 (the shared JPEG test set, split at random into
5000 calibration and 5000 evaluation images) with MNIST and Gaussian noise as OOD:

A. The shared third-party ResNet-20 (one checkpoint). Its ensemble is the only one that
   can be built here without retraining the network: 5 linear heads trained from seeds
   0-4 on the JPEG training features (10000 images), each on the frozen ResNet-20
   backbone - a *last-layer* ensemble, shown beside one such head alone (seed 0),
   which is its baseline (a different model from the published head).
B. A model trained here from 5 seeds: an MLP (64 -> 128 -> ReLU -> dropout 0.2 -> 10)
   on the ResNet-20's 64-d CIFAR-10 features, 30 epochs of Adam. MC dropout samples its
   own dropout; the ensemble averages the 5 seeds; the other methods wrap seed 0.

For each method: accuracy, ECE (15 bins, top label), NLL, the OOD AUROC (ID positive:
the score's AUROC of separating OOD from ID, higher = better, 50 = chance) of its own
epistemic score (``msp`` = 1 - max probability where a method has none), and its cost
per image as the ratio of its ``predict`` time to one forward pass of the bare model on
the same 256 inputs (best of 3 interleaved rounds). Every method fits from the cached
features (one backbone pass per data set).

It checks the Laplace rows against laplace-torch (the prior precision by marginal
likelihood and the probit predictive) and exits with status 1 when a check fails.

Run: ``python benchmarks/uncertainty_compare.py`` (about 6-8 minutes on 2 loaded cores).
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from _ood_sets import ood_sets
from _timing import Checks, best_times, import_shared_data, machine_line, threads
from torch import nn

import wrapcal
from wrapcal.metrics.calibration import accuracy, ece, nll
from wrapcal.metrics.ood import auroc

shared = import_shared_data()
SEEDS = (0, 1, 2, 3, 4)
N_CAL = 5000
TIMING_ROWS = 256

#: method -> (plugins, score). ``None`` for the ensemble rows, built separately.
METHODS: dict[str, tuple[list[Any], str]] = {
    "baseline": ([], "msp"),
    "temperature": (["temperature"], "msp"),
    "mc_dropout (T=30)": ([("mc_dropout", {"samples": 30})], "mutual_information"),
    "mc_dropout + temperature": (
        [("mc_dropout", {"samples": 30}), "temperature"],
        "mutual_information",
    ),
    "laplace kron probit, marglik": ([("laplace", {})], "laplace_variance"),
    "laplace kron probit, cal. NLL": (
        [("laplace", {"prior_precision": "calibration_nll"})],
        "laplace_variance",
    ),
    "laplace kron samples (S=30), cal. NLL": (
        [
            (
                "laplace",
                {"prior_precision": "calibration_nll", "predictive": "samples", "samples": 30},
            )
        ],
        "laplace_mutual_information",
    ),
    "laplace kron samples (S=30), marglik": (
        [("laplace", {"predictive": "samples", "samples": 30})],
        "laplace_mutual_information",
    ),
    "laplace marglik + temperature": ([("laplace", {}), "temperature"], "laplace_variance"),
    "laplace full probit, cal. NLL": (
        [("laplace", {"hessian": "full", "prior_precision": "calibration_nll"})],
        "laplace_variance",
    ),
    "laplace diag probit, cal. NLL": (
        [("laplace", {"hessian": "diag", "prior_precision": "calibration_nll"})],
        "laplace_variance",
    ),
}


def train_head(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int
) -> nn.Module:
    """Adam, cross-entropy, mini-batches of 128, order and init from ``seed``."""
    torch.manual_seed(seed)
    for layer in model.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 128):
            idx = order[start : start + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def metrics(wrapped: wrapcal.WrappedModel, data: dict[str, Any], score: str) -> dict[str, float]:
    """Accuracy, ECE, NLL on the evaluation split; AUROC of ``score`` per OOD set."""
    with torch.no_grad():
        pred = wrapped.predict_features(data["eval"])
        ood = {name: wrapped.predict_features(f) for name, f in data["ood"].items()}

    def scores(p: Any) -> torch.Tensor:
        return 1 - p.probs.max(dim=-1).values if score == "msp" else p.scores[score]

    row = {
        "accuracy": 100 * accuracy(pred.probs, data["eval_labels"]),
        "ece": 100 * ece(pred.probs, data["eval_labels"]),
        "nll": nll(pred.probs, data["eval_labels"]),
    }
    msp = 1 - pred.probs.max(dim=-1).values
    for name, p in ood.items():
        row[f"auroc_{name}"] = 100 * auroc(scores(pred), scores(p))
        row[f"msp_{name}"] = 100 * auroc(msp, 1 - p.probs.max(dim=-1).values)
    return row


def fitted(model: nn.Module, plugins: list[Any], data: dict[str, Any]) -> wrapcal.WrappedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mc_dropout on a head trained without dropout
        wrapped = wrapcal.wrap(model, plugins=plugins)
        return wrapped.fit_features(
            train=(data["train"], data["train_labels"]),
            calibration=(data["cal"], data["cal_labels"]),
            progress=False,
        )


def cost(runs: dict[str, Callable[[], object]], bare: Callable[[], object]) -> dict[str, float]:
    times = best_times({"__bare__": bare, **runs}, repeats=3)
    return {name: times[name] / times["__bare__"] for name in runs}


def evaluate_model(
    title: str,
    model: nn.Module,
    members: list[nn.Module],
    data: dict[str, Any],
    ensemble_data: dict[str, Any],
    inputs: torch.Tensor,
    single_member: nn.Module | None = None,
) -> None:
    """Every method on ``model`` and the ensemble of ``members``; prints the table.

    ``data`` holds ``model``'s cached features (what its backbone gives), and
    ``ensemble_data`` the ensemble's (every member's features side by side).
    """
    rows, timers = [], {}
    for name, (plugins, score) in METHODS.items():
        wrapped = fitted(copy.deepcopy(model), plugins, data)
        rows.append((name, score, metrics(wrapped, data, score)))
        timers[name] = lambda w=wrapped: w.predict(inputs)
    if single_member is not None:
        wrapped = fitted(copy.deepcopy(single_member), [], data)
        rows.append(("one retrained head (seed 0)", "msp", metrics(wrapped, data, "msp")))
    if "ensemble" in wrapcal.plugin_registry():
        from wrapcal_plugins.uncertainty.ensemble import Ensemble

        score = "ensemble_mutual_information"
        for name, plugins in (
            (f"ensemble ({len(members)} seeds)", ["ensemble"]),
            (f"ensemble ({len(members)} seeds) + temperature", ["ensemble", "temperature"]),
        ):
            ensemble = Ensemble([copy.deepcopy(m) for m in members])
            wrapped = fitted(ensemble, plugins, ensemble_data)
            rows.append((name, score, metrics(wrapped, ensemble_data, score)))
            timers[name] = lambda w=wrapped: w.predict(inputs)
    else:
        print("(the ensemble plugin is not installed: no ensemble rows)")
    with torch.no_grad(), threads(1):
        ratios = cost(timers, lambda: model(inputs))
    print(f"\n### {title}\n")
    print(
        "| method | accuracy % | ECE % | NLL | epistemic score | AUROC MNIST | AUROC noise |"
        " its MSP: AUROC MNIST | AUROC noise | cost / one forward |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, score, row in rows:
        ratio = ratios.get(name)
        print(
            f"| {name} | {row['accuracy']:.2f} | {row['ece']:.2f} | {row['nll']:.3f} | "
            f"{score} | {row['auroc_mnist']:.1f} | {row['auroc_noise']:.1f} | "
            f"{row['msp_mnist']:.1f} | {row['msp_noise']:.1f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} |",
            flush=True,
        )


def features_of(
    models: list[nn.Module],
    data: dict[str, Any],
    extract: Callable[[nn.Module, torch.Tensor], torch.Tensor],
) -> dict[str, Any]:
    """``data`` with every feature set replaced by the models' features side by side."""

    def side_by_side(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([extract(m, x) for m in models], dim=1)

    out = {**data, "ood": {k: side_by_side(v) for k, v in data["ood"].items()}}
    for key in ("train", "cal", "eval"):
        out[key] = side_by_side(data[key])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs of model B's MLPs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # 2 shared cores: one thread is faster and steadier
    print(machine_line(), flush=True)
    out = shared.resnet20_outputs()
    order = torch.randperm(len(out["test_labels"]), generator=torch.Generator().manual_seed(0))
    cal, held = order[:N_CAL], order[N_CAL:]
    resnet = shared.pretrained_resnet20()
    noise_images = ood_sets(n=2000)["gaussian"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = wrapcal.wrap(resnet).backbone
    with torch.no_grad():
        noise = torch.cat([backbone(noise_images[i : i + 500]) for i in range(0, 2000, 500)])
    data = {
        "train": out["train_features"],
        "train_labels": out["train_labels"],
        "cal": out["test_features"][cal],
        "cal_labels": out["test_labels"][cal],
        "eval": out["test_features"][held],
        "eval_labels": out["test_labels"][held],
        "ood": {"mnist": out["mnist_features"], "noise": noise},
    }
    # --- A: the shared ResNet-20, and a last-layer ensemble of it ---------------------------
    members = []
    for seed in SEEDS:
        member = copy.deepcopy(resnet)
        member.linear = train_head(nn.Linear(64, 10), data["train"], data["train_labels"], seed, 20)
        members.append(member)
    images = shared.cifar10("test")[0][held[:TIMING_ROWS]]
    evaluate_model(
        "A. shared ResNet-20 (CIFAR-10 JPEG: 5000 calibration, 5000 evaluation images)",
        resnet,
        members,
        data,
        features_of([resnet] * len(members), data, lambda _, x: x),
        images,
        single_member=members[0],
    )
    checks = Checks()
    check_against_laplace_torch(checks, resnet, data)
    # --- B: an MLP on the ResNet-20's features, trained here from 5 seeds -------------------
    mlps = [
        train_head(
            nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10)),
            data["train"],
            data["train_labels"],
            seed,
            args.epochs,
        )
        for seed in SEEDS
    ]

    def hidden(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return mlp[1](mlp[0](x))  # the MLP's backbone (dropout is off in eval mode)

    evaluate_model(
        "B. MLP on the ResNet-20 features, trained here from 5 seeds (wrapped: seed 0)",
        mlps[0],
        mlps,
        features_of(mlps[:1], data, hidden),
        features_of(mlps, data, hidden),
        data["eval"][:TIMING_ROWS],
    )
    raise SystemExit(checks.report())


def check_against_laplace_torch(checks: Checks, resnet: nn.Module, data: dict[str, Any]) -> None:
    """The table's "laplace kron probit, marglik" row is laplace-torch's: the same prior
    precision (its 100 Adam steps against our exact optimum) and the same predictive."""
    try:
        from laplace import Laplace
    except ImportError:
        checks.check("laplace-torch installed", False, "pip install laplace-torch")
        return
    from torch.utils.data import DataLoader, TensorDataset

    head = copy.deepcopy(resnet.linear).double()
    reference = Laplace(
        nn.Sequential(head), "classification", subset_of_weights="all", hessian_structure="kron"
    )
    train = TensorDataset(data["train"].double(), data["train_labels"])
    reference.fit(DataLoader(train, batch_size=len(train)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.optimize_prior_precision(
            pred_type="glm", method="marglik", prior_structure="scalar"
        )
    ours = fitted(copy.deepcopy(resnet), [("laplace", {})], data)
    prior = float(ours.get_plugin("laplace").prior_precision_)
    theirs = float(reference.prior_precision)
    checks.check(
        "laplace marglik prior = laplace-torch's",
        abs(prior / theirs - 1) < 1e-2,
        f"{prior:.6g} vs {theirs:.6g}",
    )
    reference.prior_precision = prior
    rows = data["eval"][:1000]
    with torch.no_grad():
        want = reference(rows.double(), pred_type="glm", link_approx="probit").float()
        got = ours.predict_features(rows).probs
    gap = float((got - want).abs().max())
    checks.check("laplace kron probit = laplace-torch's (1000 rows)", gap < 1e-4, f"max {gap:.1e}")


if __name__ == "__main__":
    main()
