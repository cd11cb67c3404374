"""``auto_calibration``: choose a post-hoc calibrator by cross-validation on the
calibration set, and never ship one that makes the held-out NLL worse.

Every candidate is fitted on the whole calibration set (a candidate with
hyperparameters, such as Dirichlet calibration's ODIR weights, tunes them there by its
own cross-validation), then refitted with those hyperparameters fixed on each of the
``cv`` stratified folds and applied to the held-out fold. The out-of-fold calibrated
probabilities of every candidate, and of the uncalibrated logits ("identity"), give
one row of the table: accuracy, NLL, ECE, class-wise ECE and Brier score
(``wrapcal.metrics``). The candidate with the lowest value of ``metric`` among those
whose cross-validated NLL is no worse than identity's is chosen; if there is none, the
plugin warns and keeps the logits as they are. (The hyperparameters of tuned
candidates saw every fold, which flatters them slightly; full nested cross-validation
would multiply their cost by ``cv``.)

The table is kept in the JSON-able learned value ``table_`` (saved with the model), the
choice in ``chosen_``; every candidate stays fitted, so the alternatives can be
inspected after loading. Inference is the chosen calibrator's.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from wrapcal import PluginTags, get_tags, hookimpl, metrics
from wrapcal.plugin import Calibrator, Check, Interval, Options, create_plugin, stratified_folds

if TYPE_CHECKING:
    from collections.abc import Callable

    from wrapcal.plugin import ShapeSpec

__all__ = ["DEFAULT_CANDIDATES", "METRICS", "AutoCalibration"]

#: Every built-in calibrator, tried in this order (ties go to the earlier one).
DEFAULT_CANDIDATES = (
    "temperature",
    "vector_scaling",
    "matrix_scaling",
    "dirichlet",
    "ensemble_temperature",
    "histogram_binning",
    "isotonic",
)
#: The metrics that can choose (lower is better), and the table's columns.
METRICS = {
    "nll": metrics.nll,
    "ece": metrics.ece,
    "classwise_ece": metrics.classwise_ece,
    "brier": metrics.brier,
}
IDENTITY = "identity"
_COLUMNS = {"method", "accuracy", *METRICS}


def _is_name_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(v, str) and v and "." not in v for v in value)
        and len(set(value)) == len(value)
        and "auto_calibration" not in value
    )


def _is_table(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(row, dict)
        and set(row) == _COLUMNS
        and isinstance(row["method"], str)
        and all(isinstance(row[c], float) for c in _COLUMNS - {"method"})
        for row in value
    )


def _is_states(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, dict) for k, v in value.items()
    )


class AutoCalibration(Calibrator):
    """Choose among calibrators by cross-validated NLL (or ECE, class-wise ECE, Brier).

    Args:
        candidates: Registered calibrator names to choose from; ``None``: every
            built-in one (:data:`DEFAULT_CANDIDATES`), each with its default parameters.
        metric: What chooses: ``"nll"``, ``"ece"``, ``"classwise_ece"`` or ``"brier"``.
        cv: Folds of the cross-validation (stratified by class).
        seed: Seed of the folds.

    Attributes:
        chosen_: The chosen calibrator's name, or ``"identity"``.
        table_: One row per method (identity first): its cross-validated
            ``accuracy``, ``nll``, ``ece``, ``classwise_ece`` and ``brier``.
        calibrators: The candidates (an ``nn.ModuleDict``), each fitted on the whole
            calibration set.
    """

    calibrator_name = "auto_calibration"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "candidates": [None, Check(_is_name_list, "a non-empty list of calibrator names")],
        "metric": [Options(str, set(METRICS))],
        "cv": [Interval(int, 2, 100)],
        "seed": [Interval(int, 0, None)],
    }
    _state_constraints: ClassVar[dict[str, list[Any]]] = {
        "chosen_": [None, str],
        "table_": [None, Check(_is_table, "a list of rows of cross-validated metrics")],
        "candidate_states_": [None, Check(_is_states, "name -> learned state")],
    }

    def __init__(
        self,
        candidates: list[str] | None = None,
        metric: str = "nll",
        cv: int = 5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.candidates = candidates
        self.metric = metric
        self.cv = cv
        self.seed = seed
        self.chosen_: str | None = None
        self.table_: list[dict[str, Any]] | None = None
        self.candidate_states_: dict[str, dict[str, Any]] | None = None
        # The candidates decide which modules are built: check the parameters before
        # building (a string would be read letter by letter as plugin names).
        if isinstance(candidates, list) and "auto_calibration" in candidates:
            raise ValueError("'auto_calibration' cannot be a candidate of auto_calibration")
        self.validate_params("plugin auto_calibration")
        names = list(DEFAULT_CANDIDATES if candidates is None else candidates)
        # The children depend on the parameters only, so wrap and load build the same
        # modules; their learned tensors are declared as this plugin's (see below).
        self.calibrators = nn.ModuleDict({name: self._candidate(name, {}) for name in names})

    @staticmethod
    def _candidate(name: str, params: dict[str, Any]) -> Calibrator:
        if not isinstance(name, str) or name == "auto_calibration":
            raise ValueError(f"{name!r} cannot be a candidate of auto_calibration")
        plugin = create_plugin(name, params)
        if not isinstance(plugin, Calibrator):
            raise TypeError(f"candidate {name} is not a calibrator (a wrapcal.Calibrator)")
        return plugin

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.exportable = all(get_tags(c).exportable for c in self.calibrators.values())
        return tags

    # --- fitting ----------------------------------------------------------------------

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        folds = stratified_folds(labels, min(self.cv, labels.shape[0]), self.seed)
        table = [_row(IDENTITY, torch.log_softmax(logits, dim=1), labels)]
        with warnings.catch_warnings():
            # fit_logits already warned about the data; the folds would repeat it.
            warnings.simplefilter("ignore")
            for name, calibrator in self.calibrators.items():
                calibrator.fit_logits(logits, labels)
                out_of_fold = calibrator.cross_val_log_probs(logits, labels, folds)
                table.append(_row(name, out_of_fold, labels))
        identity = table[0]["nll"]
        eligible = [row for row in table[1:] if row["nll"] <= identity]
        if eligible:
            self.chosen_ = min(eligible, key=lambda row: row[self.metric])["method"]
        else:
            self.chosen_ = IDENTITY
            warnings.warn(
                f"auto_calibration: no calibrator lowers the cross-validated NLL below the "
                f"uncalibrated model's ({identity:.4f}); keeping the logits as they are "
                "(identity). See the plugin's table_ for every candidate's figures",
                UserWarning,
                stacklevel=3,
            )
        self.table_ = table

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        if self.chosen_ == IDENTITY:
            return logits
        return self.calibrators[self.chosen_].transform_logits(logits)

    @property
    def chosen(self) -> Calibrator | None:
        """The chosen calibrator, or ``None`` for identity."""
        self.check_is_fitted()
        return None if self.chosen_ == IDENTITY else self.calibrators[self.chosen_]

    # --- the children's learned state ----------------------------------------------

    def learned_tensor_specs(self) -> dict[str, tuple[ShapeSpec, tuple[torch.dtype, ...] | None]]:
        """Also the candidates' data-sized buffers, by their dotted names, so ``load``
        gives them the sizes the file holds."""
        specs = super().learned_tensor_specs()
        for name, child in self.calibrators.items():
            for buffer, spec in child.learned_tensor_specs().items():
                specs[f"calibrators.{name}.{buffer}"] = spec
        return specs

    def __setattr__(self, name: str, value: Any) -> None:
        # ``load`` sets each learned buffer by the name learned_tensor_specs gives:
        # route a candidate's dotted name to the candidate.
        if "." in name:
            owner, _, attribute = name.rpartition(".")
            setattr(self.get_submodule(owner), attribute, value)
            return
        super().__setattr__(name, value)

    def get_state(self) -> dict[str, Any]:
        self.candidate_states_ = {n: c.get_state() for n, c in self.calibrators.items()}
        return super().get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        states = self.candidate_states_ or {}
        if set(states) != set(self.calibrators):
            raise ValueError(
                f"the saved candidates {sorted(states)} differ from {sorted(self.calibrators)}"
            )
        for name, child in self.calibrators.items():
            child.set_state(states[name])

    def validate_state(self) -> None:
        super().validate_state()
        for child in self.calibrators.values():
            child.validate_state()
        if self.fitted_ and self.chosen_ not in (IDENTITY, *self.calibrators):
            raise ValueError(f"chosen_ {self.chosen_!r} is not a candidate")


def _row(method: str, log_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    probs = log_probs.exp()
    probs = probs / probs.sum(dim=1, keepdim=True)  # exact rows for the metrics' checks
    row: dict[str, Any] = {"method": method, "accuracy": float(metrics.accuracy(probs, labels))}
    row.update({name: float(fn(probs, labels)) for name, fn in METRICS.items()})
    return row


@hookimpl
def wrapcal_register_plugins(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("auto_calibration", AutoCalibration)
