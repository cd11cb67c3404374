"""Feature-space OOD detectors (knn, mahalanobis, vim, react) on the shared ResNet-20.

Statistics come from the 10000 CIFAR-10 training features only. Evaluation follows
``examples/retrofit_resnet20.py`` (its half B of the test set, its half B of MNIST, its
pixel permutation), cut to 2000 images per set: 2000 held-out test images against 2000
MNIST digits, 2000 Gaussian-noise images and the same test images with their pixels
shuffled. Every score is checked against the paper's formula written out below in
numpy/scipy, on the real features.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy.spatial.distance import cdist
from scipy.special import logsumexp
from shared_data import (
    CIFAR_NPZ,
    RESNET20_WEIGHTS,
    cache_dir,
    cifar10,
    pretrained_resnet20,
    requires_shared_data,
    resnet20_on_features,
    resnet20_outputs,
)
from sklearn.metrics import roc_auc_score

import wrapcal

pytestmark = requires_shared_data

N_EVAL = 2000
_SCENARIO_VERSION = "1"


# --- the scenario ------------------------------------------------------------------------


def _eval_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """The example's half B of the CIFAR-10 test set and of MNIST, first N_EVAL each."""
    rng = np.random.default_rng(0)
    test_perm, mnist_perm = rng.permutation(10000), rng.permutation(10000)
    return torch.from_numpy(test_perm[5000:][:N_EVAL]), torch.from_numpy(mnist_perm[5000:][:N_EVAL])


@torch.no_grad()
def _backbone_features(images: torch.Tensor) -> np.ndarray:
    model = pretrained_resnet20()
    captured: list[torch.Tensor] = []
    hook = model.linear.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        for start in range(0, len(images), 500):
            model(images[start : start + 500])
    finally:
        hook.remove()
    return torch.cat(captured).numpy()


def _synthetic_ood_features() -> dict[str, np.ndarray]:
    """Noise and shuffled-pixel features (one backbone pass over 4000 images), cached on
    disk beside resnet20_outputs' cache."""
    digest = hashlib.sha256(f"feature-ood v{_SCENARIO_VERSION} n{N_EVAL}".encode())
    digest.update(RESNET20_WEIGHTS.read_bytes())
    digest.update(f"{CIFAR_NPZ.stat().st_size}:{CIFAR_NPZ.stat().st_mtime_ns}".encode())
    path = cache_dir() / f"feature_ood_scenario-{digest.hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    test_idx, _ = _eval_indices()
    images = cifar10("test")[0][test_idx]
    g = torch.Generator().manual_seed(0)  # as examples/retrofit_resnet20.py draws them
    pixel_order = torch.randperm(32 * 32, generator=g)
    shuffled = images.flatten(2)[:, :, pixel_order].reshape(images.shape)
    noise = torch.randn(images.shape, generator=g)
    out = {"noise": _backbone_features(noise), "shuffled": _backbone_features(shuffled)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:  # atomic: a parallel run never reads half a file
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **out)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


@cache
def scenario() -> dict[str, torch.Tensor]:
    o = resnet20_outputs()
    test_idx, mnist_idx = _eval_indices()
    synthetic = _synthetic_ood_features()
    return {
        "train": o["train_features"],
        "train_labels": o["train_labels"],
        "test": o["test_features"][test_idx],
        "test_labels": o["test_labels"][test_idx],
        "MNIST": o["mnist_features"][mnist_idx],
        "noise": torch.from_numpy(synthetic["noise"]),
        "shuffled": torch.from_numpy(synthetic["shuffled"]),
        "weight": o["weight"],
        "bias": o["bias"],
    }


def fitted(plugins: list) -> wrapcal.WrappedModel:
    s = scenario()
    return resnet20_on_features(plugins).fit(train=(s["train"], s["train_labels"]), progress=False)


# --- the papers' formulas, written out (numpy / scipy, float64) -------------------------

OOD_SETS = ("MNIST", "noise", "shuffled")


def f64(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float64)


def np_logits(f: np.ndarray) -> np.ndarray:
    s = scenario()
    return f @ f64(s["weight"]).T + f64(s["bias"])


def np_knn(train: np.ndarray, queries: np.ndarray, k: int = 50) -> np.ndarray:
    """Sun et al. 2022: Euclidean distance between normalised features, k-th smallest."""
    bank = train / np.linalg.norm(train, axis=1, keepdims=True)
    z = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.partition(cdist(z, bank), k - 1, axis=1)[:, k - 1]


def np_mahalanobis(
    train: np.ndarray, labels: np.ndarray, queries: np.ndarray, relative: bool = False
) -> np.ndarray:
    """Lee et al. 2018 (and Ren et al. 2021): min over classes of the squared distance
    with the shared MLE covariance; minus the background distance when relative."""
    means = np.stack([train[labels == c].mean(axis=0) for c in range(10)])
    centred = train - means[labels]
    precision = np.linalg.pinv(centred.T @ centred / len(train), hermitian=True)
    score = (cdist(queries, means, "mahalanobis", VI=precision) ** 2).min(axis=1)
    if relative:
        mean = train.mean(axis=0, keepdims=True)
        background = np.linalg.pinv(np.cov(train, rowvar=False, bias=True), hermitian=True)
        score -= cdist(queries, mean, "mahalanobis", VI=background)[:, 0] ** 2
    return score


