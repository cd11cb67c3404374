"""The discrepancy heads (Yu & Aizawa 2019): loss, score, training, composition, real data."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from shared_data import (
    cifar10,
    pretrained_resnet20,
    requires_shared_data,
    resnet20_outputs,
)
from torch import nn

import wrapcal
from wrapcal import Plugin, Stage, get_tags
from wrapcal.errors import DataError
from wrapcal.files.cifar_resnets import CIFAR_MEAN, CIFAR_STD
from wrapcal.metrics.ood import auroc, fpr_at_tpr
from wrapcal_plugins.ood.discrepancy import (
    DiscrepancyHeads,
    discrepancy_loss,
    l1_discrepancy,
    per_sample_entropy,
)

# --- formulas written out independently (numpy, float64) -------------------------------


def np_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def np_paper_loss(l1: np.ndarray, l2: np.ndarray, m: float) -> float:
    """max(0, m - 1/|X| sum_x [H(p1(x)) - H(p2(x))]), H summed over the classes of x."""
    p1, p2 = np_softmax(l1), np_softmax(l2)
    h1 = -(p1 * np.log(p1)).sum(axis=1)
    h2 = -(p2 * np.log(p2)).sum(axis=1)
    return max(0.0, m - float(np.mean(h1 - h2)))


def np_batch_axis_losses(l1: np.ndarray, l2: np.ndarray, m: float) -> list[float]:
    """The known wrong variants: entropy summed over the BATCH axis (dim 0) instead of
    over the classes, with the softmax over the classes or over the batch as well."""
    out = []
    for softmax_axis in (1, 0):
        p1, p2 = np_softmax(l1, axis=softmax_axis), np_softmax(l2, axis=softmax_axis)
        h1 = -(p1 * np.log(p1)).sum(axis=0)  # [K]: one "entropy" per class
        h2 = -(p2 * np.log(p2)).sum(axis=0)
        out.append(max(0.0, m - float(np.mean(h1 - h2))))
    return out


def np_l1(members: np.ndarray) -> np.ndarray:
    """Mean over t of sum_k |p(2t)_k - p(2t+1)_k|, one loop per pair (reference only)."""
    p = np_softmax(members)
    pairs = [np.abs(p[2 * t] - p[2 * t + 1]).sum(axis=-1) for t in range(p.shape[0] // 2)]
    return np.mean(pairs, axis=0)


# --- loss ------------------------------------------------------------------------------


def test_entropy_is_per_sample():
    logits = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    p = np_softmax(logits.numpy())
    expected = -(p * np.log(p)).sum(axis=1)
    got = per_sample_entropy(logits)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert got[0].item() == pytest.approx(math.log(3))
    # No NaN for saturated logits (log-softmax, not log of a rounded 0).
    assert torch.isfinite(per_sample_entropy(torch.tensor([[1e4, -1e4]]))).all()


def test_loss_matches_formula_and_not_batch_axis_entropy():
    g = torch.Generator().manual_seed(0)
    l1 = torch.randn(7, 5, generator=g, dtype=torch.float64)
    l2 = 4 * torch.randn(7, 5, generator=g, dtype=torch.float64)
    for m in (1.2, 0.3, 5.0):
        got = discrepancy_loss(l1, l2, m).item()
        assert got == pytest.approx(np_paper_loss(l1.numpy(), l2.numpy(), m), abs=1e-12)
    # A case where the definitions differ: 2 samples, 10 classes; head 1 uniform, head 2
    # confident (classes 0 and 3). Per sample H1 = log 10 ~ 2.30 and H2 ~ 0, so the gap
    # exceeds m = 1.2 and the loss is 0. Summed over the batch axis (then averaged over
    # the classes) the "entropies" are 2/10 of that, 0.46, and the loss is ~0.74; with the
    # softmax over the batch too, ~1.06.
    l1 = torch.zeros(2, 10, dtype=torch.float64)
    l2 = torch.zeros(2, 10, dtype=torch.float64)
    l2[0, 0] = l2[1, 3] = 30.0
    ours = discrepancy_loss(l1, l2, 1.2).item()
    assert ours == pytest.approx(np_paper_loss(l1.numpy(), l2.numpy(), 1.2), abs=1e-12)
    assert ours == 0.0
    wrong = np_batch_axis_losses(l1.numpy(), l2.numpy(), 1.2)
    assert wrong[0] == pytest.approx(1.2 - 0.2 * math.log(10), abs=1e-9)
    assert wrong[1] == pytest.approx(1.2 - 0.2 * math.log(2), abs=1e-9)
    # Where the gap is below the margin the loss is m - gap, per sample.
    assert discrepancy_loss(l1[:, :3], l2[:, :3], 1.2).item() == pytest.approx(
        1.2 - (math.log(3) - 0.5 * float(per_sample_entropy(l2[1:, :3]))), abs=1e-9
    )
    # And the sign: the paper's loss rewards head 1 being the uncertain one.
    assert discrepancy_loss(l2, l1, 1.2).item() == pytest.approx(1.2 + math.log(10), abs=1e-9)


def test_loss_gradient_moves_heads_apart():
    l1 = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    l2 = torch.randn(8, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    discrepancy_loss(l1, l2).backward()
    step = 0.5
    with torch.no_grad():
        h1_after = per_sample_entropy(l1 - step * l1.grad).mean()
        h2_after = per_sample_entropy(l2 - step * l2.grad).mean()
        assert h1_after > per_sample_entropy(l1).mean()
        assert h2_after < per_sample_entropy(l2).mean()


# --- score -----------------------------------------------------------------------------


def test_l1_score_two_heads_and_mc_layout():
    g = torch.Generator().manual_seed(3)
    members = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(l1_discrepancy(members).numpy(), np_l1(members.numpy()))
    many = torch.randn(3 * 2, 6, 4, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(l1_discrepancy(many).numpy(), np_l1(many.numpy()))
    # Head index fastest: pairs (0, 1) and (2, 3) agree, so the score is 0, although
    # members 0 and 2 differ (a [2, T] layout would give a positive score).
    a, b = torch.randn(2, 1, 6, 4, generator=g, dtype=torch.float64)
    layout = torch.cat([a, a, b, b])
    assert l1_discrepancy(layout).abs().max().item() < 1e-12
    # Bounds: 0 for identical heads, 2 (never more) for one-hots on different classes.
    one_hots = 50 * torch.stack([torch.eye(4), torch.eye(4).roll(1, dims=1)]).double()
    np.testing.assert_allclose(l1_discrepancy(one_hots).numpy(), 2.0, atol=1e-12)
    with pytest.raises(ValueError, match="pairs|T\\*2"):
        l1_discrepancy(torch.zeros(3, 2, 4))


# --- a small problem where the answer is known -----------------------------------------


def blobs(n: int, seed: int, std: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian classes at (-2, 0) and (2, 0), standard deviation 0.5."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    return centres[y] + std * torch.randn(n, 2, generator=g), y


def far_points(n: int, seed: int) -> torch.Tensor:
    """OOD: points around (0, +6) and (0, -6), far from both classes."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    return torch.stack([torch.zeros(n), 6 * sign], dim=1) + 0.5 * torch.randn(n, 2, generator=g)


