"""The feature-space detectors' machinery: chunked statistics, the exact chunked
percentile, the blockwise k-NN search, their errors, and pytorch-ood's detectors."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import wrapcal
import wrapcal_plugins.ood._feature_stats as stats
import wrapcal_plugins.ood.knn as knn_module
from wrapcal import OutputContext
from wrapcal.errors import DataError
from wrapcal.model.split import Split
from wrapcal_plugins.ood._feature_stats import Moments, chunked_quantile
from wrapcal_plugins.ood.knn import kth_nearest_distance, normalise

# --- the exact chunked percentile ------------------------------------------------------


def _chunked(values: np.ndarray, rows: int):
    tensor = torch.from_numpy(values)
    return lambda: (tensor[i : i + rows] for i in range(0, len(tensor), rows))


@pytest.mark.parametrize("q", [0.0, 0.37, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("kind", ["normal", "relu", "integers"])
def test_chunked_quantile_is_numpys_quantile(q: float, kind: str) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=30011).astype(np.float32)
    if kind == "relu":  # ReLU features: a third of the values exactly 0
        values = np.maximum(values + 0.4, 0)
    elif kind == "integers":  # heavy ties everywhere
        values = rng.integers(0, 5, size=30011).astype(np.float32)
    want = np.quantile(values.astype(np.float64), q)
    # Tiny bins and gather limit: several narrowing passes, as on a huge feature set.
    got = chunked_quantile(_chunked(values, 1000), q, bins=8, gather_limit=50)
    assert got == pytest.approx(want, abs=1e-12)
    assert chunked_quantile(_chunked(values, 7000), q) == pytest.approx(want, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=300),
    q=st.floats(0, 1),
    rows=st.integers(1, 50),
)
def test_chunked_quantile_any_values(values: list[float], q: float, rows: int) -> None:
    array = np.asarray(values, dtype=np.float32)
    got = chunked_quantile(_chunked(array, rows), q, bins=3, gather_limit=4)
    want = np.quantile(array.astype(np.float64), q)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-9)


def test_chunked_quantile_refuses_nan_and_nothing() -> None:
    with pytest.raises(DataError, match="NaN"):
        chunked_quantile(_chunked(np.array([1.0, np.nan]), 1), 0.5)
    with pytest.raises(DataError, match="no feature values"):
        chunked_quantile(lambda: iter([]), 0.5)


# --- chunked float64 moments -------------------------------------------------------------


def test_moments_in_chunks_keep_their_digits_far_from_the_origin() -> None:
    """Features with a mean 1e4 times their spread: a raw sum of squares in float64 would
    lose ~8 digits of the covariance; the shifted sums keep them."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=5000)
    x = (1e4 + rng.normal(size=(5000, 6)) + labels[:, None]).astype(np.float32)
    moments = Moments(classes=3)
    for i in range(0, 5000, 777):
        moments.update(torch.from_numpy(x[i : i + 777]), torch.from_numpy(labels[i : i + 777]))
    x64 = x.astype(np.float64)
    means = np.stack([x64[labels == c].mean(0) for c in range(3)])
    centred = x64 - means[labels]
    np.testing.assert_allclose(moments.class_means()[0].numpy(), means, rtol=1e-13)
    np.testing.assert_allclose(
        moments.within_class_covariance().numpy(), centred.T @ centred / 5000, rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(
        moments.covariance().numpy(), np.cov(x64, rowvar=False, bias=True), rtol=1e-9, atol=1e-12
    )


def test_mahalanobis_fit_does_not_depend_on_the_chunk_size(monkeypatch) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(3000, 16) + 5, torch.randint(0, 4, (3000,))
    scores = []
    for elements in (1 << 22, 16 * 97):  # one chunk; chunks of 97 rows
        monkeypatch.setattr(stats, "CHUNK_ELEMENTS", elements)
        wrapped = _features_model(16, 4, ["mahalanobis"]).fit(train=(x, y), progress=False)
        scores.append(wrapped.predict_features(x[:100] * 1.5).scores["mahalanobis"])
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-6, atol=1e-6)


# --- k-NN search -----------------------------------------------------------------------


def test_blockwise_search_equals_one_block(monkeypatch) -> None:
    torch.manual_seed(0)
    bank, queries = normalise(torch.randn(5000, 32)), normalise(torch.randn(64, 32))
    whole = kth_nearest_distance(queries, bank, 50)
    monkeypatch.setattr(knn_module, "SEARCH_ELEMENTS", 64 * 300)  # 17 blocks of 300 rows
    torch.testing.assert_close(kth_nearest_distance(queries, bank, 50), whole)
    exact = torch.cdist(queries.double(), bank.double()).sort(dim=1).values[:, 49]
    torch.testing.assert_close(whole.double(), exact, atol=1e-5, rtol=0)


def _features_model(width: int, classes: int, plugins: list, head: nn.Module | None = None):
    torch.manual_seed(1)
    return wrapcal.wrap(
        None, split=Split(nn.Identity(), head or nn.Linear(width, classes)), plugins=plugins
    )


