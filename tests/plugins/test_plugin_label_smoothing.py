"""Label smoothing: the loss, head retraining, alpha="auto", scope="all", real data.

Cross-checks use implementations written here: the smoothed cross-entropy and its
gradient in numpy, scikit-learn's ``LogisticRegression`` (the same objective at
``alpha = 0``), the optimality condition of the smoothed objective in numpy, a
temperature fit with ``scipy.optimize.minimize_scalar`` and an ECE formula in numpy.

The slow test builds Müller et al.'s Table 3 (baseline / temperature scaling / label
smoothing, plus smoothing followed by temperature scaling) for the pretrained ResNet-20
on ``cifar10_jpeg.npz`` and checks it; ``python benchmarks/label_smoothing_table.py``
prints it (the table in ``docs/label_smoothing.md``).
"""

from __future__ import annotations

import copy
import json
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from references import ece_np, nll_np, scipy_temperature
from scipy.special import log_softmax, softmax
from shared_data import pretrained_resnet20, requires_shared_data, resnet20_outputs
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import wrapcal
from wrapcal import DataError, Plugin, Stage, get_tags
from wrapcal.datasets import digits
from wrapcal.metrics import accuracy, ece, ece_bootstrap, nll
from wrapcal.model.assemble import create_plugin
from wrapcal.plugin.training import fit_head_lbfgs, train_head
from wrapcal_plugins.retrain.label_smoothing import (
    DEFAULT_GRID,
    LabelSmoothing,
    smoothed_cross_entropy,
    smoothed_targets,
)

# --- independent references -------------------------------------------------------------


def smoothed_ce_np(logits: np.ndarray, labels: np.ndarray, alpha: float) -> float:
    """-sum_k q_k log p_k averaged over samples, q = y (1 - alpha) + alpha / K, written out."""
    n, k = logits.shape
    q = np.full((n, k), alpha / k)
    q[np.arange(n), labels] += 1 - alpha
    return float(-(q * log_softmax(logits.astype(np.float64), axis=1)).sum(axis=1).mean())


def temperature_plugin_usable() -> bool:
    try:
        plugin = create_plugin("temperature")
    except Exception:
        return False
    return isinstance(plugin, Plugin) and get_tags(plugin).stage == Stage.CALIBRATE


# --- small models and data ---------------------------------------------------------------

K, D = 4, 20
CENTERS = torch.randn(K, D, generator=torch.Generator().manual_seed(123)) * 0.5


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian classes: 150 training points overfit, so smoothing helps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    return CENTERS[y] + torch.randn(n, D, generator=g), y


def linear_model(d: int = D, k: int = K) -> nn.Module:
    """features -> Linear: the backbone is the identity, so the features are the inputs."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Identity(), nn.Linear(d, k))


class TinyCNN(nn.Module):
    """A small CNN with BatchNorm for the digits data (97% accuracy in 4 epochs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, 4)  # the 32x32 digits are upsampled 8x8 images
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run this module on one intra-op thread, as the plugin does for small heads.

    The CNN and head fits here are many millisecond-sized ops; on a shared 2-core
    machine a second thread's synchronisation made them 3-8x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits_data():
    return digits()