def np_vim(train: np.ndarray, queries: np.ndarray, dim: int = 32) -> np.ndarray:
    """Wang et al. 2022, as the authors' benchmark.py computes it."""
    s = scenario()
    u = -np.linalg.pinv(f64(s["weight"])) @ f64(s["bias"])
    second = (train - u).T @ (train - u) / len(train)
    values, vectors = np.linalg.eig(second)
    null_space = vectors[:, np.argsort(-values.real)[dim:]].real
    alpha = (
        np_logits(train).max(axis=1).mean()
        / np.linalg.norm((train - u) @ null_space, axis=1).mean()
    )
    virtual = alpha * np.linalg.norm((queries - u) @ null_space, axis=1)
    return virtual - logsumexp(np_logits(queries), axis=1)


def np_react(train: np.ndarray, queries: np.ndarray, percentile: float = 90) -> np.ndarray:
    """Sun et al. 2021: clip at the percentile of all training activations; energy."""
    clip = np.percentile(train.ravel(), percentile)
    return -logsumexp(np_logits(np.minimum(queries, clip)), axis=1)


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "reference"),
    [
        ("knn", lambda tr, y, q: np_knn(tr, q)),
        ("mahalanobis", lambda tr, y, q: np_mahalanobis(tr, y, q)),
        (("mahalanobis", {"relative": True}), lambda tr, y, q: np_mahalanobis(tr, y, q, True)),
        ("vim", lambda tr, y, q: np_vim(tr, q)),
        ("react", lambda tr, y, q: np_react(tr, q)),
    ],
    ids=["knn", "mahalanobis", "relative_mahalanobis", "vim", "react"],
)
def test_score_matches_the_papers_formula_on_real_features(spec, reference) -> None:
    s = scenario()
    wrapped = fitted([spec])
    name = spec if isinstance(spec, str) else spec[0]
    queries = torch.cat([s["test"][:500], s["MNIST"][:250], s["noise"][:250]])
    got = wrapped.predict_features(queries).scores[name].double().numpy()
    want = reference(f64(s["train"]), s["train_labels"].numpy(), f64(queries))
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_react_clips_at_the_exact_percentile_for_its_score_only() -> None:
    """The clip value is the exact 90th percentile of the training values; the model's
    logits are the unclipped ones (issue 23: ReAct clipped what every head read before;
    now it is a detector, and only its score sees the clipped features)."""
    s = scenario()
    wrapped = fitted(["react"])
    clip = wrapped.get_plugin("react").clip_
    assert clip.dtype == torch.float64
    assert float(clip) == pytest.approx(np.percentile(f64(s["train"]).ravel(), 90), abs=1e-12)
    with torch.no_grad():
        pred = wrapped.predict_features(s["test"])
    np.testing.assert_allclose(
        pred.logits.double().numpy(), np_logits(f64(s["test"])), rtol=1e-5, atol=1e-5
    )
    clipped = np_logits(np.minimum(f64(s["test"]), float(clip)))
    np.testing.assert_allclose(
        pred.scores["react"].double().numpy(), -logsumexp(clipped, axis=1), rtol=1e-5, atol=1e-5
    )
    accuracy = (pred.logits.argmax(1) == s["test_labels"]).float().mean()
    assert abs(float(accuracy) - 0.82) < 0.03  # the model's own accuracy, unclipped
    # Not a copy of the core's energy (that of the unclipped logits).
    differs = (pred.scores["react"] - pred.scores["energy"]).abs() > 1e-4
    assert float(differs.float().mean()) > 0.9


# The detectors' AUROC / FPR@95 on this scenario (2000 vs 2000 per OOD kind), floors set
# just below what the plugins measure (they equal the formulas above): a regression fails.
# Where a detector fails is part of the record: energy-style scores on noise, the class
# Gaussians on MNIST, the relative distance on far OOD (noise, shuffled pixels).
FLOORS = {
    "knn": {"MNIST": (0.99, 0.05), "noise": (0.995, 0.01), "shuffled": (0.98, 0.08)},
    "mahalanobis": {"MNIST": (0.82, 0.81), "noise": (0.995, 0.01), "shuffled": (0.99, 0.03)},
    "vim": {"MNIST": (0.96, 0.2), "noise": (0.995, 0.01), "shuffled": (0.97, 0.14)},
    "react": {"MNIST": (0.89, 0.52), "noise": (0.71, 1.0), "shuffled": (0.77, 0.9)},
}


