"""``torch.distributed``: fit and evaluate with every rank on its own shard of the data.

Under ``torchrun --nproc_per_node=N`` (any backend: gloo on CPU, NCCL on GPUs), once
the process group is initialised, ``wrapped.fit`` and ``wrapcal.evaluate`` shard each
data set across the ranks: a tensor, array or ``(X, y)`` pair and a ``Dataset`` are cut
into contiguous blocks (rank ``r`` of ``N`` takes rows ``[r n / N, (r + 1) n / N)``), a
Hugging Face dataset too; a ``DataLoader`` whose sampler is a ``DistributedSampler`` is
taken as the user's own sharding, and so is an ``IterableDataset`` (it has no length to
cut by: it must yield only its rank's rows). Each rank runs the backbone on its shard
only. A fit data set that only shard-aware plugins read (``tags.fits_from_shards``)
stays sharded: those plugins combine what they need across ranks (statistics summed, a
KNN bank kept per rank).
Any other fit set is gathered, in rank order, so every rank fits the same plugins from
the same features; ``evaluate`` gathers the predictions the same way, so every rank
holds the same report (write it from rank 0).

Before fitting, the ranks check that they agree (:func:`check_agreement`, with the facts
of :func:`model_facts` and :func:`data_facts`): the model's weights (backbone, head and
every plugin's state), the plugins and their parameters, and each data set's size,
labels and sharding (after reading: that the shards add up to it). Ranks that disagree
would fit different models while reporting as one; instead every rank fails with a
:class:`DistributedError` that names what differs, each rank's value and the fix.
:func:`agree_to_evaluate` does the same for ``evaluate``'s models, data and settings.

A rank that fails (bad data, a plugin's error) makes every rank fail with its message
at the next synchronisation point, instead of leaving the others waiting in a
collective until the backend's timeout. That holds because every collective made
while a rank may fail (inside :func:`agree`) starts with a status exchange: use the
collectives of this module there (:func:`all_reduce`, :func:`gather_rows`,
:func:`exchange`, :func:`lockstep`), never ``torch.distributed``'s own.
"""

from __future__ import annotations

import hashlib
import json
import re
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

# Defined with the other errors (the plugin SDK re-exports it without importing this
# module); kept importable from here, where 0.2.0 defined it.
from wrapcal.errors import DistributedError
from wrapcal.features.fingerprint import backbone_fingerprint, tensor_bytes

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from wrapcal.plugin.types import PluginTags

__all__ = [
    "DistributedError",
    "Fact",
    "Facts",
    "active",
    "agree",
    "agree_to_evaluate",
    "all_reduce",
    "check_agreement",
    "check_shard_rows",
    "check_whole",
    "data_facts",
    "exchange",
    "gather_rows",
    "lockstep",
    "model_facts",
    "rank",
    "shard",
    "sharded_by_user",
    "unshard",
    "world",
]

T = TypeVar("T")

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def active(group: ProcessGroup | None = None) -> bool:
    """Whether a process group (``group``, the default one by default) with more than one
    rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 outside a process group)."""
    return dist.get_rank(group) if active(group) else 0


def world(group: ProcessGroup | None = None) -> int:
    """The number of ranks in ``group`` (1 outside a process group)."""
    return dist.get_world_size(group) if active(group) else 1


def _block(n: int) -> tuple[int, int]:
    return rank() * n // world(), (rank() + 1) * n // world()


def sharded_by_user(data: Any) -> bool:
    """Whether each rank's ``data`` is already its own shard, cut by the user: a
    ``DataLoader`` whose sampler is a ``DistributedSampler``, or an ``IterableDataset``
    (bare or in a loader), which has no length to cut by and must yield its rank's rows
    only."""
    if isinstance(data, DataLoader):
        return isinstance(data.sampler, DistributedSampler) or isinstance(
            data.dataset, IterableDataset
        )
    return isinstance(data, IterableDataset)


