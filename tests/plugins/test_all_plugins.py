"""All four built-in plugins in one wrap: any list order gives the same model."""

from __future__ import annotations

import torch
from helpers import SmallNet

import wrapcal
from wrapcal import Stage, get_tags
from wrapcal.datasets import digits

SPECS = [
    ("temperature", {}),
    ("mc_dropout", {"samples": 8, "p": 0.2}),
    ("label_smoothing", {"alpha": 0.05}),
    ("discrepancy", {"epochs_pretrain": 2, "epochs": 2}),
]


def test_any_order_gives_the_same_model() -> None:
    data = digits()
    torch.manual_seed(0)
    model = SmallNet().eval()
    x_test = data.test[0][:64]
    traffic = torch.cat([data.calibration[0], torch.randn(100, 3, 32, 32)])
    results = []
    orders = [SPECS, SPECS[::-1], [SPECS[2], SPECS[0], SPECS[3], SPECS[1]]]
    for order in orders:
        wrapped = wrapcal.wrap(model, plugins=list(order))
        stages = [get_tags(p).stage for p in wrapped.plugins]
        assert stages == [Stage.TRAIN, Stage.HEADS, Stage.SAMPLE, Stage.CALIBRATE]
        wrapped.fit(
            train=data.train, calibration=data.calibration, unlabeled=traffic, progress=False
        )
        results.append((wrapped(x_test), wrapped.predict(x_test)))
    logits0, pred0 = results[0]
    for logits, pred in results[1:]:
        assert torch.equal(logits, logits0)
        assert pred.scores.keys() == pred0.scores.keys()
        for name in pred0.scores:
            assert torch.equal(pred.scores[name], pred0.scores[name]), name
    # Every plugin did something: its score or its learned state is there.
    wrapped_scores = results[0][1].scores
    assert {"discrepancy", "mutual_information", "msp"} <= set(wrapped_scores)
    assert wrapped.get_plugin("temperature").temperature_ != 1.0
