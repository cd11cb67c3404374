"""Ranks that disagree fail together: run by ``tests/model/test_distributed.py`` under
``torchrun`` (gloo, two ranks), on a small network and random 8x8 images (no shared data).

Usage: ``python agree.py OUT``. Each scenario gives rank 1 something of its
own (other weights, parameters, data) and fits; every rank records the
``DistributedError`` it raised, or what it fitted, in ``OUT/rank<r>.json``. The
scenarios run one after another in one process group: a refusal leaves no rank inside a
collective, so the next fit runs (the last scenario fits the agreeing model again).
Last, rank 1's backbone differs and nothing catches the error: every process must
exit with it (no rank waits).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import SmallNet  # tests/ is on PYTHONPATH (the launching test sets it)
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

import wrapcal
from wrapcal import distributed
from wrapcal.model import fitting

PLUGINS: list[Any] = ["temperature", ("conformal", {"alpha": 0.1})]


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=generator), torch.arange(n) % 10


def network() -> SmallNet:
    torch.manual_seed(0)  # the same weights on every rank
    return SmallNet()


def nudged(part: str) -> SmallNet:
    """The network with one weight of ``part`` changed by 1e-3."""
    net = network()
    with torch.no_grad():
        getattr(net, part).weight.view(-1)[0] += 1e-3
    return net


class Halves(IterableDataset):
    """Yields this rank's contiguous half of ``(x, y)``: an iterable the user shards."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, r, w = len(self.y), distributed.rank(), distributed.world()
        for i in range(r * n // w, (r + 1) * n // w):
            yield self.x[i], self.y[i]


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fitted(
    net: torch.nn.Module | None = None,
    plugins: list[Any] | None = None,
    temperature: float | None = None,
    **fit: Any,
) -> dict[str, Any]:
    """Fit, and what was fitted (or the error every rank must raise); ``temperature``
    starts the temperature plugin from that learned value (a model fitted before)."""
    wrapped = wrapcal.wrap(net or network(), plugins or PLUGINS)
    if temperature is not None:
        with torch.no_grad():
            wrapped.get_plugin("temperature").temperature.fill_(temperature)
    if fit.get("calibration") is None:
        fit["calibration"] = data(200, 1)
    times: dict[str, float] = {}
    check = fitting.agree_to_fit

    def timed(*args: Any) -> None:
        start = time.perf_counter()
        check(*args)
        times["agree"] = time.perf_counter() - start

    fitting.agree_to_fit = timed  # type: ignore[assignment]
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped.fit(progress=False, batch_size=50, **fit)
    except distributed.DistributedError as err:
        return {"error": str(err)}
    finally:
        fitting.agree_to_fit = check  # type: ignore[assignment]
    seconds = time.perf_counter() - start
    return {
        "temperature": float(wrapped.get_plugin("temperature").temperature),
        "state": digest(wrapped),
        "plain_state": [p.get_state() for p in wrapped.plugins],  # conformal's row count
        "operating_points": wrapped.operating_points,
        "agree_seconds": times["agree"],
        "fit_seconds": seconds,
        "model": wrapped,
    }


def hugging_face(x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Fit from a Hugging Face dataset (each rank must read its block only, not all)."""
    try:
        import datasets
    except ImportError:
        return {"skipped": "datasets is not installed"}
    table = datasets.Dataset.from_dict({"image": x.numpy(), "label": y.numpy()})
    return fitted(calibration=table.with_format("torch"))


def evaluated(models: dict[str, torch.nn.Module], **settings: Any) -> dict[str, Any]:
    """What ``evaluate``'s agreement step says of these models (``"agreed"`` or the error)."""
    try:
        distributed.agree_to_evaluate(models, {"test": data(100, 2)}, settings)
    except distributed.DistributedError as err:
        return {"error": str(err)}
    return {"agreed": True}


def scenarios(rank: int) -> dict[str, Callable[[], dict[str, Any]]]:
    """Name -> what this rank does; rank 1 differs in each but ``agree``/``again``."""
    other = rank == 1
    cal_x, cal_y = data(200, 1)
    loader = DataLoader(
        TensorDataset(cal_x, cal_y),
        batch_size=50,
        # Every rank told it is rank 0: both would read the same half.
        sampler=DistributedSampler(TensorDataset(cal_x, cal_y), 2, 0, shuffle=False),
    )
    return {
        "agree": lambda: fitted(),
        "backbone_weights": lambda: fitted(nudged("conv") if other else None),
        "head_weights": lambda: fitted(nudged("out") if other else None),
        "temperature_max_iter": lambda: fitted(
            plugins=[("temperature", {"max_iter": 50 if other else 100}), PLUGINS[1]]
        ),
        "conformal_alpha": lambda: fitted(
            plugins=["temperature", ("conformal", {"alpha": 0.2 if other else 0.1})]
        ),
        "plugins": lambda: fitted(plugins=PLUGINS[:1] if other else PLUGINS),
        "fitted_state": lambda: fitted(temperature=2.0 if other else None),
        "seed": lambda: fitted(seed=1 if other else 0),
        "size": lambda: fitted(calibration=(cal_x[:199], cal_y[:199]) if other else None),
        "labels": lambda: fitted(calibration=(cal_x, (cal_y + 1) % 10) if other else None),
        "classes": lambda: fitted(calibration=(cal_x, cal_y % 5) if other else None),
        "inputs": lambda: fitted(calibration=(cal_x * 2, cal_y) if other else None),
        "data_sets": lambda: fitted(train=data(100, 3) if other else None),
        "labelled": lambda: fitted(
            calibration=TensorDataset(cal_x) if other else TensorDataset(cal_x, cal_y)
        ),
        "sampler": lambda: fitted(calibration=loader),
        "iterable": lambda: fitted(calibration=DataLoader(Halves(cal_x, cal_y), batch_size=50)),
        "hugging_face": lambda: hugging_face(cal_x, cal_y),
        "again": lambda: fitted(),
    }


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = distributed.rank()
    results: dict[str, Any] = {}
    for name, run in scenarios(rank).items():
        results[name] = run()
    fitted_model = results["agree"].pop("model")
    results["again"].pop("model")
    for name in ("iterable", "hugging_face"):
        results[name].pop("model", None)
    # evaluate's agreement step: the models fitted together agree; a model whose fitted
    # temperature differs on rank 1 (another fit, another saved file) does not.
    changed = copy.deepcopy(fitted_model)
    if rank == 1:
        with torch.no_grad():
            changed.get_plugin("temperature").temperature.mul_(2)
    results["evaluate_agree"] = evaluated({"wrapped": fitted_model, "baseline": network()})
    results["evaluate_state"] = evaluated({"wrapped": changed})
    results["evaluate_settings"] = evaluated({"wrapped": fitted_model}, n_bins=15 + rank)
    # Shards whose rows do not add up to the size the ranks agreed on (a length that
    # lies): 4 + 4 rows of a set of 10.
    try:
        distributed.check_shard_rows("odd", torch.zeros(10, 2), 4, True)
        results["rows"] = {"agreed": True}
    except distributed.DistributedError as err:
        results["rows"] = {"error": str(err)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(results, default=float))
    # Last, nothing catches it: every process must end with the error.
    wrapcal.wrap(nudged("conv") if rank == 1 else network(), PLUGINS).fit(
        calibration=data(200, 1), progress=False
    )


if __name__ == "__main__":
    main()