def shard(data: Any) -> Any:
    """This rank's part of ``data`` (the data itself outside a process group)."""
    from wrapcal.data import _is_map_style  # imported here: wrapcal.data imports the SDK

    if not active() or data is None or sharded_by_user(data):
        return data
    if isinstance(data, DataLoader):
        start, stop = _block(len(data.dataset))  # type: ignore[arg-type]
        subset = Subset(data.dataset, range(start, stop))
        return DataLoader(
            subset,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
        )
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
        start, stop = _block(len(data[0]))
        return (data[0][start:stop], data[1][start:stop])
    if isinstance(data, (torch.Tensor, np.ndarray)):
        start, stop = _block(len(data))
        return data[start:stop]
    if isinstance(data, Dataset) or _is_map_style(data):
        # A Hugging Face dataset too: without this every rank would read all of it.
        start, stop = _block(len(data))
        return Subset(data, range(start, stop))
    return data


# --- failure-aware synchronisation ------------------------------------------------------


def _reported(error: BaseException) -> bool:
    """Whether every other rank already knows of this error (so no rank waits for news)."""
    return getattr(error, "_wrapcal_reported", False)


def _statuses(
    status: tuple[int, str | None, str | None, Any], group: ProcessGroup | None = None
) -> list[Any]:
    everyone: list[Any] = [None] * world(group)
    dist.all_gather_object(everyone, status, group=group)
    return everyone


def _raise_for_failures(everyone: list[Any]) -> None:
    for r, what, message, _ in everyone:
        if message is not None:
            error = DistributedError(f"rank {r} failed while {what}: {message}")
            error._wrapcal_reported = True  # type: ignore[attr-defined]  # news to no rank
            raise error


