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
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrapcal.report.tracking import mlflow_name

if TYPE_CHECKING:
    from wrapcal.monitoring.summary import WindowSummary

# A MonitorResult, not imported (even for typing): MonitorResult.log_to imports this module.
MonitorResult = Any

__all__ = ["log_monitor", "window_metrics"]

_BATCH = 1000  # MLflow's limit of metrics per log_batch call


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
    artifact_path: str = "wrapcal_monitor",
    directory: str | Path | None = None,
) -> str:
    """Log a monitoring run to an MLflow run (a step per window).

    Args:
        result: What :func:`wrapcal.monitor` returned.
        run: A run id or an ``mlflow.ActiveRun``; ``None``: the active run, else a new
            run in ``experiment`` (default ``"wrapcal"``), ended once all is logged.
        tracking_uri: The tracking store (default MLflow's current one).
        experiment: The experiment of a new run.
        artifact_path: Folder of the run's artifacts receiving the report.
        directory: Where ``result.save`` wrote the report already (logged as it is);
            default: saved to a temporary folder.

    Returns:
        The run's id.

    Raises:
        ImportError: MLflow is not installed.
    """
    try:
        import mlflow
        from mlflow.entities import Metric, Param
    except ImportError as err:
        raise ImportError("logging to MLflow needs mlflow: pip install 'wrapcal[mlflow]'") from err
    client = mlflow.MlflowClient(tracking_uri)
    if run is None and mlflow.active_run() is not None and tracking_uri is None:
        run = mlflow.active_run()
    created = run is None
    if created:
        name = experiment or "wrapcal"
        found = client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else client.create_experiment(name)
        run_id = client.create_run(experiment_id).info.run_id
    else:
        run_id = run if isinstance(run, str) else run.info.run_id
    now = int(time.time() * 1000)
    metrics = [
        Metric(k, v, now, w.index) for w in result.windows for k, v in window_metrics(w).items()
    ]
    params = {mlflow_name("rule", k): str(v) for k, v in result.rules.to_dict().items()}
    params["model"] = str(result.settings["model"])
    params["plugins"] = ", ".join(result.settings["plugins"]) or "none"
    params["ood"] = json.dumps(result.settings.get("ood"))
    params["reference"] = f"{result.reference.source} (n={result.reference.n})"
    try:
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        if directory is not None:
            client.log_artifacts(run_id, str(directory), artifact_path)
        else:
            with tempfile.TemporaryDirectory(prefix="wrapcal-monitor-") as tmp:
                result.save(tmp)
                client.log_artifacts(run_id, tmp, artifact_path)
    except BaseException:
        if created:
            client.set_terminated(run_id, status="FAILED")
        raise
    if created:
        client.set_terminated(run_id)
    return run_id
