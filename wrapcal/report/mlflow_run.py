"""One MLflow run, however the caller gives it, and the batched logging into it: what
:func:`wrapcal.report.log_report` and :func:`wrapcal.monitoring.tracking.log_monitor`
share (the monitor imports it from here; nothing here imports the monitor).

:func:`logging_run` resolves the run to log into:

* a run given (an ``mlflow.ActiveRun``, an ``mlflow.entities.Run`` or a run id): that
  run, left as it is (running or ended) afterwards;
* none given: the active run (``with mlflow.start_run():``) when there is one and no
  ``tracking_uri`` names another store; else a new run in ``experiment`` (created if
  missing; default ``"wrapcal"``), ended FINISHED when the logging succeeds and FAILED
  when it raises;
* ``nested=True``: a new run *under* the given run (or the active one), in its
  experiment, tagged ``mlflow.parentRunId`` as ``mlflow.start_run(nested=True)`` does,
  so the MLflow UI shows it inside its parent; ended like any new run.

:func:`log_batches` logs metrics, params and tags in MLflow's batch sizes (1000 metrics,
100 params or tags per call; param values cut at 6000 characters), and
:func:`log_files` a saved report's files, or a fresh save to a temporary folder.
MLflow is imported only when these run (``pip install 'wrapcal[mlflow]'``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LoggingRun", "import_mlflow", "log_batches", "log_files", "logging_run", "run_id_of"]

#: MLflow's limits per ``log_batch`` call, and on a param's value.
METRICS_PER_BATCH, PARAMS_PER_BATCH, TAGS_PER_BATCH, PARAM_CHARS = 1000, 100, 100, 6000
#: The tag MLflow's own nested runs carry (``mlflow.start_run(nested=True)``).
PARENT_TAG = "mlflow.parentRunId"


def import_mlflow(what: str = "logging to MLflow") -> Any:
    """The ``mlflow`` module, or an ImportError that says how to install it."""
    try:
        import mlflow
    except ImportError as err:  # an optional extra: say how to get it
        raise ImportError(f"{what} needs mlflow: pip install 'wrapcal[mlflow]'") from err
    return mlflow


def run_id_of(run: Any) -> str:
    """The id of a run given as an id, an ``mlflow.ActiveRun`` or an ``mlflow.entities.Run``.

    Raises:
        ValueError: ``run`` is none of these.
    """
    if isinstance(run, str):
        return run
    run_id = getattr(getattr(run, "info", None), "run_id", None)
    if not isinstance(run_id, str):
        raise ValueError(
            f"run must be an mlflow.ActiveRun, an mlflow.entities.Run or a run id; got "
            f"{type(run).__name__}"
        )
    return run_id


@dataclass(frozen=True)
class LoggingRun:
    """The run :func:`logging_run` resolved.

    Attributes:
        client: An ``mlflow.MlflowClient`` on the run's tracking store.
        run_id: The run's id.
        created: Whether :func:`logging_run` created it (and so ends it).
        parent_id: The parent's id of a nested run, else ``None``.
    """

    client: Any
    run_id: str
    created: bool
    parent_id: str | None = None


def _experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


@contextmanager
def logging_run(
    run: Any = None,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    nested: bool = False,
) -> Iterator[LoggingRun]:
    """The run to log into, for the duration of a ``with`` block (see the module's rules).

    Args:
        run: A run id, an ``mlflow.ActiveRun`` or an ``mlflow.entities.Run``; ``None``:
            the active run, else a new run. With ``nested``: the parent.
        tracking_uri: The tracking store; default MLflow's current one. Given, the active
            run (of the current store) is not used.
        experiment: The experiment of a new run that is not nested (default
            ``"wrapcal"``).
        run_name: The name of a new run.
        nested: Log into a new run under ``run`` (or the active run).

    Yields:
        The resolved :class:`LoggingRun`.

    Raises:
        ImportError: MLflow is not installed.
        ValueError: ``run`` is not a run, or ``nested`` without a parent.
    """
    mlflow = import_mlflow()
    client = mlflow.MlflowClient(tracking_uri)
    active = mlflow.active_run() if tracking_uri is None else None
    given = run if run is not None else active
    parent_id = None
    if nested:
        if given is None:
            raise ValueError(
                "nested=True logs into a new run under a parent: pass run=<the parent> or "
                "call it inside `with mlflow.start_run():`"
            )
        parent_id = run_id_of(given)
        given = None
    if given is None:
        tags = {PARENT_TAG: parent_id} if parent_id else None
        experiment_id = (
            client.get_run(parent_id).info.experiment_id
            if parent_id
            else _experiment_id(client, experiment or "wrapcal")
        )
        made = client.create_run(experiment_id, run_name=run_name, tags=tags)
        resolved = LoggingRun(client, made.info.run_id, True, parent_id)
    else:
        resolved = LoggingRun(client, run_id_of(given), False)
    try:
        yield resolved
    except BaseException:
        if resolved.created:
            client.set_terminated(resolved.run_id, status="FAILED")
        raise
    if resolved.created:
        client.set_terminated(resolved.run_id)


def log_batches(
    target: LoggingRun,
    metrics: Iterable[tuple[str, float, int]] = (),
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Log metrics ``(name, value, step)``, params and tags in MLflow's batch sizes, all
    with one timestamp (now)."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    rows = [Metric(name, value, now, step) for name, value, step in metrics]
    params_ = [Param(k, str(v)[:PARAM_CHARS]) for k, v in (params or {}).items()]
    tags_ = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    client, run_id = target.client, target.run_id
    for i in range(0, len(rows), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=rows[i : i + METRICS_PER_BATCH])
    for i in range(0, len(params_), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params_[i : i + PARAMS_PER_BATCH])
    for i in range(0, len(tags_), TAGS_PER_BATCH):
        client.log_batch(run_id, tags=tags_[i : i + TAGS_PER_BATCH])


def log_files(
    target: LoggingRun,
    artifact_path: str,
    names: Sequence[str],
    save: Callable[[str], Any],
    directory: str | Path | None = None,
    what: str = "report.save()",
) -> None:
    """Log a report's files (``names``, and ``figures/*.png``) under ``artifact_path``.

    Args:
        target: The run.
        artifact_path: The run's folder that receives them.
        names: The report's files (``report.html``, ...): only these and the figures are
            logged from ``directory``, not whatever else the folder holds.
        save: Writes the report into a folder (``report.save``): used without
            ``directory``, into a temporary folder.
        directory: Where the report was saved already (logged as it is).
        what: The call that writes the report, for the error message.

    Raises:
        FileNotFoundError: ``directory`` lacks one of ``names``.
    """
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="wrapcal-report-") as tmp:
            save(tmp)
            target.client.log_artifacts(target.run_id, tmp, artifact_path)
        return
    folder = Path(directory)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} has no {', '.join(missing)}: pass the folder {what} wrote"
        )
    for name in names:
        target.client.log_artifact(target.run_id, str(folder / name), artifact_path)
    for png in sorted((folder / "figures").glob("*.png")):
        target.client.log_artifact(target.run_id, str(png), f"{artifact_path}/figures")