def exchange(payload: Any, *, group: ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``payload`` (small, picklable), in rank order.

    Args:
        payload: This rank's part.
        group: The ranks that exchange (the default process group by default).

    Raises:
        DistributedError: Another rank failed inside :func:`agree` before reaching this
            point; its message is passed on.
    """
    if not active(group):
        return [payload]
    everyone = _statuses((rank(group), None, None, payload), group)
    _raise_for_failures(everyone)
    return [p for *_, p in everyone]


def agree(step: Callable[[], T], what: str) -> T:
    """Run ``step`` on every rank; if it fails on any rank, fail on all with the message.

    ``step`` may synchronise with the other ranks, through this module's collectives
    only: each starts with a status exchange, so a rank that failed before reaching it
    is reported there rather than waited for.

    Args:
        step: This rank's work.
        what: What the step does, for the message.

    Raises:
        DistributedError: Another rank's step failed (this rank's own error is raised
            as it is).
    """
    if not active():
        return step()
    try:
        result = step()
    except Exception as err:
        if _reported(err):
            raise  # every rank already knows: nobody waits for this rank's status
        message = "".join(traceback.format_exception_only(err)).strip()
        _statuses((rank(), what, message, None))
        err._wrapcal_reported = True  # type: ignore[attr-defined]
        raise
    _raise_for_failures(_statuses((rank(), None, None, None)))
    return result


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where a tensor must be for the backend (NCCL moves CUDA tensors only)."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce(
    tensor: torch.Tensor, op: str = "sum", *, group: ProcessGroup | None = None
) -> torch.Tensor:
    """``tensor`` combined over every rank of ``group`` (``"sum"``, ``"min"`` or
    ``"max"``), as a new tensor on ``tensor``'s device (the tensor itself outside a
    process group)."""
    if not active(group):
        return tensor
    combined = tensor.detach().to(_comm_device(tensor), copy=True)  # before: it may fail
    exchange(None, group=group)
    dist.all_reduce(combined, op=_REDUCE_OPS[op], group=group)
    return combined.to(tensor.device)


@overload
def gather_rows(
    tensor: torch.Tensor,
    *,
    sizes: list[int] | None = None,
    group: ProcessGroup | None = None,
) -> torch.Tensor: ...


@overload
def gather_rows(
    tensor: torch.Tensor | None,
    *,
    sizes: list[int] | None = None,
    group: ProcessGroup | None = None,
) -> torch.Tensor | None: ...


def gather_rows(
    tensor: torch.Tensor | None,
    *,
    sizes: list[int] | None = None,
    group: ProcessGroup | None = None,
) -> torch.Tensor | None:
    """Every rank's rows of ``tensor``, concatenated in rank order, on every rank.

    The ranks may hold different numbers of rows: each pads its rows to the largest
    count for the ``all_gather``, and the padding is cut off again. It starts with the
    status exchange (the row counts travel in it), like every collective here. Boolean
    tensors travel as ``uint8`` (some backends cannot send ``bool``) and come back as
    ``bool``.

    Args:
        tensor: This rank's rows; ``None`` (unlabelled) on any rank gives ``None``.
        sizes: When given, filled with each rank's number of rows.
        group: The ranks that gather (the default process group by default).
    """
    if not active(group):
        if sizes is not None and tensor is not None:
            sizes[:] = [tensor.shape[0]]
        return tensor
    found = exchange(None if tensor is None else int(tensor.shape[0]), group=group)
    if any(n is None for n in found):
        return None
    assert tensor is not None
    if sizes is not None:
        sizes[:] = found
    device = _comm_device(tensor)
    send = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    padded = torch.zeros((max(found), *send.shape[1:]), dtype=send.dtype, device=device)
    padded[: tensor.shape[0]] = send.to(device)
    parts = [torch.empty_like(padded) for _ in range(world(group))]
    exchange(None, group=group)  # every rank allocated: a rank that could not has said so
    dist.all_gather(parts, padded, group=group)
    whole = torch.cat([p[:n] for p, n in zip(parts, found, strict=True)])
    return whole.to(device=tensor.device, dtype=tensor.dtype)


def lockstep(items: Iterable[T]) -> Iterator[T | None]:
    """This rank's ``items`` in rounds that every rank runs together.

    Inference whose plugins search data held by every rank (a sharded KNN bank) makes
    one collective call per batch, so every rank must run the same number of batches.
    Ranks whose items ran out get ``None`` (run a small stand-in batch and drop its
    result) until every rank's items have.
    """
    iterator = iter(items)
    end = object()
    while True:
        item = next(iterator, end)
        if not any(exchange(item is not end)):
            return
        yield None if item is end else item  # type: ignore[misc]


# --- agreement of the ranks ---------------------------------------------------------------
# Ranks that hold different models or data fit different plugins, each reporting as if it
# were the one model: every rank describes what it holds in a few short strings (digests
# for weights and labels), the ranks exchange them once, and any difference fails every
# rank with the same message (each rank compares the same exchanged list).

#: What a rank says about one topic: the value (compared as is, and shown in the
#: message) and the fix to name when the ranks' values differ.
Fact = tuple[str, str]
#: Topic -> fact, in the order to check (the first difference is named first).
Facts = dict[str, Fact]

#: Object addresses (``<function f at 0x7f...>``) differ between processes: never compared.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SHOWN = 72  # characters of a value shown in a message
_GROUPS = 4  # values shown in a message; more are counted
#: Rows of an in-memory data set whose bytes are compared: a sample, so the check costs
#: the same on any size (a hash of every row costs about a second per GB).
_SAMPLE_ROWS = 64

#: The fix for weights that differ (their digest is the feature cache's fingerprint, which
#: covers the modules' code too).
RELOAD = "load the same checkpoint on every rank, with the same version of the model's code"
_SAME_DATA = (
    "load and preprocess the data the same way on every rank (the same files, order, "
    "transforms and seed)"
)


def _digest(*parts: bytes | memoryview | str) -> str:
    """16 hex digits: enough to tell accidental differences apart, short to show."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def _plain(value: Any) -> Any:
    """A JSON-able stand-in for ``value`` that is the same in every process."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        return {
            "dtype": str(value.dtype),
            "shape": list(value.shape),
            "bytes": _digest(tensor_bytes(value)),
        }
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)  # set order varies by process
    return _ADDRESS.sub("", repr(value))


def _canonical(value: Any) -> str:
    """``value`` as canonical JSON (sorted keys), or its ``repr`` without addresses."""
    try:
        return json.dumps(value, sort_keys=True, default=_plain, separators=(",", ":"))
    except (TypeError, ValueError):  # keys that cannot be sorted or written
        return _ADDRESS.sub("", repr(value))


def _architecture(module: nn.Module) -> str:
    """A digest of a module's structure: its ``repr`` and its tensors' names, shapes and
    dtypes (not their values)."""
    shapes = [f"{k}:{t.dtype}:{tuple(t.shape)}" for k, t in module.state_dict().items()]
    return _digest(_ADDRESS.sub("", repr(module)), *shapes)


def _weights(module: nn.Module) -> str:
    """The module's fingerprint (the feature cache's: structure, weights, buffers and
    code), cut to 16 hex digits. Computed once per change of the weights: the cache of
    the fit that follows reuses it."""
    return backbone_fingerprint(module)[:16]


def model_facts(model: nn.Module, who: str = "", *, learned: bool = True) -> Facts:
    """What every rank must agree on about a model: its plugins, their classes and
    parameters, the backbone's and head's architecture and weights, and every plugin's
    learned state (a bare classifier: its architecture and weights).

    Args:
        model: A :class:`~wrapcal.WrappedModel` or a bare ``nn.Module``.
        who: How messages name the model when there are several (``"model 'wrapped'"``).
        learned: Compare the plugins' learned state too.
    """
    p = f"{who}: " if who else ""
    names: list[str] | None = getattr(model, "plugin_names", None)
    plugins = getattr(model, "plugins", None)
    if names is None or plugins is None or not hasattr(model, "head"):
        return {
            f"{p}the model's architecture": (
                _architecture(model),
                "build the same model on every rank",
            ),
            f"{p}the model's weights": (_weights(model), RELOAD),
        }
    same = "on every rank"
    facts: Facts = {
        f"{p}the plugins": (
            ", ".join(names) or "none",
            f"wrap the model with the same plugins, in the same order, {same}",
        )
    }
    for name, plugin in zip(names, plugins, strict=True):
        kind = type(plugin)
        facts[f"{p}plugin {name}'s class"] = (
            f"{kind.__module__}.{kind.__qualname__}",
            f"install the same version of the plugin's package {same}",
        )
        for key, value in plugin.get_params().items():
            facts[f"{p}plugin {name}'s parameter {key}"] = (
                _canonical(value),
                f"pass the same parameters to plugin {name} {same}",
            )
    rebuild = f"build the same model and wrap it the same way {same}"
    for part in ("backbone", "head"):
        module = getattr(model, part)
        facts[f"{p}the {part}'s architecture"] = (_architecture(module), rebuild)
        facts[f"{p}the {part}'s weights"] = (_weights(module), RELOAD)
    # A state split across the ranks (a KNN bank with shard_bank=True) differs by design.
    split = set(sharded_plugins(model)) if hasattr(model, "chain") else set()  # type: ignore[arg-type]
    for name, plugin in zip(names, plugins, strict=True):
        if not learned:
            break
        facts[f"{p}plugin {name}'s learned state"] = (
            "split across the ranks"
            if name in split
            else _digest(_weights(plugin), _canonical(plugin.get_state())),
            "start every rank from the same model: a fresh wrap, the same saved file, or "
            "a fit on every rank together",
        )
    return facts


def _total(data: Any) -> int | None:
    """The whole data set's rows, as every rank should see them (``None``: unknown)."""
    from wrapcal.data import num_samples

    try:
        return num_samples(data)
    except Exception:  # a length that fails is reported as unknown, and compared so
        return None