@pytest.fixture(scope="module")
def trained_cnn(digits_data) -> TinyCNN:
    """TinyCNN trained with plain cross-entropy, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = digits_data.train
    model.train()
    for _ in range(4):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in module.state_dict().items()
        if "running_" in k or "num_batches_tracked" in k
    }


def modes(module: nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


# --- the loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.1, 0.3])
def test_smoothed_loss_matches_formula_and_torch(alpha):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 7, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 7, (64,), generator=g)
    expected = smoothed_ce_np(logits.numpy(), labels.numpy(), alpha)
    ours = float(smoothed_cross_entropy(logits, labels, alpha))
    # torch's definition (docs: targets become (1 - alpha) * onehot + alpha / K) agrees.
    theirs = float(F.cross_entropy(logits, labels, label_smoothing=alpha))
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert theirs == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # The explicit target distribution, and the gradient softmax(z) - q (per sample / N).
    q = np.full((64, 7), alpha / 7)
    q[np.arange(64), labels.numpy()] += 1 - alpha
    np.testing.assert_allclose(smoothed_targets(labels, 7, alpha).numpy(), q, rtol=1e-6)
    z = logits.clone().requires_grad_(True)
    smoothed_cross_entropy(z, labels, alpha).backward()
    grad_expected = (softmax(logits.numpy(), axis=1) - q) / 64
    np.testing.assert_allclose(z.grad.numpy(), grad_expected, atol=1e-12)


def test_alpha_zero_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(50, 10, generator=g), torch.randint(0, 10, (50,), generator=g)
    ours = smoothed_cross_entropy(logits, labels, 0.0)
    assert torch.allclose(ours, F.cross_entropy(logits, labels), rtol=1e-6, atol=0)
    assert torch.equal(smoothed_targets(labels, 10, 0.0), F.one_hot(labels, 10).float())


def test_single_logit_binary_is_smoothed_bce():
    g = torch.Generator().manual_seed(3)
    logit, labels = torch.randn(40, 1, generator=g), torch.randint(0, 2, (40,), generator=g)
    alpha = 0.1
    target = labels.float() * (1 - alpha) + alpha / 2  # K = 2 for one logit
    expected = F.binary_cross_entropy_with_logits(logit[:, 0], target)
    assert float(smoothed_cross_entropy(logit, labels, alpha)) == pytest.approx(float(expected))


# --- scope="head" --------------------------------------------------------------------------


def test_head_alpha_zero_matches_sklearn_logistic_regression():
    x, y = blobs(300, 1)
    wrapped = wrapcal.wrap(linear_model(), [("label_smoothing", {"alpha": 0.0})])
    wrapped.fit_features(train=(x, y), progress=False)
    # The same objective at the default weight_decay = 1e-4: mean CE + wd/2 ||W||^2 is
    # sum CE + 1/(2C) ||W||^2 with C = 1/(wd N), the intercept unpenalised in both.
    reference = LogisticRegression(C=1 / (1e-4 * len(x)), tol=1e-10, max_iter=10_000)
    reference.fit(x.numpy().astype(np.float64), y.numpy())
    probs = wrapped.predict(x).probs.numpy()
    np.testing.assert_allclose(probs, reference.predict_proba(x.numpy()), atol=2e-3)


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_head_reaches_optimum_of_smoothed_objective(alpha):
    x, y = blobs(300, 1)
    plugin = LabelSmoothing(alpha=alpha, weight_decay=1e-3)
    wrapped = wrapcal.wrap(linear_model(), [plugin])
    head = wrapped.head
    before = head.weight.detach().clone()
    wrapped.fit_features(train=(x, y), progress=False)
    assert wrapped.head is head and not torch.equal(head.weight, before)  # in place
    assert plugin.alpha_ == alpha
    # Stationarity written out: (P - Q)^T X / N + wd W = 0 and mean(P - Q) = 0.
    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    xs = x.double().numpy()
    p = softmax(xs @ w.T + b, axis=1)
    q = np.full_like(p, alpha / K)
    q[np.arange(len(y)), y.numpy()] += 1 - alpha
    grad_w = (p - q).T @ xs / len(xs) + 1e-3 * w
    grad_b = (p - q).mean(0)
    assert np.abs(grad_w).max() < 1e-4 and np.abs(grad_b).max() < 1e-4


def test_head_scope_runs_no_extra_backbone_pass(trained_cnn, digits_data):
    wrapped = wrapcal.wrap(trained_cnn, [("label_smoothing", {"alpha": 0.1})])
    backbone_before = {k: v.clone() for k, v in wrapped.backbone.state_dict().items()}
    head_before = wrapped.head.weight.detach().clone()
    wrapped.fit(train=digits_data.train, calibration=digits_data.calibration, progress=False)
    assert wrapped.backbone_passes == 2  # train and calibration, once each
    assert not get_tags(LabelSmoothing(scope="head")).changes_backbone
    assert all(torch.equal(v, wrapped.backbone.state_dict()[k]) for k, v in backbone_before.items())
    assert not torch.equal(wrapped.head.weight, head_before)
    x, y = digits_data.test
    assert accuracy(wrapped.predict(x).probs, y) > 0.9


def test_auto_picks_the_grid_point_with_lowest_calibration_nll():
    train, cal, test = blobs(150, 1), blobs(1000, 2), blobs(500, 3)
    grid = [0.0, 0.02, 0.05, 0.1, 0.2, 0.4]
    auto = LabelSmoothing(alpha="auto", grid=grid)
    wrapped = wrapcal.wrap(linear_model(), [auto])
    wrapped.fit_features(train=train, calibration=cal, progress=False)
    # Recompute every grid point with an independent fixed-alpha fit.
    recomputed, outputs = [], {}
    for alpha in grid:
        fixed = wrapcal.wrap(linear_model(), [("label_smoothing", {"alpha": alpha})])
        fixed.fit_features(train=train, progress=False)
        with torch.no_grad():
            recomputed.append(nll_np(fixed.head(cal[0]).numpy(), cal[1].numpy()))
            outputs[alpha] = fixed.head(test[0])
    best = grid[int(np.argmin(recomputed))]
    assert auto.alpha_ == best
    assert 0 < best < max(grid)  # this data has an interior optimum: the test discriminates
    np.testing.assert_allclose([v for _, v in auto.grid_nll_], recomputed, rtol=1e-5)
    assert [a for a, _ in auto.grid_nll_] == grid
    with torch.no_grad():
        assert torch.allclose(wrapped.head(test[0]), outputs[best], atol=1e-5)


def test_errors_name_the_missing_data_and_the_fix():
    x, y = blobs(100, 1)
    wrapped = wrapcal.wrap(linear_model(), ["label_smoothing"])
    with pytest.raises(DataError, match=r"label_smoothing needs wrapped\.fit\(train=\.\.\.\)"):
        wrapped.fit_features(calibration=(x, y), progress=False)
    with pytest.raises(DataError, match="label_smoothing needs labels"):
        wrapped.fit_features(train=x, progress=False)
    auto = wrapcal.wrap(linear_model(), [("label_smoothing", {"alpha": "auto"})])
    with pytest.raises(DataError, match=r"fit\(calibration=\.\.\.\).*alpha=\"auto\""):
        auto.fit_features(train=(x, y), progress=False)
    whole = wrapcal.wrap(linear_model(), [("label_smoothing", {"scope": "all"})])
    with pytest.raises(DataError, match=r"scope=\"all\".*wrapped\.fit\(train="):
        whole.fit_features(train=(x, y), progress=False)
    for bad in ({"alpha": 1.0}, {"alpha": "big"}, {"alpha": True}, {"scope": "backbone"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            wrapcal.wrap(linear_model(), [("label_smoothing", bad)])
    with pytest.raises(ValueError, match="optimizer"):
        wrapcal.wrap(linear_model(), [("label_smoothing", {"optimizer": "rmsprop"})])


def test_params_and_state_are_json_and_round_trip(tmp_path):
    train, cal = blobs(150, 1), blobs(300, 2)
    wrapped = wrapcal.wrap(linear_model(), [("label_smoothing", {"alpha": "auto"})])
    wrapped.fit_features(train=train, calibration=cal, progress=False)
    plugin = wrapped.get_plugin("label_smoothing")
    state = json.loads(json.dumps(plugin.get_state()))
    assert state["alpha_"] == plugin.alpha_ and len(state["grid_nll_"]) == len(DEFAULT_GRID)
    json.dumps(plugin.get_params())
    path = wrapped.save(tmp_path / "ls.wrapcal")
    loaded = wrapcal.load(path, model=linear_model())
    again = loaded.get_plugin("label_smoothing")
    assert again.alpha_ == plugin.alpha_ and again.grid_nll_ == plugin.grid_nll_
    assert torch.equal(loaded(cal[0]), wrapped.eval()(cal[0]))


def test_order_in_the_list_does_not_matter_with_temperature():
    if not temperature_plugin_usable():
        pytest.skip("the temperature plugin is not usable in this checkout")
    train, cal, test = blobs(150, 1), blobs(1000, 2), blobs(500, 3)
    outputs, temperatures = [], []
    for plugins in (["temperature", "label_smoothing"], ["label_smoothing", "temperature"]):
        wrapped = wrapcal.wrap(linear_model(), plugins)
        wrapped.fit_features(train=train, calibration=cal, seed=0, progress=False)
        assert wrapped.plugin_names == ["label_smoothing", "temperature"]
        outputs.append(wrapped(test[0]))
        temperatures.append(wrapped.get_plugin("temperature").temperature_)
        # Temperature was fitted on the retrained head's logits, not the original's.
        with torch.no_grad():
            cal_logits = wrapped.head(cal[0]).numpy()
        assert temperatures[-1] == pytest.approx(
            scipy_temperature(cal_logits, cal[1].numpy()), 1e-4
        )
    assert torch.equal(outputs[0], outputs[1])
    assert temperatures[0] == temperatures[1]


# --- scope="all" --------------------------------------------------------------------------


def fine_tune(model: nn.Module, data, train_mode: bool = False, **params):
    plugin = {"scope": "all", "alpha": 0.1, "batch_size": 64, **params}
    wrapped = wrapcal.wrap(model, [("label_smoothing", plugin)])
    if train_mode:
        wrapped.train()  # wrap gives an inference object in eval mode; the user may train
    wrapped.fit(train=data.train, calibration=data.calibration, progress=False)
    return wrapped


def test_scope_all_early_stops_and_restores_the_best_epoch(trained_cnn, digits_data):
    wrapped = wrapcal.wrap(trained_cnn, [])
    stats_before = bn_buffers(wrapped.backbone)
    modes_before = modes(wrapped.backbone) + modes(wrapped.head)
    wrapped = fine_tune(trained_cnn, digits_data, lr=0.05, epochs=8, patience=1)
    plugin = wrapped.get_plugin("label_smoothing")
    history = plugin.history_
    assert get_tags(plugin).changes_backbone
    assert 1 <= len(history) < 8  # stopped early
    assert plugin.best_epoch_ == int(np.argmin(history)) + 1 < len(history)
    assert all(h >= min(history) for h in history[plugin.best_epoch_ :])
    # The model in hand is the best epoch's: its calibration NLL, recomputed here through
    # the whole network, is the minimum, not the last epoch's.
    x_cal, y_cal = digits_data.calibration
    cal_nll = nll_np(wrapped(x_cal).detach().numpy(), y_cal.numpy())
    assert cal_nll == pytest.approx(min(history), rel=1e-4)
    assert cal_nll < history[-1] - 1e-4
    # Backbone passes: 2 to cache features, one per epoch on train and on calibration,
    # 2 to recompute the cache after the backbone changed.
    assert wrapped.backbone_passes == 2 + 2 * len(history) + 2
    # Frozen BatchNorm: running statistics untouched, affine weights trained.
    after = bn_buffers(wrapped.backbone)
    assert stats_before.keys() == after.keys() and len(after) == 6
    assert all(torch.equal(stats_before[k], after[k]) for k in after)
    assert not torch.equal(wrapped.backbone.model.bn1.weight, trained_cnn.bn1.weight)
    assert modes(wrapped.backbone) + modes(wrapped.head) == modes_before  # eval restored
    x, y = digits_data.test
    assert accuracy(wrapped.predict(x).probs, y) > 0.9


def test_scope_all_without_frozen_bn_updates_running_stats(trained_cnn, digits_data):
    wrapped = fine_tune(trained_cnn, digits_data, freeze_bn=False, epochs=2)
    after = wrapped.backbone.model
    assert not torch.equal(after.bn1.running_mean, trained_cnn.bn1.running_mean)
    assert int(after.bn1.num_batches_tracked) > int(trained_cnn.bn1.num_batches_tracked)
    assert not any(modes(wrapped))
    # A wrapped model its user put in train mode is left in train mode, frozen BatchNorm
    # included.
    training = fine_tune(copy.deepcopy(trained_cnn), digits_data, train_mode=True, epochs=1)
    assert all(modes(training.backbone)) and all(modes(training.head))


def test_scope_all_is_seeded_and_runs_without_calibration(trained_cnn, digits_data):
    def run(seed: int) -> tuple[wrapcal.WrappedModel, LabelSmoothing]:
        plugin = LabelSmoothing(scope="all", epochs=2, batch_size=64, optimizer="adam", lr=1e-3)
        wrapped = wrapcal.wrap(trained_cnn, [plugin])
        x, y = digits_data.train
        wrapped.fit(train=(x[:400], y[:400]), seed=seed, progress=False)
        return wrapped, plugin

    (a, pa), (b, _), (c, _) = run(0), run(0), run(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert pa.history_ == [] and pa.best_epoch_ == 2  # no calibration: all epochs, last kept


def test_scope_all_reads_datasets_and_loaders(trained_cnn, digits_data):
    x, y = digits_data.train
    for train in (TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=100)):
        wrapped = wrapcal.wrap(trained_cnn, [("label_smoothing", {"scope": "all", "epochs": 1})])
        wrapped.fit(train=train, calibration=digits_data.calibration, progress=False)
        assert len(wrapped.get_plugin("label_smoothing").history_) == 1
    unlabeled = wrapcal.wrap(trained_cnn, [("label_smoothing", {"scope": "all", "epochs": 1})])
    with pytest.raises(DataError, match="labels"):
        unlabeled.fit(train=x, progress=False)


def test_scope_all_auto_keeps_the_alpha_with_the_lowest_calibration_nll(trained_cnn, digits_data):
    wrapped = fine_tune(trained_cnn, digits_data, alpha="auto", grid=[0.0, 0.3], epochs=1)
    plugin = wrapped.get_plugin("label_smoothing")
    nlls = dict((a, v) for a, v in plugin.grid_nll_)
    assert sorted(nlls) == [0.0, 0.3] and plugin.alpha_ == min(nlls, key=nlls.get)
    assert plugin.history_ == [nlls[plugin.alpha_]]
    x_cal, y_cal = digits_data.calibration
    cal_nll = nll_np(wrapped(x_cal).detach().numpy(), y_cal.numpy())
    assert cal_nll == pytest.approx(nlls[plugin.alpha_], rel=1e-4)  # the chosen weights


def test_scope_all_saves_and_loads(trained_cnn, digits_data, tmp_path):
    wrapped = fine_tune(trained_cnn, digits_data, epochs=2).eval()
    path = wrapped.save(tmp_path / "cnn.wrapcal")
    loaded = wrapcal.load(path, model=TinyCNN())
    x, _ = digits_data.test
    assert torch.equal(loaded(x), wrapped(x))
    plugin, again = wrapped.get_plugin("label_smoothing"), loaded.get_plugin("label_smoothing")
    assert again.get_state() == plugin.get_state() and again.scope == "all"
    assert not torch.equal(loaded(x), wrapcal.wrap(trained_cnn, [])(x))  # it was fine-tuned


# --- the shared head trainer ----------------------------------------------------------------


def test_train_head_adam_is_seeded_and_approaches_the_lbfgs_optimum():
    x, y = blobs(600, 1)
    loss = partial(smoothed_cross_entropy, alpha=0.1)
    heads = [nn.Linear(D, K) for _ in range(3)]
    for head in heads[1:]:
        head.load_state_dict(heads[0].state_dict())
    optimum = fit_head_lbfgs(heads[0], x, y, loss, weight_decay=1e-3)[-1]
    first = train_head(heads[1], x, y, loss, epochs=60, lr=1e-2, weight_decay=1e-3, seed=4)
    second = train_head(heads[2], x, y, loss, epochs=60, lr=1e-2, weight_decay=1e-3, seed=4)
    assert first == second and torch.equal(heads[1].weight, heads[2].weight)
    assert first[-1] < first[0]
    with torch.no_grad():
        final = float(loss(heads[1](x), y) + 0.5e-3 * heads[1].weight.pow(2).sum())
    assert optimum <= final + 1e-6 and final < optimum + 5e-3
    assert heads[1].training  # mode restored (a new Linear is in train mode)


# --- real data: Müller et al.'s Table 3 for the pretrained ResNet-20 -----------------------

TABLE_ALPHAS: list[float | str] = [0.0, 0.05, 0.1, "auto"]


def resnet20_table() -> tuple[list[dict], dict]:
    """Rows of the table on the evaluation half of cifar10_jpeg's test set.

    The test set is split once (seed 0) into 5000 calibration images (for temperature
    scaling and alpha="auto") and 5000 evaluation images; every row uses that split.
    The head is retrained on the 10000 training images' cached features.

    Returns:
        The rows, and facts the test checks (temperatures, grid NLLs, whether the
        temperature plugin or the scipy fit made the temperature rows).
    """
    out = resnet20_outputs()
    order = torch.randperm(10000, generator=torch.Generator().manual_seed(0))
    cal_idx, eval_idx = order[:5000], order[5000:]
    train = (out["train_features"], out["train_labels"])
    cal = (out["test_features"][cal_idx], out["test_labels"][cal_idx])
    f_eval, y_eval = out["test_features"][eval_idx], out["test_labels"][eval_idx]
    use_plugin = temperature_plugin_usable()
    rows: list[dict] = []
    facts: dict = {"temperature_plugin": use_plugin, "grid_nll": None, "cal_nll": {}}

    def add(name: str, alpha: float | None, temperature: float, logits: torch.Tensor) -> None:
        probs = torch.softmax(logits.double(), dim=1)
        rows.append(
            {
                "row": name,
                "alpha": alpha,
                "T": temperature,
                "acc": accuracy(probs, y_eval),
                "ece": ece(probs, y_eval),
                "ece_ci": ece_bootstrap(probs, y_eval, seed=0),
                "nll": nll(probs, y_eval),
                "conf": float(probs.max(1).values.mean()),
                "ece_np": ece_np(probs.numpy(), y_eval.numpy()),
            }
        )

    for alpha in [None, *TABLE_ALPHAS]:
        plugins: list = [] if alpha is None else [("label_smoothing", {"alpha": alpha})]
        plugins += ["temperature"] if use_plugin else []
        wrapped = wrapcal.wrap(pretrained_resnet20(), plugins)
        if plugins:
            wrapped.fit_features(
                train=None if alpha is None else train, calibration=cal, progress=False
            )
        with torch.no_grad():
            raw_eval, raw_cal = wrapped.head(f_eval), wrapped.head(cal[0])
        t_own = scipy_temperature(raw_cal.numpy(), cal[1].numpy())
        if use_plugin:
            t = wrapped.get_plugin("temperature").temperature_
            scaled = wrapped.head_logits(f_eval)
            assert t == pytest.approx(t_own, rel=1e-4)
        else:
            t, scaled = t_own, raw_eval / t_own
        if alpha is None:
            assert torch.allclose(raw_eval, out["test_logits"][eval_idx], atol=1e-4)
            add("baseline (pretrained head)", None, 1.0, raw_eval)
            add("baseline + temperature scaling", None, t, scaled)
            continue
        plugin = wrapped.get_plugin("label_smoothing")
        facts["cal_nll"][plugin.alpha_] = nll_np(raw_cal.numpy(), cal[1].numpy())
        if alpha == "auto":
            facts["grid_nll"], label = plugin.grid_nll_, f"auto -> {plugin.alpha_:g}"
        else:
            label = f"{alpha:g}" + (" (new data only)" if alpha == 0 else "")
        add(f"retrained head, alpha={label}", plugin.alpha_, 1.0, raw_eval)
        add(f"retrained head, alpha={label} + temperature", plugin.alpha_, t, scaled)
    return rows, facts


@pytest.mark.slow
@requires_shared_data
def test_table_label_smoothing_vs_temperature_on_resnet20():
    rows, facts = resnet20_table()
    by = {r["row"]: r for r in rows}
    base, base_ts = by["baseline (pretrained head)"], by["baseline + temperature scaling"]
    plain = by["retrained head, alpha=0 (new data only)"]
    plain_ts = by["retrained head, alpha=0 (new data only) + temperature"]
    auto_name = next(r["row"] for r in rows if "auto" in r["row"] and "temperature" not in r["row"])
    auto, auto_ts = by[auto_name], by[auto_name + " + temperature"]
    over = by["retrained head, alpha=0.1"]
    for r in rows:  # two ECE implementations agree
        assert r["ece"] == pytest.approx(r["ece_np"], abs=1e-9)
    # The published model: 81% accurate, ECE about 12.5%, fixed by temperature scaling.
    assert 0.80 < base["acc"] < 0.825 and base["ece"] > 0.10
    assert base_ts["ece"] < base["ece"] / 4 and base_ts["nll"] < base["nll"]
    for r in rows:
        # Accuracy: never more than a point below the baseline; smoothing itself moves it
        # by at most a point from the unsmoothed retrained head; temperature not at all.
        assert r["acc"] >= base["acc"] - 0.01
        if r["alpha"] is not None:
            assert abs(r["acc"] - plain["acc"]) <= 0.01
    for raw, scaled in zip(rows[::2], rows[1::2], strict=True):  # (row, row + temperature)
        assert scaled["acc"] == raw["acc"] and raw["T"] == 1.0
    # alpha="auto" chose the grid point with the lowest calibration NLL, and its numbers
    # agree with the fixed-alpha fits of the same alphas.
    grid = dict((a, v) for a, v in facts["grid_nll"])
    assert auto["alpha"] == min(grid, key=grid.get)
    for alpha in (0.0, 0.05, 0.1):
        assert grid[alpha] == pytest.approx(facts["cal_nll"][alpha], rel=1e-4)
    # Müller et al.: smoothing (alpha tuned) calibrates about as well as temperature
    # scaling, better than the unsmoothed retrained head ...
    assert auto["ece"] < plain["ece"] / 2 and auto["nll"] < plain["nll"]
    assert abs(auto["ece"] - plain_ts["ece"]) < 0.01
    # ... and leaves temperature scaling little to do afterwards (T near 1).
    assert 0.9 < auto_ts["T"] < 1.1
    # A fixed alpha = 0.1 over-smooths 10 classes into underconfidence (T < 1 undoes it).
    assert over["conf"] < over["acc"] - 0.05 and by[over["row"] + " + temperature"]["T"] < 1


def test_small_cpu_head_fits_run_on_one_thread_and_restore_the_setting():
    x, y = blobs(200, 1)
    seen: list[int] = []

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return F.cross_entropy(logits, labels)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit_head_lbfgs(nn.Linear(D, K), x, y, loss, max_iter=5)
        train_head(nn.Linear(D, K), x, y, loss, epochs=1)
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
