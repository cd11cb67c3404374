"""The backbone runs once per data set for everything: fit, evaluate and every variant."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import SmallNet
from torch.utils.data import DataLoader, TensorDataset

import wrapcal
from wrapcal.features.memory_store import CACHE

VARIANTS = {
    "temperature": [("temperature", {})],
    "mc_dropout": [("mc_dropout", {"samples": 4, "p": 0.2})],
    "label_smoothing": [("label_smoothing", {"alpha": 0.05})],
    "discrepancy": [("discrepancy", {"epochs_pretrain": 1, "epochs": 1})],
}


def data(n: int, seed: int, model=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    if model is None:
        return x
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::3] = torch.randint(0, 10, y[::3].shape, generator=g)
    return x, y


@pytest.fixture(autouse=True)
def empty_cache():
    CACHE.clear()
    yield
    CACHE.clear()


class Counter:
    """Images through every backbone a hook is on."""

    def __init__(self) -> None:
        self.images = 0

    def watch(self, module: torch.nn.Module) -> None:
        module.register_forward_hook(lambda m, i, o: setattr(self, "images", self.images + len(o)))


def fitted_variants(model, counter):
    train, cal, unl = data(300, 1, model), data(200, 2, model), data(150, 3)
    wrapped = {}
    for name, plugins in VARIANTS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mc_dropout inserts dropout; unused sets
            w = wrapcal.wrap(model, plugins)
            counter.watch(w.backbone)
            wrapped[name] = w.fit(train=train, calibration=cal, unlabeled=unl, progress=False)
    return wrapped


def test_evaluate_over_a_baseline_and_four_variants_makes_one_pass_per_data_set():
    torch.manual_seed(0)
    model = SmallNet().eval()
    counter = Counter()
    variants = fitted_variants(model, counter)
    # fit: train, calibration and unlabeled once each, whatever the number of variants.
    assert counter.images == 300 + 200 + 150
    assert sum(w.backbone_passes for w in variants.values()) == 3
    counter.images = 0
    test, noise, far = data(250, 4, model), data(120, 5), 5 * data(80, 6)
    counter.watch(model)  # the bare baseline, in case it ran itself
    report = wrapcal.evaluate(
        {"baseline": model, **variants},
        test=test,
        ood={"noise": noise, "far": far},
        bootstrap=0,
        progress=False,
    )
    assert counter.images == 250 + 120 + 80  # three passes for five models
    # The same numbers as five separate passes without the cache.
    separate = wrapcal.evaluate(
        {"baseline": model, **variants},
        test=test,
        ood={"noise": noise, "far": far},
        bootstrap=0,
        progress=False,
        cache=False,
    )
    for name in report.calibration:
        for metric, value in report.calibration[name].items():
            if value is not None:
                assert value == pytest.approx(separate.calibration[name][metric], abs=1e-6), (
                    name,
                    metric,
                )
        for ood_set, rows in report.ood[name].items():
            for score, row in rows.items():
                assert row["auroc"] == pytest.approx(
                    separate.ood[name][ood_set][score]["auroc"], abs=1e-6
                )
    assert counter.images > 3 * (250 + 120 + 80)  # without the cache: one pass each


def test_the_cache_never_serves_stale_features():
    torch.manual_seed(0)
    model = SmallNet().eval()
    x, y = data(100, 1, model)
    first = wrapcal.wrap(model, ["temperature"]).fit(calibration=(x, y), progress=False)
    assert first.backbone_passes == 1
    again = wrapcal.wrap(model, ["temperature"]).fit(calibration=(x, y), progress=False)
    assert again.backbone_passes == 0 and CACHE.hits == 1
    # Changed data (in place: same object, new contents) and changed weights miss.
    x2 = x.clone()
    x2[0, 0, 0, 0] += 1
    assert (
        wrapcal.wrap(model, ["temperature"])
        .fit(calibration=(x2, y), progress=False)
        .backbone_passes
        == 1
    )
    changed = wrapcal.wrap(model, ["temperature"])
    with torch.no_grad():
        changed.backbone.model.conv.weight.mul_(1.01)
    assert changed.fit(calibration=(x, y), progress=False).backbone_passes == 1
    assert (
        changed.get_plugin("temperature").temperature_
        != first.get_plugin("temperature").temperature_
    )
    # Turned off: always the backbone.
    assert (
        wrapcal.wrap(model, ["temperature"])
        .fit(calibration=(x, y), progress=False, cache=False)
        .backbone_passes
        == 1
    )


def test_loaders_hit_only_when_every_batch_is_the_same():
    torch.manual_seed(0)
    model = SmallNet().eval()
    x, y = data(96, 1, model)
    ordered = DataLoader(TensorDataset(x, y), batch_size=32)
    counter = Counter()
    for _ in range(2):
        w = wrapcal.wrap(model, ["temperature"])
        counter.watch(w.backbone)
        w.fit(calibration=ordered, progress=False)
    assert counter.images == 96  # the second fit read the loader, without the backbone
    shuffled = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    counter.images = 0
    for _ in range(2):
        w = wrapcal.wrap(model, ["temperature"])
        counter.watch(w.backbone)
        w.fit(calibration=shuffled, progress=False)
    assert counter.images == 2 * 96  # another order: never served from the cache


def test_a_variant_that_changes_the_backbone_gets_its_own_pass():
    torch.manual_seed(0)
    model = SmallNet().eval()
    train, cal = data(200, 1, model), data(100, 2, model)
    base = wrapcal.wrap(model, ["temperature"]).fit(calibration=cal, progress=False)
    tuned = wrapcal.wrap(
        model, [("label_smoothing", {"scope": "all", "epochs": 1, "batch_size": 64})]
    )
    tuned.fit(train=train, calibration=cal, progress=False)
    counter = Counter()
    counter.watch(base.backbone)
    counter.watch(tuned.backbone)
    test = data(64, 3, model)
    wrapcal.evaluate({"base": base, "tuned": tuned}, test=test, bootstrap=0, progress=False)
    assert counter.images == 2 * 64
