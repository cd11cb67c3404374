"""The post-hoc detectors of issue 25 (gradnorm, gen, kl_matching, she) on the shared
ResNet-20, each checked against ``pytorch_ood`` (0.4) on the same features and logits,
and against the paper's formula written out where ``pytorch_ood`` differs from it.

The model is the ResNet-20's own head on an identity backbone, so the inputs are its
cached penultimate features. Statistics come from the 10,000 CIFAR-10 training features
(she, kl_matching); evaluation uses 2,000 held-out test images (half B) against 2,000
MNIST digits, the split of ``test_plugin_feature_ood.py``.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from pytorch_ood.detector import GEN as OodGEN
from pytorch_ood.detector import SHE as OodSHE
from pytorch_ood.detector import GradNorm as OodGradNorm
from pytorch_ood.detector import KLMatching as OodKLMatching
from shared_data import (
    requires_shared_data,
    resnet20_head,
    resnet20_on_features,
    resnet20_outputs,
)
from sklearn.metrics import roc_auc_score
from torch import nn

import wrapcal
from wrapcal.errors import NotFittedError
from wrapcal.model.split import Split
from wrapcal.plugin import DataError
from wrapcal_plugins.ood.gen import generalized_entropy
from wrapcal_plugins.ood.gradnorm import gradnorm_score
from wrapcal_plugins.ood.kl_matching import kl_to_templates

pytestmark = requires_shared_data

N_EVAL = 2000
DETECTORS = ("gradnorm", "gen", "kl_matching", "she")


@cache
def scenario() -> dict[str, torch.Tensor]:
    o = resnet20_outputs()
    rng = np.random.default_rng(0)
    test_perm, mnist_perm = rng.permutation(10000), rng.permutation(10000)
    half_a = torch.from_numpy(test_perm[:5000][:N_EVAL])
    half_b = torch.from_numpy(test_perm[5000:][:N_EVAL])
    mnist = torch.from_numpy(mnist_perm[5000:][:N_EVAL])
    return {
        "train": o["train_features"],
        "train_labels": o["train_labels"],
        "calibration": o["test_features"][half_a],
        "calibration_labels": o["test_labels"][half_a],
        "test": o["test_features"][half_b],
        "MNIST": o["mnist_features"][mnist],
        "weight": o["weight"],
        "bias": o["bias"],
    }


@cache
def fitted_all() -> wrapcal.WrappedModel:
    """The four detectors in one model, fitted once from the training features."""
    s = scenario()
    return resnet20_on_features(list(DETECTORS)).fit(
        train=(s["train"], s["train_labels"]),
        calibration=(s["calibration"], s["calibration_labels"]),
        progress=False,
    )


def queries() -> torch.Tensor:
    s = scenario()
    return torch.cat([s["test"][:300], s["MNIST"][:200]])


def assert_matches(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    want = want.double()
    scale = float(want.abs().max())
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * scale)


# --- gradnorm -----------------------------------------------------------------------------


def autograd_gradnorm(head: nn.Linear, features: torch.Tensor, temperature: float):
    """The paper's definition, one input at a time: ``-||d KL(u || softmax(z / T)) / dW||_1``
    by backpropagation (a single logit ``z`` read as ``[0, z]``)."""
    scores = []
    for row in features:
        with torch.enable_grad():
            logits = head(row[None]) / temperature
            if logits.shape[-1] == 1:
                logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
            uniform = torch.full_like(logits, 1 / logits.shape[-1])
            kl = (uniform * (uniform.log() - logits.log_softmax(dim=-1))).sum()
            (grad,) = torch.autograd.grad(kl, head.weight)
        scores.append(-grad.abs().sum())
    return torch.stack(scores)


def test_gradnorm_closed_form_equals_autograd_and_pytorch_ood() -> None:
    head = resnet20_head(torch.float64)
    x = queries().double()[::2]
    for temperature in (1.0, 2.5):
        ours = gradnorm_score(x, head(x).detach(), temperature)
        # pytorch_ood's per-sample gradients (torch.func.vmap) of the head's weight only.
        detector = OodGradNorm(
            head,
            param_filter=lambda name: name == "weight",
            micro_batch_size=len(x),
            temperature=temperature,
        )
        assert_matches(ours, detector.predict(x), rtol=1e-10)
        assert_matches(ours[:40], autograd_gradnorm(head, x[:40], temperature), rtol=1e-10)
        # The plugin, on the float32 features, reads the same closed form.
        wrapped = resnet20_on_features([("gradnorm", {"temperature": temperature})])
        got = wrapped.predict_features(queries()[::2].clone()).scores["gradnorm"]
        assert got.dtype == torch.float32
        assert_matches(got, ours, rtol=1e-5)
    # One binary logit: the gradient of its one row of weights.
    torch.manual_seed(0)
    binary = nn.Linear(64, 1).double()
    assert_matches(
        gradnorm_score(x[:40], binary(x[:40]).detach(), 2.5),
        autograd_gradnorm(binary, x[:40], 2.5),
        rtol=1e-10,
    )


# --- gen ----------------------------------------------------------------------------------


def paper_gen(logits: np.ndarray, gamma: float, m: int) -> np.ndarray:
    """The authors' code (XixiLiu95/GEN), float64: sum over the top M, no clamp."""
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    top = np.sort(probs, axis=1)[:, -m:]
    return np.sum(top**gamma * (1 - top) ** gamma, axis=1)


