"""Log a monitoring run to MLflow: each window's numbers as one step, the report as
artifacts.

Metrics (fractions; step = the window's index; timestamp = now): ``monitor/n``,
``monitor/estimated_accuracy`` with ``_ci_low`` / ``_ci_high``, ``monitor/accuracy``,
``monitor/ece``, ``monitor/estimate_error`` (labelled windows), ``monitor/ood_rate``
and ``monitor/ood_pvalue``, ``monitor/decision/<name>``, ``monitor/set_size/<name>``,
``monitor/drift/<score>/{ks,pvalue,psi}`` and ``monitor/alerts`` (the window's count);
params: the rules and settings; artifacts: ``monitor.html``, ``monitor.md``,
``monitor.json`` and ``figures/*.png`` under ``artifact_path``. MLflow is imported only
when this runs (``pip install 'wrapcal[mlflow]'``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrapcal.report.mlflow_run import log_batches, log_files, logging_run
from wrapcal.report.tracking import mlflow_name

if TYPE_CHECKING:
    from wrapcal.monitoring.summary import WindowSummary

# A MonitorResult, not imported (even for typing): MonitorResult.log_to imports this module.
MonitorResult = Any

__all__ = ["MONITOR_FILES", "log_monitor", "window_metrics"]

#: The monitoring report's files a run receives (with ``figures/*.png``).
MONITOR_FILES = ("monitor.html", "monitor.md", "monitor.json")


def window_metrics(w: WindowSummary) -> dict[str, float]:
    """A window's numbers under their MLflow names (``None`` values left out)."""
    out: dict[str, Any] = {
        "monitor/n": w.n,
        "monitor/estimated_accuracy": w.estimated_accuracy,
        "monitor/estimated_accuracy_ci_low": w.estimated_accuracy_ci[0],
        "monitor/estimated_accuracy_ci_high": w.estimated_accuracy_ci[1],
        "monitor/accuracy": w.accuracy,
        "monitor/ece": w.ece,
        "monitor/estimate_error": w.estimate_error,
        "monitor/alerts": len(w.alerts),
    }
    if w.ood is not None:
        out["monitor/ood_rate"] = w.ood["rate"]
        out["monitor/ood_pvalue"] = w.ood["pvalue"]
    for name, rate in w.decisions.items():
        out[mlflow_name("monitor", "decision", name)] = rate
    for name, size in w.sets.items():
        out[mlflow_name("monitor", "set_size", name)] = size
    for score, row in w.drift.items():
        for key, value in row.items():
            out[mlflow_name("monitor", "drift", score, key)] = value
    return {k: float(v) for k, v in out.items() if v is not None and v == v}


def log_monitor(
    result: MonitorResult,
    run: Any = None,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    artifact_path: str = "wrapcal_monitor",
    directory: str | Path | None = None,
    nested: bool = False,
) -> str:
    """Log a monitoring run to an MLflow run (a step per window).

    The run is resolved as :func:`wrapcal.report.log_report` resolves it
    (:func:`wrapcal.report.mlflow_run.logging_run`).

    Args:
        result: What :func:`wrapcal.monitor` returned.
        run: A run id or an ``mlflow.ActiveRun``; ``None``: the active run, else a new
            run in ``experiment`` (default ``"wrapcal"``), ended once all is logged.
        tracking_uri: The tracking store (default MLflow's current one).
        experiment: The experiment of a new run.
        run_name: The name of a new run.
        artifact_path: Folder of the run's artifacts receiving the report.
        directory: Where ``result.save`` wrote the report already (its ``monitor.*``
            files and figures are logged as they are); default: saved to a temporary
            folder.
        nested: Log into a new run nested under ``run`` (or the active run).

    Returns:
        The run's id.

    Raises:
        ImportError: MLflow is not installed.
        ValueError: ``run`` is not a run, or ``nested`` without a parent run.
    """
    metrics = [(k, v, w.index) for w in result.windows for k, v in window_metrics(w).items()]
    params = {mlflow_name("rule", k): str(v) for k, v in result.rules.to_dict().items()}
    params["model"] = str(result.settings["model"])
    params["plugins"] = ", ".join(result.settings["plugins"]) or "none"
    params["ood"] = json.dumps(result.settings.get("ood"))
    params["reference"] = f"{result.reference.source} (n={result.reference.n})"
    with logging_run(
        run, tracking_uri=tracking_uri, experiment=experiment, run_name=run_name, nested=nested
    ) as target:
        log_batches(target, metrics=metrics, params=params)
        log_files(target, artifact_path, MONITOR_FILES, result.save, directory, "result.save()")
    return target.run_id