def toy_model() -> nn.Module:
    torch.manual_seed(0)  # the toy model's own init only; the plugin uses its seed
    return nn.Sequential(nn.Identity(), nn.Linear(2, 2)).eval()


def fit_toy(**params):
    x, y = blobs(400, seed=0)
    unl = torch.cat([blobs(200, seed=1)[0], far_points(200, seed=2)])
    wrapped = wrapcal.wrap(
        toy_model(), [("discrepancy", {"epochs_pretrain": 20, "batch_size": 32, **params})]
    )
    wrapped.fit_features(train=(x, y), unlabeled=unl, progress=False)
    return wrapped


@pytest.fixture(scope="module")
def toy():
    return fit_toy(epochs=10)


def test_toy_heads_agree_on_data_and_disagree_off_it(toy):
    x_id, y_id = blobs(300, seed=10)
    x_ood = far_points(300, seed=11)
    pred_id, pred_ood = toy.predict(x_id), toy.predict(x_ood)
    s_id, s_ood = pred_id.scores["discrepancy"], pred_ood.scores["discrepancy"]
    assert (pred_id.label == y_id).float().mean() > 0.97
    assert s_id.mean() < 0.15
    assert s_ood.mean() > 0.8
    assert auroc(s_id, s_ood) > 0.97
    # The paper's sign: head 1 (the model's head) is the uncertain one off the data.
    members = toy.head_members(x_ood)
    h1, h2 = per_sample_entropy(members[0]), per_sample_entropy(members[1])
    assert (h1 - h2).mean() > 0.3
    # The training drove the discrepancy loss down (history is per-epoch means).
    hist = toy.get_plugin("discrepancy").history_
    assert len(hist["discrepancy"]) == 10 and len(hist["pretrain"]) == 20
    assert hist["discrepancy"][-1] < hist["discrepancy"][0]


