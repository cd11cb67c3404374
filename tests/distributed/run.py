"""Fit and evaluate every built-in plugin on the shared ResNet-20, in one process or
under ``torchrun`` (run by ``tests/model/test_distributed.py``), and write what was learned.

Usage: ``python run.py OUT [fail-on-rank-1 | fail-after-reduce-on-rank-1]``. Under
torchrun every rank fits from its shard of each data set; rank 0 writes
``OUT/result.json`` (with the seconds of each fit and of the ranks' agreement step
before it) and ``OUT/tensors.safetensors``.

The ``sharded`` model's plugins all fit from shards, so its train set is never gathered
(the names of the sets gathered are recorded), and its KNN bank stays split across the
ranks until ``unshard``; it is also evaluated on a test set whose shards run unequal
numbers of batches.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

# tests/ is on PYTHONPATH (the test that launches torchrun sets it).
from shared_data import cifar10, mnist_ood, pretrained_resnet20

import wrapcal
import wrapcal_plugins.ood._feature_stats as feature_stats
from wrapcal import distributed
from wrapcal.errors import DataError
from wrapcal.model import fitting

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
    "sharded": [
        "react",
        ("knn", {"k": 10, "bank_size": 1500, "shard_bank": True}),
        ("mahalanobis", {"relative": True}),
        "vim",
        "temperature",
        "conformal",
    ],
}
# ReAct's exact percentile narrows the range by histograms until this many values are
# left: small here so that the histogram passes run (and are combined over ranks).
feature_stats.GATHER_VALUES = 4096


class FailsAfterReduce(wrapcal.Plugin):
    """Fits from shards; on rank 1 it fails between two all-reduces."""

    def __wrapcal_tags__(self) -> wrapcal.PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = wrapcal.Stage.DETECT
        tags.fit_reads = ("train",)
        tags.fits_from_shards = True
        return tags

    def fit(self, model, data) -> FailsAfterReduce:
        data.train.sum_over_shards(torch.ones(1))
        if distributed.rank() == 1:
            raise DataError("a shard-aware fit failed after its first all-reduce")
        data.train.sum_over_shards(torch.ones(1))  # rank 0 must hear of it here
        return self


def record_gathers() -> list[str]:
    """Names of the fit sets gathered across ranks, in order, from now on."""
    names: list[str] = []
    gathered = fitting._gathered

    def spy(local):
        if distributed.active():
            names.append(local.name)
        return gathered(local)

    fitting._gathered = spy
    return names


def time_agreement(check):
    """Seconds of the ranks' agreement step of the next fits, under ``"agree"``."""
    seconds: dict[str, float] = {"agree": 0.0}

    def timed(*args):
        start = time.perf_counter()
        check(*args)
        seconds["agree"] += time.perf_counter() - start

    fitting.agree_to_fit = timed
    return seconds


