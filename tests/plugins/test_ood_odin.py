"""ODIN (``odin``): pytorch-ood's ODIN on the shared ResNet-20, a closed form on a linear
model, and the contract that gives a detector the inputs and the network.

The kit's conformance run over every built-in (tests/sdk/test_conformance.py) checks
``odin`` against every rule; here: its values, and what the core does around it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from pytorch_ood.detector import ODIN as ReferenceODIN
from shared_data import CIFAR_STD, cifar10, mnist_ood, pretrained_resnet20, requires_shared_data
from sklearn.metrics import roc_auc_score
from torch import nn

import wrapcal
from wrapcal.errors import DataError
from wrapcal.export import ExportError
from wrapcal.model.split import Split
from wrapcal.plugin import OutputContext, OutputKind, Plugin, PluginTags, Stage
from wrapcal.testing import PluginCheckError, check_plugin, kit_data
from wrapcal_plugins.ood.odin import ODIN

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: Images per side (CIFAR-10 test, MNIST): ODIN costs about five forward passes each.
N = 32


@pytest.fixture(scope="module")
def resnet() -> dict[str, Any]:
    """ODIN of wrapcal and of pytorch-ood on the same ResNet-20 and images."""
    model = pretrained_resnet20()
    x = torch.cat([cifar10("test")[0][:N], mnist_ood(N)])
    wrapped = wrapcal.wrap(model, ["odin"])
    pred = wrapped.predict(x)
    reference = ReferenceODIN(model, eps=0.0014, temperature=1000.0).predict(x)
    return {"model": model, "wrapped": wrapped, "x": x, "pred": pred, "reference": reference}


@requires_shared_data
def test_odin_is_pytorch_oods_odin_on_the_resnet20(resnet: dict[str, Any]) -> None:
    ours, theirs = resnet["pred"].scores["odin"], resnet["reference"]
    # pytorch-ood's score is -max softmax(f(x') / T), wrapcal's 1 - max softmax: higher
    # = more OOD for both. The scores of T = 1000 spread over ~1e-3.
    assert float(ours.max() - ours.min()) > 1e-4
    torch.testing.assert_close(ours, 1 + theirs, rtol=0, atol=1e-6)
    # The perturbation matters: the temperature-scaled softmax of the inputs differs.
    plain = 1 - torch.softmax(resnet["pred"].logits / 1000.0, -1).amax(-1)
    assert float((plain - ours).abs().max()) > 1e-4
    # Neither the user's model nor the wrapped copy collects gradients.
    for module in (resnet["model"], resnet["wrapped"]):
        assert all(p.grad is None for p in module.parameters())


@requires_shared_data
def test_odin_separates_cifar_from_mnist(resnet: dict[str, Any]) -> None:
    """AUROC on CIFAR-10 test vs MNIST (OOD positive): ODIN above the plain MSP, as in
    the paper (benchmarks/bench_odin.py prints it on more images)."""
    pred = resnet["pred"]
    is_ood = torch.cat([torch.zeros(N), torch.ones(N)]).numpy()
    odin = roc_auc_score(is_ood, pred.scores["odin"].numpy())
    msp = roc_auc_score(is_ood, pred.scores["msp"].numpy())
    assert odin > 0.85 and odin > msp + 0.05, (odin, msp)


@requires_shared_data
def test_odin_step_in_pixel_space_is_pytorch_oods_norm_std(resnet: dict[str, Any]) -> None:
    """``input_std`` divides the step's sign by the normalisation's std per channel (the
    paper's code; pytorch-ood's ``norm_std``)."""
    x = resnet["x"][N - 4 : N + 4]
    std = list(CIFAR_STD)
    wrapped = wrapcal.wrap(resnet["model"], [("odin", {"input_std": std})])
    ours = wrapped.predict(x).scores["odin"]
    theirs = ReferenceODIN(resnet["model"], norm_std=std).predict(x)
    torch.testing.assert_close(ours, 1 + theirs, rtol=0, atol=1e-6)
    assert float((ours - resnet["pred"].scores["odin"][N - 4 : N + 4]).abs().max()) > 1e-5


def _linear(weight: torch.Tensor, bias: torch.Tensor, plugins: list[Any]) -> wrapcal.WrappedModel:
    head = nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return wrapcal.wrap(None, split=Split(nn.Identity(), head), plugins=plugins)


def test_odin_is_the_closed_form_on_a_linear_model() -> None:
    """For logits ``z = W x + b``, ``grad_x log softmax(z / T)_y = (W_y - p W) / T`` with
    ``p = softmax(z / T)`` and ``y`` its argmax, so ODIN's input is
    ``x + eps * sign(W_y - p W)``; a single logit ``z`` counts as ``[0, z]``-style binary
    probabilities ``[sigmoid(-z), sigmoid(z)]``: ``x + eps * sign(z) * sign(w)``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    t, eps = 2.0, 0.05
    weight = torch.randn(5, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    wrapped = _linear(weight, bias, [("odin", {"temperature": t, "eps": eps})])
    p = torch.softmax((x @ weight.T + bias) / t, -1)
    y = p.argmax(-1)
    moved = x + eps * torch.sign(weight[y] - p @ weight)
    want = 1 - torch.softmax((moved @ weight.T + bias) / t, -1).amax(-1)
    torch.testing.assert_close(wrapped.predict(x).scores["odin"], want, rtol=0, atol=1e-12)

    w = torch.randn(1, 6, generator=g, dtype=torch.float64)
    b = torch.randn(1, generator=g, dtype=torch.float64)
    binary = _linear(w, b, [("odin", {"temperature": t, "eps": eps})])
    z = x @ w.T + b
    moved = x + eps * torch.sign(z) * torch.sign(w)
    want = 1 - torch.sigmoid((moved @ w.T + b).abs() / t).squeeze(1)
    torch.testing.assert_close(binary.predict(x).scores["odin"], want, rtol=0, atol=1e-12)


def test_from_cached_features_odin_is_absent_and_the_rest_fits_and_predicts() -> None:
    """No inputs, no ODIN: ``predict_features`` (and what ``fit`` measures from cached
    features: operating points, the plugins after it) leave ``odin`` out, every other
    output as from the inputs."""
    data = kit_data()
    wrapped = wrapcal.wrap(data.model(), ["odin", "temperature", ("conformal", {"alpha": 0.1})])
    wrapped.fit(calibration=data.calibration, progress=False)
    assert wrapped.operating_points is not None
    from_inputs = wrapped.predict(data.test)
    with torch.no_grad():
        cached = wrapped.predict_features(wrapped.backbone(data.test))
    assert "odin" in from_inputs.scores and "odin" not in cached.scores
    assert set(cached.scores) == set(from_inputs.scores) - {"odin"}
    for name, value in cached.scores.items():
        torch.testing.assert_close(value, from_inputs.scores[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.probs, from_inputs.probs)
    assert torch.equal(cached.outputs["sets"], from_inputs.outputs["sets"])
    # Under inference_mode (serving code) ODIN still takes its gradient.
    with torch.inference_mode():
        served = wrapped.predict(data.test)
    torch.testing.assert_close(served.scores["odin"], from_inputs.scores["odin"])


def test_an_input_std_that_does_not_fit_the_channels_is_refused() -> None:
    data = kit_data()
    wrapped = wrapcal.wrap(data.model(), [("odin", {"input_std": [0.2, 0.2, 0.2]})])
    with pytest.raises(DataError, match=r"input_std has 3 values .* \[60, 64\]"):
        wrapped.predict(data.test)


def test_evaluate_runs_odin_on_the_inputs() -> None:
    """``evaluate`` runs a model whose plugin needs the inputs on the data sets' inputs,
    so ``odin`` is measured like every score."""
    data = kit_data()
    wrapped = wrapcal.wrap(data.model(), ["odin"])
    test, noise = (data.test, torch.zeros(60, dtype=torch.int64)), data.unlabeled[60:]
    report = wrapcal.evaluate(
        {"odin": wrapped}, test=test, ood={"noise": noise}, progress=False, bootstrap=0
    )
    scores = torch.cat(
        [wrapped.predict(data.test).scores["odin"], wrapped.predict(noise).scores["odin"]]
    )
    is_ood = torch.cat([torch.zeros(60), torch.ones(len(noise))]).numpy()
    measured = report.ood["odin"]["noise"]["odin"]
    auroc = measured["auroc"]
    auroc = auroc["value"] if isinstance(auroc, dict) else auroc
    assert auroc == pytest.approx(roc_auc_score(is_ood, scores.numpy()), abs=1e-9)


class _Reader(Plugin):
    """Reads the inputs and the network from its context; declares needs_inputs or not."""

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {"declares": [bool]}

    def __init__(self, declares: bool = True) -> None:
        super().__init__()
        self.declares = declares
        self.seen: list[Any] = []

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.requires_fit = False
        tags.needs_inputs = self.declares
        tags.outputs = {"reader": OutputKind.OOD_SCORE}
        return tags

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        inputs = context.inputs
        self.seen.append((inputs, context.base_logits))
        if inputs is None:
            return {}
        logits = context.network(inputs)
        self.seen.append(logits)
        return {"reader": -logits.amax(-1)}


def test_only_a_plugin_that_declares_needs_inputs_gets_the_inputs_and_the_network() -> None:
    data = kit_data()
    x = data.test[:10]
    undeclared = wrapcal.wrap(data.model(), [_Reader(declares=False)])
    with pytest.raises(ValueError, match=r"OutputContext.inputs is given only .*needs_inputs"):
        undeclared.predict(x)
    reader = _Reader()
    wrapped = wrapcal.wrap(data.model(), [reader, ("mc_dropout", {"samples": 3, "p": 0.3})])
    wrapped.predict(x)
    reader = wrapped.get_plugin(_Reader)
    (inputs, base), network_logits = reader.seen
    assert torch.equal(inputs, x)  # the batch as predict received it
    # The model's own network (no dropout sample): base_logits of those inputs.
    torch.testing.assert_close(network_logits, base)
    with torch.no_grad():
        torch.testing.assert_close(network_logits, data.model()(x))
    reader.seen.clear()
    with torch.no_grad():
        wrapped.predict_features(wrapped.backbone(x))
    assert reader.seen[0][0] is None  # cached features: no inputs


def test_export_refuses_odin_by_name(tmp_path) -> None:
    data = kit_data()
    wrapped = wrapcal.wrap(data.model(), ["temperature", "odin"])
    wrapped.fit(calibration=data.calibration, progress=False)
    with pytest.raises(ExportError, match=r"plugin odin") as caught:
        wrapcal.export(wrapped, tmp_path / "m.pt2", format="torch", input_shape=(64,))
    assert "plugin temperature" not in str(caught.value)
    # The reason is odin's own (a gradient with respect to the inputs), not a sampler's.
    assert "a traced graph cannot hold" in str(caught.value)
    assert "samples the backbone" not in str(caught.value)
    assert not (tmp_path / "m.pt2").exists()
    assert wrapcal.get_tags(ODIN()).export_refusal.startswith("differentiates the network")


class _BackwardODIN(ODIN):
    """ODIN with ``loss.backward()``: gradients left in the user's parameters."""

    def perturb(self, network: Any, inputs: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = inputs.detach().clone().requires_grad_(True)
            (-torch.log_softmax(network(x) / self.temperature, -1).amax(-1).sum()).backward()
            assert x.grad is not None
            return x.detach() - self.eps * x.grad.sign()


def test_the_kit_refuses_a_detector_that_leaves_gradients_in_the_model() -> None:
    with pytest.raises(PluginCheckError, match=r"rule 'outputs'.*autograd.grad"):
        check_plugin(_BackwardODIN)
