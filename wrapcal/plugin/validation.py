"""Checks on logits, labels and per-sample values: one set of rules and messages for
numpy and torch inputs.

Every entry point that takes logits or labels (``wrapped.fit``, the calibrators'
``fit_logits``, ``fit_temperature``, ``fit_conformal``/``conformal_sets``,
``fit_abstention``, the metrics) runs these, so a problem reads the same wherever it is
found and whatever the input's kind (a torch tensor on any device, a numpy array of
numpy 1 or 2, nested lists): NaN or inf logits, probabilities passed where logits are
expected (a softmax of probabilities is nearly uniform, and a calibrator fitted on it
does nothing useful), labels of the wrong shape, dtype or range, one class only.

The rules:

* logits are real numbers ``[N, K]`` (or ``[N]`` for one binary logit), ``N, K > 0``,
  finite, and not rows of probabilities (:func:`as_logits`, :func:`check_logits`);
* labels are class indices ``[N]`` (``[N, 1]`` is read as ``[N]``) in ``[0, K)``:
  integers, booleans (0 and 1), or floats holding whole numbers (labels read from a
  text file); anything else is refused (:func:`check_labels`);
* per-sample values (scores, ``1 - max p``) are one finite real number per sample
  (:func:`check_values`);
* data a calibrator is fitted on also holds at least two classes, and fewer than
  :data:`MIN_SAMPLES` samples give a warning (:func:`check_fit_data`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import torch

from wrapcal.errors import DataError

#: Logits as users hold them: a tensor (any device), a numpy array or nested lists.
LogitsLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]
#: Class indices as users hold them: a tensor, a numpy array or a list of ints.
LabelsLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[int]

__all__ = [
    "MIN_SAMPLES",
    "ROW_SUM_TOL",
    "as_logits",
    "as_tensor",
    "check_finite",
    "check_fit_data",
    "check_iterations",
    "check_labels",
    "check_logits",
    "check_values",
    "checked_logits",
    "looks_like_probabilities",
]

#: Rows of probabilities sum to 1 within this, even clipped ones (``clip(p, 1e-3, 1)``
#: over 10 classes moves a sum by up to 0.01); real logits practically never lie all in
#: [0, 1] with rows summing to 1.
ROW_SUM_TOL = 2e-2
#: Fewer calibration samples than this give a warning: the calibration map (a
#: temperature, a matrix, bins) is then poorly determined.
MIN_SAMPLES = 50

# numpy dtype kinds of real numbers: bool, signed and unsigned integers, floats.
_REAL_KINDS = "biuf"


def as_tensor(values: object, what: str, expected: str = "real numbers") -> torch.Tensor:
    """``values`` as a tensor, without a copy where possible.

    A tensor is detached and kept on its device; a numpy array (numpy 1 or 2) becomes a
    CPU tensor sharing its memory; nested lists go through ``numpy.asarray``. Nothing is
    read from the object but its values: a numpy 2 array's ``.device`` (the string
    ``"cpu"``) is never mistaken for a torch device.

    Args:
        values: A tensor, array or nested lists.
        what: What the values are, for messages ("logits", "labels").
        expected: What they should be, for messages.

    Raises:
        DataError: Values that are not real numbers (strings, objects, complex).
    """
    if isinstance(values, torch.Tensor):
        tensor = values.detach()
    else:
        array = np.asarray(values)
        if array.dtype == object or array.dtype.kind not in _REAL_KINDS:
            raise DataError(f"{what} have dtype {array.dtype}; expected {expected}")
        if not array.dtype.isnative:  # torch reads native byte order only
            array = array.astype(array.dtype.newbyteorder("="))
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.is_complex():
        raise DataError(f"{what} have dtype {tensor.dtype}; expected {expected}")
    return tensor


# --- logits ----------------------------------------------------------------------------


def looks_like_probabilities(values: torch.Tensor) -> bool:
    """Whether ``[N, K]`` values (``K >= 2``) are probabilities: every value in [0, 1] and
    every row summing to 1 within :data:`ROW_SUM_TOL`."""
    if values.ndim != 2 or values.shape[-1] < 2 or values.numel() == 0:
        return False
    if not values.is_floating_point():
        return False
    lowest, highest = torch.stack(torch.aminmax(values)).tolist()
    return lowest >= 0.0 and highest <= 1.0 and _rows_sum_to_one(values)


def _rows_sum_to_one(values: torch.Tensor) -> bool:
    sums = values.sum(dim=-1, dtype=torch.float64)
    return bool(((sums - 1).abs() <= ROW_SUM_TOL).all())


def _non_finite_message(values: torch.Tensor, what: str) -> str:
    """Says how many NaN and inf values there are and the first row holding one."""
    rows = (~torch.isfinite(values)).reshape(len(values), -1).any(-1).nonzero().flatten()
    nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
    return (
        f"{what} hold NaN or inf values: {nan} NaN and {inf} inf ({len(rows)} rows, the "
        f"first is row {int(rows[0])}); check the model's inputs (NaN pixels?) and its "
        "precision (float16 overflow?), and fix or drop those rows"
    )


def check_finite(values: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` if every one is finite; else a :class:`DataError` saying how many NaN
    and inf values there are and the first row holding one (features a user passes,
    refused as ``predict`` refuses NaN inputs)."""
    if values.is_floating_point() and values.numel() and not bool(torch.isfinite(values).all()):
        raise DataError(_non_finite_message(values, what))
    return values