def test_toy_without_fine_tuning_does_not_separate(toy):
    # Control: pre-training alone gives two heads that agree almost everywhere.
    control = fit_toy(epochs=0)
    x_ood = far_points(300, seed=11)
    s_control = control.predict(x_ood).scores["discrepancy"]
    s_tuned = toy.predict(x_ood).scores["discrepancy"]
    assert s_tuned.mean() > s_control.mean() + 0.5


def test_prediction_is_mean_of_head_softmax(toy):
    x = torch.cat([blobs(20, seed=5)[0], far_points(20, seed=6)])
    pred = toy.predict(x)
    plugin = toy.get_plugin("discrepancy")
    with torch.no_grad():
        p1 = torch.softmax(toy.head(x), -1)
        p2 = torch.softmax(plugin.head2(x), -1)
    torch.testing.assert_close(pred.probs, (p1 + p2) / 2)
    torch.testing.assert_close(pred.scores["discrepancy"], (p1 - p2).abs().sum(-1))
    assert "max_logit" not in pred.scores  # two members: no single-logit baselines


def test_seed_determinism_and_user_model_untouched():
    threads = torch.get_num_threads()
    model = toy_model()
    before = copy.deepcopy(model.state_dict())
    x, y = blobs(100, seed=0)
    unl = far_points(50, seed=1)
    heads = []
    for seed in (4, 4, 5):
        w = wrapcal.wrap(model, [("discrepancy", {"epochs_pretrain": 2, "epochs": 2})])
        w.fit_features(train=(x, y), unlabeled=unl, progress=False, seed=seed)
        heads.append(w.get_plugin("discrepancy").head2.weight.detach().clone())
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=0)
    assert not torch.equal(heads[0], heads[2])
    assert torch.get_num_threads() == threads  # the one-thread training restored it
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_save_load_roundtrip(toy, tmp_path):
    path = toy.save(tmp_path / "toy.wrapcal")
    loaded = wrapcal.load(path, model=toy_model())
    x = torch.cat([blobs(30, seed=7)[0], far_points(30, seed=8)])
    a, b = toy.predict(x), loaded.predict(x)
    torch.testing.assert_close(a.probs, b.probs)
    torch.testing.assert_close(a.scores["discrepancy"], b.scores["discrepancy"])
    plugin = loaded.get_plugin("discrepancy")
    assert plugin.history_ == toy.get_plugin("discrepancy").history_
    assert any(k.endswith("head2.weight") for k in loaded.state_dict())


def test_single_logit_binary_head():
    torch.manual_seed(0)  # the toy model's own init
    model = nn.Sequential(nn.Identity(), nn.Linear(2, 1)).eval()
    x, y = blobs(200, seed=0)
    unl = torch.cat([blobs(100, seed=1)[0], far_points(100, seed=2)])
    w = wrapcal.wrap(model, [("discrepancy", {"epochs_pretrain": 5, "epochs": 5})])
    w.fit_features(train=(x, y), unlabeled=unl, progress=False)
    xt = torch.cat([blobs(50, seed=3)[0], far_points(50, seed=4)])
    pred = w.predict(xt)
    assert pred.logits.shape == (100, 1) and pred.probs.shape == (100, 2)
    with torch.no_grad():
        p1 = torch.sigmoid(w.head(xt))
        p2 = torch.sigmoid(w.get_plugin("discrepancy").head2(xt))
    # Two columns (1 - p, p): the L1 distance is twice the difference of p.
    torch.testing.assert_close(pred.scores["discrepancy"], 2 * (p1 - p2).abs()[:, 0])
    assert pred.scores["discrepancy"][50:].mean() > pred.scores["discrepancy"][:50].mean()


# --- errors ----------------------------------------------------------------------------