def test_wrapcal_evaluate_reports_each_detector_above_the_floors() -> None:
    s = scenario()
    models = {name: fitted([name]) for name in FLOORS}
    models["relative"] = fitted([("mahalanobis", {"relative": True})])
    report = wrapcal.evaluate(
        models,
        test=(s["test"], s["test_labels"]),
        ood={k: s[k] for k in OOD_SETS},
        progress=False,
        bootstrap=0,
    )
    ood = report.to_dict()["ood"]
    for name, floors in FLOORS.items():
        for kind, (auroc, fpr) in floors.items():
            measured = ood[name][kind][name]
            assert measured["auroc"] >= auroc, (name, kind, measured)
            assert measured["fpr95"] <= fpr, (name, kind, measured)
    # Independent AUROC of one score (ID = 0, OOD = 1 with higher = more OOD).
    knn_id = models["knn"].predict_features(s["test"]).scores["knn"].numpy()
    knn_ood = models["knn"].predict_features(s["MNIST"]).scores["knn"].numpy()
    truth = np.r_[np.zeros(len(knn_id)), np.ones(len(knn_ood))]
    assert ood["knn"]["MNIST"]["knn"]["auroc"] == pytest.approx(
        roc_auc_score(truth, np.r_[knn_id, knn_ood]), abs=1e-6
    )
    # The relative distance is built for near OOD; on far OOD it ranks worse than chance.
    relative = ood["relative"]
    assert relative["MNIST"]["mahalanobis"]["auroc"] > 0.7
    assert relative["noise"]["mahalanobis"]["auroc"] < 0.5
    # The baseline score (msp) is beaten on every kind by knn, vim and mahalanobis.
    for kind in ("noise", "shuffled"):
        for name in ("knn", "vim", "mahalanobis"):
            assert ood[name][kind][name]["auroc"] > ood[name][kind]["msp"]["auroc"] + 0.15


# --- composition and persistence, on the real ResNet-20 -------------------------------------

ALL = [
    ("label_smoothing", {"alpha": 0.05}),
    ("discrepancy", {"epochs_pretrain": 2, "epochs": 2}),
    ("mc_dropout", {"samples": 4, "p": 0.2}),
    "temperature",
    ("knn", {"bank_size": 2000, "dtype": "float16"}),
    ("mahalanobis", {"relative": True}),
    "vim",
    "react",
]


def _fit_all(order: list) -> wrapcal.WrappedModel:
    """Every built-in plugin on the real ResNet-20, fitted from its cached features:
    train rows, calibration and traffic from the test set's half A (not evaluated)."""
    s, o = scenario(), resnet20_outputs()
    half_a = torch.from_numpy(np.random.default_rng(0).permutation(10000)[:5000])
    calibration = o["test_features"][half_a[:2000]], o["test_labels"][half_a[:2000]]
    traffic = torch.cat([o["test_features"][half_a[2000:3000]], o["mnist_features"][:1000]])
    wrapped = wrapcal.wrap(pretrained_resnet20(), plugins=order)
    return wrapped.fit_features(
        train=(s["train"][::3], s["train_labels"][::3]),
        calibration=calibration,
        unlabeled=traffic,
        progress=False,
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:mc_dropout.*no dropout before its head:UserWarning")
def test_any_order_with_the_other_builtins_gives_the_same_model(tmp_path) -> None:
    s = scenario()
    queries = torch.cat([s["test"][:100], s["MNIST"][:50], s["noise"][:50]])
    orders = [ALL, ALL[::-1], [ALL[i] for i in (6, 2, 4, 0, 7, 3, 5, 1)]]
    results = []
    for order in orders:
        wrapped = _fit_all(order)
        results.append(wrapped.predict_features(queries))
    first = results[0]
    assert {"knn", "mahalanobis", "vim", "react", "discrepancy", "mutual_information"} <= set(
        first.scores
    )
    for other in results[1:]:
        assert torch.equal(other.logits, first.logits)
        assert other.scores.keys() == first.scores.keys()
        for name, value in first.scores.items():
            assert torch.equal(other.scores[name], value), name

    # ViM reads the head as the plugins before it left it (label smoothing, then the
    # discrepancy heads retrained it): its origin is -pinv(W) b of that head.
    head = wrapped.head
    weight, bias = head.weight.detach().double(), head.bias.detach().double()
    origin = wrapped.get_plugin("vim").origin_
    torch.testing.assert_close(origin, -(torch.linalg.pinv(weight) @ bias))
    original = -(torch.linalg.pinv(s["weight"].double()) @ s["bias"].double())
    assert (origin - original).norm() > 1e-3 * original.norm()

    # Saved and loaded: the same outputs, bit for bit, and the bank in safetensors.
    path = wrapped.save(tmp_path / "all.wrapcal")
    loaded = wrapcal.load(path)
    again = loaded.predict_features(queries)
    assert torch.equal(again.logits, results[-1].logits)
    for name, value in results[-1].scores.items():
        assert torch.equal(again.scores[name], value), name
    for name, tensor in wrapped.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    bank = loaded.get_plugin("knn").bank_
    assert bank.dtype == torch.float16 and bank.shape == (2000, 64)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        config = f.metadata()["wrapcal"]
    assert any(k.endswith(".bank_") for k in keys)
    assert len(config) < 20_000  # the bank (2000 x 64) is not in the JSON header
    images = cifar10("test")[0][:4]
    with torch.no_grad():
        assert torch.equal(loaded(images), wrapped(images))
