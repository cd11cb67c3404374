"""Vector scaling, matrix scaling and Dirichlet calibration: linear maps of the logits.

* ``vector_scaling`` (Guo et al. 2017): ``z * a + b``, one scale and one intercept per
  class, fitted by NLL (no penalty). Different scales and intercepts reorder classes
  whose logits are close, so accuracy moves (on the CIFAR-100 ResNet-20 of
  ``docs/calibration.md`` from 68.22% to 67.52%; on the shifted ResNet-20 up 2 points).
* ``matrix_scaling`` (Guo et al. 2017, with Kull et al. 2019's ODIR): ``W z + b``.
* ``dirichlet`` (Kull et al. 2019, "Beyond temperature scaling"): ``W log softmax(z) + b``,
  the Dirichlet family's canonical parametrisation, with ODIR.

For the last two, ``lambda`` (off-diagonal entries) and ``mu`` (intercepts) are chosen
by cross-validated NLL on the calibration set, as Kull et al. do (see
:func:`wrapcal_plugins.calibration._linear_calibration.select_odir`); a full matrix can reorder
classes, so accuracy can move (up or down). The fits run in float64; inference is one
``addmm`` in the logits' dtype (exportable).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from wrapcal import PluginTags, hookimpl
from wrapcal.plugin import Calibrator, Check, Interval, one_cpu_thread, stratified_folds

from ._linear_calibration import TOL_SEARCH, LinearFit, ODIRSearch, fit_linear, select_odir

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["DirichletCalibration", "MatrixScaling", "VectorScaling"]

_F64 = (torch.float64,)
_REG = [None, Interval(float, 0, None)]


def _is_table(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(row, dict)
        and set(row) == {"reg_lambda", "reg_mu", "cv_nll", "folds"}
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values())
        for row in value
    )


def _cross_val(
    fit: LinearFit, x: torch.Tensor, labels: torch.Tensor, folds: list[torch.Tensor], **kw: Any
) -> torch.Tensor:
    """Out-of-fold log-probabilities of the linear map refitted on each fold's complement,
    started from the fit on all the data, in float32 to the search's tolerance (these
    refits only rank calibrators; see ``auto_calibration``)."""
    x32 = x.float()
    start = LinearFit(fit.weight.float(), fit.bias.float(), 0)
    out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    for held_out in folds:
        train = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        train[held_out] = False
        refit = fit_linear(x32[train], labels[train], init=start, tol=TOL_SEARCH, **kw)
        out[held_out] = torch.log_softmax(refit.logits(x32[held_out]).double(), dim=1)
    return out


def _same_folds(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and bool(torch.equal(x, y.to(x.device)))
        for x, y in zip(a, b, strict=True)
    )


class VectorScaling(Calibrator):
    """Vector scaling: a scale and an intercept per class, fitted by NLL.

    Args:
        max_iter: Maximum L-BFGS iterations.

    Attributes:
        scale_: Buffer ``[K]`` (float64): the per-class scales.
        bias_: Buffer ``[K]`` (float64): the per-class intercepts (centred).
        evaluations_: Objective evaluations the fit took.
    """

    calibrator_name = "vector_scaling"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "max_iter": [Interval(int, 1, 100_000)]
    }
    _state_constraints: ClassVar[dict[str, list[Any]]] = {
        "evaluations_": [None, Interval(int, 0, None)]
    }

    def __init__(self, max_iter: int = 1000) -> None:
        super().__init__()
        self.max_iter = max_iter
        self.evaluations_: int | None = None
        self.register_learned_buffer("scale_", (None,), _F64)
        self.register_learned_buffer("bias_", (None,), _F64)

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.exportable = True
        return tags

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        fit = fit_linear(logits, labels, diagonal=True, max_iter=self.max_iter)
        self.scale_, self.bias_, self.evaluations_ = fit.weight, fit.bias, fit.evaluations

    def cross_val_log_probs(
        self, logits: torch.Tensor, labels: torch.Tensor, folds: list[torch.Tensor]
    ) -> torch.Tensor:
        fit = LinearFit(self.scale_, self.bias_, 0)
        with one_cpu_thread(logits.device):
            return _cross_val(fit, logits, labels, folds, diagonal=True)

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        scale = self.scale_.to(device=logits.device, dtype=logits.dtype)
        return torch.addcmul(self.bias_.to(device=logits.device, dtype=logits.dtype), logits, scale)

    def validate_state(self) -> None:
        super().validate_state()
        if self.scale_.shape != self.bias_.shape:
            raise ValueError(
                f"scale_ {tuple(self.scale_.shape)} and bias_ {tuple(self.bias_.shape)} differ"
            )


class _ODIRCalibrator(Calibrator):
    """``W x + b`` with ODIR, ``x`` given by :meth:`_inputs`; lambda and mu by CV.

    Args:
        reg_lambda: ODIR weight of the off-diagonal entries; ``None``: chosen by
            cross-validation.
        reg_mu: ODIR weight of the intercepts; ``None``: chosen by cross-validation.
        cv: Folds of the cross-validation (stratified by class).
        seed: Seed of the folds.
        max_iter: Maximum L-BFGS iterations of the final fit.

    Attributes:
        weight_: Buffer ``[K, K]`` (float64).
        bias_: Buffer ``[K]`` (float64).
        reg_lambda_, reg_mu_: The ODIR weights used.
        cv_table_: Every ``(lambda, mu)`` tried, with its cross-validated NLL (empty
            when both were given).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "reg_lambda": _REG,
        "reg_mu": _REG,
        "cv": [Interval(int, 2, 100)],
        "seed": [Interval(int, 0, None)],
        "max_iter": [Interval(int, 1, 100_000)],
    }
    _state_constraints: ClassVar[dict[str, list[Any]]] = {
        "reg_lambda_": [None, Interval(float, 0, None)],
        "reg_mu_": [None, Interval(float, 0, None)],
        "cv_table_": [None, Check(_is_table, "a list of {reg_lambda, reg_mu, cv_nll, folds}")],
    }

    def __init__(
        self,
        reg_lambda: float | None = None,
        reg_mu: float | None = None,
        cv: int = 5,
        seed: int = 0,
        max_iter: int = 1000,
    ) -> None:
        super().__init__()
        self.reg_lambda = reg_lambda
        self.reg_mu = reg_mu
        self.cv = cv
        self.seed = seed
        self.max_iter = max_iter
        self.reg_lambda_: float | None = None
        self.reg_mu_: float | None = None
        self.cv_table_: list[dict[str, float]] | None = None
        self.register_learned_buffer("weight_", (None, None), _F64)
        self.register_learned_buffer("bias_", (None,), _F64)
        # Working state of the last fit, never saved: see cross_val_log_probs.
        self._search: tuple[list[torch.Tensor], ODIRSearch] | None = None
        self._warm: dict[tuple[float, float], LinearFit] | None = None

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.exportable = True
        return tags

    def _inputs(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        x = self._inputs(logits)
        self._search = None
        if self.reg_lambda is None or self.reg_mu is None:
            folds = stratified_folds(labels, min(self.cv, labels.shape[0]), self.seed)
            search = select_odir(
                x, labels, folds, reg_lambda=self.reg_lambda, reg_mu=self.reg_mu, warm=self._warm
            )
            lam, mu, table, start = search.reg_lambda, search.reg_mu, search.table, search.start
            # Kept (not saved) for cross_val_log_probs and procedure_copy on this data.
            self._search = (folds, search)
        else:
            lam, mu, table, start = float(self.reg_lambda), float(self.reg_mu), [], None
        fit: LinearFit = fit_linear(x, labels, lam, mu, init=start, max_iter=self.max_iter)
        self.weight_, self.bias_ = fit.weight, fit.bias
        self.reg_lambda_, self.reg_mu_, self.cv_table_ = lam, mu, table

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        weight = self.weight_.to(device=logits.device, dtype=logits.dtype)
        bias = self.bias_.to(device=logits.device, dtype=logits.dtype)
        return torch.addmm(bias, self._inputs(logits), weight.T)

    def cross_val_log_probs(
        self, logits: torch.Tensor, labels: torch.Tensor, folds: list[torch.Tensor]
    ) -> torch.Tensor:
        x = self._inputs(logits)
        if self._search is not None and _same_folds(self._search[0], folds):
            # The search already fitted the chosen (lambda, mu) on each fold's complement,
            # on these folds: those are the refits (to the search's tolerance).
            fold_fits = self._search[1].fold_fits
            out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
            x32 = x.float()
            for fit, held_out in zip(fold_fits, folds, strict=True):
                out[held_out] = torch.log_softmax(fit.logits(x32[held_out]).double(), dim=1)
            return out
        fit = LinearFit(self.weight_, self.bias_, 0)
        lam, mu = self.reg_lambda_, self.reg_mu_
        with one_cpu_thread(logits.device):
            return _cross_val(fit, x, labels, folds, reg_lambda=lam, reg_mu=mu)

    def procedure_copy(self) -> _ODIRCalibrator:
        """A fresh copy whose search starts each grid point's first fits from this fit's
        search (same result to the search's tolerance, fewer iterations): nested
        cross-validation refits the whole procedure on each fold."""
        copy = super().procedure_copy()
        assert isinstance(copy, _ODIRCalibrator)
        if self._search is not None:
            copy._warm = self._search[1].points
        return copy

    def frozen_params(self) -> dict[str, Any]:
        """The parameters with the fitted ``lambda`` and ``mu`` fixed (no search)."""
        return {**self.get_params(), "reg_lambda": self.reg_lambda_, "reg_mu": self.reg_mu_}

    def validate_state(self) -> None:
        super().validate_state()
        k = self.bias_.shape[0]
        if tuple(self.weight_.shape) not in ((k, k), (0, 0)):
            raise ValueError(f"weight_ {tuple(self.weight_.shape)} does not match bias_ {(k,)}")


class MatrixScaling(_ODIRCalibrator):
    """Matrix scaling with ODIR: ``W z + b`` on the logits (Kull et al. 2019's MS-ODIR)."""

    calibrator_name = "matrix_scaling"

    def _inputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class DirichletCalibration(_ODIRCalibrator):
    """Dirichlet calibration with ODIR: ``W log softmax(z) + b`` (Kull et al. 2019)."""

    calibrator_name = "dirichlet"

    def _inputs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits, dim=-1)


@hookimpl
def wrapcal_register_plugins(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("vector_scaling", VectorScaling)
    register("matrix_scaling", MatrixScaling)
    register("dirichlet", DirichletCalibration)
