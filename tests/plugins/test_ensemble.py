"""Deep ensembles of checkpoints: ``wrap(Ensemble([m1, m2, m3]), ["ensemble", ...])``.

Three classifiers trained from different seeds on the bundled digits (two SmallNets and
an MLP: different architectures and feature widths) are checked against what each
member computes on its own: the probabilities are the mean of the members' (computed
here from the original modules), the disagreement scores are the entropy decomposition
written out here, each member's backbone runs once per batch and once per data set,
and the model saves, loads and exports with every member.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SmallNet
from torch import nn

import wrapcal
from wrapcal.datasets import digits
from wrapcal.files.cifar_resnets import cifar_resnet
from wrapcal.files.families import check_spec
from wrapcal_plugins.uncertainty.ensemble import Ensemble, EnsembleHead


def mlp(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, num_classes))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in model.parameters():  # a fresh initialisation from this seed
            if p.ndim > 1:
                nn.init.kaiming_uniform_(p, a=5**0.5)
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        for _ in range(6):  # a few full-batch steps: the checks hold for any weights
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


class Pooled:
    """The bundled digits at their native 8x8 (the 32x32 copies are upsampled): the same
    data, a sixteenth of the convolution work."""

    def __init__(self) -> None:
        full = digits()
        self.train = (F.avg_pool2d(full.train[0][:600], 4), full.train[1][:600])
        self.calibration = (F.avg_pool2d(full.calibration[0], 4), full.calibration[1])
        self.test = (F.avg_pool2d(full.test[0], 4), full.test[1])


@pytest.fixture(scope="module")
def data():
    return Pooled()


@pytest.fixture(scope="module")
def members(data):
    x, y = data.train
    return [train(SmallNet(), x, y, 0), train(SmallNet(), x, y, 1), train(mlp(), x, y, 2)]


@pytest.fixture(scope="module")
def templates():
    """Untrained members of the same architectures, for load(model=...)."""
    return Ensemble([SmallNet(), SmallNet(), mlp()])


@pytest.fixture(scope="module")
def fitted(members, data):
    plugins = ["ensemble", "temperature", "knn", "conformal"]
    wrapped = wrapcal.wrap(Ensemble(members), plugins=plugins)
    return wrapped.fit(train=data.train, calibration=data.calibration, progress=False)


def member_probs(members, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([m(x).softmax(-1) for m in members]).double()


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def test_probabilities_are_the_mean_of_the_members(members, data) -> None:
    x = data.test[0][:64]
    wrapped = wrapcal.wrap(Ensemble(members), plugins=["ensemble"])
    pred = wrapped.predict(x)
    probs = member_probs(members, x)  # the original modules, each on its own
    mean = probs.mean(0)
    torch.testing.assert_close(pred.probs.double(), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(wrapped(x).softmax(-1).double(), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(Ensemble(members)(x).softmax(-1).double(), mean, rtol=0, atol=1e-6)
    # Disagreement, written out: total, aleatoric, epistemic; votes; spread of the top class.
    total, aleatoric = entropy(mean), entropy(probs).mean(0)
    scores = {k: v.double() for k, v in pred.scores.items()}
    torch.testing.assert_close(scores["ensemble_predictive_entropy"], total, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores["ensemble_expected_entropy"], aleatoric, atol=1e-5, rtol=0)
    mi = scores["ensemble_mutual_information"]
    torch.testing.assert_close(mi, (total - aleatoric).clamp_min(0), atol=1e-5, rtol=0)
    votes = probs.argmax(-1)  # [M, B]
    agree = (votes == torch.mode(votes, 0).values).double().mean(0)
    torch.testing.assert_close(scores["ensemble_variation_ratio"], 1 - agree)
    top = probs[:, torch.arange(len(x)), mean.argmax(-1)]
    torch.testing.assert_close(
        scores["ensemble_std_top_prob"], top.std(0, correction=0), atol=1e-6, rtol=0
    )
    assert float(mi.max()) > 0.01  # the members do disagree somewhere
    # The energy the core reports is that of the members' mean logits (the shifted head).
    with torch.no_grad():
        mean_logits = torch.stack([m(x) for m in members]).mean(0)
    torch.testing.assert_close(
        pred.scores["energy"], -torch.logsumexp(mean_logits, -1), atol=1e-5, rtol=0
    )


def test_each_member_runs_once_per_batch_and_once_per_data_set(members, data) -> None:
    wrapped = wrapcal.wrap(Ensemble(members), plugins=["ensemble", "temperature", "knn"])
    rows: list[list[int]] = [[] for _ in members]
    for i, backbone in enumerate(wrapped.backbone.members):
        backbone.register_forward_hook(lambda m, a, o, i=i: rows[i].append(a[0].shape[0]))
    wrapped.fit(train=data.train, calibration=data.calibration, progress=False, cache=False)
    n_train, n_cal = len(data.train[1]), len(data.calibration[1])
    for seen in rows:
        assert sum(seen) == n_train + n_cal  # one pass per data set, for every plugin
        seen.clear()
    wrapped.predict(data.test[0][:50])
    assert rows == [[50]] * len(members)  # one call per batch, scores included


def test_fits_temperature_on_the_ensemble_output(members, data, fitted) -> None:
    x, y = data.calibration
    mean = member_probs(members, x).mean(0)
    want = wrapcal.fit_temperature(mean.log().float(), y)
    got = fitted.get_plugin("temperature").temperature_
    assert float(got) == pytest.approx(float(want), rel=1e-3)
    xt = data.test[0][:64]
    pred = fitted.predict(xt)
    calibrated = member_probs(members, xt).mean(0).log() / float(got)
    torch.testing.assert_close(pred.probs.double(), calibrated.softmax(-1), atol=1e-5, rtol=0)
    # The disagreement scores read the members, before the calibrator: as alone.
    alone = wrapcal.wrap(Ensemble(members), plugins=["ensemble"]).predict(xt)
    for name in ("ensemble_mutual_information", "ensemble_std_top_prob"):
        torch.testing.assert_close(pred.scores[name], alone.scores[name])


def test_a_detector_reads_the_concatenated_features(members, data, fitted) -> None:
    """knn of the ensemble equals knn of a linear model fitted on the members'
    penultimate features put side by side by hand."""

    def penultimate(x: torch.Tensor) -> torch.Tensor:
        parts = []
        for m in members:
            last = m.out if isinstance(m, SmallNet) else m[-1]
            seen: list[torch.Tensor] = []
            handle = last.register_forward_hook(lambda mod, a, o, seen=seen: seen.append(a[0]))
            with torch.no_grad():
                m(x)
            handle.remove()
            parts.append(seen[0])
        return torch.cat(parts, -1)

    x, y = data.train
    linear = nn.Linear(16 + 16 + 32, 10)
    by_hand = wrapcal.wrap(linear, ["knn"]).fit_features(train=(penultimate(x), y), progress=False)
    xt = data.test[0][:64]
    want = by_hand.predict_features(penultimate(xt)).scores["knn"]
    torch.testing.assert_close(fitted.predict(xt).scores["knn"], want, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(fitted, templates, data, tmp_path) -> None:
    path = fitted.save(tmp_path / "ens.wrapcal")
    loaded = wrapcal.load(path, model=templates)
    x = data.test[0][:40]
    a, b = fitted.predict(x), loaded.predict(x)
    assert torch.equal(a.probs, b.probs)
    for name in a.scores:
        assert torch.equal(a.scores[name], b.scores[name]), name
    with pytest.raises(wrapcal.SavedFileError, match=r"model=Ensemble\(\["):
        wrapcal.load(path)  # custom members: only the user can build them
    with pytest.raises(wrapcal.SavedFileError, match="ensemble of 3"):
        wrapcal.load(path, model=SmallNet())


def test_members_built_by_name_load_without_the_model(tmp_path) -> None:
    torch.manual_seed(0)
    members = [cifar_resnet(8).eval(), cifar_resnet(14).eval()]
    wrapped = wrapcal.wrap(Ensemble(members), ["ensemble"])
    loaded = wrapcal.load(wrapped.save(tmp_path / "byname.wrapcal"))
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(wrapped(x), loaded(x))
    assert [type(m.model).__name__ for m in loaded.backbone.members] == ["CifarResNet"] * 2


def test_a_saved_description_cannot_choose_code_outside_the_allow_list() -> None:
    good = {"library": "wrapcal", "name": "cifar_resnet", "kwargs": {"depth": 8}}
    check_spec("ensemble", "ensemble", {"members": [good, good]})
    for bad in (
        {"library": "timm", "name": "hf-hub:someone/evil", "kwargs": {}},
        {"library": "wrapcal", "name": "cifar_resnet", "kwargs": {"pretrained_path": "/x"}},
        {"library": "ensemble", "name": "ensemble", "kwargs": {"members": [good, good]}},
        {"library": "builtins", "name": "eval", "kwargs": {}},
    ):
        with pytest.raises(ValueError, match="members"):
            check_spec("ensemble", "ensemble", {"members": [good, bad]})
    with pytest.raises(ValueError, match="not allowed"):
        check_spec("ensemble", "ensemble", {"members": [good, good], "code": "x"})


@pytest.mark.parametrize("fmt", ["onnx", "torch"])
def test_export_holds_every_member(fitted, members, data, tmp_path, fmt) -> None:
    from wrapcal.export.module import prediction_outputs

    x = data.test[0][:16]
    expected = prediction_outputs(fitted.predict(x))
    path = wrapcal.export(fitted, tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt2"), format=fmt)
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path))
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(None, {"input": x.numpy()}), strict=True))
        got = {k: torch.from_numpy(np.asarray(v)) for k, v in got.items()}
    else:
        with torch.no_grad():
            values = torch.export.load(str(path)).module()(x)
        got = dict(zip(expected, values, strict=True))
    assert list(got) == list(expected)
    for name, want in expected.items():
        if want.is_floating_point():
            torch.testing.assert_close(got[name], want, atol=2e-5, rtol=1e-4)
        else:
            assert torch.equal(got[name], want), name
    # Every member is in the graph: the served probabilities are the calibrated mean of
    # the three original members' (computed here from the modules themselves).
    temperature = float(fitted.get_plugin("temperature").temperature_)
    mean = member_probs(members, x).mean(0)
    served = got["probs"].double()
    torch.testing.assert_close(served, (mean.log() / temperature).softmax(-1), atol=1e-5, rtol=0)


def test_errors_name_the_member_and_the_fix(members) -> None:
    with pytest.raises(wrapcal.SplitError, match=r"different numbers of logits \[10, 10, 5\]"):
        wrapcal.wrap(Ensemble([*members[:2], mlp(num_classes=5)]))
    headless = nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(wrapcal.SplitError, match=r"ensemble member 1 \(Sequential\).*heads="):
        wrapcal.wrap(Ensemble([members[0], headless]))
    with pytest.raises(ValueError, match="2 to 64 members"):
        Ensemble([members[0]])
    with pytest.raises(TypeError, match="list of models"):
        Ensemble(members[0])
    with pytest.raises(ValueError, match="members 0 and 2 are the same module"):
        Ensemble([members[0], members[1], members[0]])
    with pytest.warns(UserWarning, match="single network"):
        wrapcal.wrap(members[0], ["ensemble"])
    # A member split by hand at a named head works like wrap(model, head=...).
    wrapped = wrapcal.wrap(Ensemble([members[0], members[2]], heads=["out", None]))
    assert isinstance(wrapped.head, EnsembleHead) and wrapped.num_features == 16 + 32


def test_single_network_is_an_ensemble_of_one(members, data) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = wrapcal.wrap(members[0], ["ensemble"]).predict(data.test[0][:8])
    assert torch.equal(pred.scores["ensemble_mutual_information"], torch.zeros(8))
