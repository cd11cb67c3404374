"""Training loops for heads on cached features, shared by the built-in plugins.

Two ways to fit a head ``head(features) -> logits`` to ``loss_fn(logits, labels)``:

* :func:`fit_head_lbfgs`: full-batch L-BFGS on the exact training objective. For a
  linear head the problem is convex, so it converges to the optimum reliably, in a few
  hundred cheap evaluations, without a learning rate or a seed to tune; the label
  smoothing plugin uses it.
* :func:`train_head`: mini-batch Adam, for losses that need batches (or heads too big
  for a full-batch objective).

:func:`shuffled_batches` gives one epoch of mini-batches in a seeded order; every
plugin that trains on batches (label smoothing, the discrepancy heads) reads its data
through it.

Both minimise the same objective, ``loss_fn + weight_decay / 2 * ||W||^2``, where the
penalty covers the parameters with two or more dimensions (weight matrices, not biases
or normalisation scales, as usual), train the head in place, and restore its
train/eval mode and ``requires_grad`` flags afterwards. ``loss_fn`` must return the
*mean* loss over the samples it is given.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from wrapcal.features.disk_arrays import DiskFeatures

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "SINGLE_THREAD_WORK",
    "LossFn",
    "fit_head_lbfgs",
    "l2_penalty",
    "shuffled_batches",
    "small_work_threads",
    "train_head",
    "training_state",
]

#: Multiply-adds per forward pass (rows x head parameters) up to which CPU training runs
#: on one intra-op thread (see :func:`small_work_threads`).
SINGLE_THREAD_WORK = 1 << 24


@overload
def shuffled_batches(
    data: tuple[torch.Tensor | DiskFeatures, torch.Tensor],
    batch_size: int,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@overload
def shuffled_batches(
    data: Any, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Any, torch.Tensor | None]]: ...


def shuffled_batches(
    data: Any, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """One epoch of ``(x, y)`` mini-batches (``y`` is ``None`` for unlabelled data) in a
    seeded random order.

    Tensors, arrays and disk-cached features, alone or as an ``(X, y)`` pair, are indexed
    a batch at a time through one permutation drawn from ``generator`` (a CPU generator:
    the same order on any device), never copied whole. A ``Dataset`` is read by a
    shuffling ``DataLoader`` on the same generator. A ``DataLoader`` is used as given: it
    decides its own order.
    """
    # Imported here: the data readers and the disk store import SDK modules, and this
    # module is imported with the SDK's package (see wrapcal/plugin/__init__.py).
    from wrapcal.data import iter_batches
    from wrapcal.features.disk_arrays import DiskFeatures

    pair = isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset)
    x, y = data if pair else (data, None)
    x, y = (torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in (x, y))
    if isinstance(x, (torch.Tensor, DiskFeatures)):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            yield x[idx.to(x.device)], None if y is None else y[idx.to(y.device)]
    elif isinstance(data, Dataset) and not isinstance(data, DataLoader):
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
        yield from iter_batches(loader, batch_size)
    else:
        yield from iter_batches(data, batch_size)


def l2_penalty(module: nn.Module, weight_decay: float) -> torch.Tensor:
    """``weight_decay / 2`` times the squared norm of the module's weight matrices.

    Its gradient is ``weight_decay * W``: the classic (coupled) weight decay.
    """
    weights = [p for p in module.parameters() if p.ndim > 1]
    if not weights or weight_decay == 0:
        return torch.zeros((), device=_device(module))
    # Summed term by term, as sum() would, but starting from a tensor (not the int 0).
    penalty = weights[0].pow(2).sum()
    for p in weights[1:]:
        penalty = penalty + p.pow(2).sum()
    return 0.5 * weight_decay * penalty


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def small_work_threads(device: torch.device, work: int) -> Iterator[None]:
    """Run small CPU work on one intra-op thread, then restore the thread count.

    Fitting a head is hundreds of passes of ops that take a few milliseconds: extra
    intra-op threads save little and add a synchronisation per op, which dominates when
    the CPU is shared (measured here, ResNet-20 head on 10000 x 64 features, 2 cores
    under load: 4-5 s on one thread, 25-41 s on two). Larger work and CUDA keep the
    process's setting.

    Args:
        device: Where the work runs.
        work: Multiply-adds of one forward pass, about rows x head parameters.
    """
    if device.type != "cpu" or work > SINGLE_THREAD_WORK or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _work(head: nn.Module, rows: int) -> int:
    return rows * sum(p.numel() for p in head.parameters())


@contextlib.contextmanager
def training_state(module: nn.Module, train: bool) -> Iterator[list[nn.Parameter]]:
    """Put ``module`` in train or eval mode with gradients on; restore both afterwards.

    Yields:
        The module's parameters, all with ``requires_grad=True`` inside the block.
    """
    modes = [(m, m.training) for m in module.modules()]
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    module.train(train)
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield params
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _check_inputs(features: torch.Tensor | DiskFeatures, labels: torch.Tensor) -> None:
    if features.ndim != 2 or labels.shape[:1] != features.shape[:1]:
        raise ValueError(
            f"features must be [N, D] and labels [N]; got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError("no training samples: features is empty")


def fit_head_lbfgs(
    head: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn,
    weight_decay: float = 1e-4,
    max_iter: int = 500,
    chunk_size: int = 65536,
    progress: bool = False,
) -> list[float]:
    """Fit ``head`` in place by full-batch L-BFGS (strong Wolfe line search).

    The head is in eval mode while it is fitted: dropout inside it would make the
    objective random, and a line search needs a deterministic one. The objective is
    summed over chunks of ``chunk_size`` rows, so memory stays bounded for large sets.
    The result depends only on the data and the starting weights (no seed).

    Args:
        head: The module mapping features ``[N, D]`` to logits ``[N, K]``.
        features: Training features ``[N, D]`` on the head's device.
        labels: What ``loss_fn`` takes as targets, ``[N]``.
        loss_fn: ``loss_fn(logits, labels)`` -> mean loss.
        weight_decay: Coefficient of the L2 penalty on the weight matrices.
        max_iter: Maximum L-BFGS iterations.
        chunk_size: Rows per forward pass when evaluating the objective.
        progress: Show a progress bar over objective evaluations.

    Returns:
        The objective after every evaluation (line-search trials included); the last
        entry is the objective at the returned weights.

    Raises:
        FloatingPointError: The objective became NaN or infinite.
    """
    _check_inputs(features, labels)
    n = features.shape[0]
    history: list[float] = []
    # L-BFGS evaluates the objective up to 1.25 times per iteration (its max_eval).
    bar = tqdm(
        total=max_iter * 5 // 4 + 1, desc="fit head (L-BFGS)", unit="eval", disable=not progress
    )
    threads = small_work_threads(features.device, _work(head, min(n, chunk_size)))
    with threads, training_state(head, train=False) as params:
        optimizer = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=max_iter,
            history_size=20,
            line_search_fn="strong_wolfe",
            # float32 objectives stall around 1e-7 relative change; tighter is noise.
            tolerance_grad=1e-6,
            tolerance_change=1e-9,
        )

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            total = 0.0
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                share = (stop - start) / n  # chunk means weighted into the full mean
                part = loss_fn(head(features[start:stop]), labels[start:stop]) * share
                part.backward()  # per chunk: only one chunk's graph is alive at a time
                total += float(part.detach())
            penalty = l2_penalty(head, weight_decay)
            if penalty.requires_grad:
                penalty.backward()
            value = total + float(penalty.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    "the head's training objective became NaN or infinite; check the "
                    "features for NaN/inf and lower weight_decay or the learning rate"
                )
            history.append(value)
            bar.update(1)
            return torch.tensor(value)

        optimizer.step(objective)
        # The line search may end on an earlier trial point: evaluate where we stopped.
        objective()
        optimizer.zero_grad(set_to_none=True)
    # L-BFGS usually stops well before max_iter: the bar ends full, saying why.
    stopped_early = len(history) < bar.total
    bar.total = bar.n
    bar.set_postfix_str("converged" if stopped_early else "max_iter reached")
    bar.close()
    return history


def train_head(
    head: nn.Module,
    features: torch.Tensor | DiskFeatures,
    labels: torch.Tensor,
    loss_fn: LossFn,
    epochs: int = 30,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train ``head`` in place with mini-batch Adam over shuffled cached features.

    The head is in train mode (dropout active) while it trains. Shuffling uses its own
    generator seeded with ``seed``, never the global RNG, so runs repeat exactly.

    Args:
        head: The module mapping features ``[N, D]`` to logits ``[N, K]``.
        features: Training features ``[N, D]`` on the head's device.
        labels: What ``loss_fn`` takes as targets, ``[N]``.
        loss_fn: ``loss_fn(logits, labels)`` -> mean loss over the batch.
        epochs: Passes over the features.
        lr: Adam's learning rate.
        weight_decay: Coefficient of the L2 penalty on the weight matrices.
        batch_size: Samples per step.
        seed: Seed of the shuffling.
        progress: Show a progress bar over epochs.

    Returns:
        The mean training objective of each epoch.
    """
    _check_inputs(features, labels)
    n = features.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    history: list[float] = []
    threads = small_work_threads(features.device, _work(head, min(n, batch_size)))
    with threads, training_state(head, train=True) as params:
        optimizer = torch.optim.Adam(params, lr=lr)
        for _ in tqdm(range(epochs), desc="train head", unit="epoch", disable=not progress):
            total = torch.zeros((), device=features.device)
            for x, y in shuffled_batches((features, labels), batch_size, generator):
                loss = loss_fn(head(x), y) + l2_penalty(head, weight_decay)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * x.shape[0]
            history.append(float(total) / n)
    return history