def main() -> None:
    out = Path(sys.argv[1])
    fail = sys.argv[2] if len(sys.argv) > 2 else ""
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
    if fail == "fail-after-reduce-on-rank-1":
        wrapped = wrapcal.wrap(pretrained_resnet20(), [FailsAfterReduce()])
        wrapped.fit(train=data["train"], batch_size=BATCH, progress=False)
        return
    if fail == "fail-on-rank-1":
        # The same data on every rank (the ranks agree), but the second half, rank 1's
        # shard, has labels out of range: a data error on rank 1 only.
        bad = labels[:1000].clone()
        bad[500:] += 100
        data["calibration"] = (images[:1000], bad)
    calibrators = [
        name
        for name, info in wrapcal.plugin_registry().items()
        if isinstance(info.factory, type)
        and wrapcal.get_tags(info.factory()).stage is wrapcal.Stage.CALIBRATE
        and name not in ("auto_calibration",)
    ]
    models = {**MODELS, "calibrators": sorted(calibrators)}
    gathered_function = fitting._gathered
    result: dict = {"world": distributed.world(), "models": {}, "gathered": {}, "seconds": {}}
    agree_to_fit = fitting.agree_to_fit
    tensors: dict = {}
    wrapped_models = {}
    for name, plugins in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = wrapcal.wrap(pretrained_resnet20(), plugins)
            reads, _ = wrapcal.model.fitting.read_sets(wrapped)
            gathered = record_gathers()
            seconds = time_agreement(agree_to_fit)
            start = time.perf_counter()
            wrapped.fit(
                **{k: v for k, v in data.items() if k in reads},
                batch_size=BATCH,
                progress=False,
            )
            seconds["fit"] = time.perf_counter() - start
        fitting._gathered = gathered_function
        fitting.agree_to_fit = agree_to_fit
        result["seconds"][name] = seconds
        result["gathered"][name] = gathered
        wrapped_models[name] = wrapped
        result["models"][name] = {
            "plugins": wrapped.plugin_names,
            "states": [p.get_state() for p in wrapped.plugins],
            "operating_points": wrapped.operating_points,
        }
    # Two classes sorted by class: each rank's contiguous shard holds one of them (a
    # fit that counted classes per shard would refuse it).
    two = torch.nonzero(train_y[:2000] < 2).squeeze(1)
    two = two[torch.argsort(train_y[two], stable=True)]
    on_sorted = wrapcal.wrap(pretrained_resnet20(), ["mahalanobis"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "labels cover 2 of 10 classes"
        on_sorted.fit(train=(train_x[two], train_y[two]), batch_size=BATCH, progress=False)
    result["models"]["sorted"] = {"states": [p.get_state() for p in on_sorted.plugins]}
    tensors["sorted"] = {k: v.detach().cpu() for k, v in on_sorted.state_dict().items()}
    knn = wrapped_models["sharded"].get_plugin("knn")
    result["bank_rows"] = distributed.exchange(int(knn.bank_.shape[0]))
    # Unequal shards (500 and 501 rows, batches of 100: 5 and 6 batches per rank), from
    # the feature cache and through the model's own predict, batch by batch.
    for key, cache in (("odd_report", True), ("odd_report_uncached", False)):
        odd = wrapcal.evaluate(
            {"sharded": wrapped_models["sharded"]},
            test=(images[2000:3001], labels[2000:3001]),
            ood={"mnist": mnist_ood(1001)},
            batch_size=100,
            bootstrap=0,
            progress=False,
            cache=cache,
        )
        result[key] = {k: odd.to_dict()[k] for k in ("calibration", "ood")}
    try:
        wrapped_models["sharded"].save(out / "refused.wrapcal")
        result["save_before_unshard"] = "saved"
    except distributed.DistributedError as err:
        result["save_before_unshard"] = str(err)
    # Models fitted together agree on every rank, a KNN bank still split included (what
    # evaluate checks before it runs a model).
    start = time.perf_counter()
    distributed.agree_to_evaluate(
        {"baseline": pretrained_resnet20(), **wrapped_models},
        {"test": (images[2000:3000], labels[2000:3000]), "mnist": mnist_ood(1000)[500:]},
        {"bootstrap": 200},
    )
    result["seconds"]["agree_to_evaluate"] = time.perf_counter() - start
    report = wrapcal.evaluate(
        {"baseline": pretrained_resnet20(), **wrapped_models},
        test=(images[2000:3000], labels[2000:3000]),
        ood={"mnist": mnist_ood(1000)[500:]},
        batch_size=BATCH,
        bootstrap=200,
        progress=False,
    )
    result["report"] = {k: report.to_dict()[k] for k in ("calibration", "ood", "plugin_metrics")}
    distributed.unshard(wrapped_models["sharded"])
    for name, wrapped in wrapped_models.items():
        tensors[name] = {k: v.detach().cpu() for k, v in wrapped.state_dict().items()}
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
