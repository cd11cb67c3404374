"""The monitoring loop: one backbone pass per window, summaries out, nothing else kept.

Each batch goes through ``wrapped.predict`` once (the backbone runs once per input);
the window's values are summarised when it ends (:mod:`wrapcal.monitoring.summary`), its
alerts checked (:mod:`wrapcal.monitoring.alerts`), and only the summary is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from wrapcal.monitoring.alerts import AlertRules
from wrapcal.monitoring.reference import Reference
from wrapcal.monitoring.result import MonitorResult
from wrapcal.monitoring.summary import OodPlan, WindowAccumulator, WindowSummary, plan_ood
from wrapcal.monitoring.windows import iter_windows
from wrapcal.plugin.prediction import Prediction

if TYPE_CHECKING:
    from wrapcal.model.wrapped import WrappedModel

__all__ = ["monitor", "resolve_reference", "stream"]

BatchHook = Callable[[int, Prediction, "torch.Tensor | None"], None]


def resolve_reference(wrapped: WrappedModel, reference: Any, batch_size: int = 256) -> Reference:
    """``reference=`` as a :class:`Reference`: one as it is, a saved one (a ``.json``
    path) read, calibration data summarised (one pass), ``None`` from the model's
    operating points."""
    if reference is None:
        return Reference.from_model(wrapped)
    if isinstance(reference, Reference):
        return reference
    if isinstance(reference, (str, Path)):
        return Reference.load(reference)
    return Reference.from_data(wrapped, reference, batch_size=batch_size)


def _check_level(level: float) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level!r}")


def stream(
    wrapped: WrappedModel,
    traffic: Any,
    *,
    reference: Any = None,
    window_size: int | None = None,
    names: Sequence[str] | None = None,
    timestamps: Sequence[Any] | None = None,
    rules: AlertRules | None = None,
    ood_score: str | None = "auto",
    level: float = 0.95,
    batch_size: int = 256,
    on_batch: BatchHook | None = None,
    _plan: list[OodPlan | None] | None = None,
) -> Iterator[WindowSummary]:
    """Monitor ``traffic`` window by window, yielding each window's summary as soon as
    it ends (for live alerting); the arguments are :func:`monitor`'s."""
    wrapped.check_is_fitted()
    _check_level(level)
    rules = rules or AlertRules()
    ref = resolve_reference(wrapped, reference, batch_size)
    plan: list[OodPlan | None] = _plan if _plan is not None else []
    for info, batches in iter_windows(
        traffic,
        window_size=window_size,
        names=names,
        timestamps=timestamps,
        batch_size=batch_size,
    ):
        start = time.perf_counter()
        acc: WindowAccumulator | None = None
        for x, y in batches:
            if not x.shape[0]:
                continue
            pred = wrapped.predict(x, batch_size=max(batch_size, x.shape[0]))
            if not plan:
                plan.append(plan_ood(wrapped, pred, ref, ood_score))
            if acc is None:
                acc = WindowAccumulator(plan[0])
            acc.add(pred, y)
            if on_batch is not None:
                on_batch(info.index, pred, y)
        acc = acc or WindowAccumulator(plan[0] if plan else None)
        yield acc.summarise(info, ref, rules, level, time.perf_counter() - start)


def monitor(
    wrapped: WrappedModel,
    traffic: Any,
    *,
    reference: Any = None,
    window_size: int | None = None,
    names: Sequence[str] | None = None,
    timestamps: Sequence[Any] | None = None,
    rules: AlertRules | None = None,
    ood_score: str | None = "auto",
    level: float = 0.95,
    batch_size: int = 256,
    on_batch: BatchHook | None = None,
    on_window: Callable[[WindowSummary], None] | None = None,
) -> MonitorResult:
    """Watch a fitted model on windows of traffic: estimated accuracy, OOD rate, drift,
    alerts.

    Per window, with one backbone pass over it: the estimated accuracy (mean calibrated
    confidence, NannyML's CBPE) with its interval; the OOD rate and a binomial test
    against the rate expected in distribution; the mean set size and the share of each
    decision (abstain...) where the model has those plugins; the drift of every score
    against the calibration set (two-sample KS, with PSI beside it); with labels, the
    realised accuracy, ECE and the estimate's error. See docs/monitoring.md.

    Args:
        wrapped: A fitted :class:`~wrapcal.WrappedModel` (``wrapcal.load`` gives one).
        traffic: A list (or any iterable) of windows, each a data set
            (:class:`~wrapcal.monitoring.Window` adds a name and timestamp), or one data
            set with ``window_size``. Inputs as ``wrapped.predict`` takes them;
            labelled windows add realised accuracy and ECE.
        reference: The calibration set as the monitor's reference: calibration data
            (one pass; needed for drift), a :class:`~wrapcal.monitoring.Reference` or the
            path of a saved one, or ``None`` for the model's operating points alone
            (no drift test).
        window_size: Cut one data stream into windows of this many inputs.
        names: A name per window.
        timestamps: A timestamp per window.
        rules: The alert rules (default :class:`~wrapcal.monitoring.AlertRules`()).
        ood_score: How inputs count as OOD: ``"auto"`` (the ``ood`` plugin's
            ``is_ood``, else the first OOD score a plugin adds, else ``msp``), a score
            name (past its operating-point threshold), ``"is_ood"``, or ``None``.
        level: Coverage of the estimated accuracy's interval.
        batch_size: Inputs per batch of the backbone pass.
        on_batch: Called with ``(window index, prediction, labels)`` after each batch.
        on_window: Called with each window's summary as soon as the window ends.

    Returns:
        A :class:`~wrapcal.monitoring.MonitorResult`: the summaries, the alerts, and
        ``save`` (HTML, Markdown, JSON) and ``log_to`` (MLflow, a step per window).

    Raises:
        NotFittedError: A plugin still needs ``fit``.
        DataError: An empty window, or bad inputs.
        ValueError: Bad settings (one data set without ``window_size``, an unknown
            ``ood_score``...).
    """
    rules = rules or AlertRules()
    ref = resolve_reference(wrapped, reference, batch_size)
    plan: list[OodPlan | None] = []
    windows = []
    start = time.perf_counter()
    for summary in stream(
        wrapped,
        traffic,
        reference=ref,
        window_size=window_size,
        names=names,
        timestamps=timestamps,
        rules=rules,
        ood_score=ood_score,
        level=level,
        batch_size=batch_size,
        on_batch=on_batch,
        _plan=plan,
    ):
        windows.append(summary)
        if on_window is not None:
            on_window(summary)
    settings = {
        "model": wrapped.model_name,
        "plugins": list(wrapped.plugin_names),
        "ood": None if not plan or plan[0] is None else vars(plan[0]).copy(),
        "level": level,
        "window_size": window_size,
        "batch_size": batch_size,
        "seconds": time.perf_counter() - start,
    }
    return MonitorResult(windows, ref, rules, settings)
