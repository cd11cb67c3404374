"""The Lightning callback, with a real ``Trainer`` on the embedded digits (CPU, seconds).

Every number the callback logs is checked against a computation written here: the
module's own softmax and ``references.ece_np`` for the ECE, scikit-learn for the AUROC,
``wrapcal.metrics`` on the wrapped model's predictions for the rest.
"""

from __future__ import annotations

import csv
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from references import ece_np
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import wrapcal
from wrapcal.datasets.digits import digits

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from wrapcal.integrations.lightning import WrapcalCallback  # noqa: E402


def make_net() -> nn.Module:
    """A small MLP on 8x8-pooled digits: trains to ~90% in two epochs on one thread."""
    return nn.Sequential(
        nn.AvgPool2d(4), nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10)
    )


class DigitsModule(L.LightningModule):
    """The LightningModule a user writes: its classifier under ``net``, trained with label
    smoothing, which leaves it underconfident (test ECE about 22% over five seeds): the
    miscalibration temperature scaling is for (about 3% after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        self.steps += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, label_smoothing=0.2)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.fixture(scope="module")
def one_thread():
    """A model this small trains 20x faster on one thread on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return digits()


def loaders(data) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(TensorDataset(*data.train), batch_size=50, shuffle=True)
    val = DataLoader(TensorDataset(*data.calibration), batch_size=128)
    return train, val


def trainer(root: Path, callback: WrapcalCallback, **kw) -> L.Trainer:
    settings = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": True,
        "log_every_n_steps": 10,
        "logger": CSVLogger(root),
        "default_root_dir": root,
        "callbacks": [callback],
    }
    return L.Trainer(**{**settings, **kw})


def logged(logger_dir: Path) -> dict[str, float]:
    """The callback's numbers, read back from the CSV file the logger wrote."""
    with open(logger_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for row in rows:
        out.update({k: float(v) for k, v in row.items() if k.startswith("wrapcal/") and v})
    return out


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, data, one_thread):
    """One training run: the module itself wrapped with temperature and KNN, reported on
    the test split and a noise OOD set."""
    root = tmp_path_factory.mktemp("lightning")
    noise = torch.randn(200, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    callback = WrapcalCallback(
        ["temperature", "knn"], test=data.test, ood={"noise": noise}, bootstrap=0
    )
    module = DigitsModule()
    run = trainer(root, callback)
    run.fit(module, *loaders(data))
    return run, module, callback, noise


def test_the_callback_calibrates_the_trained_module(fitted, data) -> None:
    run, module, callback, _ = fitted
    x, y = data.test
    with torch.no_grad():
        before = torch.softmax(module.eval()(x), dim=-1).numpy()  # the module as trained
    after = callback.wrapped_.predict(x).probs.numpy()
    labels = y.numpy()
    assert (before.argmax(1) == labels).mean() > 0.8  # it trained
    # Temperature scaling, written out: softmax(logits / T) with the fitted T.
    temperature = callback.wrapped_.get_plugin("temperature").temperature_
    with torch.no_grad():
        by_hand = torch.softmax(module(x).double() / temperature, dim=-1).numpy()
    np.testing.assert_allclose(after, by_hand, atol=1e-5)
    assert temperature < 1  # it sharpens the underconfident module
    assert ece_np(after, labels) < ece_np(before, labels) / 2
    # Fit read each data set once: train (KNN's bank) and validation (temperature).
    assert callback.wrapped_.backbone_passes == 2
    # The trained module is left as it was: its head in place, its weights the last
    # checkpoint's.
    assert isinstance(module.net[-1], nn.Linear)
    (checkpoint,) = Path(run.checkpoint_callback.dirpath).glob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)


def test_the_logged_metrics_are_the_metrics_of_the_predictions(fitted, data) -> None:
    from sklearn.metrics import roc_auc_score

    run, module, callback, noise = fitted
    found = logged(Path(run.logger.log_dir))
    assert found == pytest.approx(callback.metrics_, rel=1e-6, abs=1e-9)
    x, y = data.test
    pred = callback.wrapped_.predict(x)
    with torch.no_grad():
        raw = torch.softmax(module.eval()(x), dim=-1)
    for model, probs in (("wrapped", pred.probs), ("baseline", raw)):
        name = f"wrapcal/test/calibration/{model}"
        assert found[f"{name}/ece"] == pytest.approx(wrapcal.metrics.ece(probs, y), abs=1e-6)
        assert found[f"{name}/ece"] == pytest.approx(ece_np(probs.numpy(), y.numpy()), abs=1e-6)
        assert found[f"{name}/nll"] == pytest.approx(wrapcal.metrics.nll(probs, y), abs=1e-5)
        assert found[f"{name}/accuracy"] == pytest.approx(
            float((probs.argmax(1) == y).double().mean()), abs=1e-9
        )
    # In-distribution is the positive class; scores are higher for OOD.
    knn_in = pred.scores["knn"].numpy()
    knn_out = callback.wrapped_.predict(noise).scores["knn"].numpy()
    truth = np.r_[np.ones(len(knn_in)), np.zeros(len(knn_out))]
    expected = roc_auc_score(truth, -np.r_[knn_in, knn_out])
    assert found["wrapcal/test/ood/wrapped/noise/knn/auroc"] == pytest.approx(expected, abs=1e-9)
    hparams = (Path(run.logger.log_dir) / "hparams.yaml").read_text()
    assert "wrapcal/plugins: knn, temperature" in hparams
    assert "wrapcal/report_on: test" in hparams


