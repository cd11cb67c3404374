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
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["flat_metrics", "log_report", "mlflow_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_./-]+")
_BATCH = 1000  # MLflow's limit of metrics per log_batch call (params and tags: 100)


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
    return {k: v[:6000] for k, v in params.items()}  # MLflow's longest param value


def _tags(data: dict[str, Any]) -> dict[str, str]:
    tags = {"wrapcal.report": data["title"]}
    for model, entry in data.get("summary", {}).get("models", {}).items():
        for ood_set, cell in entry.get("ood", {}).items():
            if cell:
                tags[mlflow_name("wrapcal.best_score", model, ood_set)] = cell["score"]
    return tags


def _log_saved(client: Any, run_id: str, directory: Path, artifact_path: str) -> None:
    """Log the report files of a saved report (and only those: not whatever else the
    folder holds)."""
    names = ("report.html", "report.md", "report.json")
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} has no {', '.join(missing)}: pass the folder report.save() wrote"
        )
    for name in names:
        client.log_artifact(run_id, str(directory / name), artifact_path)
    for png in sorted((directory / "figures").glob("*.png")):
        client.log_artifact(run_id, str(png), f"{artifact_path}/figures")


def _run_id(run: Any) -> str:
    if isinstance(run, str):
        return run
    info = getattr(run, "info", None)
    run_id = getattr(info, "run_id", None)
    if not isinstance(run_id, str):
        raise ValueError(
            f"run must be an mlflow.ActiveRun, an mlflow.entities.Run or a run id; got "
            f"{type(run).__name__}"
        )
    return run_id


def log_report(
    report: Any,
    run: Any = None,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    artifact_path: str = "wrapcal_report",
    directory: str | Path | None = None,
) -> str:
    """Log a :class:`~wrapcal.report.Report` to an MLflow run.

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

    Returns:
        The run's id.

    Raises:
        ImportError: If MLflow is not installed (``pip install wrapcal[mlflow]``).
    """
    try:
        import mlflow
        from mlflow.entities import Metric, Param, RunTag
    except ImportError as err:  # an optional extra: say how to get it
        raise ImportError(
            "logging a report to MLflow needs mlflow: pip install 'wrapcal[mlflow]'"
        ) from err
    client = mlflow.MlflowClient(tracking_uri)
    if run is None and mlflow.active_run() is not None and tracking_uri is None:
        run = mlflow.active_run()
    created = run is None
    if created:
        name = experiment or "wrapcal"
        found = client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else client.create_experiment(name)
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    else:
        run_id = _run_id(run)
    data = report.to_dict()
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in flat_metrics(data).items()]
    params = [Param(k, v) for k, v in _params(data).items()]
    tags = [RunTag(k, v) for k, v in _tags(data).items()]
    try:
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(tags), 100):
            client.log_batch(run_id, tags=tags[i : i + 100])
        if directory is not None:
            _log_saved(client, run_id, Path(directory), artifact_path)
        else:
            with tempfile.TemporaryDirectory(prefix="wrapcal-report-") as tmp:
                report.save(tmp)
                client.log_artifacts(run_id, tmp, artifact_path)
    except BaseException:
        if created:
            client.set_terminated(run_id, status="FAILED")
        raise
    if created:
        client.set_terminated(run_id)
    return run_id