def test_clear_errors():
    x, y = blobs(40, seed=0)
    w = wrapcal.wrap(toy_model(), ["discrepancy"])
    with pytest.raises(DataError, match="unlabeled="):
        w.fit_features(train=(x, y), progress=False)
    with pytest.raises(DataError, match="needs labels"):
        w.fit_features(train=x, unlabeled=x, progress=False)
    with pytest.raises(wrapcal.NotFittedError):
        w.predict(x)
    w = wrapcal.wrap(toy_model(), [("discrepancy", {"train_backbone_block": "model.0"})])
    with pytest.raises(ValueError, match="no parameters"):
        w.fit_features(train=(x, y), unlabeled=x, progress=False)
    w = wrapcal.wrap(toy_model(), [("discrepancy", {"train_backbone_block": "nope"})])
    with pytest.raises(ValueError, match="not a submodule"):
        w.fit_features(train=(x, y), unlabeled=x, progress=False)


# --- composition -----------------------------------------------------------------------


class FakeSampler(Plugin):
    """Stage-SAMPLE stand-in for MC dropout: T scaled copies of the inner members."""

    def __init__(self, samples: int = 3) -> None:
        super().__init__()
        self.samples = samples

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.SAMPLE
        tags.requires_fit = False
        return tags

    def members(self, features, inner):
        parts = [inner(features * (1 + 0.3 * t)) for t in range(self.samples)]
        return torch.cat(parts)  # [T * 2, N, K], head index fastest


def test_sampler_around_heads(toy):
    sampler = FakeSampler(samples=3)
    w = wrapcal.wrap(toy_model(), [sampler, ("discrepancy", {"epochs_pretrain": 2, "epochs": 2})])
    x, y = blobs(100, seed=0)
    w.fit_features(train=(x, y), unlabeled=far_points(50, seed=1), progress=False)
    xt = torch.cat([blobs(10, seed=2)[0], far_points(10, seed=3)])
    members = w.members(xt)
    assert members.shape == (6, 20, 2)
    head2 = w.get_plugin("discrepancy").head2
    with torch.no_grad():
        torch.testing.assert_close(members[2], w.head(xt * 1.3))
        torch.testing.assert_close(members[5], head2(xt * 1.6))
        pairs = [
            (torch.softmax(w.head(xt * s), -1) - torch.softmax(head2(xt * s), -1)).abs().sum(-1)
            for s in (1.0, 1.3, 1.6)
        ]
    torch.testing.assert_close(w.predict(xt).scores["discrepancy"], torch.stack(pairs).mean(0))


class InnerMembers(Plugin):
    """A stage-TRAIN plugin that changes the members the discrepancy heads get."""

    def __init__(self, copies: int = 2) -> None:
        super().__init__()
        self.copies = copies

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.TRAIN
        tags.requires_fit = False
        return tags

    def members(self, features, inner):
        logits = inner(features)
        return torch.cat([logits * (1 + c) for c in range(self.copies)])


