"""Post-hoc calibrators: the base class of the CALIBRATE family and the logits-only path.

A :class:`Calibrator` is a :class:`~wrapcal.Plugin` that learns a map from logits to
calibrated logits on held-out labelled data. It has two ways in:

* inside a wrapped model, ``wrapped.fit(calibration=...)`` calls :meth:`Calibrator.fit`,
  which fits on the calibration set's logits as the plugins before it give them;
* with logits only, :func:`~wrapcal.fit_calibrator` (or ``plugin.fit_logits(logits, labels)``)
  fits on arrays the user already has, and ``calibrator.transform(logits)`` applies it.

Both paths run the same checks (NaN/inf, probabilities passed as logits, labels out of
range, one class only) and the same code. A calibrator returns logits: rescaled logits
for the scaling methods, log-probabilities of the calibrated distribution for the
methods that produce probabilities (binning, isotonic, ensembles); both are valid
logits, ``softmax`` of either gives the calibrated probabilities. A single-logit binary
model (``[N, 1]``) is calibrated as the two logits ``[0, z]`` and given back as one.

The logits-only entry point, :func:`wrapcal.fit_calibrator`, lives in
:mod:`wrapcal.logits.calibrators`: it creates a calibrator through the plugin registry,
like ``wrap`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, overload

import numpy as np
import torch

from wrapcal.plugin.base import Plugin
from wrapcal.plugin.torch_helpers import one_cpu_thread
from wrapcal.plugin.types import PluginTags, Stage
from wrapcal.plugin.validation import (
    MIN_SAMPLES,
    LabelsLike,
    LogitsLike,
    as_logits,
    check_fit_data,
    check_logits,
)

if TYPE_CHECKING:
    from wrapcal.features.extract import FitData
    from wrapcal.plugin.types import ModelView

__all__ = [
    "MIN_SAMPLES",
    "Calibrator",
    "as_logits",
    "calibrated_log_probs",
    "check_calibration_data",
    "out_of_fold_log_probs",
    "stratified_folds",
]


class Calibrator(Plugin):
    """Base class of post-hoc calibrators (``Stage.CALIBRATE``).

    A subclass implements :meth:`_fit` and :meth:`_transform` on logits ``[N, K]`` with
    ``K >= 2`` (the base class checks the inputs, handles single-logit binary models
    and sets ``fitted_``), or overrides :meth:`fit_logits` and :meth:`transform_logits`
    themselves (``temperature`` does, to keep its one-dimensional solver).

    Class attributes:
        calibrator_name: The registered name, for messages.
        fit_reason: Why it needs the calibration set (shown when ``fit`` lacks it).
        probability_valued: ``transform_logits`` returns log-probabilities of a
            distribution built in probability space (binning, isotonic, ensembles),
            rather than a transform of the logits.
    """

    calibrator_name: ClassVar[str | None] = None
    fit_reason: ClassVar[str] = (
        "post-hoc calibration fits on held-out labelled data the model was not trained on"
    )
    probability_valued: ClassVar[bool] = False

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.CALIBRATE
        tags.fit_requires = {"calibration": self.fit_reason}
        return tags

    def display_name(self) -> str:
        """The name used in messages: the registered name, else the class name."""
        if self.calibrator_name:
            return self.calibrator_name
        # The registry sits above the SDK: look the name up only when a message needs it.
        from wrapcal.model.discovery import plugin_name

        return plugin_name(self) or type(self).__name__

    # --- fitting -----------------------------------------------------------------------

    def fit(self, model: ModelView, data: FitData) -> Calibrator:
        """Fit on the calibration set's logits as the plugins before this one give them."""
        name = self.display_name()
        calibration = data.require("calibration", name, self.fit_reason)
        labels = calibration.require_labels(name)
        return self.fit_logits(model.head_logits(calibration.features), labels)

    def fit_logits(self, logits: LogitsLike, labels: LabelsLike) -> Calibrator:
        """Fit on logits and labels directly, without a wrapped model.

        Args:
            logits: ``[N, K]`` logits (a tensor on any device, a numpy array or nested
                lists), or ``[N]`` / ``[N, 1]`` for one binary logit. Log-probabilities
                are valid logits; probabilities are not.
            labels: ``[N]`` integer class indices.

        Returns:
            self

        Raises:
            DataError: NaN/inf logits, probabilities, labels of the wrong shape, type
                or range, or of one class only.
        """
        z, y = check_calibration_data(logits, labels, self.display_name())
        with one_cpu_thread(z.device):
            self._fit(z, y)
        self.fitted_ = True
        return self

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Learn from checked float64 logits ``[N, K >= 2]`` and int64 labels ``[N]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _fit or fit_logits")

    # --- inference ---------------------------------------------------------------------

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated logits ``[B, K]`` of logits ``[B, K]``, in their dtype and device.

        A single logit ``[B, 1]`` is calibrated as ``[0, z]`` and returned as the one
        logit ``log p1 - log p0``.
        """
        self.check_is_fitted()
        if logits.shape[-1] == 1:
            pair = torch.cat([torch.zeros_like(logits), logits], dim=-1)
            out = self._transform(pair)
            return out[..., 1:] - out[..., :1]
        return self._transform(logits)

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated logits of logits ``[B, K >= 2]``: plain tensor operations."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement _transform or transform_logits"
        )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """The same as :meth:`transform_logits`."""
        return self.transform_logits(logits)

    @overload
    def transform(self, logits: torch.Tensor) -> torch.Tensor: ...

    @overload
    def transform(
        self, logits: np.ndarray | Sequence[float] | Sequence[Sequence[float]]
    ) -> np.ndarray: ...

    def transform(self, logits: LogitsLike) -> torch.Tensor | np.ndarray:
        """Calibrated logits of the user's logits, of the same kind.

        A numpy array (or nested lists) gives a numpy array, a tensor gives a tensor on
        its device and in its dtype; ``[N]`` gives ``[N]``. ``softmax`` of the result
        gives the calibrated probabilities.

        Raises:
            DataError: NaN/inf values, probabilities instead of logits, a bad shape.
            NotFittedError: Before :meth:`fit_logits`.
        """
        self.check_is_fitted()
        is_tensor = isinstance(logits, torch.Tensor)
        z = as_logits(logits)
        one_dim = z.ndim == 1
        z2 = check_logits(z[:, None] if one_dim else z)
        with torch.no_grad():
            out = self.transform_logits(z2)
        out = out[:, 0] if one_dim else out
        return out if is_tensor else out.cpu().numpy()

    def frozen_params(self) -> dict[str, Any]:
        """Parameters that refit this calibrator with its fitted hyperparameters fixed
        (cross-validation by ``auto_calibration``); by default its own parameters."""
        return self.get_params()

    def procedure_copy(self) -> Calibrator:
        """A fresh, unfitted copy with this calibrator's parameters (hyperparameters not
        fixed): what nested cross-validation refits on each fold. A subclass may hand
        the copy what only speeds its fit up (warm starts from this fit), never what
        changes its result."""
        return type(self)(**self.get_params())

    def cross_val_log_probs(
        self, logits: torch.Tensor, labels: torch.Tensor, folds: list[torch.Tensor]
    ) -> torch.Tensor:
        """Out-of-fold calibrated log-probabilities ``[N, K]`` (float64) of checked
        logits ``[N, K >= 2]``: for each fold, a copy refitted with :meth:`frozen_params`
        on the other folds, applied to it. Call after :meth:`fit_logits` on the same data
        (a subclass may start its refits from that fit)."""
        return out_of_fold_log_probs(
            lambda: type(self)(**self.frozen_params()), logits, labels, folds
        )


def out_of_fold_log_probs(
    make: Callable[[], Calibrator],
    logits: torch.Tensor,
    labels: torch.Tensor,
    folds: list[torch.Tensor],
) -> torch.Tensor:
    """Out-of-fold calibrated log-probabilities ``[N, K]`` (float64): for each fold, a
    fresh calibrator from ``make()`` fitted on the other folds and applied to it.

    ``make`` decides what is refitted: with the fitted hyperparameters frozen
    (:meth:`Calibrator.cross_val_log_probs`) or the whole procedure, hyperparameter
    search included (nested cross-validation, as ``auto_calibration`` scores tuned
    candidates).
    """
    out = torch.empty_like(logits, dtype=torch.float64)
    for held_out in folds:
        train = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        train[held_out] = False
        clone = make()
        clone.fit_logits(logits[train], labels[train])
        with torch.no_grad():
            calibrated = clone.transform_logits(logits[held_out])
        out[held_out] = torch.log_softmax(calibrated.double(), dim=1)
    return out


# --- helpers shared by the calibrators ---------------------------------------------------


def check_calibration_data(
    logits: LogitsLike, labels: LabelsLike, name: str = "calibrator"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked calibration data: float64 logits ``[N, K >= 2]`` and int64 labels ``[N]``.

    The checks are :func:`wrapcal.plugin.validation.check_fit_data` (the ones
    ``fit_temperature`` runs); a single logit (``[N]`` or ``[N, 1]``) then becomes the
    two columns ``[0, z]``. Both stay on the logits' device.

    Raises:
        DataError: NaN/inf logits, probabilities passed as logits, labels of the wrong
            shape, dtype or range, or one class only.

    Warns:
        UserWarning: Fewer than :data:`MIN_SAMPLES` samples.
    """
    # stacklevel 3: the warning points at the user's call of fit_logits / fit_calibrator.
    z, y = check_fit_data(logits, labels, name, stacklevel=3)
    z = z.to(torch.float64)
    if z.shape[1] == 1:
        z = torch.cat([torch.zeros_like(z), z], dim=1)
    return z, y


