"""Fine-tuning the whole network (backbone and head) on streamed batches, with early
stopping on the calibration NLL: label smoothing's ``scope="all"``.

The plugin (:mod:`wrapcal_plugins.retrain.label_smoothing`) chooses the loss and the alphas;
this module runs the epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from wrapcal import FeatureSet, ModelView
from wrapcal.plugin import (
    DataError,
    LossFn,
    iter_batches,
    logits_to_log_probs,
    num_samples,
    shuffled_batches,
)

__all__ = ["FineTuning", "clone_state", "fine_tune", "load_state", "mean_nll"]


@dataclass(frozen=True)
class FineTuning:
    """How the network is fine-tuned (the plugin's ``scope="all"`` parameters).

    Attributes:
        epochs: Maximum epochs.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        lr: Learning rate.
        weight_decay: L2 coefficient on weight matrices (not biases or normalisation).
        freeze_bn: Keep BatchNorm layers in eval mode while training.
        patience: Epochs without a lower calibration NLL before stopping.
        batch_size: Training batch size.
        seed: Seed of the shuffles.
    """

    epochs: int
    optimizer: str
    lr: float
    weight_decay: float
    freeze_bn: bool
    patience: int
    batch_size: int
    seed: int


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``labels``, computed in float64."""
    log_p = logits_to_log_probs(logits.double())
    return float(-log_p.gather(-1, labels.long().unsqueeze(-1)).mean())


def clone_state(*modules: nn.Module) -> list[dict[str, torch.Tensor]]:
    """A detached copy of each module's ``state_dict``."""
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def load_state(states: list[dict[str, torch.Tensor]], *modules: nn.Module) -> None:
    """Put back what :func:`clone_state` copied."""
    for module, state in zip(modules, states, strict=True):
        module.load_state_dict(state)


def _to_model(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(device=like.device, dtype=like.dtype if x.is_floating_point() else x.dtype)


def _train_mode(model: ModelView, freeze_bn: bool) -> None:
    for root in (model.backbone, model.head):
        root.train()
        if freeze_bn:
            for m in root.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def _make_optimizer(params: list[nn.Parameter], settings: FineTuning) -> torch.optim.Optimizer:
    # No decay on biases and normalisation parameters (1-d), as in the head fit.
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=0.9)
    return torch.optim.Adam(groups, lr=settings.lr)


def fine_tune(
    model: ModelView,
    loss_fn: LossFn,
    train_data: Any,
    calibration: FeatureSet | None,
    settings: FineTuning,
    progress: bool,
    desc: str,
) -> tuple[list[float], int | None]:
    """Fine-tune backbone and head from their current weights on ``train_data``; leave
    the best epoch's weights in place.

    Args:
        model: The wrapped model's view (its backbone and head train in place).
        loss_fn: ``loss_fn(logits, labels)`` -> the mean training loss.
        train_data: The labelled inputs, streamed through the whole network each epoch.
        calibration: Labelled data with inputs for early stopping, or ``None``.
        settings: Epochs, optimiser, patience and the rest.
        progress: Show a progress bar.
        desc: The bar's label.

    Returns:
        The calibration NLL after each epoch (empty without calibration data) and
        the best epoch (1-based; the last one without calibration data).
    """
    backbone, head = model.backbone, model.head
    params = [p for m in (backbone, head) for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            'scope="all" found no parameter with requires_grad=True; unfreeze the model '
            'or use scope="head"'
        )
    optimizer = _make_optimizer(params, settings)
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    n = num_samples(train_data)
    bar = tqdm(
        total=settings.epochs * n if n else None,
        desc=desc,
        unit="img",
        disable=not progress,
    )
    history: list[float] = []
    best_epoch: int | None = None
    best_nll, best_state = math.inf, None
    try:
        for epoch in range(1, settings.epochs + 1):
            _train_mode(model, settings.freeze_bn)
            total = torch.zeros((), dtype=torch.float64, device=params[0].device)
            seen = 0
            with torch.enable_grad():
                for x, y in shuffled_batches(train_data, settings.batch_size, generator):
                    if y is None:
                        raise DataError(
                            'label_smoothing with scope="all" needs labelled training '
                            "batches: pass (X, y) or a loader that yields (x, y)"
                        )
                    x = _to_model(x, params[0])
                    loss = loss_fn(head(backbone(x)), y.to(x.device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.detach() * x.shape[0]
                    seen += x.shape[0]
                    bar.update(x.shape[0])
            model.backbone_passes += 1
            mean_loss = float(total) / max(seen, 1)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"fine-tuning diverged (training loss {mean_loss}) at epoch {epoch}; lower lr"
                )
            if calibration is None:
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                best_epoch = epoch
                continue
            nll = _stream_nll(model, calibration, settings.batch_size)
            if not math.isfinite(nll):
                raise FloatingPointError(
                    f"the calibration NLL is {nll} after epoch {epoch}; lower lr"
                )
            history.append(nll)
            bar.set_postfix(loss=f"{mean_loss:.4f}", cal_nll=f"{nll:.4f}")
            if nll < best_nll:
                best_nll, best_epoch = nll, epoch
                best_state = clone_state(backbone, head)
            elif best_epoch is not None and epoch - best_epoch >= settings.patience:
                break  # early stopping: no better calibration NLL for `patience` epochs
    finally:
        bar.close()
    if best_state is not None:
        load_state(best_state, backbone, head)
    return history, best_epoch


def _stream_nll(model: ModelView, calibration: FeatureSet, batch_size: int) -> float:
    """Mean NLL of the calibration data through the whole network, in eval mode."""
    model.backbone.eval()
    model.head.eval()
    like = next(iter(model.head.parameters()))
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in iter_batches(calibration.data, batch_size):
            if y is None:
                raise DataError("label_smoothing needs labelled calibration data")
            x = _to_model(x, like)
            logits = model.head_logits(model.backbone(x))
            total += mean_nll(logits, y.to(logits.device)) * x.shape[0]
            count += x.shape[0]
    model.backbone_passes += 1
    return total / count