def test_refuses_or_warns_when_inner_members_are_not_the_head():
    """The heads train the model's own head: plugins before them that change its output
    get a warning (head 1 serves what training did not see), and plugins that add
    members get an error naming the fix (the old contract bypassed them silently)."""
    w = wrapcal.wrap(toy_model(), [InnerMembers(1), DiscrepancyHeads(epochs_pretrain=1, epochs=1)])
    x, y = blobs(50, seed=0)
    w.fit_features(train=(x, y), unlabeled=x, progress=False)  # 1 copy: the head itself
    scaled = wrapcal.wrap(toy_model(), [InnerMembers(2), DiscrepancyHeads(epochs_pretrain=1)])
    with pytest.raises(ValueError, match="discrepancy.*2 sets of logits.*after the discrepancy"):
        scaled.fit_features(train=(x, y), unlabeled=x, progress=False)

    class Doubling(InnerMembers):
        def members(self, features, inner):
            return 2 * inner(features)

    doubled = wrapcal.wrap(toy_model(), [Doubling(), DiscrepancyHeads(epochs_pretrain=1)])
    with pytest.warns(UserWarning, match="change its output"):
        doubled.fit_features(train=(x, y), unlabeled=x, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_toy(epochs=1, epochs_pretrain=1)


def registered(name: str) -> bool:
    return name in wrapcal.plugin_registry()


@pytest.mark.skipif(not registered("temperature"), reason="temperature plugin not installed")
def test_temperature_fits_on_the_mean_of_the_heads():
    x, y = blobs(400, seed=0)
    xc, yc = blobs(300, seed=20, std=1.5)  # overlapping: some errors to calibrate on
    unl = torch.cat([blobs(200, seed=1)[0], far_points(200, seed=2)])
    w = wrapcal.wrap(toy_model(), ["temperature", ("discrepancy", {"epochs": 5})])
    w.fit_features(train=(x, y), calibration=(xc, yc), unlabeled=unl, progress=False)
    t = w.get_plugin("temperature").temperature_
    plugin = w.get_plugin("discrepancy")
    xt = blobs(50, seed=30)[0]
    with torch.no_grad():
        mean = (torch.softmax(w.head(xt), -1) + torch.softmax(plugin.head2(xt), -1)) / 2
        expected = torch.softmax(torch.log(mean) / t, -1)
        # The temperature minimises the NLL of the calibration set on the mean of the heads.
        cal = torch.log((torch.softmax(w.head(xc), -1) + torch.softmax(plugin.head2(xc), -1)) / 2)
        nll = [
            torch.nn.functional.cross_entropy(cal / s, yc).item() for s in (t * 0.8, t, t * 1.25)
        ]
    pred = w.predict(xt)
    torch.testing.assert_close(pred.probs, expected, atol=1e-6, rtol=1e-5)
    assert nll[1] <= min(nll[0], nll[2]) + 1e-6
    torch.testing.assert_close(
        pred.scores["discrepancy"],
        (torch.softmax(w.head(xt), -1) - torch.softmax(plugin.head2(xt), -1))
        .abs()
        .sum(-1)
        .detach(),
    )


@pytest.mark.skipif(not registered("mc_dropout"), reason="mc_dropout plugin not installed")
@pytest.mark.filterwarnings("ignore:mc_dropout.*no dropout before its head")
def test_mc_dropout_wraps_the_heads():
    x, y = blobs(200, seed=0)
    w = wrapcal.wrap(
        toy_model(), [("mc_dropout", {"samples": 4, "p": 0.2}), ("discrepancy", {"epochs": 3})]
    )
    w.fit_features(train=(x, y), unlabeled=far_points(100, seed=1), progress=False)
    xt = torch.cat([blobs(10, seed=2)[0], far_points(10, seed=3)])
    members = w.members(xt).detach()
    assert members.shape == (8, 20, 2)
    pred = w.predict(xt)
    torch.testing.assert_close(pred.scores["discrepancy"], l1_discrepancy(members))
    expected = np_l1(members.double().numpy())
    np.testing.assert_allclose(pred.scores["discrepancy"].double().numpy(), expected, rtol=1e-5)


# --- training a backbone block, streaming --------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block(torch.relu(self.stem(x)))).flatten(1))


def test_train_backbone_block_streams_and_recomputes_features():
    torch.manual_seed(0)  # TinyNet's own init
    model = TinyNet().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    xu = torch.randn(64, 3, 8, 8, generator=g) * 3
    params = {"train_backbone_block": "model.block", "epochs_pretrain": 2, "epochs": 2}
    params["batch_size"] = 32
    later = ["temperature"] if registered("temperature") else []
    w = wrapcal.wrap(model, [("discrepancy", params), *later])
    plugin = w.get_plugin("discrepancy")
    assert get_tags(plugin).changes_backbone and not get_tags(DiscrepancyHeads()).changes_backbone
    bb = w.backbone.model
    stem0, block0 = bb.stem.weight.detach().clone(), bb.block[0].weight.detach().clone()
    bn_mean0 = bb.block[1].running_mean.clone()
    flags0 = {n: p.requires_grad for n, p in w.named_parameters()}
    # Three distinct data sets (the same tensors twice would share one cached pass).
    w.fit(train=(x, y), unlabeled=xu, calibration=(x[:64], y[:64]), progress=False, batch_size=32)
    assert torch.equal(bb.stem.weight, stem0)  # outside the block: frozen
    assert not torch.equal(bb.block[0].weight, block0)  # the block was trained
    assert torch.equal(bb.block[1].running_mean, bn_mean0)  # eval mode: BN stats kept
    assert {n: p.requires_grad for n, p in w.named_parameters()} == flags0
    assert not w.training and not w.backbone.training
    # One pass per data set, then again after the backbone changed.
    assert w.backbone_passes == 6
    pred = w.predict(x[:5])
    assert pred.scores["discrepancy"].shape == (5,)
    # Streaming needs the inputs: features alone cannot train a backbone block.
    w2 = wrapcal.wrap(model, [("discrepancy", params)])
    with torch.no_grad():
        f = w2.backbone(x)
    with pytest.raises(DataError, match="not fit_features"):
        w2.fit_features(train=(f, y), unlabeled=f, progress=False)


# --- real data ---------------------------------------------------------------------------


def _split_halves() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    perm_cifar = torch.randperm(10000, generator=g)
    perm_mnist = torch.randperm(10000, generator=g)
    return perm_cifar[:5000], perm_cifar[5000:], perm_mnist[:5000], perm_mnist[5000:]


@pytest.fixture(scope="module")
def unseen_ood_features():
    """Backbone features of OOD kinds absent from the unlabelled data (1000 each)."""
    _, cifar_eval, _, _ = _split_halves()
    model = wrapcal.wrap(pretrained_resnet20())
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    # Gaussian noise images: pixels N(0.5, 0.5^2) clipped to [0, 1], then normalised.
    g = torch.Generator().manual_seed(1)
    noise = ((0.5 + 0.5 * torch.randn(1000, 3, 32, 32, generator=g)).clamp(0, 1) - mean) / std
    # Held-out CIFAR test images with every pixel position moved by one fixed permutation.
    images = cifar10("test")[0][cifar_eval[:1000]]
    perm = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(2))
    shuffled = images.flatten(2)[:, :, perm].reshape(images.shape)
    with torch.no_grad():
        return {
            name: torch.cat([model.backbone(x[i : i + 500]) for i in range(0, len(x), 500)])
            for name, x in (("noise", noise), ("shuffled", shuffled))
        }


