"""Log a report to MLflow: its metrics, its settings, its figures and its files.

``pip install wrapcal[mlflow]``; MLflow is imported only when this module's functions
run. A report becomes, in one MLflow run:

* **metrics** (fractions, as in ``report.json``; flattened, MLflow-safe names):
  ``calibration/<model>/<metric>``, ``ood/<model>/<ood set>/<score>/<metric>``,
  ``summary/<model>/<metric>`` and ``summary/<model>/<ood set>/<metric>`` (the best
  score's ``auroc``, ``fpr95``, ``threshold``), ``plugin/<model>/<plugin>/<metric>``,
  ``seconds/<model>``; intervals as ``<metric>_ci_low`` / ``<metric>_ci_high``;
* **params**: the settings, the data set sizes, the models' plugins, wrapcal's version;
* **tags**: ``wrapcal.best_score/<model>/<ood set>`` (the summary's best score);
* **artifacts** under ``artifact_path``: ``report.html``, ``report.md``,
  ``report.json`` and ``figures/*.png``.

>>> import mlflow                                                  # doctest: +SKIP
>>> with mlflow.start_run():                                      # doctest: +SKIP
...     report.log_to()                                           # the active run
>>> log_report(report, tracking_uri="sqlite:///mlflow.db", experiment="retrofit")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from wrapcal.report.mlflow_run import log_batches, log_files, logging_run

__all__ = ["REPORT_FILES", "flat_metrics", "log_report", "mlflow_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_./-]+")
#: The report's files a run receives (with ``figures/*.png``).
REPORT_FILES = ("report.html", "report.md", "report.json")


def mlflow_name(*parts: str) -> str:
    """A metric, param or tag name MLflow accepts on every backend: the parts joined with
    ``/``, each reduced to letters, digits, ``_``, ``-`` and ``.``."""
    cleaned = [_UNSAFE.sub("_", str(p)).strip("_") or "_" for p in parts]
    return "/".join(cleaned)


def _add(out: dict[str, float], name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return  # None, strings, NaN: not a metric
    key, i = name, 2
    while key in out:  # names that differ only in symbols would collide once cleaned
        key, i = f"{name}_{i}", i + 1
    out[key] = float(value)


def _add_ci(out: dict[str, float], name: str, ci: Any) -> None:
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        _add(out, f"{name}_ci_low", ci[0])
        _add(out, f"{name}_ci_high", ci[1])


def flat_metrics(data: dict[str, Any]) -> dict[str, float]:
    """Every number of a report's data (``Report.to_dict()``) under a flat MLflow name."""
    out: dict[str, float] = {}
    for model, row in data["calibration"].items():
        for metric, value in row.items():
            name = mlflow_name("calibration", model, metric.removesuffix("_ci"))
            _add_ci(out, name, value) if metric.endswith("_ci") else _add(out, name, value)
    for model, sets in data["ood"].items():
        for ood_set, scores in sets.items():
            for score, row in scores.items():
                for metric, value in row.items():
                    name = mlflow_name("ood", model, ood_set, score, metric.removesuffix("_ci"))
                    _add_ci(out, name, value) if metric.endswith("_ci") else _add(out, name, value)
    for model, entry in data.get("summary", {}).get("models", {}).items():
        for metric in ("accuracy", "ece", "baseline_ece"):
            _add(out, mlflow_name("summary", model, metric), entry.get(metric))
        for ood_set, cell in entry.get("ood", {}).items():
            for metric in ("auroc", "fpr95", "threshold", "accepted"):
                _add(out, mlflow_name("summary", model, ood_set, metric), (cell or {}).get(metric))
            _add_ci(
                out, mlflow_name("summary", model, ood_set, "auroc"), (cell or {}).get("auroc_ci")
            )
    for model, plugins in data.get("plugin_metrics", {}).items():
        for plugin, metrics in plugins.items():
            for metric, entry in metrics.items():
                if isinstance(entry, dict) and "value" in entry:
                    name = mlflow_name("plugin", model, plugin, metric)
                    _add(out, name, entry["value"])
                    _add_ci(out, name, entry.get("ci"))
    for model, info in data["models"].items():
        _add(out, mlflow_name("seconds", model), info["seconds"]["total"])
    return out


def _params(data: dict[str, Any]) -> dict[str, str]:
    params = {mlflow_name(k): str(v) for k, v in data["settings"].items()}
    params["wrapcal_version"] = str(data["wrapcal_version"])
    params["test_n"] = str(data["data"]["test"]["n"])
    params["num_classes"] = str(data["data"]["test"]["num_classes"])
    params["ood_sets"] = json.dumps({k: v["n"] for k, v in data["data"]["ood"].items()})
    for model, info in data["models"].items():
        plugins = info.get("plugins")
        params[mlflow_name("model", model)] = (
            f"{info.get('wrapped') or 'model'} + {', '.join(plugins) or 'no plugins'}"
            if plugins is not None
            else f"bare {info['class']}"
        )
    return params  # log_batches cuts each value at MLflow's 6000 characters


def _tags(data: dict[str, Any]) -> dict[str, str]:
    tags = {"wrapcal.report": data["title"]}
    for model, entry in data.get("summary", {}).get("models", {}).items():
        for ood_set, cell in entry.get("ood", {}).items():
            if cell:
                tags[mlflow_name("wrapcal.best_score", model, ood_set)] = cell["score"]
    return tags


def log_report(
    report: Any,
    run: Any = None,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    artifact_path: str = "wrapcal_report",
    directory: str | Path | None = None,
    nested: bool = False,
) -> str:
    """Log a :class:`~wrapcal.report.Report` to an MLflow run.

    The run is resolved by :func:`wrapcal.report.mlflow_run.logging_run`, which
    :func:`wrapcal.monitoring.tracking.log_monitor` shares.

    Args:
        report: The report (``wrapcal.evaluate``'s result).
        run: The run to log into: an ``mlflow.ActiveRun``, an ``mlflow.entities.Run`` or
            a run id. ``None``: the active run if there is one, else a new run in
            ``experiment``, ended (FINISHED) once everything is logged.
        tracking_uri: The tracking server or store (``sqlite:///mlflow.db``, MLflow 3's
            default; ``http://host:5000``; the file store ``file:///path/mlruns`` only
            with ``MLFLOW_ALLOW_FILE_STORE=true``, which MLflow 3 requires); default
            MLflow's current one.
        experiment: The experiment of a new run (created if missing; default
            ``"wrapcal"``). Ignored when logging into an existing run.
        run_name: The name of a new run.
        artifact_path: Folder of the run's artifacts that receives the report's files.
        directory: Where ``report.save`` already wrote the report: its files are logged
            as they are (no second rendering of the figures). Default: save to a
            temporary folder.
        nested: Log into a new run nested under ``run`` (or the active run), as
            ``mlflow.start_run(nested=True)`` makes: one child run per report of a sweep.

    Returns:
        The run's id.

    Raises:
        ImportError: If MLflow is not installed (``pip install wrapcal[mlflow]``).
        ValueError: ``run`` is not a run, or ``nested`` without a parent run.
    """
    data = report.to_dict()
    with logging_run(
        run, tracking_uri=tracking_uri, experiment=experiment, run_name=run_name, nested=nested
    ) as target:
        log_batches(
            target,
            metrics=[(k, v, 0) for k, v in flat_metrics(data).items()],
            params=_params(data),
            tags=_tags(data),
        )
        log_files(target, artifact_path, REPORT_FILES, report.save, directory)
    return target.run_id
