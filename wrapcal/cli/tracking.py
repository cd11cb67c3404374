"""``evaluate --mlflow``: the tracking store is opened, and the run created, before the
evaluation starts, so that a store MLflow refuses costs a second, not an evaluation.

:func:`open_run` checks what can be checked without MLflow (an ``sqlite:///`` database's
folder exists and can be written, the file is a database; an ``http(s)://`` server
answers a TCP connection within :data:`CONNECT_SECONDS`), then gets or creates the
experiment and creates the run, which is a write: a read-only database fails here. MLflow
retries a refused request for minutes by default (an HTTP error with backoff, an SQLite
file that cannot be opened); the checks above and a short retry budget while opening
keep a dead store from hanging the command. Every failure is one
:class:`~wrapcal.cli.errors.CliError` naming ``--mlflow`` and the fix.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from wrapcal.cli.errors import CliError
from wrapcal.cli.targets import existing_ancestor, write_problem

__all__ = ["CONNECT_SECONDS", "TrackingRun", "log_into", "open_run", "sqlite_path"]

#: How long a tracking server has to accept a connection.
CONNECT_SECONDS = 5.0
#: MLflow's HTTP settings while the store is opened (unless the user set them).
_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_SQLITE_MAGIC = b"SQLite format 3\x00"
FILE_STORE_FIX = (
    "MLflow 3 refuses the plain file store unless MLFLOW_ALLOW_FILE_STORE=true is set; "
    "use --mlflow sqlite:///mlflow.db (a database file in the current folder)"
)


@dataclass
class TrackingRun:
    """A run created before the evaluation, to log the report into after it."""

    uri: str
    experiment: str
    run_id: str
    client: Any

    def finish(self, ok: bool) -> None:
        """End the run FINISHED, or FAILED (best effort: the command's own error is what
        the user must see)."""
        try:
            self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")
        except Exception:
            if ok:
                raise


def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` URI (``None`` for an in-memory one)."""
    rest = uri[len("sqlite://") :]
    if not rest.startswith("/"):
        return None
    rest = rest[1:].split("?", 1)[0]
    rest = rest.removeprefix("file:")
    if not rest or rest == ":memory:":
        return None
    return Path(rest)


def _fail(uri: str, what: str) -> CliError:
    return CliError(f"--mlflow {uri}: {what}")


def _check_sqlite(uri: str) -> None:
    path = sqlite_path(uri)
    if path is None:
        raise _fail(uri, "an in-memory database keeps nothing; give a file: sqlite:///mlflow.db")
    if path.exists():
        if not path.is_file():
            raise _fail(uri, f"{path} is not a file; give a database file: sqlite:///mlflow.db")
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
        if head and head != _SQLITE_MAGIC:
            raise _fail(uri, f"{path} is not an SQLite database; give another file")
    # MLflow creates missing folders above the database: the nearest existing one must
    # be a folder that can be written (SQLite also writes a journal beside the file).
    folder = existing_ancestor(path.parent)
    if not folder.is_dir():
        raise _fail(uri, f"{folder} is a file, so the database cannot go under it")
    problem = write_problem(folder)
    if problem is not None:
        raise _fail(uri, f"cannot write in {folder} ({problem}); give a database you can write")


def _check_server(uri: str) -> None:
    parts = urlsplit(uri)
    if not parts.hostname:
        raise _fail(uri, "no host in the URI; give http://HOST:PORT")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_SECONDS).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise _fail(
            uri,
            f"cannot reach the tracking server ({reason}); start it (mlflow server) or check "
            "the address",
        ) from None


def _check_file_store(uri: str) -> None:
    # Whether MLflow allows it is MLflow's to say (open_run turns its refusal into
    # FILE_STORE_FIX); what is checked here is the folder.
    path = Path(urlsplit(uri).path if uri.startswith("file:") else uri)
    if path.exists() and not path.is_dir():
        raise _fail(uri, f"{path} is a file; the file store is a folder (mlruns)")


@contextmanager
def _quiet_and_quick() -> Iterator[None]:
    """MLflow's HTTP retries cut short while the store is opened (the user's own
    settings win), and its logger quiet: it logs a store's failure with a traceback
    before raising, and the command says that failure in one line."""
    set_here = [k for k in _QUICK if k not in os.environ]
    os.environ.update({k: _QUICK[k] for k in set_here})
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        for key in set_here:
            os.environ.pop(key, None)


def _first_line(err: BaseException) -> str:
    """The error's first informative line (SQLAlchemy opens with a note on autoflush)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith("(raised as a result")]
    text = (useful or lines or [type(err).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def open_run(uri: str, experiment: str) -> TrackingRun:
    """Open the tracking store, get or create ``experiment`` and create a run in it.

    Raises:
        CliError: MLflow is not installed, or the store cannot be reached or written;
            the message names ``--mlflow`` and what to do.
    """
    try:
        import mlflow
    except ImportError:
        raise CliError("--mlflow needs MLflow: pip install 'wrapcal[mlflow]'") from None
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("http", "https"):
        _check_server(uri)
    elif scheme in ("", "file"):
        _check_file_store(uri)
    try:
        with _quiet_and_quick():
            client = mlflow.MlflowClient(uri)
            found = client.get_experiment_by_name(experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                raise _fail(
                    uri,
                    f"the experiment {experiment!r} is deleted; restore it or give another "
                    "--mlflow-experiment",
                )
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            run_id = client.create_run(experiment_id).info.run_id
    except CliError:
        raise
    except Exception as err:  # MLflow's, SQLAlchemy's, requests' errors: one line
        text, whole = _first_line(err), str(err)
        if "MLFLOW_ALLOW_FILE_STORE" in whole:
            text = FILE_STORE_FIX
        elif "readonly database" in whole or "read-only" in whole:
            text = "the database is read-only; give a tracking store you can write to"
        raise _fail(uri, text) from None
    return TrackingRun(uri, experiment, run_id, client)


def log_into(run: TrackingRun, report: Any, directory: Path) -> None:
    """Log a saved report into the run :func:`open_run` created.

    Raises:
        CliError: The store failed while logging (it went away, filled up...).
    """
    from wrapcal.report.tracking import log_report

    try:
        with _quiet_and_quick():
            log_report(report, run.run_id, tracking_uri=run.uri, directory=directory)
    except Exception as err:
        raise _fail(
            run.uri, f"logging the report failed ({_first_line(err)}); it is saved in {directory}"
        ) from None