@pytest.mark.slow
@requires_shared_data
def test_resnet20_cifar_vs_mnist(unseen_ood_features):
    out = resnet20_outputs()
    cifar_unl, cifar_eval, mnist_unl, mnist_eval = _split_halves()
    unlabeled = torch.cat([out["test_features"][cifar_unl], out["mnist_features"][mnist_unl]])
    wrapped = wrapcal.wrap(pretrained_resnet20(), ["discrepancy"])
    wrapped.fit_features(
        train=(out["train_features"], out["train_labels"]), unlabeled=unlabeled, progress=False
    )

    def discrepancy_and_probs(features):
        members = wrapped.head_members(features).detach()
        return l1_discrepancy(members), torch.softmax(wrapped.finish(members), -1)

    score_id, probs_id = discrepancy_and_probs(out["test_features"][cifar_eval])
    base_probs_id = torch.softmax(out["test_logits"][cifar_eval], -1)
    labels = out["test_labels"][cifar_eval]
    acc = (probs_id.argmax(-1) == labels).float().mean().item()
    base_acc = (base_probs_id.argmax(-1) == labels).float().mean().item()
    msp_id = 1 - base_probs_id.max(-1).values
    head = pretrained_resnet20().linear

    ood = {"mnist": out["mnist_features"][mnist_eval], **unseen_ood_features}
    figures = {}
    for name, features in ood.items():
        score_ood, _ = discrepancy_and_probs(features)
        with torch.no_grad():
            msp_ood = 1 - torch.softmax(head(features), -1).max(-1).values
        figures[name] = (
            auroc(score_id, score_ood),
            fpr_at_tpr(score_id, score_ood),
            auroc(msp_id, msp_ood),
            fpr_at_tpr(msp_id, msp_ood),
        )

    # The two heads' mean classifies at least as well as the model it came from.
    assert acc >= base_acc - 0.01
    # MNIST (the OOD kind in the unlabelled data, held-out images): far better than MSP.
    a, f, ma, mf = figures["mnist"]
    assert a > 0.97 and a > ma + 0.1
    assert f < 0.15 and f < mf - 0.3
    # OOD kinds the fine-tuning never saw: still better than MSP, but no guarantee of
    # the transductive figures (reported above).
    for name in ("noise", "shuffled"):
        assert figures[name][0] > figures[name][2], name
    # The whole API agrees with the cached-feature computation on real images.
    images = cifar10("test")[0][cifar_eval[:200]]
    pred = wrapped.predict(images)
    torch.testing.assert_close(pred.scores["discrepancy"], score_id[:200], atol=1e-4, rtol=1e-4)
