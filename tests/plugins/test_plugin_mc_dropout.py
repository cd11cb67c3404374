"""MC dropout plugin: sampling, scores, seeds, scopes, composition, save/load, real data."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
from shared_data import (
    cifar10,
    mnist_ood,
    pretrained_resnet20,
    requires_shared_data,
    resnet20_outputs,
)
from sklearn.metrics import roc_auc_score
from torch import nn

import wrapcal
from wrapcal import Plugin, Stage
from wrapcal.errors import DataError, NotFittedError
from wrapcal.metrics import accuracy, auroc, ece, fpr_at_tpr
from wrapcal_plugins.sampling.mc_dropout import DEFAULT_P, MCDropout, mc_scores, seeded_dropout

SCORE_NAMES = (
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
    "std_top_prob",
)


class DropNet(nn.Module):
    """Conv + BatchNorm features, a hidden layer, Dropout, then the linear head ``fc``."""

    def __init__(self, p: float = 0.3, k: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.hidden = nn.Linear(8, 16)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(16, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.drop(torch.relu(self.hidden(h))))


class BNNet(nn.Module):
    """Conv + BatchNorm features and a linear head: no dropout anywhere."""

    def __init__(self, k: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class TwoHeads(Plugin):
    """A head-members plugin for composition: the model's head and a second linear head."""

    def __init__(self) -> None:
        super().__init__()

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.HEADS
        tags.requires_fit = False
        return tags

    def attach(self, model) -> None:
        gen = torch.Generator().manual_seed(7)
        # skip_init: no draw from the global RNG; the weights come from our generator.
        self.second = nn.utils.skip_init(nn.Linear, model.num_features, model.num_classes)
        with torch.no_grad():
            self.second.weight.copy_(torch.randn(self.second.weight.shape, generator=gen))
            self.second.bias.copy_(torch.randn(self.second.bias.shape, generator=gen))

    def members(self, features, inner):
        samples, batch, width = features.shape
        second = self.second(features.reshape(samples * batch, width)).reshape(samples, batch, -1)
        return torch.stack([inner(features), second], dim=1).reshape(2 * samples, batch, -1)


