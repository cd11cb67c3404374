"""Last-layer Laplace against laplace-torch on the shared ResNet-20's real features.

laplace-torch (Daxberger et al. 2021) is the independent reference: its
``Laplace(nn.Sequential(head), "classification", subset_of_weights="all",
hessian_structure=...)`` fitted on the same cached training features (one batch, so its
Kronecker factors are the whole set's) must give the same probit predictive, the same
log marginal likelihood and the same prior precision by marginal likelihood; the
sampled heads must follow its GLM predictive's covariance within Monte Carlo error.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from shared_data import requires_shared_data, resnet20_outputs
from torch import nn

import wrapcal
from wrapcal.errors import DataError, NotFittedError
from wrapcal.model.split import Split

laplace = pytest.importorskip("laplace")
torch_data = pytest.importorskip("torch.utils.data")

pytestmark = [requires_shared_data, pytest.mark.filterwarnings("ignore::UserWarning")]

STRUCTURES = ("diag", "kron", "full")
N_TRAIN, N_QUERY, N_CAL = 200, 60, 200
PRIOR = 0.7


@pytest.fixture(scope="module")
def real() -> dict[str, torch.Tensor]:
    out = resnet20_outputs()
    rows = torch.randperm(len(out["train_labels"]), generator=torch.Generator().manual_seed(0))
    rows = rows[:N_TRAIN]  # the shared sets are sorted by class
    test = torch.randperm(len(out["test_labels"]), generator=torch.Generator().manual_seed(1))
    return {
        "x": out["train_features"][rows],
        "y": out["train_labels"][rows],
        # CIFAR-10 queries and MNIST ones (far from the training features).
        "q": torch.cat([out["test_features"][test[:N_QUERY]], out["mnist_features"][:20]]),
        "xc": out["test_features"][test[N_QUERY : N_QUERY + N_CAL]],
        "yc": out["test_labels"][test[N_QUERY : N_QUERY + N_CAL]],
        "weight": out["weight"],
        "bias": out["bias"],
    }


def real_head(real: dict[str, torch.Tensor]) -> nn.Linear:
    head = nn.Linear(real["weight"].shape[1], real["weight"].shape[0])
    with torch.no_grad():
        head.weight.copy_(real["weight"])
        head.bias.copy_(real["bias"])
    return head


def wrapped_laplace(real: dict[str, torch.Tensor], **params: Any) -> wrapcal.WrappedModel:
    wrapped = wrapcal.wrap(
        None, split=Split(nn.Identity(), real_head(real)), plugins=[("laplace", params)]
    )
    sets: dict[str, Any] = {"train": (real["x"], real["y"])}
    if params.get("prior_precision") == "calibration_nll":
        sets["calibration"] = (real["xc"], real["yc"])
    return wrapped.fit_features(**sets, progress=False)


@pytest.fixture(scope="module")
def reference(real: dict[str, torch.Tensor]) -> dict[str, Any]:
    """laplace-torch fitted once per structure on the same features (one batch), in
    float64: in float32 its eigendecomposition of the Kronecker factors is off by 1e-4
    (relative) in the logits' variances, where ours (float64 inside) is off by 4e-7."""
    loader = torch_data.DataLoader(
        torch_data.TensorDataset(real["x"].double(), real["y"]), batch_size=N_TRAIN
    )
    fitted = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for structure in STRUCTURES:
            la = laplace.Laplace(
                nn.Sequential(real_head(real).double()),
                "classification",
                subset_of_weights="all",
                hessian_structure=structure,
            )
            la.fit(loader)
            fitted[structure] = la
    return fitted


def reference_probs(la: Any, x: torch.Tensor, prior: float) -> torch.Tensor:
    la.prior_precision = prior
    return la(x.double(), pred_type="glm", link_approx="probit").float()


def reference_variances(la: Any, x: torch.Tensor, prior: float) -> torch.Tensor:
    """laplace-torch's ``f_var`` ``[B, K, K]`` (float64)."""
    la.prior_precision = prior
    return la._glm_predictive_distribution(x.double())[1]