@pytest.mark.parametrize(("gamma", "m"), [(0.1, 100), (0.5, 3)])
def test_gen_equals_the_paper_and_pytorch_ood(gamma: float, m: int) -> None:
    head = resnet20_head(torch.float64)
    x = queries().double()
    logits = head(x).detach()
    want = paper_gen(logits.numpy(), gamma, m)
    ours = generalized_entropy(logits, gamma, m).numpy()
    # The paper's 1 - p_max loses digits as p_max nears 1 (float64 keeps ~1e-16 / (1 -
    # p_max) of it; ours, the sum of the others, keeps them all): equal to 1e-10 where
    # 1 - p_max > 1e-6, to ~1e-6 where it is smaller.
    exact = logits.softmax(dim=1).max(dim=1).values.numpy() < 1 - 1e-6
    assert 0.2 < exact.mean() < 1
    np.testing.assert_allclose(ours[exact], want[exact], rtol=1e-10)
    np.testing.assert_allclose(ours, want, rtol=1e-10, atol=1e-5)
    wrapped = resnet20_on_features([("gen", {"gamma": gamma, "M": m})])
    got = wrapped.predict_features(queries().clone()).scores["gen"]
    assert_matches(got, torch.from_numpy(want), rtol=1e-4)

    # pytorch_ood averages (divides by min(M, K)) and clamps p to [1e-7, 1 - 1e-7]:
    # equal up to the factor where the clamp does not bind (logits / 4 here)...
    flat = logits / 4
    probs = flat.softmax(dim=1)
    assert probs.min() > 1e-7 and probs.max() < 1 - 1e-7
    kept = min(m, 10)
    assert_matches(generalized_entropy(flat, gamma, m), kept * OodGEN.score(flat, gamma, m), 1e-10)
    # ... and not where it does: on the real logits, top-M classes below 1e-7 add
    # ~1e-7 ** gamma, and p_max above 1 - 1e-7 is lowered.
    gap = (kept * OodGEN.score(logits, gamma, m) - torch.from_numpy(want)).abs()
    top = logits.softmax(dim=1).topk(kept, dim=1).values
    binds = (top < 1e-7).any(dim=1) | (top > 1 - 1e-7).any(dim=1)
    assert 0.05 < float(binds.double().mean()) < 1
    assert float(gap[binds].max()) > 1e-4 and float(gap[~binds].max()) < 1e-9

    # One binary logit z is the two logits [0, z].
    z = logits[:, :1] - logits[:, 1:2]
    two = torch.cat([torch.zeros_like(z), z], dim=1)
    assert_matches(generalized_entropy(z, gamma, m), generalized_entropy(two, gamma, m), 1e-12)


def test_gen_keeps_one_minus_p_of_confident_float32_predictions() -> None:
    """1 - p_max is the sum of the others: float32 rounds p_max to 1 and 1 - p_max to 0."""
    logits = torch.tensor([[20.0, 0.0, 0.0], [25.0, 1.0, -3.0], [1.0, 0.5, 0.0]])
    want = torch.from_numpy(paper_gen(logits.double().numpy(), 0.1, 100))
    got = generalized_entropy(logits, 0.1, 100)
    assert got.dtype == torch.float32
    assert_matches(got, want, rtol=1e-5)
    assert float(logits.softmax(dim=1)[0, 0]) == 1.0  # what the paper's float32 code sees


# --- kl_matching --------------------------------------------------------------------------


def test_kl_matching_equals_pytorch_ood() -> None:
    s = scenario()
    plugin = fitted_all().get_plugin("kl_matching")
    head = resnet20_head()
    # The logits the plugin fits on: the model's float32 head of the training features
    # (train= before calibration=), in float64.
    with torch.no_grad():
        fit_logits = head(s["train"]).double()
        x = queries().clone()
        query_logits = head(x).double()
    reference = OodKLMatching(None).fit_logits(fit_logits)
    assert plugin.template_classes_.tolist() == [int(k) for k in reference.dists]
    torch.testing.assert_close(
        plugin.templates_, torch.stack(list(reference.dists.values())), rtol=1e-12, atol=1e-15
    )
    # The templates written out: mean posterior of the rows predicted as each class.
    probs = fit_logits.softmax(dim=1)
    predicted = probs.argmax(dim=1)
    for row, k in zip(plugin.templates_, plugin.template_classes_, strict=True):
        torch.testing.assert_close(row, probs[predicted == k].mean(dim=0))
    want = reference.predict_logits(query_logits)
    assert_matches(kl_to_templates(query_logits, plugin.templates_), want, rtol=1e-9)
    got = fitted_all().predict_features(x).scores["kl_matching"]
    assert got.dtype == torch.float32
    assert_matches(got, want, rtol=1e-4)