def _in_memory(data: Any) -> tuple[Any, Any, bool] | None:
    """``(inputs, labels, labelled)`` of a tensor, an array or an ``(X, y)`` pair."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return data, None, False
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
        return data[0], data[1], True
    return None


def _dataset_of(data: Any) -> Any:
    return data.dataset if isinstance(data, DataLoader) else data


def _labels_summary(labels: Any) -> str:
    """How many labels, their classes and a digest of them all (in order)."""
    if not isinstance(labels, (torch.Tensor, np.ndarray, list, tuple)):
        return f"a {type(labels).__name__}"  # refused when read, alike on every rank
    y = torch.as_tensor(np.asarray(labels) if isinstance(labels, (list, tuple)) else labels)
    y = y.detach().cpu().reshape(-1)
    if not y.is_floating_point() and not y.is_complex():
        y = y.to(torch.int64)  # int32 on one rank, int64 on another: the same labels
    if len(y) and y.dtype == torch.int64 and y.min() >= 0 and y.max() < 1 << 20:
        classes = torch.bincount(y).nonzero().reshape(-1)  # 6x faster than a sort
    else:
        classes = torch.unique(y)
    span = f"{classes[0].item()}..{classes[-1].item()}" if len(classes) else "none"
    return f"{len(y)} labels, {len(classes)} classes ({span}), digest {_digest(tensor_bytes(y))}"


def _inputs_sample(x: Any) -> str:
    """A digest of up to :data:`_SAMPLE_ROWS` rows spread over the inputs, with the
    inputs' row shape and dtype."""
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        return f"a {type(x).__name__}"  # refused when read, alike on every rank
    n = len(x)
    rows = torch.linspace(0, max(n - 1, 0), min(n, _SAMPLE_ROWS)).round().long().unique()
    if isinstance(x, np.ndarray):
        sample = torch.from_numpy(np.ascontiguousarray(x[rows.numpy()]))
    else:
        sample = torch.as_tensor(x)[rows.to(torch.as_tensor(x).device)]
    shape = "x".join(str(d) for d in sample.shape[1:]) or "scalar"
    digest = _digest(tensor_bytes(sample))
    dtype = str(sample.dtype).removeprefix("torch.")
    return f"{len(rows)} of {n} rows of {shape} {dtype}, digest {digest}"