def check_logits(logits: torch.Tensor, what: str = "logits") -> torch.Tensor:
    """``logits`` if they are finite logits; else a :class:`DataError` that says what is
    wrong (NaN/inf, probabilities) and how to fix it.

    One reduction (the minimum and maximum) decides in the common case: NaN propagates
    into both and inf shows in one, and only values all in [0, 1] can be probabilities.
    """
    if logits.numel() == 0 or not logits.is_floating_point():
        return logits
    lowest, highest = torch.stack(torch.aminmax(logits)).tolist()
    if not (math.isfinite(lowest) and math.isfinite(highest)):
        raise DataError(_non_finite_message(logits, what))
    if (
        lowest >= 0.0
        and highest <= 1.0
        and logits.ndim == 2
        and logits.shape[-1] >= 2
        and _rows_sum_to_one(logits)
    ):
        raise DataError(
            f"these {what} look like probabilities, not logits: every value is in [0, 1] "
            "and every row sums to 1. Pass the model's logits (its output before softmax), "
            "or log-probabilities (log(probs)), which are valid logits; for a model that "
            "ends in softmax, wrap it so the split takes the layer before"
        )
    return logits


def as_logits(logits: LogitsLike, what: str = "logits") -> torch.Tensor:
    """``logits`` as a floating tensor ``[N, K]`` or ``[N]`` (numpy arrays and lists become
    CPU tensors; integers and half precision become float32), or a :class:`DataError`
    for a bad shape or dtype. The values are not checked: see :func:`check_logits`."""
    z = as_tensor(logits, what, "real numbers (the model's output)")
    if z.dtype == torch.bool:
        raise DataError(f"{what} have dtype {z.dtype}; expected real numbers (the model's output)")
    if not z.is_floating_point() or z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    if z.ndim not in (1, 2) or z.shape[0] == 0 or (z.ndim == 2 and z.shape[1] == 0):
        raise DataError(
            f"{what} have shape {tuple(z.shape)}; expected [N, K] (N samples, K classes) or "
            "[N] for a single-logit binary classifier. Several members [M, N, K]? Combine "
            "them first (wrapcal.plugin.probs.combine_members)"
        )
    return z


def checked_logits(logits: LogitsLike, what: str = "logits") -> torch.Tensor:
    """:func:`as_logits` then :func:`check_logits`, with ``[N]`` read as ``[N, 1]``: the
    checked logits ``[N, K]`` in their dtype, on their device (possibly the caller's
    memory: do not modify them in place)."""
    z = as_logits(logits, what)
    return check_logits(z[:, None] if z.ndim == 1 else z, what)


# --- labels ----------------------------------------------------------------------------