def test_the_saved_model_sits_beside_the_checkpoint_and_loads(fitted, data) -> None:
    run, _, callback, noise = fitted
    folder = Path(run.checkpoint_callback.dirpath)
    assert callback.saved_to_ == folder / "model.wrapcal"
    assert any(folder.glob("*.ckpt")) and callback.saved_to_.is_file()
    # A custom architecture: load takes the (untrained) module to rebuild.
    loaded = wrapcal.load(callback.saved_to_, model=DigitsModule())
    x = torch.cat([data.test[0][:50], noise[:20]])
    got, want = loaded.predict(x), callback.wrapped_.predict(x)
    torch.testing.assert_close(got.probs, want.probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.scores["knn"], want.scores["knn"], rtol=0, atol=1e-6)


def test_a_named_submodule_is_wrapped_and_reported_on_the_validation_data(
    tmp_path, data, one_thread
) -> None:
    target = tmp_path / "out" / "digits.wrapcal"
    callback = WrapcalCallback(["temperature"], model_attr="net", save_to=target)
    module = DigitsModule()
    run = trainer(tmp_path, callback, max_epochs=1)
    run.fit(module, *loaders(data))
    assert callback.wrapped_.backbone_passes == 1  # no plugin reads train: not read
    x, y = data.calibration
    found = logged(Path(run.logger.log_dir))
    assert not any(name.startswith("wrapcal/test/") for name in found)
    probs = callback.wrapped_.predict(x).probs
    assert found["wrapcal/val/calibration/wrapped/ece"] == pytest.approx(
        ece_np(probs.numpy(), y.numpy()), abs=1e-6
    )
    assert callback.saved_to_ == target
    loaded = wrapcal.load(target, model=make_net())
    torch.testing.assert_close(loaded(x), callback.wrapped_(x), rtol=0, atol=1e-6)


def test_missing_calibration_data_fails_before_training_and_names_the_fix(tmp_path, data) -> None:
    module = DigitsModule()
    run = trainer(tmp_path, WrapcalCallback(["temperature"]))
    with pytest.raises(wrapcal.DataError) as err:
        run.fit(module, loaders(data)[0])  # no validation dataloader
    message = str(err.value)
    assert "plugin temperature needs calibration data" in message
    assert "validation dataloader" in message and "fit_data={'calibration'" in message
    assert module.steps == 0


def test_a_bad_model_attr_or_plugin_fails_early(tmp_path, data) -> None:
    module = DigitsModule()
    run = trainer(tmp_path, WrapcalCallback(["temperature"], model_attr="backbone"))
    with pytest.raises(ValueError, match=r"no submodule 'backbone'.*submodules are \['net'\]"):
        run.fit(module, *loaders(data))
    assert module.steps == 0
    with pytest.raises(wrapcal.PluginNotFoundError):
        WrapcalCallback(["temprature"])


class ProbabilitiesModule(DigitsModule):
    """Its forward returns probabilities: not the logits of its last linear layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=-1)


def test_a_module_that_does_not_return_its_logits_is_refused_with_the_fix(tmp_path, data) -> None:
    run = trainer(tmp_path, WrapcalCallback(["temperature"]), max_epochs=1, limit_train_batches=1)
    with pytest.raises(wrapcal.SplitError, match=r"model_attr='\.\.\.'.*head='\.\.\.'"):
        run.fit(ProbabilitiesModule(), *loaders(data))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="imports wrapcal again in a forked child")
def test_import_wrapcal_does_not_import_lightning() -> None:
    """``import wrapcal`` in a child forked from this process with every wrapcal and
    Lightning module forgotten (torch stays loaded: seconds saved over a fresh
    interpreter)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the Lightning modules that importing wrapcal loaded
        os.close(read)
        try:
            for name in list(sys.modules):
                if name.split(".")[0] in ("wrapcal", "wrapcal_plugins", "lightning"):
                    del sys.modules[name]
            importlib.import_module("wrapcal")
            importlib.import_module("wrapcal.integrations")
            found = sorted(m for m in sys.modules if m.split(".")[0] == "lightning")
            out = "imported: " + ", ".join(found) if found else "ok"
        except BaseException as err:
            out = f"{type(err).__name__}: {err}"
        os.write(write, out.encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    assert b"".join(chunks).decode() == "ok"