def data_facts(name: str, data: Any) -> Facts:
    """What every rank must agree on about one data set, before reading it: how it is
    sharded, its size, its labels (of in-memory data, or a dataset's ``targets``), its
    class names (a dataset's ``classes``), a sample of its inputs (in-memory data) and,
    for a ``DistributedSampler``, that each rank's sampler is set for that rank.

    Each rank passes the whole set (wrapcal cuts each rank's shard) or its own
    shards through a ``DistributedSampler``: either way the whole set is the same on
    every rank. Rows that only reading tells (a ``Dataset``'s labels, the rows an
    iterable yields) are checked after reading, by :func:`check_shard_rows`.
    """
    what = f"the {name} set"
    by_user = sharded_by_user(data)
    sampler = getattr(data, "sampler", None) if isinstance(data, DataLoader) else None
    facts: Facts = {
        f"how {what} is sharded": (
            "by the user" if by_user else "by wrapcal",
            "pass the whole data set on every rank (wrapcal gives each rank its shard), or "
            "a DataLoader with a DistributedSampler on every rank",
        ),
    }
    total = _total(data)
    facts[f"the size of {what}"] = (
        "unknown" if total is None else f"{total} rows",
        f"pass the whole {name} set on every rank, the same rows (wrapcal gives each rank "
        f"its shard); {_SAME_DATA}",
    )
    if isinstance(sampler, DistributedSampler):
        mine = sampler.num_replicas == world() and sampler.rank == rank()
        facts[f"{what}'s DistributedSampler"] = (
            "set for its rank"
            if mine
            else f"num_replicas={sampler.num_replicas}, rank={sampler.rank} in the process "
            f"of rank {rank()} of {world()}",
            "create it after init_process_group without num_replicas and rank (they "
            "default to the process group's), or with this process's",
        )
    memory = _in_memory(data)
    if memory is not None:
        x, y, labelled = memory
        facts[f"whether {what} is labelled"] = (
            "labelled" if labelled else "unlabelled",
            "pass labels on every rank or on none",
        )
        facts[f"a sample of {what}'s inputs"] = (_inputs_sample(x), _SAME_DATA)
    else:
        dataset = _dataset_of(data)
        y = getattr(dataset, "targets", None)  # torchvision's ImageFolder, CIFAR, MNIST
        classes = getattr(dataset, "classes", None)
        if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
            shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
            facts[f"{what}'s class names"] = (
                f"{len(classes)} ({shown}), digest {_digest(chr(0).join(classes))}",
                f"use the same data, with the same class folders, on every rank; {_SAME_DATA}",
            )
        if not isinstance(y, (list, tuple, np.ndarray, torch.Tensor)):
            y = None
    if y is not None:
        try:
            labels = _labels_summary(y)
        except (TypeError, ValueError, RuntimeError):  # refused when read, alike everywhere
            labels = f"unreadable labels ({type(y).__name__})"
        facts[f"{what}'s labels"] = (labels, _SAME_DATA)
    return facts