def check_labels(
    labels: LabelsLike,
    n: int,
    num_classes: int | None = None,
    *,
    single_logit: bool = False,
    rows: str = "inputs",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Labels as int64 class indices ``[n]`` in ``[0, num_classes)``, or a clear error.

    Args:
        labels: A tensor, numpy array or list: integers, booleans (0 and 1) or floats
            holding whole numbers; ``[n]``, or ``[n, 1]``.
        n: The number of inputs (rows of logits, probabilities, features) they label.
        num_classes: ``K``; ``None`` checks only that they are not negative.
        single_logit: The labels go with one binary logit (``K = 2``), for the message.
        rows: What the ``n`` rows are, for the message: ``"inputs"`` (data),
            ``"rows of logits"`` (the logits-only tools), ``"rows of probs"`` (metrics).
        device: Where the result goes (the labels' own device by default).

    Raises:
        DataError: A shape other than ``[n]``, a dtype that is not integer (or floats
            that are not whole numbers), a label outside ``[0, num_classes)``.
    """
    y = as_tensor(labels, "labels", "integer class indices")
    if device is not None:
        y = y.to(device)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"labels have shape {tuple(y.shape)}; labels must be 1-D with N = {n} entries, "
            "one class index per input"
            + (", not one-hot rows (one-hot? pass labels.argmax(1))" if y.ndim == 2 else "")
        )
    if y.shape[0] != n:
        one = rows.removeprefix("rows of ")
        each = "input" if rows == "inputs" else f"row of {one}"
        raise DataError(
            f"{n} {rows} but {y.shape[0]} labels; labels must be 1-D with N = {n} entries: "
            f"give one label per {each}"
        )
    if y.is_floating_point() and not bool((torch.isfinite(y) & (y == torch.round(y))).all()):
        raise DataError(
            f"labels have dtype {y.dtype} with non-integer values; expected integer class "
            "indices (not probabilities or scores)"
        )
    y = y.long()
    if y.numel():
        low, high = torch.stack(torch.aminmax(y)).tolist()
        if low < 0 or (num_classes and high >= num_classes):
            bound = f"[0, {num_classes})" if num_classes else "[0, K)"
            binary = " for a single binary logit" if single_logit else ""
            raise DataError(
                f"labels must be in {bound}{binary}; got min {low}, max {high}. Labels must "
                "index the columns of the model's outputs: map them to its class indices"
            )
    return y


# --- per-sample values -------------------------------------------------------------------


def check_values(
    values: object, what: str, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """One finite real value per sample (a score, ``1 - max p``): a 1-D, non-empty tensor
    in the values' own dtype (booleans and integers kept as they are).

    Raises:
        DataError: Another shape, no values, NaN or inf values, strings or objects.
    """
    v = as_tensor(values, what)
    if device is not None:
        v = v.to(device)
    if v.ndim != 1:
        raise DataError(
            f"{what} must be 1-D (one value per sample); got shape {tuple(v.shape)}: reduce "
            "each sample to a single score first"
        )
    if v.numel() == 0:
        raise DataError(f"{what} is empty: pass at least one sample")
    if v.is_floating_point() and not bool(torch.isfinite(v).all()):
        raise DataError(_non_finite_message(v, what))
    return v


# --- data a calibrator is fitted on ------------------------------------------------------


def check_fit_data(
    logits: LogitsLike, labels: LabelsLike, name: str, *, stacklevel: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked calibration data: logits ``[N, K]`` and int64 labels ``[N]``.

    The logits keep their dtype and device (they may be the caller's memory: do not
    modify them in place); a single logit ``[N]`` becomes ``[N, 1]``. The labels go to
    the logits' device.

    Args:
        logits: ``[N, K]`` logits, ``[N]`` or ``[N, 1]`` for one binary logit.
        labels: ``[N]`` class indices in ``[0, max(K, 2))``.
        name: What is fitted ("temperature scaling", a calibrator's name), for messages.
        stacklevel: Of the warnings, counted from the caller of this function.

    Raises:
        DataError: Bad logits (:func:`as_logits`, :func:`check_logits`), bad labels
            (:func:`check_labels`), or labels of one class only.

    Warns:
        UserWarning: Fewer than :data:`MIN_SAMPLES` samples; every value in [0, 1]
            (a single logit: probabilities of the positive class?; several: sigmoid
            outputs?).
    """
    z = checked_logits(logits, "calibration logits")
    n, k = z.shape
    y = check_labels(
        labels, n, max(k, 2), single_logit=k == 1, rows="rows of logits", device=z.device
    )
    low, high = torch.stack(torch.aminmax(y)).tolist()
    if low == high:
        raise DataError(
            f"the calibration labels hold one class only ({low}): {name} needs a "
            "calibration set with several classes; pass a random held-out sample of the "
            "data, not one selected or sorted by class"
        )
    if n < MIN_SAMPLES:
        warnings.warn(
            f"fitting {name} on {n} samples: with fewer than {MIN_SAMPLES} samples it is "
            "poorly determined; use a larger held-out calibration set (hundreds to "
            "thousands)",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    lowest, highest = torch.stack(torch.aminmax(z)).tolist()
    if k == 1 and lowest >= 0.0 and highest <= 1.0:
        warnings.warn(
            "every single-logit value is in [0, 1]: if these are probabilities of the "
            "positive class, pass logits instead (log(p / (1 - p)))",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    elif lowest >= 0.0 and highest <= 1.0:
        # Rows summing to 1 were refused above (softmax outputs); per-class sigmoid
        # outputs, or probabilities rounded or clipped, only look like these: real logits
        # of several classes practically never all lie in [0, 1].
        warnings.warn(
            f"every calibration logit is in [0, 1]: if these are probabilities (sigmoid "
            f"outputs, one per class), {name} of them does nothing useful; pass the "
            "model's logits (its output before the sigmoid, log(p / (1 - p))) instead",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    return z, y


def check_iterations(value: object, name: str, where: str) -> int:
    """An iteration count (``max_iter``): an int >= 1, or a clear error.

    Args:
        value: The count given.
        name: The argument's name, for the message.
        where: The function or plugin it was given to, for the message.

    Raises:
        TypeError: Not an int (a bool, a float such as 1e3, ``None``).
        ValueError: 0 or negative: no step would run, and the result would be the
            starting point, silently.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{where}: {name} must be an int >= 1, got {value!r} "
            f"({type(value).__name__}); pass e.g. {name}=100"
        )
    if value < 1:
        raise ValueError(
            f"{where}: {name} must be at least 1, got {value}: with no step nothing is "
            f"fitted; pass e.g. {name}=100"
        )
    return int(value)