def trained_bn(model: nn.Module, size: int = 8) -> nn.Module:
    """Set BatchNorm's running statistics to those of one random batch, then eval mode.

    Random-init deep nets (torchvision's EfficientNet) otherwise shrink their features
    to ~1e-14 in eval mode. The train-mode pass runs on a forked, seeded global RNG.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives its exact statistics
    gen = torch.Generator().manual_seed(3)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(3)
        model.train()(torch.randn(32, 3, size, size, generator=gen) * 2 + 1)
    return model.eval()


def images(n: int = 12, seed: int = 0, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def quiet_wrap(model: nn.Module, plugins: list) -> wrapcal.WrappedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return wrapcal.wrap(model, plugins).eval()


# --- scores ---------------------------------------------------------------------------


def loop_scores(members: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    """The five scores written out with a plain loop over inputs and samples (numpy)."""
    t, b, k = members.shape
    out = {name: np.zeros(b) for name in SCORE_NAMES}
    for i in range(b):
        probs = []
        for s in range(t):
            z = members[s, i] - members[s, i].max()
            probs.append(np.exp(z) / np.exp(z).sum())
        probs = np.array(probs)  # [T, K]
        mean = probs.mean(axis=0)
        total = -sum(q * math.log(q) for q in mean if q > 0)
        aleatoric = np.mean([-sum(q * math.log(q) for q in row if q > 0) for row in probs])
        votes = np.bincount(probs.argmax(axis=1), minlength=k)
        top = probs[:, label[i]]
        out["predictive_entropy"][i] = total
        out["expected_entropy"][i] = aleatoric
        out["mutual_information"][i] = total - aleatoric
        out["variation_ratio"][i] = 1 - votes.max() / t
        out["std_top_prob"][i] = math.sqrt(np.mean((top - top.mean()) ** 2))
    return out


def test_scores_match_plain_loop_and_identities() -> None:
    gen = torch.Generator().manual_seed(0)
    members = torch.randn(7, 40, 6, generator=gen, dtype=torch.float64) * 3
    label = torch.randint(0, 6, (40,), generator=gen)
    scores = mc_scores(members, label)
    expected = loop_scores(members.numpy(), label.numpy())
    for name in SCORE_NAMES:
        np.testing.assert_allclose(scores[name].numpy(), expected[name], atol=1e-10, err_msg=name)
    mi = scores["mutual_information"]
    assert (mi >= 0).all()
    torch.testing.assert_close(
        scores["predictive_entropy"], scores["expected_entropy"] + mi, atol=1e-12, rtol=0
    )
    assert ((scores["variation_ratio"] >= 0) & (scores["variation_ratio"] <= 1 - 1 / 7)).all()
    # Identical members: no epistemic uncertainty, no disagreement.
    same = mc_scores(members[:1].expand(5, -1, -1), label)
    assert torch.allclose(same["mutual_information"], torch.zeros(40, dtype=torch.float64))
    assert not same["variation_ratio"].any() and not same["std_top_prob"].any()


def test_predict_scores_are_those_of_the_members() -> None:
    wrapped = quiet_wrap(trained_bn(DropNet()), [("mc_dropout", {"samples": 9})])
    x = images()
    pred = wrapped.predict(x)
    with torch.no_grad():
        members = wrapped.members(x)
    assert members.shape == (9, 12, 5)
    expected = loop_scores(members.numpy(), pred.label.numpy())
    for name in SCORE_NAMES:
        np.testing.assert_allclose(pred.scores[name].numpy(), expected[name], atol=1e-5)
    # The prediction is the mean of the T softmax outputs.
    torch.testing.assert_close(pred.probs, members.softmax(-1).mean(0))
    assert {"msp", "entropy"} <= set(pred.scores)


# --- the head samples -------------------------------------------------------------------


def test_head_members_are_the_head_on_masked_features() -> None:
    model = trained_bn(DropNet(p=0.3))
    wrapped = quiet_wrap(model, [("mc_dropout", {"samples": 6})])
    plugin = wrapped.get_plugin("mc_dropout")
    assert plugin.p_ == 0.3  # the model's own Dropout, just before the head
    x = images()
    with torch.no_grad():
        features = wrapped.backbone(x)
        members = wrapped.members(x)
        masks = plugin.feature_masks(16)
        for t in range(6):
            torch.testing.assert_close(members[t], model.fc(features * masks[t]))
    # Inverted dropout: kept units scaled by 1 / (1 - p), the others zero.
    assert set(torch.unique(masks).tolist()) <= {0.0, torch.tensor(1 / 0.7).item()}
    big = MCDropout(samples=200, p=0.3)
    big.p_ = 0.3
    dropped = (big.feature_masks(500) == 0).double().mean().item()
    assert abs(dropped - 0.3) < 0.01
    # One batched call: the backbone ran once, the head saw T * N rows at once.
    calls = []
    wrapped.backbone.model.conv.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    wrapped.head.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    wrapped.predict(x)
    assert calls == [12, 6 * 12]


def test_one_sample_without_dropout_is_the_bare_model() -> None:
    model = trained_bn(DropNet())
    wrapped = quiet_wrap(model, [("mc_dropout", {"samples": 1, "p": 0.0})])
    x = images()
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))
        assert torch.equal(wrapped.predict(x).probs, model(x).softmax(-1))
    # p = 0 with many samples: identical members, zero epistemic uncertainty.
    many = quiet_wrap(model, [("mc_dropout", {"samples": 5, "p": 0.0})])
    pred = many.predict(x)
    torch.testing.assert_close(pred.probs, model(x).softmax(-1).detach())
    assert pred.scores["mutual_information"].abs().max() < 1e-6  # rounding only
    assert not pred.scores["variation_ratio"].any()


def test_seeded_reproducible_batch_invariant_and_global_rng_untouched() -> None:
    model = trained_bn(DropNet())
    x = images(20)
    rng = torch.get_rng_state()
    a = quiet_wrap(model, [("mc_dropout", {"samples": 8, "seed": 5})])
    first, second = a.predict(x), a.predict(x)
    assert torch.equal(first.probs, second.probs)
    for name in SCORE_NAMES:
        assert torch.equal(first.scores[name], second.scores[name])
    # The same T thinned heads for every input: any batching gives the same outputs.
    parts = a.predict(x, batch_size=7)
    torch.testing.assert_close(parts.probs, first.probs)
    torch.testing.assert_close(a.predict(x[13:17]).probs, first.probs[13:17])
    other = quiet_wrap(model, [("mc_dropout", {"samples": 8, "seed": 6})]).predict(x)
    assert not torch.allclose(other.probs, first.probs)
    # scope="all": reproducible for the same batch as well.
    b = quiet_wrap(model, [("mc_dropout", {"samples": 8, "scope": "all", "seed": 5})])
    assert torch.equal(b.predict(x).probs, b.predict(x).probs)
    assert torch.equal(torch.get_rng_state(), rng)


# --- BatchNorm stays in eval mode -------------------------------------------------------


@pytest.mark.parametrize("scope", ["head", "all"])
def test_batchnorm_stays_in_eval_mode_under_sampling(scope: str) -> None:
    model = trained_bn(DropNet())
    wrapped = quiet_wrap(model, [("mc_dropout", {"samples": 10, "scope": scope})])
    bn = wrapped.backbone.model.bn
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    modes = []
    bn.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    pred = wrapped.predict(images(16))
    assert modes and not any(modes)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, stats[key]), key
    assert not wrapped.backbone.model.drop.training
    assert (pred.scores["mutual_information"] > 0).any()


def test_batchnorm_only_model_is_deterministic() -> None:
    model = trained_bn(BNNet())
    x = images(16)
    wrapped = quiet_wrap(model, [("mc_dropout", {"samples": 4, "p": 0.0})])
    with torch.no_grad():
        members = wrapped.members(x)
        bare = model(x)
    # Running statistics (not batch statistics) are used: equal to the eval model, and
    # each input's output does not depend on the rest of the batch.
    for t in range(4):
        assert torch.equal(members[t], bare)
    torch.testing.assert_close(wrapped.predict(x[:3]).probs, bare[:3].softmax(-1))
    with pytest.raises(ValueError, match=r"BNNet.*scope='head'"):
        wrapcal.wrap(model, [("mc_dropout", {"scope": "all"})])


# --- scope="all" ------------------------------------------------------------------------


def test_scope_all_samples_dropout_modules_like_train_mode() -> None:
    model = trained_bn(DropNet(p=0.4))
    params = {"samples": 1000, "scope": "all", "max_batch": 3000}
    wrapped = quiet_wrap(model, [("mc_dropout", params)])
    assert wrapped.get_plugin("mc_dropout").pass_p_ == 0.0  # the Dropout module does it
    x = images(3)
    with torch.no_grad():
        members = wrapped.members(x)
    assert members.shape == (1000, 3, 5)
    assert members.std(dim=0).min() > 1e-3  # the samples vary
    # The same distribution as the dropout module in train mode (global RNG, forked here).
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        model.drop.train()
        reference = model(x.repeat(1000, 1, 1, 1)).reshape(1000, 3, 5)
        model.drop.eval()
    # Standard errors here: ~0.004 for the means, ~2% for the stds (which are 0.06-0.12).
    torch.testing.assert_close(members.mean(0), reference.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(members.std(0), reference.std(0), atol=0.005, rtol=0.1)
    # Chunks bounded by max_batch give the same shapes and run more backbone calls.
    small = quiet_wrap(model, [("mc_dropout", {"samples": 10, "scope": "all", "max_batch": 7})])
    calls = []
    small.backbone.model.conv.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    assert small.members(x).shape == (10, 3, 5)
    assert calls == [6, 6, 6, 6, 6]  # two samples of 3 inputs per call


def test_seeded_dropout_kinds_match_torch_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, 6, 6, generator=gen)
    y = seeded_dropout(x, 0.25, gen, nn.Dropout)
    zero = y == 0
    assert abs(zero.double().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(y[~zero], x[~zero] / 0.75)
    y2 = seeded_dropout(x, 0.25, gen, nn.Dropout2d)
    per_channel = (y2 == 0).flatten(2).all(-1) | (y2 != 0).flatten(2).all(-1)
    assert per_channel.all()  # whole channels dropped or kept
    # Alpha dropout keeps a standard normal input at mean 0, variance 1, like torch's.
    z = torch.randn(200_000, generator=gen)
    ours = seeded_dropout(z, 0.2, gen, nn.AlphaDropout)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = nn.AlphaDropout(0.2).train()(z)
    for a, b in ((ours.mean(), theirs.mean()), (ours.var(), theirs.var())):
        assert abs(a.item() - b.item()) < 0.02
    assert torch.equal(seeded_dropout(x, 0.0, gen), x)


# --- composition ------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["head", "all"])
def test_composition_with_two_heads(scope: str) -> None:
    model = trained_bn(DropNet())
    wrapped = quiet_wrap(model, [("mc_dropout", {"samples": 4, "scope": scope}), TwoHeads()])
    x = images(5)
    with torch.no_grad():
        members = wrapped.members(x)
        assert members.shape == (4 * 2, 5, 5)
        if scope == "head":
            heads = (model.fc, wrapped.get_plugin(TwoHeads).second)
            masks = wrapped.get_plugin("mc_dropout").feature_masks(16)
            features = wrapped.backbone(x)
            for t in range(4):
                for h, head in enumerate(heads):
                    torch.testing.assert_close(members[t * 2 + h], head(features * masks[t]))
        else:
            # Both heads see the same sampled features: member t*2 and t*2+1 come from
            # one backbone pass, so each pair differs from the other pairs.
            assert not torch.allclose(members[0], members[2])
    assert wrapped.predict(x).scores["mutual_information"].shape == (5,)


# --- real architectures -----------------------------------------------------------------


def test_default_rate_comes_from_the_models_head_dropout() -> None:
    cases = [
        (timm.create_model("resnet18", num_classes=4, drop_rate=0.25), 0.25),  # F.dropout
        (trained_bn(torchvision.models.efficientnet_b0(num_classes=4), 32), 0.2),  # classifier.0
        (
            timm.create_model(
                "vit_tiny_patch16_224", num_classes=4, drop_rate=0.15, img_size=32, patch_size=16
            ),
            0.15,  # head_drop
        ),
    ]
    for model, rate in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # trained with it: no warning
            wrapped = wrapcal.wrap(model.eval(), [("mc_dropout", {"samples": 5})])
        plugin = wrapped.get_plugin("mc_dropout")
        assert plugin.p_ == rate
        x = images(2, size=32)
        pred = wrapped.predict(x)
        assert pred.probs.shape == (2, 4)
        assert (pred.scores["mutual_information"] > 0).all()
        with torch.no_grad():
            members, features = wrapped.members(x), wrapped.backbone(x)
            for t, mask in enumerate(plugin.feature_masks(features.shape[1])):
                torch.testing.assert_close(members[t], wrapped.head(features * mask))
    resnet = torchvision.models.resnet18(num_classes=4).eval()
    with pytest.warns(UserWarning, match="not trained with"):
        wrapped = wrapcal.wrap(resnet, [("mc_dropout", {})])
    assert wrapped.get_plugin("mc_dropout").p_ == DEFAULT_P
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        wrapcal.wrap(resnet, [("mc_dropout", {"finetune": True})])
    with pytest.raises(ValueError, match=r"ResNet.*scope='head'"):
        wrapcal.wrap(resnet, [("mc_dropout", {"scope": "all"})])


def test_scope_all_on_timm_vit_and_torchvision_efficientnet() -> None:
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=4, proj_drop_rate=0.1, img_size=32, patch_size=16
    ).eval()
    wrapped = quiet_wrap(vit, [("mc_dropout", {"samples": 3, "scope": "all"})])
    # 12 blocks x (attn.proj_drop, mlp.drop1, mlp.drop2); attn_drop has p = 0.
    assert len(wrapped.get_plugin("mc_dropout").dropout_modules_) == 36
    with torch.no_grad():
        members = wrapped.members(images(2, size=32))
    assert members.shape == (3, 2, 4) and not torch.allclose(members[0], members[1])
    eff = trained_bn(torchvision.models.efficientnet_b0(num_classes=4), 32)
    with pytest.warns(UserWarning, match="only dropout is at its head"):
        wrapped = wrapcal.wrap(eff, [("mc_dropout", {"samples": 3, "scope": "all"})])
    with torch.no_grad():
        members = wrapped.eval().members(images(2, size=32))
    assert members.shape == (3, 2, 4) and not torch.allclose(members[0], members[1])


# --- fine-tuning, parameters, save/load --------------------------------------------------


def feature_data(n: int = 600, d: int = 8, k: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=gen)
    centres = torch.randn(k, d, generator=gen) * 2
    return torch.relu(centres[labels] + torch.randn(n, d, generator=gen)), labels


def test_finetune_trains_the_head_with_dropout_reproducibly() -> None:
    feats, labels = feature_data()
    base = trained_bn(BNNet())
    params = {"finetune": True, "epochs": 20, "lr": 0.05}

    def fitted(seed: int) -> wrapcal.WrappedModel:
        w = wrapcal.wrap(base, [("mc_dropout", params)])
        with pytest.raises(NotFittedError):
            w.predict(images(2))
        return w.fit_features(train=(feats, labels), seed=seed, progress=False)

    before = quiet_wrap(base, [("mc_dropout", {"p": 0.1})])
    a, b, c = fitted(0), fitted(0), fitted(1)
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)
    assert not torch.equal(a.head.weight, before.head.weight)
    acc_before = accuracy(before.head_logits(feats).softmax(-1), labels)
    acc_after = accuracy(a.head_logits(feats).softmax(-1), labels)
    assert acc_after > acc_before + 0.3  # the random head learnt the classes
    with pytest.raises(DataError, match="train"):
        wrapcal.wrap(BNNet(), [("mc_dropout", {"finetune": True})]).fit_features(
            calibration=(feats, labels), progress=False
        )


def test_bad_parameters_are_refused() -> None:
    for params in (
        {"p": 1.0},
        {"p": -0.1},
        {"samples": 0},
        {"scope": "backbone"},
        {"scope": "all", "finetune": True},
        {"max_batch": 0},
    ):
        with pytest.raises(ValueError, match="mc_dropout"):
            quiet_wrap(DropNet(), [("mc_dropout", params)])


@pytest.mark.parametrize("scope", ["head", "all"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, scope: str) -> None:
    feats, labels = feature_data(d=16)
    model = trained_bn(DropNet())
    params = {"samples": 7, "seed": 11, "scope": scope, "finetune": scope == "head"}
    wrapped = quiet_wrap(model, [("mc_dropout", params)])
    wrapped.fit_features(train=(feats, labels), progress=False)
    plugin = wrapped.get_plugin("mc_dropout")
    assert json.loads(json.dumps(plugin.get_params())) == {
        "samples": 7,
        "p": None,
        "scope": scope,
        "finetune": scope == "head",
        "epochs": 5,
        "lr": 1e-3,
        "seed": 11,
        "max_batch": 256,
    }
    path = wrapped.save(tmp_path / "mc.wrapcal")
    loaded = wrapcal.load(path, model=DropNet())
    x = images(10)
    before, after = wrapped.predict(x), loaded.predict(x)
    assert torch.equal(before.logits, after.logits)
    for name in SCORE_NAMES:
        assert torch.equal(before.scores[name], after.scores[name])


# --- real data: the pretrained ResNet-20, CIFAR-10 (JPEG) vs MNIST ------------------------


def ood_row(scores_in: torch.Tensor, scores_out: torch.Tensor) -> tuple[float, float]:
    value = auroc(scores_in, scores_out)
    # Independent check of the convention: ID positive, lower score = more ID.
    is_id = np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))]
    sk = roc_auc_score(is_id, -np.r_[scores_in.numpy(), scores_out.numpy()])
    assert abs(value - sk) < 1e-9
    return value, fpr_at_tpr(scores_in, scores_out, 0.95)


@pytest.mark.slow
@requires_shared_data
def test_resnet20_cifar10_vs_mnist() -> None:
    out = resnet20_outputs()
    wrapped = wrapcal.wrap(pretrained_resnet20(), [("mc_dropout", {"finetune": True})])
    plugin = wrapped.get_plugin("mc_dropout")
    assert plugin.p_ == DEFAULT_P  # ResNet-20 has no dropout: inserted and fine-tuned
    wrapped.fit_features(train=(out["train_features"], out["train_labels"]), progress=False)

    def from_features(features: torch.Tensor):
        with torch.no_grad():
            members = wrapped.head_members(features)
            probs = wrapped.finish(members).softmax(-1)
        return probs, mc_scores(members, probs.argmax(-1))

    probs_in, mc_in = from_features(out["test_features"])
    probs_out, mc_out = from_features(out["mnist_features"])
    labels = out["test_labels"]
    bare_in, bare_out = out["test_logits"].softmax(-1), out["mnist_logits"].softmax(-1)
    rows = {
        "MSP (bare)": ood_row(1 - bare_in.max(-1).values, 1 - bare_out.max(-1).values),
        "MSP (MC mean)": ood_row(1 - probs_in.max(-1).values, 1 - probs_out.max(-1).values),
        "predictive entropy": ood_row(mc_in["predictive_entropy"], mc_out["predictive_entropy"]),
        "mutual information": ood_row(mc_in["mutual_information"], mc_out["mutual_information"]),
        "variation ratio": ood_row(mc_in["variation_ratio"], mc_out["variation_ratio"]),
        "std top prob": ood_row(mc_in["std_top_prob"], mc_out["std_top_prob"]),
    }
    acc = {"bare": accuracy(bare_in, labels), "mc": accuracy(probs_in, labels)}
    eces = {"bare": ece(bare_in, labels), "mc": ece(probs_in, labels)}

    # The bare numbers are the published ones: the data and the baseline are right.
    assert abs(acc["bare"] - 0.810) < 0.005 and abs(eces["bare"] - 0.125) < 0.01
    # Sanity, not salesmanship: every score beats chance; MC keeps the accuracy.
    for name, (a, f) in rows.items():
        assert 0.5 < a <= 1 and 0 <= f <= 1, name
    assert acc["mc"] > acc["bare"] - 0.01
    assert math.isfinite(eces["mc"]) and 0 <= eces["mc"] < 1
    # Measured: the MC mean is better calibrated than the bare model (0.071 vs 0.125).
    assert eces["mc"] < eces["bare"]
    for scores in (mc_in, mc_out):
        torch.testing.assert_close(
            scores["predictive_entropy"],
            scores["expected_entropy"] + scores["mutual_information"],
            atol=1e-5,
            rtol=0,
        )
        assert (scores["mutual_information"] >= 0).all()
    # MNIST is more uncertain than CIFAR on average, as the AUROCs above say.
    assert mc_out["mutual_information"].mean() > mc_in["mutual_information"].mean()

    # The feature path agrees with predict on images (same T heads for every input).
    for x, scores, probs in (
        (cifar10("test")[0][:128], mc_in, probs_in),
        (mnist_ood(128), mc_out, probs_out),
    ):
        pred = wrapped.predict(x)
        torch.testing.assert_close(pred.probs, probs[:128], atol=1e-4, rtol=0)
        torch.testing.assert_close(
            pred.scores["mutual_information"], scores["mutual_information"][:128], atol=1e-4, rtol=0
        )