# --- she ----------------------------------------------------------------------------------


def test_she_equals_pytorch_ood() -> None:
    s = scenario()
    plugin = fitted_all().get_plugin("she")
    head = resnet20_head()
    # pytorch_ood in float64, with the model's float32 head deciding what is correct
    # (the same rows as the plugin's).
    reference = OodSHE(encoder=nn.Identity(), head=lambda z: head(z.float()).double())
    reference.fit_features(s["train"].double(), s["train_labels"])
    torch.testing.assert_close(plugin.patterns_, reference.patterns, rtol=1e-12, atol=1e-12)
    x = queries().clone()
    with torch.no_grad():
        want = reference.predict_features(x.double())
    got = fitted_all().predict_features(x).scores["she"]
    assert_matches(got, want, rtol=1e-5)
    # The formula written out: -f . S_yhat, S_k the mean of the correct rows of class k.
    with torch.no_grad():
        correct = head(s["train"]).argmax(dim=1) == s["train_labels"]
        yhat = head(x).argmax(dim=1)
    train, labels = s["train"].double()[correct], s["train_labels"][correct]
    patterns = torch.stack([train[labels == k].mean(dim=0) for k in range(10)])
    assert_matches(got, -(x.double() * patterns[yhat]).sum(dim=1), rtol=1e-5)


# --- what they detect -----------------------------------------------------------------------

#: AUROC floors, CIFAR-10 test (half B) vs MNIST, 2000 each, just below what the
#: detectors measure (gradnorm 0.989, gen 0.914, kl_matching 0.777, she 0.997; msp
#: 0.815 and energy 0.932 on the same model).
FLOORS = {"gradnorm": 0.98, "gen": 0.90, "kl_matching": 0.76, "she": 0.99}


def test_auroc_cifar10_vs_mnist() -> None:
    s = scenario()
    wrapped = fitted_all()
    ind = wrapped.predict_features(s["test"]).scores
    ood = wrapped.predict_features(s["MNIST"]).scores
    truth = np.r_[np.zeros(N_EVAL), np.ones(N_EVAL)]  # OOD = 1: higher = more OOD
    auroc = {
        name: roc_auc_score(truth, np.r_[ind[name].numpy(), ood[name].numpy()])
        for name in (*DETECTORS, "msp", "energy")
    }
    print("AUROC CIFAR-10 vs MNIST:", {k: round(v, 4) for k, v in auroc.items()})
    for name, floor in FLOORS.items():
        assert auroc[name] >= floor, (name, auroc)
    # The gradient and the feature patterns beat the softmax baseline by far.
    assert min(auroc["gradnorm"], auroc["she"]) > auroc["msp"] + 0.15


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:the 'train' labels cover:UserWarning")
@pytest.mark.filterwarnings("ignore:no plugin reads unlabeled:UserWarning")
def test_unfitted_and_bad_input_errors() -> None:
    s = scenario()
    x = s["test"][:8]
    for name in ("kl_matching", "she"):
        with pytest.raises(NotFittedError, match=name):
            resnet20_on_features([name]).predict_features(x)
    # gradnorm and gen learn nothing: they work right after wrap.
    scores = resnet20_on_features(["gradnorm", "gen"]).predict_features(x).scores
    assert scores["gradnorm"].shape == scores["gen"].shape == (8,)

    for name, params in [
        ("gen", {"gamma": 0.0}),
        ("gen", {"M": 0}),
        ("gradnorm", {"temperature": -1.0}),
    ]:
        with pytest.raises(ValueError, match=next(iter(params))):
            resnet20_on_features([(name, params)])

    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ValueError, match="one nn.Linear"):
        wrapcal.wrap(None, split=Split(nn.Identity(), mlp), plugins=["gradnorm"])

    with pytest.raises(DataError, match="needs labels"):
        resnet20_on_features(["she"]).fit(train=s["train"][:200], progress=False)
    with torch.no_grad():
        predicted = resnet20_head()(s["train"][:200]).argmax(dim=1)
    wrong = (predicted + 1) % 10  # no row is classified correctly
    with pytest.raises(DataError, match=r"no 'train' sample is classified correctly"):
        resnet20_on_features(["she"]).fit(train=(s["train"][:200], wrong), progress=False)
    with pytest.raises(DataError, match=r"train=\.\.\. or calibration=\.\.\."):
        resnet20_on_features(["kl_matching"]).fit(unlabeled=s["test"][:50], progress=False)
