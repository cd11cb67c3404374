"""The parts the discrepancy heads are trained with (Yu & Aizawa, ICCV 2019): the losses
and the score, head 2's seeded initialisation, the paired labelled/unlabelled batches and
the optional backbone block. The plugin itself is :mod:`wrapcal_plugins.ood.discrepancy`."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wrapcal.plugin import (
    DataError,
    check_features,
    logits_to_log_probs,
    logits_to_probs,
    shuffled_batches,
)

__all__ = [
    "NAME",
    "PairedBatches",
    "backbone_block",
    "cross_entropy",
    "discrepancy_loss",
    "embedder",
    "l1_discrepancy",
    "per_sample_entropy",
    "seeded_reinit",
    "unfreeze_only",
]

NAME = "discrepancy"


def per_sample_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each sample's class distribution: ``[..., K]`` -> ``[...]``.

    Computed from log-softmax, so confident logits give 0 rather than NaN.
    """
    log_p = logits_to_log_probs(logits)
    return -(log_p.exp() * log_p).sum(dim=-1)


def discrepancy_loss(
    logits1: torch.Tensor, logits2: torch.Tensor, margin: float = 1.2
) -> torch.Tensor:
    """The paper's unsupervised loss ``max(0, m - mean_x [H(p1(x)) - H(p2(x))])``.

    Args:
        logits1: Head 1's logits ``[B, K]`` on unlabelled inputs.
        logits2: Head 2's logits ``[B, K]`` on the same inputs.
        margin: ``m``; the loss is 0 once the mean entropy gap reaches it.

    Returns:
        A scalar tensor.
    """
    gap = per_sample_entropy(logits1) - per_sample_entropy(logits2)
    return F.relu(margin - gap.mean())


def l1_discrepancy(members: torch.Tensor) -> torch.Tensor:
    """``sum_k |p1_k - p2_k|`` per sample from members ``[T*2, N, K]`` (head fastest).

    The L1 distance is taken within each pair ``(2t, 2t + 1)`` and averaged over ``t``.

    Raises:
        ValueError: If the members do not come in pairs.
    """
    if members.ndim != 3 or members.shape[0] % 2:
        raise ValueError(
            f"the discrepancy score needs members [T*2, N, K] from the two heads; got "
            f"shape {tuple(members.shape)}. A plugin that changes the members after the "
            "discrepancy heads must keep the head index fastest"
        )
    probs = logits_to_probs(members)
    pairs = probs.reshape(-1, 2, *probs.shape[1:])
    return (pairs[:, 0] - pairs[:, 1]).abs().sum(dim=-1).mean(dim=0)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Through logits_to_log_probs so single-logit binary heads work too.
    return F.nll_loss(logits_to_log_probs(logits), labels)


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def seeded_reinit(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module`` like PyTorch's defaults, from a seeded generator.

    Linear and convolution layers get PyTorch's default (Kaiming-uniform weights with
    ``a = sqrt(5)``, biases uniform in ``±1/sqrt(fan_in)``); normalisation layers
    their deterministic reset. Values are drawn on the CPU and copied, so the same
    seed gives the same head on any device. Other parameters keep their values.

    The generator's seed is derived from ``seed`` and a fixed tag: a head that was
    itself initialised after ``torch.manual_seed(seed)`` would otherwise get the very
    same draws, and the two heads would start identical.
    """
    derived = zlib.crc32(f"wrapcal.discrepancy.head2:{seed}".encode())
    generator = torch.Generator(device="cpu").manual_seed(derived)
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            weight = torch.empty(m.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            m.weight.copy_(weight)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
                bias = torch.empty(m.bias.shape, dtype=torch.float32)
                nn.init.uniform_(bias, -bound, bound, generator=generator)
                m.bias.copy_(bias)
        elif isinstance(m, _NORMS):
            m.reset_parameters()


class PairedBatches:
    """Mini-batches for one epoch: labelled ``(x, y)`` paired with unlabelled ``x``.

    ``x`` are cached features or raw inputs streamed from the user's data, both read
    through :func:`shuffled_batches` on one seeded generator; the unlabelled data is
    cycled when it runs out before the labelled data.
    """

    def __init__(self, labelled: Any, unlabelled: Any, batch_size: int, seed: int) -> None:
        self.labelled = labelled
        self.unlabelled = unlabelled
        self.batch_size = batch_size
        # CPU generator: the same shuffles on any device.
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self._unlabelled_iter: Iterator[torch.Tensor] | None = None

    def _next_unlabelled(self) -> torch.Tensor:
        for _ in range(2):  # a fresh pass when the last one ran out
            if self._unlabelled_iter is None:
                self._unlabelled_iter = (
                    x for x, _ in shuffled_batches(self.unlabelled, self.batch_size, self.generator)
                )
            x = next(self._unlabelled_iter, None)
            if x is not None:
                return x
            self._unlabelled_iter = None
        raise DataError("the unlabeled data set is empty")

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(x_labelled, y, x_unlabelled)`` for one pass over the labelled data."""
        for x, y in shuffled_batches(self.labelled, self.batch_size, self.generator):
            if y is None:
                raise DataError(
                    f"plugin {NAME} needs labels for the 'train' data; pass (X, y) or a "
                    "loader that yields (x, y) batches"
                )
            yield x, y, self._next_unlabelled()


def backbone_block(
    backbone: nn.Module, name: str | None, train_data: Any, unlabeled_data: Any
) -> nn.Module | None:
    """The backbone submodule ``name`` that fine-tuning trains too (``None``: heads only).

    Raises:
        ValueError: ``name`` is not a submodule of the backbone, or has no parameters.
        DataError: The inputs are missing (fitted from features), so nothing can stream.
    """
    if name is None:
        return None
    try:
        block = backbone.get_submodule(name)
    except AttributeError as err:
        names = [n for n, m in backbone.named_children()]
        raise ValueError(
            f"train_backbone_block={name!r} is not a submodule of the backbone; its "
            f"top-level children are {names} (use dotted names, e.g. 'model.layer3')"
        ) from err
    if not any(True for _ in block.parameters()):
        raise ValueError(f"train_backbone_block={name!r} has no parameters to train")
    if train_data is None or unlabeled_data is None:
        raise DataError(
            f"plugin {NAME} with train_backbone_block streams the inputs through the "
            "backbone: call wrapped.fit(train=..., unlabeled=...) with the data, not "
            "fit_features"
        )
    return block


def unfreeze_only(backbone: nn.Module, block: nn.Module) -> list[torch.Tensor]:
    """Freeze the backbone but ``block``; return ``block``'s parameters."""
    for p in backbone.parameters():
        p.requires_grad_(False)
    params: list[torch.Tensor] = list(block.parameters())
    for param in params:
        param.requires_grad_(True)
    return params


def embedder(backbone: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inputs to checked features through ``backbone``, on its device and dtype."""
    param = next(backbone.parameters())

    def embed(x: torch.Tensor) -> torch.Tensor:
        return check_features(backbone(x.to(device=param.device, dtype=param.dtype)))

    return embed
