"""The post-hoc detectors people compare against: ash, scale, dice, nnguide, fdbd, residual.

Each score is checked against an independent implementation on the real features of the
shared ResNet-20 (10000 CIFAR-10 training rows as the fit set): pytorch-ood 0.4's
``ASH``, ``SCALE``, ``DICE``, ``NNGuide`` and ``fDBD``, and, where pytorch-ood has none,
OpenOOD v1.5's postprocessors written out below in numpy (fDBD's feature-norm variant,
Residual). Then each detector's AUROC, CIFAR-10 test against MNIST, above a floor set
just below what it measures; then the errors.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from pytorch_ood.detector import ASH, DICE, SCALE, NNGuide, fDBD
from shared_data import requires_shared_data, resnet20_outputs
from sklearn.metrics import roc_auc_score
from torch import nn

import wrapcal
from wrapcal.model.split import Split
from wrapcal.plugin import DataError

N_EVAL = 2000


# --- the scenario: the ResNet-20's head on an identity backbone ----------------------------


@cache
def scenario() -> dict[str, torch.Tensor]:
    """Train features; half B of the test set and of MNIST, first N_EVAL each (as
    tests/plugins/test_plugin_feature_ood.py and examples/retrofit_resnet20.py)."""
    o = resnet20_outputs()
    rng = np.random.default_rng(0)
    test_idx = torch.from_numpy(rng.permutation(10000)[5000:][:N_EVAL])
    mnist_idx = torch.from_numpy(rng.permutation(10000)[5000:][:N_EVAL])
    return {
        "train": o["train_features"],
        "train_labels": o["train_labels"],
        "test": o["test_features"][test_idx],
        "MNIST": o["mnist_features"][mnist_idx],
        "weight": o["weight"],
        "bias": o["bias"],
    }


def resnet20_head() -> nn.Linear:
    s = scenario()
    head = nn.Linear(64, 10)
    with torch.no_grad():
        head.weight.copy_(s["weight"])
        head.bias.copy_(s["bias"])
    return head


_FITTED: dict[str, wrapcal.WrappedModel] = {}


def fitted(key: str) -> wrapcal.WrappedModel:
    """The detector of ``CASES[key]`` fitted on the train features (once per module)."""
    if key not in _FITTED:
        s = scenario()
        spec = CASES[key][0]
        wrapped = wrapcal.wrap(None, split=Split(nn.Identity(), resnet20_head()), plugins=[spec])
        if wrapcal.get_tags(wrapped.plugins[0]).fit_reads:  # ash and scale learn nothing
            wrapped.fit(train=(s["train"], s["train_labels"]), progress=False)
        _FITTED[key] = wrapped
    return _FITTED[key]


def queries() -> torch.Tensor:
    s = scenario()
    return torch.cat([s["test"][:600], s["MNIST"][:400]])


# --- the references ---------------------------------------------------------------------


def _maps(f: torch.Tensor) -> torch.Tensor:
    return f[:, :, None, None]  # pytorch-ood's ASH / SCALE shape B x C x H x W feature maps


def ref_ash(variant: str, percentile: float):
    def run(train: torch.Tensor, labels: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        head = resnet20_head()
        detector = ASH(None, lambda m: head(m.flatten(1)), f"ash-{variant}", percentile / 100)
        return detector.predict_feature_maps(_maps(q))

    return run


def ref_scale(percentile: float):
    def run(train: torch.Tensor, labels: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        head = resnet20_head()
        detector = SCALE(None, lambda m: head(m.flatten(1)), percentile / 100)
        return detector.predict_feature_maps(_maps(q))

    return run


def ref_dice(train: torch.Tensor, labels: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    head = resnet20_head()
    return DICE(None, head.weight, head.bias, 0.9).fit_features(train, labels).predict_features(q)


def ref_nnguide(train: torch.Tensor, labels: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return NNGuide(None, resnet20_head(), k=10).fit_features(train, labels).predict_features(q)


def ref_fdbd(train: torch.Tensor, labels: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return fDBD(None, resnet20_head()).fit_features(train).predict_features(q)


def np_fdbd_norm(train: np.ndarray, q: np.ndarray) -> np.ndarray:
    """OpenOOD's fDBDPostprocessor with ``distance_as_normalizer=False``: the boundary
    distances summed over classes, over ``||f||``; ours also divides by ``K - 1`` and
    negates (higher = more OOD)."""
    s = scenario()
    w, b = s["weight"].double().numpy(), s["bias"].double().numpy()
    classes = len(b)
    denominator = np.zeros((classes, classes))
    for p in range(classes):
        row = np.linalg.norm(w - w[p], axis=1)
        row[p] = 1
        denominator[p] = row
    logits = q @ w.T + b
    top, pred = logits.max(axis=1), logits.argmax(axis=1)
    summed = (np.abs(logits - top[:, None]) / denominator[pred]).sum(axis=1)
    return -summed / np.linalg.norm(q, axis=1) / (classes - 1)


def np_residual(train: np.ndarray, q: np.ndarray, dim: int = 32) -> np.ndarray:
    """OpenOOD's ResidualPostprocessor (ViM's Residual): ``u = -pinv(W) b``, the
    eigenvectors of the centred second moment past the top ``dim``, the residual's norm
    (OpenOOD's confidence is its negative)."""
    s = scenario()
    w, b = s["weight"].double().numpy(), s["bias"].double().numpy()
    u = -np.linalg.pinv(w) @ b
    covariance = (train - u).T @ (train - u) / len(train)  # EmpiricalCovariance, centred
    values, vectors = np.linalg.eig(covariance)
    null_space = np.ascontiguousarray(vectors.T[np.argsort(-values)[dim:]].T).real
    return np.linalg.norm((q - u) @ null_space, axis=-1)


def torch_reference(fn):
    def run(train: np.ndarray, labels: np.ndarray, q: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = fn(
                torch.from_numpy(train).float(),
                torch.from_numpy(labels),
                torch.from_numpy(q).float(),
            )
        return out.double().numpy()

    return run


CASES = {
    "ash": ("ash", torch_reference(ref_ash("s", 90))),
    "ash_b": (("ash", {"variant": "b"}), torch_reference(ref_ash("b", 90))),
    "ash_p_65": (("ash", {"variant": "p", "percentile": 65.0}), torch_reference(ref_ash("p", 65))),
    "scale": ("scale", torch_reference(ref_scale(85))),
    "dice": ("dice", torch_reference(ref_dice)),
    "nnguide": ("nnguide", torch_reference(ref_nnguide)),
    "fdbd": ("fdbd", torch_reference(ref_fdbd)),
    "fdbd_norm": (("fdbd", {"normaliser": "norm"}), lambda tr, y, q: np_fdbd_norm(tr, q)),
    "residual": ("residual", lambda tr, y, q: np_residual(tr, q)),
}


# --- tests ---------------------------------------------------------------------------------


@requires_shared_data
@pytest.mark.parametrize("case", list(CASES))
def test_score_matches_the_reference_on_real_features(case: str) -> None:
    spec, reference = CASES[case]
    s = scenario()
    name = spec if isinstance(spec, str) else spec[0]
    q = queries()
    got = fitted(case).predict_features(q).scores[name].double().numpy()
    train = s["train"].numpy().astype(np.float64)
    want = reference(train, s["train_labels"].numpy(), q.numpy().astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# AUROC, 2000 CIFAR-10 test images against 2000 MNIST digits (ID = 0, OOD = 1, higher =
# more OOD), floors just below what each measures: a regression fails. The energy of the
# unshaped logits, the baseline all but residual build on, measures 0.932.
FLOORS = {"ash": 0.905, "scale": 0.96, "dice": 0.98, "nnguide": 0.945, "fdbd": 0.96}
FLOORS |= {"residual": 0.74}


@requires_shared_data
def test_auroc_cifar10_against_mnist_above_the_floors() -> None:
    s = scenario()
    truth = np.r_[np.zeros(N_EVAL), np.ones(N_EVAL)]
    measured = {}
    for name in FLOORS:
        pred = fitted(name).predict_features(torch.cat([s["test"], s["MNIST"]]))
        measured[name] = roc_auc_score(truth, pred.scores[name].numpy())
        if name == "ash":
            energy = roc_auc_score(truth, pred.scores["energy"].numpy())
    print({k: round(v, 4) for k, v in measured.items()}, "energy", round(energy, 4))
    for name, floor in FLOORS.items():
        assert measured[name] >= floor, (name, measured[name])
    # Sparsifying the head and the boundary distances beat the energy they build on here;
    # ASH-S, tuned on ImageNet, does not on this 64-wide ResNet-20 (the record says so).
    assert measured["dice"] > energy + 0.04 and measured["fdbd"] > energy + 0.02
    assert measured["ash"] < energy


@requires_shared_data
def test_detectors_change_nothing_of_the_model() -> None:
    """Shaping and sparsifying serve the score only: the logits are the model's own."""
    s = scenario()
    wrapped = wrapcal.wrap(
        None,
        split=Split(nn.Identity(), resnet20_head()),
        plugins=["ash", "scale", "dice", "fdbd", "residual", ("nnguide", {"bank_size": 500})],
    )
    wrapped.fit(train=(s["train"], s["train_labels"]), progress=False)
    pred = wrapped.predict_features(s["test"][:200])
    with torch.no_grad():
        torch.testing.assert_close(pred.logits, resnet20_head()(s["test"][:200]))
    assert wrapped.get_plugin("nnguide").bank_.shape == (500, 64)
    for name in ("ash", "scale", "dice"):  # energies of other logits: not the core's energy
        assert float((pred.scores[name] - pred.scores["energy"]).abs().min()) > 1e-4, name


def _toy(plugins: list, classes: int = 3) -> wrapcal.WrappedModel:
    torch.manual_seed(0)
    return wrapcal.wrap(None, split=Split(nn.Identity(), nn.Linear(8, classes)), plugins=plugins)


def test_an_all_zero_row_scores_the_bias_energy_not_nan() -> None:
    """s2 = 0: the factor exp(s1 / s2) is taken as 1, the shaped row stays zero."""
    wrapped = _toy(["ash", "scale"])
    rows = torch.cat([torch.zeros(1, 8), torch.rand(3, 8)])
    scores = wrapped.predict_features(rows).scores
    bias_energy = -torch.logsumexp(wrapped.head.bias.detach(), dim=0)
    for name in ("ash", "scale"):
        assert torch.isfinite(scores[name]).all(), name
        torch.testing.assert_close(scores[name][0], bias_energy)


def test_fdbd_on_a_single_binary_logit_is_the_distance_to_its_boundary() -> None:
    """One logit z counts as [0, z]: the one boundary is z = 0, at distance |z| / ||w||."""
    wrapped = _toy(["fdbd"], classes=1)
    train = torch.rand(50, 8)
    wrapped.fit(train=train, progress=False)
    x = torch.randn(20, 8)
    head = wrapped.head
    with torch.no_grad():
        z = head(x)[:, 0]
        want = -z.abs() / head.weight.norm() / (x - train.mean(dim=0)).norm(dim=1)
    torch.testing.assert_close(wrapped.predict_features(x).scores["fdbd"], want)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (("ash", {"percentile": 100.0}), ValueError, "percentile"),
        (("ash", {"variant": "x"}), ValueError, "variant"),
        (("scale", {"percentile": -1.0}), ValueError, "percentile"),
        (("dice", {"sparsity": 100.0}), ValueError, "sparsity"),
        (("nnguide", {"k": 0}), ValueError, "k"),
        (("fdbd", {"normaliser": "l1"}), ValueError, "normaliser"),
        (("residual", {"dim": 8}), ValueError, "leaves no residual space"),
    ],
)
def test_bad_parameters_are_refused_at_wrap(spec, error, match) -> None:
    with pytest.raises(error, match=match):
        _toy([spec])


@pytest.mark.parametrize("name", ["dice", "fdbd", "residual"])
def test_a_head_that_is_not_linear_is_refused_with_the_fix(name: str) -> None:
    head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"(?s)one nn.Linear .*head='name.of.last.linear'"):
        wrapcal.wrap(None, split=Split(nn.Identity(), head), plugins=[name])


def test_fit_errors_name_the_problem() -> None:
    with pytest.raises(DataError, match=r"k=10 neighbours, but the bank holds 5 features"):
        _toy(["nnguide"]).fit(train=torch.rand(5, 8), progress=False)
    needs = r"needs wrapped.fit\(train=... or calibration=...\)"
    with (
        pytest.raises(DataError, match=needs),
        pytest.warns(UserWarning, match="no plugin reads unlabeled"),
    ):
        _toy(["dice"]).fit(unlabeled=torch.rand(20, 8), progress=False)
    wrapped = _toy(["fdbd"])
    with torch.no_grad():
        wrapped.head.weight[1] = wrapped.head.weight[0]
        wrapped.head.bias[1] = wrapped.head.bias[0]
    with pytest.raises(DataError, match="identical weights"):
        wrapped.fit(train=torch.rand(20, 8), progress=False)
