"""Small torch helpers shared by the core: modes, devices, feature shape checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from wrapcal.errors import DataError, SplitError

__all__ = [
    "HOW_TO_SPLIT_BY_HAND",
    "check_batch",
    "check_features",
    "device_of",
    "float_dtype_of",
    "in_mode",
    "input_hint",
    "one_cpu_thread",
    "preserved_modes",
]

HOW_TO_SPLIT_BY_HAND = (
    "pass the split by hand: wrapcal.wrap(model, head='name.of.final.linear') when the "
    "model's output is that module's output, or "
    "wrapcal.wrap(model, split=wrapcal.Split(backbone=features_module, head=head_module))"
)


@contextlib.contextmanager
def preserved_modes(*modules: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag when the block ends.

    ``module.train(mode)`` would flatten a user's mix (frozen BatchNorm in a training
    network, say); this puts back each submodule's flag as it was.
    """
    modes = [(m, m.training) for root in modules for m in root.modules()]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def in_mode(module: nn.Module, train: bool) -> Iterator[nn.Module]:
    """``module`` in train or eval mode inside the block, every flag restored after."""
    with preserved_modes(module):
        module.train(train)
        yield module


def device_of(module: nn.Module) -> torch.device:
    """Where the module's first parameter or buffer is (the CPU if it has none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def float_dtype_of(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating parameter or buffer, if any."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def check_features(features: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """The backbone's output must be ``[batch, features]`` (of ``width`` when known).

    Raises:
        SplitError: Another shape; the message says how to split by hand.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise SplitError(
            f"the backbone returned features of shape {shape}, expected [batch, features]; "
            f"{HOW_TO_SPLIT_BY_HAND}"
        )
    if width is not None and features.shape[1] != width:
        raise SplitError(
            f"the backbone returned {features.shape[1]} features, the head takes {width}; "
            f"{HOW_TO_SPLIT_BY_HAND}"
        )
    return features


def input_hint(expected: tuple[int, ...] | None, fixed: bool) -> str:
    """``"the model takes inputs [N, 3, ...]"`` (the whole shape when the size is fixed)."""
    if expected is None:
        return ""
    shape = [*expected] if fixed else [expected[0], "..."]
    return f"the model takes inputs [N, {', '.join(map(str, shape))}]"


def check_batch(x: torch.Tensor, expected: tuple[int, ...] | None, fixed: bool) -> None:
    """Refuse a batch the model cannot take, saying what it takes.

    Args:
        x: The batch.
        expected: The shape of one input (from ``fit`` or the split adapter), if known.
        fixed: Whether the model takes only that spatial size (a ViT).

    Raises:
        DataError: One input instead of a batch, another number of channels or
            dimensions, another size for a fixed-size model, or NaN/inf values.
    """
    if expected is not None:
        batch = f"[N, {', '.join(map(str, expected))}]"
        if tuple(x.shape) == expected:
            raise DataError(
                f"inputs have shape {list(x.shape)}: one input, not a batch; the model "
                f"takes {batch}: pass x.unsqueeze(0)"
            )
        if x.ndim != len(expected) + 1 or x.shape[1] != expected[0]:
            raise DataError(
                f"inputs have shape {list(x.shape)}; the model takes {batch} "
                f"({expected[0]} channels{' at this size' if fixed else ''})"
            )
        if fixed and tuple(x.shape[1:]) != expected:
            raise DataError(
                f"inputs have shape {list(x.shape)}; the model takes exactly {batch} "
                "(its position embedding fixes the size): resize the inputs"
            )
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(-1).sum())
        raise DataError(
            f"{bad} of {x.shape[0]} inputs hold NaN or inf values, which give NaN or inf "
            "features and predictions; fix or drop them (wrapped.check_inputs = False "
            "turns this check off for trusted inputs)"
        )


@contextlib.contextmanager
def one_cpu_thread(device: torch.device | str) -> Iterator[None]:
    """Run small many-step CPU work (a calibrator's fit) on one intra-op thread, then
    restore the count.

    A fit is hundreds of passes of operations on a few megabytes: extra threads save
    little and add a synchronisation per operation, which dominates when the CPU is
    shared (measured here, 2 cores under load: vector scaling on 5000 x 100 logits 0.74 s
    on one thread, 9.1 s on two; matrix scaling 0.7-1.0 s against 1.8-12 s). CUDA work
    is left as it is. ``device`` may be a name (``"cpu"``, ``"cuda:0"``).
    """
    if torch.device(device).type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
