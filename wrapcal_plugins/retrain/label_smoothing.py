"""Label smoothing: retrain with softened targets (Müller, Kornblith & Hinton 2019).

Training with the smoothed target ``y_k (1 - alpha) + alpha / K`` instead of the one-hot
``y_k`` keeps a network from pushing its logits without bound on the training data, so
its confidences come out closer to its accuracy. Müller et al. ("When does label
smoothing help?", NeurIPS 2019, Table 3) found that it improves calibration about as
much as temperature scaling (CIFAR-100 ResNet-56: ECE 0.150 -> 0.024 with
``alpha = 0.05``, 0.021 with temperature scaling), and that a network trained with it
is a *worse teacher* for knowledge distillation: smoothing pulls each class's
penultimate-layer representations into a tight cluster, which erases the information
the logits carried about how much an input resembles the other classes.

What follows for users:

* Smoothing is not free calibration on top of temperature scaling: expect about the
  same gain, and check the combination on held-out data (the table in
  ``docs/label_smoothing.md``).
* A fixed ``alpha`` can over-smooth a model with few classes into *under*confidence;
  ``alpha="auto"`` picks it from a small grid by the calibration set's NLL.
* Do not distil from a model retrained with smoothing.

``scope="head"`` (the default) retrains only ``wrapped.head`` on the cached features:
full-batch L-BFGS on the smoothed cross-entropy plus a small weight decay, which is a
convex problem for a linear head, so it converges reliably in seconds without a
learning rate to tune and without another backbone pass. ``scope="all"`` fine-tunes the
backbone and the head together, streaming batches through the whole network.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import partial
from numbers import Real
from typing import Any, ClassVar

import torch

from wrapcal import FeatureSet, FitData, ModelView, Plugin, PluginTags, Stage, hookimpl
from wrapcal.plugin import (
    Check,
    DataError,
    DiskFeatures,
    Interval,
    Options,
    fit_head_lbfgs,
    logits_to_log_probs,
    preserved_modes,
    train_head,
)

from ._smoothing_network import FineTuning, clone_state, fine_tune, load_state, mean_nll

__all__ = [
    "DEFAULT_GRID",
    "FALLBACK_ALPHA",
    "LabelSmoothing",
    "smoothed_cross_entropy",
    "smoothed_targets",
]

NAME = "label_smoothing"
#: The alpha of the default (``alpha=None``) when ``fit`` gets no calibration data to
#: choose one with (see :class:`LabelSmoothing`'s ``alpha`` for the evidence).
FALLBACK_ALPHA = 0.02
#: The alphas ``alpha="auto"`` chooses from; 0 lets it decline to smooth.
DEFAULT_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
SCOPES = ("head", "all")
#: Fine-tuning learning rates when ``lr`` is not given: a tenth of the usual
#: from-scratch rates, since the network starts trained.
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-4}


def smoothed_targets(labels: torch.Tensor, num_classes: int, alpha: float) -> torch.Tensor:
    """The smoothed target distribution ``y_k (1 - alpha) + alpha / K`` as ``[N, K]``."""
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(torch.get_default_dtype())
    return onehot * (1 - alpha) + alpha / num_classes


def smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.1
) -> torch.Tensor:
    """Mean cross-entropy between ``smoothed_targets`` and the softmax of ``logits``.

    ``-sum_k q_k log p_k`` with ``q = y (1 - alpha) + alpha / K``, written as
    ``(1 - alpha) * (-log p_y) + alpha * mean_k(-log p_k)`` so no one-hot matrix is
    built. For ``K >= 2`` logits it equals ``F.cross_entropy(logits, labels,
    label_smoothing=alpha)``; a single-logit binary model counts as ``K = 2``.

    Args:
        logits: ``[N, K]`` logits (``[N, 1]`` for a single-logit binary model).
        labels: ``[N]`` class indices.
        alpha: Smoothing weight in ``[0, 1)``; 0 is the plain cross-entropy.

    Returns:
        The mean loss, a scalar.
    """
    log_p = logits_to_log_probs(logits)
    nll = -log_p.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    if alpha == 0:
        return nll.mean()
    return ((1 - alpha) * nll - alpha * log_p.mean(dim=-1)).mean()


def _is_alpha(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and 0 <= float(value) < 1


#: Feature sets above this many bytes (on disk) are fitted in mini-batches; below it,
#: by the exact full-batch solve in memory, as in-memory sets are.
FULL_BATCH_BYTES = 1 << 30
#: Mini-batch size of the out-of-memory head fit.
LARGE_BATCH = 4096


def _fits_in_memory(features: Any) -> bool:
    if not isinstance(features, DiskFeatures):
        return True
    return features.rows * features.width * 4 <= FULL_BATCH_BYTES


def _is_grid(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(map(_is_alpha, value))


def _is_floats(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, float) and not isinstance(v, bool) for v in value
    )


def _is_grid_nll(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(pair, list) and len(pair) == 2 and _is_alpha(pair[0]) and _is_floats(pair[1:])
        for pair in value
    )


class LabelSmoothing(Plugin):
    """Retrain the head (or the network) with label smoothing; alpha="auto" picks alpha.

    Args:
        alpha: Smoothing weight in ``[0, 1)``; ``"auto"`` to pick it from ``grid`` by
            the NLL on ``wrapped.fit(calibration=...)`` (which it then requires); or
            ``None`` (the default): ``"auto"`` when calibration data is given, else
            :data:`FALLBACK_ALPHA` with a warning. Measured on the shared ResNet-20
            (``benchmarks/defaults_resnet20.py``; head retrained on the 10000 training
            images, ECE on CIFAR-10 JPEG test[3000:]): alpha 0.1 gives 9.4% (it
            over-smooths a 10-class model into underconfidence), 0.05 3.7%, 0.02 1.1%,
            0 5.0%; "auto" (by calibration NLL) 2.7% with the lowest NLL after 0.02.
        scope: ``"head"`` retrains ``wrapped.head`` on the cached features (seconds, no
            backbone pass); ``"all"`` fine-tunes backbone and head on the training data.
        grid: The alphas ``"auto"`` tries; the lowest calibration NLL wins (ties go to
            the smaller alpha).
        weight_decay: L2 penalty coefficient on weight matrices (not biases or
            normalisation parameters). 1e-4 is what He et al. trained CIFAR ResNets with.
        max_iter: L-BFGS iterations for ``scope="head"``.
        epochs: Maximum fine-tuning epochs for ``scope="all"``.
        lr: Learning rate for ``scope="all"`` (default 0.01 for SGD, 1e-4 for Adam).
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``, for ``scope="all"``.
        batch_size: Training batch size for ``scope="all"`` (default: ``fit``'s).
        freeze_bn: For ``scope="all"``: keep BatchNorm layers in eval mode while
            fine-tuning, so their running statistics stay those of the original
            training (their affine weights still train). Small fine-tuning sets give
            noisy batch statistics, and a network trained in the mode it is used in has
            no train/test mismatch for the early-stopping NLL to miss. ``False``
            normalises with batch statistics and updates the running ones.
        patience: For ``scope="all"`` with calibration data: stop after this many
            epochs without a lower calibration NLL; the best epoch's weights are
            restored.

    Attributes:
        alpha_: The alpha the model was retrained with.
        grid_nll_: ``[alpha, calibration NLL]`` for every alpha tried by ``"auto"``.
        history_: Calibration NLL after each fine-tuning epoch (``scope="all"``).
        best_epoch_: The epoch (1-based) whose weights were kept (``scope="all"``).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "alpha": [None, Interval(float, 0, 1, closed="left"), Options(str, ["auto"])],
        "scope": [Options(str, SCOPES)],
        "grid": [Check(_is_grid, "a non-empty list of alphas in [0, 1)")],
        "weight_decay": [Interval(float, 0, None)],
        "max_iter": [Interval(int, 1, 1_000_000)],
        "epochs": [Interval(int, 1, 100_000)],
        "lr": [None, Interval(float, 0, None, closed="neither")],
        "optimizer": [Options(str, DEFAULT_LR)],
        "batch_size": [None, Interval(int, 1, None)],
        "freeze_bn": [bool],
        "patience": [Interval(int, 1, 100_000)],
    }
    _state_constraints: ClassVar[dict[str, list[Any]]] = {
        "alpha_": [None, Interval(float, 0, 1, closed="left")],
        "grid_nll_": [Check(_is_grid_nll, "a list of [alpha, NLL] pairs")],
        "history_": [Check(_is_floats, "a list of floats")],
        "best_epoch_": [None, Interval(int, 1, None)],
    }

    def __init__(
        self,
        alpha: float | str | None = None,
        scope: str = "head",
        grid: Sequence[float] = DEFAULT_GRID,
        weight_decay: float = 1e-4,
        max_iter: int = 500,
        epochs: int = 10,
        lr: float | None = None,
        optimizer: str = "sgd",
        batch_size: int | None = None,
        freeze_bn: bool = True,
        patience: int = 2,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.scope = scope
        self.grid = grid
        self.weight_decay = weight_decay
        self.max_iter = max_iter
        self.epochs = epochs
        self.lr = lr
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.freeze_bn = freeze_bn
        self.patience = patience
        self.alpha_: float | None = None
        self.grid_nll_: list[list[float]] = []
        self.history_: list[float] = []
        self.best_epoch_: int | None = None

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.TRAIN
        tags.fit_requires = {"train": "the labelled data the model is retrained on"}
        if self.alpha == "auto":
            tags.fit_requires["calibration"] = (
                'alpha="auto" picks alpha by the NLL on held-out labels'
            )
        tags.fit_reads = ("calibration",)
        tags.changes_head = True
        # Fine-tuning the whole network changes the cached features.
        tags.changes_backbone = self.scope == "all"
        tags.streams_data = self.scope == "all"
        tags.exportable = True
        return tags

    def fit(self, model: ModelView, data: FitData) -> LabelSmoothing:
        train = data.require("train", NAME, "the labelled data the model is retrained on")
        train.require_labels(NAME)
        calibration = data.calibration
        auto = self.alpha == "auto" or (self.alpha is None and calibration is not None)
        if auto:
            calibration = data.require(
                "calibration", NAME, 'alpha="auto" picks alpha by the NLL on held-out labels'
            )
            calibration.require_labels(NAME)
            alphas = [float(a) for a in self.grid]
        elif self.alpha is None:
            warnings.warn(
                f"label_smoothing: no calibration data to choose alpha with, so it uses "
                f"alpha={FALLBACK_ALPHA}; pass wrapped.fit(calibration=...) to let it choose "
                "(a fixed alpha can over-smooth a model with few classes)",
                UserWarning,
                stacklevel=4,
            )
            alphas = [FALLBACK_ALPHA]
        else:
            alphas = [float(self.alpha)]
        self.grid_nll_, self.history_, self.best_epoch_ = [], [], None
        if self.scope == "head":
            self.alpha_ = self._fit_head(
                model, train, calibration if auto else None, alphas, data.progress
            )
        else:
            self.alpha_ = self._fit_all(model, data, train, calibration, alphas, data.progress)
        return self

    # --- scope="head" --------------------------------------------------------------------

    def _fit_head(
        self,
        model: ModelView,
        train: FeatureSet,
        calibration: FeatureSet | None,
        alphas: list[float],
        progress: bool,
    ) -> float:
        head = model.head
        start = clone_state(head)
        best: tuple[float, float, list[dict[str, torch.Tensor]]] | None = None
        features, labels = train.features, train.labels
        assert labels is not None  # fit() required them (train.require_labels)
        full_batch = _fits_in_memory(features)
        if full_batch and isinstance(features, DiskFeatures):
            features = features[:]  # small enough: the exact full-batch solve, in memory
        for alpha in alphas:
            load_state(start, head)  # every alpha starts from the same weights
            loss = partial(smoothed_cross_entropy, alpha=alpha)
            if isinstance(features, torch.Tensor):  # full batch: in memory
                fit_head_lbfgs(
                    head,
                    features,
                    labels,
                    loss,
                    weight_decay=self.weight_decay,
                    max_iter=self.max_iter,
                    progress=progress,
                )
            else:
                # Larger than memory (a disk cache): mini-batch Adam over the rows, the
                # same objective, one read of the file per epoch.
                train_head(
                    head,
                    features,
                    labels,
                    loss,
                    epochs=self.epochs,
                    weight_decay=self.weight_decay,
                    batch_size=LARGE_BATCH,
                    progress=progress,
                )
            if calibration is None:
                return alpha
            assert calibration.labels is not None  # fit() required them
            nll = mean_nll(model.head_logits(calibration.features), calibration.labels)
            self.grid_nll_.append([alpha, nll])
            if best is None or nll < best[0]:
                best = (nll, alpha, clone_state(head))
        assert best is not None
        load_state(best[2], head)
        return best[1]

    # --- scope="all" ---------------------------------------------------------------------

    def _fit_all(
        self,
        model: ModelView,
        data: FitData,
        train: FeatureSet,
        calibration: FeatureSet | None,
        alphas: list[float],
        progress: bool,
    ) -> float:
        if train.data is None:
            raise DataError(
                'label_smoothing with scope="all" fine-tunes the whole network, so it needs '
                "the inputs, not cached features: call wrapped.fit(train=(X, y), "
                'calibration=...) instead of fit_features, or use scope="head"'
            )
        if calibration is not None:
            calibration.require_labels(NAME)
            if calibration.data is None:
                calibration = None  # features only: nothing to stream, no early stopping
        settings = FineTuning(
            epochs=self.epochs,
            optimizer=self.optimizer,
            lr=self.lr if self.lr is not None else DEFAULT_LR[self.optimizer],
            weight_decay=self.weight_decay,
            freeze_bn=self.freeze_bn,
            patience=self.patience,
            batch_size=int(self.batch_size or data.options.get("batch_size", 256)),
            seed=int(data.options.get("seed", 0)),
        )
        modules = (model.backbone, model.head)
        start = clone_state(*modules) if len(alphas) > 1 else None
        best: tuple[float, float, list[dict[str, torch.Tensor]], list[float], int | None] | None
        best = None
        with preserved_modes(*modules):
            for alpha in alphas:
                if start is not None:
                    load_state(start, *modules)
                history, best_epoch = fine_tune(
                    model,
                    partial(smoothed_cross_entropy, alpha=alpha),
                    train.data,
                    calibration,
                    settings,
                    progress,
                    desc=f"label smoothing (alpha={alpha:g})",
                )
                nll = min(history) if history else math.nan
                if len(alphas) > 1:
                    self.grid_nll_.append([alpha, nll])
                if best is None or nll < best[0]:
                    states = clone_state(*modules) if len(alphas) > 1 else []
                    best = (nll, alpha, states, history, best_epoch)
        assert best is not None
        if best[2]:
            load_state(best[2], *modules)
        self.history_, self.best_epoch_ = best[3], best[4]
        return best[1]


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(NAME, LabelSmoothing)