def test_knn_bank_subset_dtype_and_fallback_to_calibration() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(1000, 8), torch.randint(0, 3, (1000,))
    spec = ("knn", {"k": 5, "bank_size": 300, "dtype": "float16"})
    a = _features_model(8, 3, [spec]).fit(calibration=(x, y), progress=False)
    b = _features_model(8, 3, [spec]).fit(calibration=(x, y), progress=False)
    c = _features_model(8, 3, [spec]).fit(calibration=(x, y), progress=False, seed=1)
    bank = a.get_plugin("knn").bank_
    assert bank.shape == (300, 8) and bank.dtype == torch.float16
    assert torch.equal(bank, b.get_plugin("knn").bank_)  # seeded
    assert not torch.equal(bank, c.get_plugin("knn").bank_)
    # The rows kept are training rows, normalised, in their original order.
    rows = torch.cdist(bank.float(), normalise(x)).argmin(dim=1)
    assert torch.equal(rows, rows.sort().values) and rows.unique().numel() == 300
    full = _features_model(8, 3, [("knn", {"k": 5})]).fit(calibration=(x, y), progress=False)
    q = torch.randn(50, 8)
    half, single = a.predict_features(q).scores["knn"], full.predict_features(q).scores["knn"]
    assert half.dtype == torch.float32 and not torch.equal(half, single)


def test_detectors_say_what_data_they_need() -> None:
    x, y = torch.randn(100, 8), torch.randint(0, 3, (100,))
    for name in ("knn", "mahalanobis", "vim", "react"):
        wrapped = _features_model(8, 3, [name])
        with (
            pytest.warns(UserWarning, match="no plugin reads unlabeled"),
            pytest.raises(DataError, match=rf"plugin {name} needs .*train=\.\.\. or calibration="),
        ):
            wrapped.fit(unlabeled=x, progress=False)
    with pytest.raises(DataError, match="k=50 neighbours, but the bank holds 20"):
        _features_model(8, 3, ["knn"]).fit(train=(x[:20], y[:20]), progress=False)
    with pytest.raises(DataError, match="mahalanobis needs labels"):
        _features_model(8, 3, ["mahalanobis"]).fit(train=x, progress=False)


# --- ViM's head, ReAct's clipping ----------------------------------------------------------


def test_vim_needs_a_linear_head_and_a_residual_space() -> None:
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"vim needs the model's head to be one nn.Linear"):
        _features_model(8, 3, ["vim"], head=mlp)
    with pytest.raises(ValueError, match=r"dim=8 leaves no residual space.*dim < 8"):
        _features_model(8, 3, [("vim", {"dim": 8})])
    # Dropout before the linear layer is fine (identity at inference).
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 3))
    x, y = torch.randn(300, 8), torch.randint(0, 3, (300,))
    wrapped = _features_model(8, 3, ["vim"], head=head).fit(train=(x, y), progress=False)
    assert wrapped.get_plugin("vim").dim_ == 4
    assert wrapped.get_plugin("vim").residual_basis_.shape == (8, 4)


def test_react_clips_for_its_own_score_only() -> None:
    """ReAct is a detector: the energy of the head's logits of the clipped features. The
    model's logits, probabilities and the core's energy stay those of the unclipped
    features (issue 23: before, it clipped what every head read, and its score was a copy
    of the core's energy)."""
    torch.manual_seed(0)
    x, y = torch.randn(2000, 8).relu(), torch.randint(0, 3, (2000,))
    wrapped = _features_model(8, 3, [("react", {"percentile": 80})])
    wrapped.fit(train=(x, y), progress=False)
    clip = float(wrapped.get_plugin("react").clip_)
    assert clip == pytest.approx(np.quantile(x.double().numpy(), 0.8), abs=1e-12)
    q = 3 * torch.randn(20, 8).abs()
    pred = wrapped.predict(q)
    with torch.no_grad():
        clipped, plain = wrapped.head(q.clamp(max=clip)), wrapped.head(q)
        assert torch.equal(wrapped(q), plain)
    assert torch.equal(pred.logits, plain)
    torch.testing.assert_close(pred.scores["react"], -torch.logsumexp(clipped, dim=-1))
    torch.testing.assert_close(pred.scores["energy"], -torch.logsumexp(plain, dim=-1))
    # Every row has a value above the clip: no row's react equals its energy.
    assert (q > clip).any(dim=1).all()
    assert not torch.isclose(pred.scores["react"], pred.scores["energy"]).any()


# --- traceable inference (exportable=True) ----------------------------------------------


class _Scores(nn.Module):
    """One plugin's ``outputs`` as a module of (features, logits), for torch.export."""

    def __init__(self, plugin: wrapcal.Plugin, name: str, head: nn.Module) -> None:
        super().__init__()
        self.plugin, self.name, self.head = plugin, name, head

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=-1)
        context = OutputContext(
            features[None], logits[None], logits, logits, probs, {}, head=self.head
        )
        return self.plugin.outputs(context)[self.name]