def agree_to_evaluate(
    models: dict[str, nn.Module],
    sets: dict[str, Any],
    settings: dict[str, Any],
    *,
    learned: bool = True,
) -> None:
    """Before ``wrapcal.evaluate`` runs a model: fail every rank unless every rank holds
    the same models (weights, plugins and their fitted state), the same data sets and
    the same settings. Ranks that disagree would gather one report from shards of
    different models (or data). A no-op outside a process group.

    Args:
        models: Name -> model, as ``evaluate`` was given them.
        sets: Name -> data (``"test"``, ``"ood 'svhn'"``...).
        settings: ``evaluate``'s other arguments that change the report.
        learned: Compare the plugins' learned state too (models fitted together on
            CPUs hold the same bits; on GPUs whose kernels are not deterministic the
            heads trained by a fit may differ in their last bits).

    Raises:
        DistributedError: On every rank, naming what differs and the fix.
    """
    if not active():
        return

    def describe() -> Facts:
        facts: Facts = {
            "the models evaluated": (
                ", ".join(models),
                "pass the same models to evaluate on every rank",
            ),
            "the data sets evaluated": (
                ", ".join(sets),
                "pass the same data sets to evaluate on every rank",
            ),
            "evaluate's settings": (
                _canonical(settings),
                "pass the same arguments to evaluate on every rank",
            ),
        }
        for name, model in models.items():
            facts.update(model_facts(model, f"model {name!r}", learned=learned))
        for name, data in sets.items():
            facts.update(data_facts(name, data))
        return facts

    check_agreement(agree(describe, "describing the models and data"))