@pytest.mark.parametrize("structure", STRUCTURES)
def test_probit_predictive_and_marglik_equal_laplace_torch(real, reference, structure) -> None:
    wrapped = wrapped_laplace(real, hessian=structure, prior_precision=PRIOR)
    pred = wrapped.predict_features(real["q"])
    want = reference_probs(reference[structure], real["q"], PRIOR)
    assert torch.allclose(pred.probs, want, atol=1e-4, rtol=0)
    # Not the bare head's softmax: the posterior widened it.
    bare = torch.softmax(real_head(real)(real["q"]), dim=-1)
    assert float((pred.probs - bare).abs().max()) > 1e-2
    plugin = wrapped.get_plugin("laplace")
    for prior in (0.05, PRIOR, 30.0):
        want_lml = float(reference[structure].log_marginal_likelihood(torch.tensor(prior)))
        assert plugin.log_marginal_likelihood(prior) == pytest.approx(want_lml, rel=1e-6)
    # The epistemic score: the delta method's total variance of the probabilities,
    # tr(Λ f_var Λ), Λ = diag(p) - p p^T at the head's softmax, with laplace-torch's f_var.
    f_var = reference_variances(reference[structure], real["q"], PRIOR)
    p = torch.softmax(real_head(real)(real["q"]).detach().double(), dim=-1)
    lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    want_score = (lam @ f_var @ lam).diagonal(dim1=-2, dim2=-1).sum(-1).float()
    # Float32 inside: confident rows (p ~ 1) cancel digits, hence atol on the scale.
    scale = float(want_score.max())
    assert torch.allclose(pred.scores["laplace_variance"], want_score, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_prior_precision_by_marglik_matches_laplace_torch(real, reference, structure) -> None:
    plugin = wrapped_laplace(real, hessian=structure).get_plugin("laplace")
    ours = float(plugin.prior_precision_)
    la = reference[structure]
    if structure == "kron":  # laplace-torch's optimisation: 100 Adam steps on log δ
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la.optimize_prior_precision(
                pred_type="glm", method="marglik", prior_structure="scalar", n_steps=100
            )
        assert ours == pytest.approx(float(la.prior_precision), rel=2e-3)
    # Ours is the maximum of laplace-torch's own marginal likelihood.
    at = [float(la.log_marginal_likelihood(torch.tensor(ours * f))) for f in (0.97, 1, 1.03)]
    assert at[1] >= max(at[0], at[2])


def test_prior_precision_by_calibration_nll(real, reference) -> None:
    plugin = wrapped_laplace(real, hessian="kron", prior_precision="calibration_nll").get_plugin(
        "laplace"
    )
    ours = float(plugin.prior_precision_)
    la = reference["kron"]

    def nll(prior: float) -> float:
        probs = reference_probs(la, real["xc"], prior)
        return float(-probs.gather(1, real["yc"].view(-1, 1)).log().mean())

    # laplace-torch's grid step (logspace(-4, 4, 100)): ours is at least as good as the
    # grid points on both sides, so as good as the grid search's choice.
    step = 10 ** (8 / 99)
    assert nll(ours) <= min(nll(ours * step), nll(ours / step)) + 1e-7
    assert 1e-4 <= ours <= 1e4


@pytest.mark.parametrize("structure", STRUCTURES)
def test_sampled_heads_follow_the_glm_predictive(real, reference, structure) -> None:
    samples = 1000
    wrapped = wrapped_laplace(
        real, hessian=structure, prior_precision=PRIOR, predictive="samples", samples=samples
    )
    plugin = wrapped.get_plugin("laplace")
    q = real["q"][::8]  # 10 queries, CIFAR-10 and MNIST
    deviations = plugin._deviations(q).double()  # [S, B, K]
    la = reference[structure]
    f_var = reference_variances(la, q, PRIOR)
    cov = torch.einsum("sbk,sbl->bkl", deviations, deviations) / samples
    d = f_var.diagonal(dim1=-2, dim2=-1)
    # Standard error of a sample covariance of Gaussians: sqrt((s_kk s_ll + s_kl^2) / S).
    error = ((d.unsqueeze(-1) * d.unsqueeze(-2) + f_var.square()) / samples).sqrt()
    assert bool(((cov - f_var).abs() <= 5 * error).all())
    assert float((deviations.mean(0) / d.sqrt()).abs().max()) < 5 / math.sqrt(samples)
    # The sampled predictive is the mean of the sampled heads' softmax, and it is
    # laplace-torch's Monte Carlo GLM predictive within Monte Carlo error.
    pred = wrapped.predict_features(q)
    member_probs = torch.softmax(real_head(real)(q).detach().double() + deviations, dim=-1)
    mean = member_probs.mean(0)
    assert torch.allclose(pred.probs.double(), mean, atol=1e-5)
    generator = torch.Generator().manual_seed(1)
    f_mu, f_var = la._glm_predictive_distribution(q.double())
    theirs = torch.softmax(
        la._glm_functional_samples(f_mu, f_var, samples, generator=generator), -1
    )
    # Two independent Monte Carlo estimates of laplace-torch's GLM predictive
    # (its link_approx="mc" averages exactly these samples): they differ by less than
    # 6 standard errors of their difference (the seeds are fixed).
    error = ((member_probs.var(0) + theirs.var(0)) / samples).sqrt()
    assert bool(((mean - theirs.mean(0)).abs() <= 6 * error + 1e-6).all())
    assert "laplace_mutual_information" in pred.scores


def test_composes_with_temperature_and_mc_dropout(real) -> None:
    """Temperature after Laplace is fitted on Laplace's predictive; the Laplace scores
    read the model's own head, so MC dropout around it leaves them alone."""
    head = real_head(real)
    wrapped = wrapcal.wrap(
        None,
        split=Split(nn.Identity(), head),
        plugins=[("temperature", {}), ("laplace", {"prior_precision": PRIOR})],
    ).fit_features(
        train=(real["x"], real["y"]), calibration=(real["xc"], real["yc"]), progress=False
    )
    plugin = wrapped.get_plugin("laplace")
    probit_logits = real_head(real)(real["xc"]) * torch.rsqrt(
        1 + math.pi / 8 * plugin.logit_variances(real["xc"])
    )
    want = wrapcal.fit_temperature(probit_logits.detach(), real["yc"])
    assert wrapped.get_plugin("temperature").temperature_ == pytest.approx(want, rel=1e-5)
    alone = wrapped_laplace(real, prior_precision=PRIOR).predict_features(real["q"])
    beside = wrapcal.wrap(
        None,
        split=Split(nn.Identity(), real_head(real)),
        plugins=[("mc_dropout", {"samples": 4}), ("laplace", {"prior_precision": PRIOR})],
    ).fit_features(train=(real["x"], real["y"]), progress=False)
    got = beside.predict_features(real["q"])
    assert torch.allclose(got.scores["laplace_variance"], alone.scores["laplace_variance"])
    assert not torch.allclose(got.probs, alone.probs)  # dropout samples around Laplace


def test_save_load_and_export_round_trip(real, tmp_path: Path) -> None:
    wrapped = wrapped_laplace(real, predictive="samples", samples=16)
    q = real["q"]
    want = wrapped.predict_features(q)
    wrapped.save(tmp_path / "laplace.wrapcal")
    loaded = wrapcal.load(
        tmp_path / "laplace.wrapcal", split=Split(nn.Identity(), nn.Linear(64, 10))
    )
    got = loaded.predict_features(q)
    assert torch.equal(got.probs, want.probs)
    for name in ("laplace_variance", "laplace_mutual_information"):
        assert torch.equal(got.scores[name], want.scores[name])
    assert loaded.get_plugin("laplace").get_state() == wrapped.get_plugin("laplace").get_state()
    from wrapcal.export import export
    from wrapcal.export.module import prediction_outputs

    # The sampled heads are buffers: the exported graph holds the very same heads.
    path = export(wrapped, tmp_path / "laplace.pt2", format="torch", input_shape=(q.shape[1],))
    with torch.no_grad():
        outputs = torch.export.load(str(path)).module()(q)
    expected = prediction_outputs(want)
    assert len(outputs) == len(expected)
    for got_value, (name, value) in zip(outputs, expected.items(), strict=True):
        assert torch.allclose(got_value, value, rtol=1e-5, atol=1e-6), name


def test_errors_name_the_problem_and_the_fix(real) -> None:
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ValueError, match=r"one nn\.Linear.*Sequential"):
        wrapcal.wrap(None, split=Split(nn.Identity(), mlp), plugins=["laplace"])
    with pytest.raises(ValueError, match="K >= 2"):
        wrapcal.wrap(None, split=Split(nn.Identity(), nn.Linear(64, 1)), plugins=["laplace"])
    with pytest.raises(ValueError, match="hessian='kron'"):
        wrapcal.wrap(
            None,
            split=Split(nn.Identity(), nn.Linear(2048, 1000)),
            plugins=[("laplace", {"hessian": "full"})],
        )
    with pytest.raises(ValueError, match="prior_precision"):
        wrapcal.wrap(
            None,
            split=Split(nn.Identity(), real_head(real)),
            plugins=[("laplace", {"prior_precision": "grid"})],
        )
    wrapped = wrapcal.wrap(None, split=Split(nn.Identity(), real_head(real)), plugins=["laplace"])
    with pytest.raises(NotFittedError, match="train"):
        wrapped.predict_features(real["q"])
    calibrated = wrapcal.wrap(
        None,
        split=Split(nn.Identity(), real_head(real)),
        plugins=[("laplace", {"prior_precision": "calibration_nll"})],
    )
    with pytest.raises(DataError, match="calibration"):
        calibrated.fit_features(train=(real["x"], real["y"]), progress=False)