@pytest.mark.parametrize("name", ["knn", "mahalanobis", "vim", "react"])
def test_scores_export_with_torch_export(name: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(500, 8), torch.randint(0, 3, (500,))
    wrapped = _features_model(8, 3, [name]).fit(train=(x, y), progress=False)
    module = _Scores(wrapped.get_plugin(name), name, wrapped.head)
    q = torch.randn(16, 8)
    logits = wrapped.head(q).detach()
    exported = torch.export.export(module, (q, logits))
    torch.testing.assert_close(exported.module()(q, logits), module(q, logits))


# --- pytorch-ood, where it installs --------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_scores_match_pytorch_ood() -> None:
    """pytorch-ood 0.4.0's detectors on the shared ResNet-20 features. Its Mahalanobis
    covariances are sums of outer products (not divided by N) and its class term carries
    the Gaussian's -1/2, so its scores are ours / (2N) (relative: / N)."""
    detectors = pytest.importorskip("pytorch_ood.detector")
    from shared_data import HAVE_SHARED_DATA, resnet20_outputs

    if not HAVE_SHARED_DATA:
        pytest.skip("shared data not found")
    o = resnet20_outputs()
    x, y = o["train_features"], o["train_labels"]
    q = torch.cat([o["test_features"][:300], o["mnist_features"][:300]])
    head = nn.Linear(64, 10)
    with torch.no_grad():
        head.weight.copy_(o["weight"])
        head.bias.copy_(o["bias"])

    def ours(spec):
        wrapped = _features_model(64, 10, [spec], head=head).fit(train=(x, y), progress=False)
        return wrapped, wrapped.predict_features(q).scores[
            spec if isinstance(spec, str) else spec[0]
        ]

    def close(got, want, atol):
        np.testing.assert_allclose(got.double(), want.double(), rtol=1e-4, atol=atol)

    n = len(x)
    close(ours("knn")[1], detectors.KNN(None, k=50).fit_features(x, y).predict_features(q), 1e-5)
    theirs = detectors.Mahalanobis(None).fit_features(x, y).predict_features(q)
    close(ours("mahalanobis")[1] / (2 * n), theirs, 1e-6 * theirs.abs().max())
    theirs = detectors.RMD(None).fit_features(x, y).predict_features(q)
    relative = ours(("mahalanobis", {"relative": True}))[1]
    close(relative / n, theirs, 1e-4 * theirs.abs().max())
    vim = detectors.ViM(None, d=32, w=o["weight"], b=o["bias"]).fit_features(x, y)
    theirs = vim.predict_features(q)
    close(ours("vim")[1], theirs, 2e-4 * theirs.abs().max())
    wrapped, react = ours("react")
    clip = float(wrapped.get_plugin("react").clip_)
    close(react, detectors.ReAct(lambda f: f, head, threshold=clip).predict(q), 1e-5)


def test_single_logit_binary_models_work() -> None:
    """One logit z: two classes for Mahalanobis, the logits [0, z] for the energies."""
    torch.manual_seed(0)
    x, y = torch.randn(400, 8).relu(), torch.randint(0, 2, (400,))
    wrapped = _features_model(8, 1, ["knn", "mahalanobis", "vim", "react"])
    wrapped.fit(train=(x, y), progress=False)
    assert wrapped.get_plugin("mahalanobis").means_.shape[0] == 2
    q = torch.randn(20, 8).relu()
    scores = wrapped.predict_features(q).scores
    assert all(torch.isfinite(scores[n]).all() for n in ("knn", "mahalanobis", "vim", "react"))
    with torch.no_grad():
        z = wrapped.head(q.clamp(max=wrapped.get_plugin("react").clip_.float()))
    energy = -torch.logsumexp(torch.cat([torch.zeros_like(z), z], dim=1), dim=1)
    torch.testing.assert_close(scores["react"], energy)


@pytest.mark.parametrize(
    "make",
    [
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3),
        lambda: torchvision.models.mobilenet_v3_small(num_classes=3),
    ],
    ids=["timm-vit-pre-logits", "torchvision-sequential-head"],
)
def test_every_detector_on_other_backbones(make) -> None:
    """A ViT's pre-logits token (signed, LayerNorm'd) and a torchvision head cut before its
    last Linear: the four detectors fit and score from whatever features the split gives."""
    torch.manual_seed(0)
    model = make().eval()
    x, y = torch.randn(120, 3, 32, 32), torch.randint(0, 3, (120,))
    plugins = [("knn", {"k": 5}), "mahalanobis", "vim", "react"]
    wrapped = wrapcal.wrap(model, plugins=plugins).fit(train=(x, y), progress=False)
    q = torch.cat([x[:8], 5 * torch.randn(8, 3, 32, 32)])
    with torch.no_grad():
        scores = wrapped.predict(q).scores
    for name in ("knn", "mahalanobis", "vim", "react"):
        assert scores[name].shape == (16,) and torch.isfinite(scores[name]).all(), name
    assert wrapped.backbone_passes == 1  # one pass over train=, every detector reads it
