"""Dropout helpers for the MC dropout plugin: finding a model's head dropout, and
dropout with masks drawn from a seeded generator, as PyTorch's modules draw them."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd  # the dropout modules' base: their rate p

from wrapcal.plugin import ModelView, TappedBackbone

__all__ = [
    "DEFAULT_P",
    "DROPOUT_TYPES",
    "dropout_modules",
    "find_head_dropout",
    "model_of",
    "seeded_dropout",
]

#: Head dropout rate when the model has none: small, because the head was not trained
#: with dropout. Measured on the shared ResNet-20 (``benchmarks/defaults_resnet20.py``:
#: CIFAR-10 JPEG test[3000:] vs MNIST, T=30, no fine-tuning, 4 mask seeds): p=0.2 keeps
#: accuracy (84.2% vs 84.3% bare) and gives ECE 2.9-4.3% where p=0.1 gives 6.2-7.1% and
#: p=0.05 8.4%; mutual-information AUROC is 58-67% at p=0.2, 63-70% at p=0.1, and Gal &
#: Ghahramani's p=0.5 costs 1.8 points of accuracy for 57%. Larger rates are a choice for
#: models trained with them.
DEFAULT_P = 0.2

#: The modules ``scope="all"`` samples. ``DropPath`` (stochastic depth) is not dropout.
DROPOUT_TYPES: tuple[type[_DropoutNd], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_CHANNEL_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)
_ALPHA_DROPOUT = (nn.AlphaDropout, nn.FeatureAlphaDropout)
#: SELU's negative saturation, as in PyTorch's alpha dropout.
_SELU_ALPHA = 1.7580993408473766


def model_of(model: ModelView) -> nn.Module:
    """The user's model inside the backbone (the split keeps it whole, head replaced)."""
    backbone = model.backbone
    return backbone.model if isinstance(backbone, TappedBackbone) else backbone


def find_head_dropout(model: ModelView) -> tuple[float, str | None]:
    """The dropout the model applies to the head's input.

    Looks, in order, for a dropout module registered just before the head (torchvision's
    ``classifier = Sequential(Dropout, Linear)``, timm's ``head_drop`` / ``head.drop``,
    ``self.drop = nn.Dropout(p); self.fc = nn.Linear(...)`` in a hand-written model), then
    for timm's ``drop_rate``, which resnet, efficientnet and mobilenetv3 apply with
    ``F.dropout`` in ``forward_head``.

    Args:
        model: The wrapped model as a plugin sees it (``backbone``, ``head_path``).

    Returns:
        ``(rate, module name)``; the name is ``None`` when the dropout is functional, and
        the rate is 0 when the model has no head dropout.
    """
    inner = model_of(model)
    slot = model.head_path
    if slot is not None:
        # Pre-order: the entry before the head is the last leaf registered before it.
        names = list(inner.named_modules())
        index = next((i for i, (name, _) in enumerate(names) if name == slot), 0)
        if index > 0:
            name, module = names[index - 1]
            if isinstance(module, DROPOUT_TYPES) and module.p > 0:
                return float(module.p), name
    rate = getattr(inner, "drop_rate", 0.0)
    timm_model = type(inner).__module__.startswith("timm.")
    if timm_model and isinstance(rate, (int, float)) and rate > 0:
        return float(rate), None
    return 0.0, None


def dropout_modules(module: nn.Module) -> list[str]:
    """Names of the dropout modules with a rate above 0 in ``module``."""
    return [name for name, m in module.named_modules() if isinstance(m, DROPOUT_TYPES) and m.p > 0]


def seeded_dropout(
    x: torch.Tensor, p: float, generator: torch.Generator, kind: type[nn.Module] = nn.Dropout
) -> torch.Tensor:
    """Dropout of rate ``p`` like ``kind`` in train mode, with masks from ``generator``.

    Elementwise for ``nn.Dropout``, one mask per (sample, channel) for the ``Dropout1d``
    ... ``3d`` and ``FeatureAlphaDropout`` kinds, and SELU-preserving for the alpha kinds,
    with PyTorch's formulas.
    """
    if p == 0:
        return x
    channel = issubclass(kind, _CHANNEL_DROPOUT)
    shape = (*x.shape[:2], *([1] * (x.ndim - 2))) if channel else x.shape
    keep = (torch.rand(shape, generator=generator, device=x.device) >= p).to(x.dtype)
    if issubclass(kind, _ALPHA_DROPOUT):
        a = 1.0 / math.sqrt((_SELU_ALPHA**2 * p + 1) * (1 - p))
        return x * (keep * a) + (keep - 1) * (_SELU_ALPHA * a) + _SELU_ALPHA * a * p
    return x * keep / (1 - p)