def calibrated_log_probs(probs: torch.Tensor, min_prob: float) -> torch.Tensor:
    """Log of ``probs`` floored at ``min_prob`` and renormalised: valid logits.

    Probability-valued calibrators (binning, isotonic) can give a class probability 0,
    whose log would be ``-inf`` (an infinite NLL, NaN downstream). The floor keeps every
    class possible; renormalising keeps the rows summing to 1. Plain tensor operations,
    nothing in place.
    """
    floored = probs.clamp_min(min_prob)
    return floored.log() - floored.sum(dim=-1, keepdim=True).log()


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """Held-out indices of ``folds`` cross-validation folds, stratified by class.

    Each class's samples are shuffled (``torch.Generator`` seeded with ``seed``, on the
    CPU, so the folds do not depend on the device) and dealt to the folds in turn, the
    deal of each class starting where the previous one stopped: fold sizes differ by
    at most one and every class is spread over the folds as evenly as it can be.

    Raises:
        ValueError: Fewer samples than folds, or fewer than 2 folds.
    """
    n = labels.shape[0]
    if folds < 2 or n < folds:
        raise ValueError(f"cannot split {n} samples into {folds} cross-validation folds")
    y = labels.detach().cpu()
    generator = torch.Generator().manual_seed(seed)
    assignment = torch.empty(n, dtype=torch.int64)
    start = 0
    for cls in torch.unique(y):
        members = torch.nonzero(y == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        assignment[members] = (start + torch.arange(members.numel())) % folds
        start = (start + members.numel()) % folds
    return [torch.nonzero(assignment == f).flatten().to(labels.device) for f in range(folds)]