def _ranks(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"ranks 0-2, 5"``."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and spans[-1][1] == r - 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"


def _shown(value: str | None) -> str:
    if value is None:
        return "(nothing)"
    return value if len(value) <= _SHOWN else value[: _SHOWN - 3] + "..."


def _by_rank(values: Sequence[str | None]) -> str:
    groups: dict[str | None, list[int]] = {}
    for r, value in enumerate(values):
        groups.setdefault(value, []).append(r)
    parts = [f"{_ranks(rs)} = {_shown(v)}" for v, rs in list(groups.items())[:_GROUPS]]
    if len(groups) > _GROUPS:
        parts.append(f"and {len(groups) - _GROUPS} other values")
    return "; ".join(parts)


def _fail_everywhere(message: str) -> DistributedError:
    """An error every rank raises alike (from the same exchanged facts): no rank waits
    to hear of it."""
    error = DistributedError(message)
    error._wrapcal_reported = True  # type: ignore[attr-defined]
    return error


def check_agreement(facts: Facts, *, group: ProcessGroup | None = None) -> None:
    """Check that every rank of ``group`` holds the same ``facts``; fail every rank if not.

    One exchange of the facts (short strings); every rank compares the same exchanged
    list, so every rank raises the same error, and none waits in a collective.

    Args:
        facts: This rank's facts (:func:`model_facts`, :func:`data_facts`).
        group: The ranks that must agree (the default process group by default).

    Raises:
        DistributedError: On every rank, when any topic's value differs between ranks:
            the message names the first such topic, each rank's value and the fix, then
            the other topics that differ.
    """
    if not active(group):
        return
    everyone: list[Facts] = exchange(facts, group=group)
    topics = list(dict.fromkeys(topic for said in everyone for topic in said))
    differ = [
        topic
        for topic in topics
        if len({said[topic][0] if topic in said else None for said in everyone}) > 1
    ]
    if not differ:
        return
    first = differ[0]
    values = [said[first][0] if first in said else None for said in everyone]
    fix = next(said[first][1] for said in everyone if first in said)
    more = differ[1 : 1 + _GROUPS] + (
        [f"{len(differ) - 1 - _GROUPS} more"] if len(differ) > 1 + _GROUPS else []
    )
    also = f" They also disagree on {'; '.join(more)}." if more else ""
    raise _fail_everywhere(f"ranks disagree on {first}: {_by_rank(values)}. Fix: {fix}.{also}")


def check_shard_rows(
    name: str, data: Any, rows: int, labelled: bool, *, group: ProcessGroup | None = None
) -> list[int]:
    """After each rank read its shard of a data set: check that every rank's shard is
    labelled, or none, and that the shards' rows add up to the whole set's rows that the
    ranks agreed on (for shards that wrapcal cut: a ``DistributedSampler`` pads or drops
    rows to even shards, so its sum is not checked). Returns every rank's rows.

    Args:
        name: The data set, for messages.
        data: The data set as this rank was given it (before :func:`shard`).
        rows: This rank's rows.
        labelled: Whether this rank's shard has labels.
        group: The ranks (the default process group by default).

    Raises:
        DistributedError: On every rank, naming the shards that differ.
    """
    if not active(group):
        return [rows]
    total, by_user = _total(data), sharded_by_user(data)
    everyone = exchange((rows, labelled), group=group)
    counts = [n for n, _ in everyone]
    marks = ["labelled" if has else "unlabelled" for _, has in everyone]
    if len(set(marks)) > 1:
        raise _fail_everywhere(
            f"ranks disagree on whether the {name} set is labelled: {_by_rank(marks)}. Fix: "
            "pass labels on every rank or on none (every sample of a Dataset or none)."
        )
    if total is not None and not by_user and sum(counts) != total:
        raise _fail_everywhere(
            f"the shards of the {name} set hold {' + '.join(map(str, counts))} = {sum(counts)} "
            f"rows, not the {total} rows that its length says on every rank: make its "
            "__len__ match the rows it yields"
        )
    return counts


# --- models with sharded plugins ---------------------------------------------------------
# The wrapped model imports this module, so these functions take it through the small
# protocols below (what they read of it) instead of importing its class.


class ShardedPlugin(Protocol):
    """A plugin as :func:`unshard` sees it: ``Plugin.unshard``, declared in
    :class:`wrapcal.plugin.base.Plugin` (a no-op unless the plugin keeps sharded state)."""

    def unshard(self) -> object:
        """Gather every rank's part of the plugin's learned state."""
        ...


class PluginChain(Protocol):
    """The plugins of a model in the order they act: ``(name, plugin, tags)``."""

    @property
    def plugins(self) -> Sequence[tuple[str, ShardedPlugin, PluginTags]]:
        """The plugins, with their names and tags."""
        ...


class ChainedModel(Protocol):
    """What these functions read of a :class:`~wrapcal.WrappedModel`: its plugin chain."""

    def chain(self) -> PluginChain:
        """The model's plugins, in order."""
        ...


M = TypeVar("M", bound=ChainedModel)


def sharded_plugins(wrapped: ChainedModel) -> list[str]:
    """Names of the plugins whose learned state is split across the ranks."""
    return [name for name, _, tags in wrapped.chain().plugins if tags.collective_outputs]


def check_whole(wrapped: ChainedModel, action: str) -> None:
    """Refuse ``action`` (save, export) on a model with sharded plugins, naming the fix.

    Raises:
        DistributedError: A plugin holds only this rank's part of its state.
    """
    names = sharded_plugins(wrapped)
    if names:
        raise DistributedError(
            f"cannot {action} this model: plugin {', '.join(names)} holds only rank "
            f"{rank()}'s part of its state (fitted with shard_bank=True under "
            "torch.distributed); call wrapcal.distributed.unshard(wrapped) on every rank "
            f"first, then {action} from rank 0"
        )


def unshard(wrapped: M) -> M:
    """Gather every rank's part of plugins whose learned state is sharded (a KNN bank
    fitted with ``shard_bank=True``), so each rank holds the whole model: needed before
    ``save`` or ``export``, or inference outside the process group. Call it on every
    rank. Returns ``wrapped``.

    It calls the declared ``Plugin.unshard()`` of every plugin that keeps sharded state
    (its tags' ``collective_outputs``), in the chain's order, so every rank makes the
    same collectives in the same order.
    """
    for _, plugin, tags in wrapped.chain().plugins:
        if tags.collective_outputs:
            plugin.unshard()
    return wrapped
