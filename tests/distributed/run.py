"""Fit and evaluate every built-in plugin on the shared ResNet-20, in one process or
under ``torchrun`` (run by ``tests/test_distributed.py``), and write what was learned.

Usage: ``python run.py OUT [fail-on-rank-1]``. Under torchrun every rank fits from its
shard of each data set; rank 0 writes ``OUT/result.json`` and ``OUT/tensors.safetensors``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared_data import cifar10, mnist_ood, pretrained_resnet20

import wrapcal
from wrapcal import distributed

BATCH = 250  # divides every shard: the same batches in one process and in two

MODELS = {
    "chain": [
        ("label_smoothing", {"alpha": 0.05}),
        ("discrepancy", {"epochs_pretrain": 2, "epochs": 2}),
        ("mc_dropout", {"samples": 4}),
        "react",
        ("knn", {"k": 10}),
        "mahalanobis",
        "vim",
        "temperature",
        "conformal",
        "abstain",
    ],
}


def main() -> None:
    out = Path(sys.argv[1])
    fail = len(sys.argv) > 2
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    # The files are ordered by class: fixed permutations give every slice every class.
    images, labels = cifar10("test")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    train_x, train_y = cifar10("train")
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))
    train_x, train_y = train_x[order], train_y[order]
    data = {
        "train": (train_x[:2000], train_y[:2000]),
        "calibration": (images[:1000], labels[:1000]),
        "unlabeled": torch.cat([images[1000:1500], mnist_ood(500)]),
    }
    if fail and distributed.rank() == 1:
        data["calibration"] = (images[:1000], labels[:1000] + 100)  # out of range: a data error
    calibrators = [
        name
        for name, info in wrapcal.plugin_registry().items()
        if isinstance(info.factory, type)
        and wrapcal.get_tags(info.factory()).stage is wrapcal.Stage.CALIBRATE
        and name not in ("auto_calibration",)
    ]
    models = {**MODELS, "calibrators": sorted(calibrators)}
    result: dict = {"world": distributed.world(), "models": {}}
    tensors: dict = {}
    wrapped_models = {}
    for name, plugins in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = wrapcal.wrap(pretrained_resnet20(), plugins)
            reads, _ = wrapcal.fitting.read_sets(wrapped)
            wrapped.fit(
                **{k: v for k, v in data.items() if k in reads},
                batch_size=BATCH,
                progress=False,
            )
        wrapped_models[name] = wrapped
        result["models"][name] = {
            "plugins": wrapped.plugin_names,
            "states": [p.get_state() for p in wrapped.plugins],
            "operating_points": wrapped.operating_points,
        }
        tensors[name] = {k: v.detach().cpu() for k, v in wrapped.state_dict().items()}
    report = wrapcal.evaluate(
        {"baseline": pretrained_resnet20(), **wrapped_models},
        test=(images[2000:3000], labels[2000:3000]),
        ood={"mnist": mnist_ood(1000)[500:]},
        batch_size=BATCH,
        bootstrap=200,
        progress=False,
    )
    result["report"] = {k: report.to_dict()[k] for k in ("calibration", "ood", "plugin_metrics")}
    if distributed.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, default=float))
        flat = {
            f"{m}/{k}": v.contiguous() for m, state in tensors.items() for k, v in state.items()
        }
        save_file(flat, str(out / "tensors.safetensors"))
    if distributed.active():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
