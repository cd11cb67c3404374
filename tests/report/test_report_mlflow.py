"""Logging a report to MLflow: a real local tracking store (SQLite, MLflow's default
backend, and the file store) in a temporary folder, read back through MLflow's own
client: every metric equals the report's number, the params and tags are there, and the
report's files are the run's artifacts. Skipped when mlflow is not installed, unless
WRAPCAL_REQUIRE_MLFLOW=1 (CI), which makes that a failure."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from torch import nn

import wrapcal
from wrapcal.report.tracking import flat_metrics, log_report, mlflow_name

if os.environ.get("WRAPCAL_REQUIRE_MLFLOW", "") in ("", "0"):  # CI sets it: no silent skip
    mlflow = pytest.importorskip("mlflow")
else:
    import mlflow

MODEL = "temp & sets (v2)"  # spaces and symbols MLflow names do not take


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """MLflow writes beside the current folder (a SQLite store's artifacts go to
    ./mlruns, a ``file:`` database URI's folders are made relative to it): keep it out of
    the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def report():
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(1600, 12, generator=gen)
    with torch.no_grad():  # labels from the model's own softmax at T = 2
        y = torch.multinomial(torch.softmax(model(x) / 2, 1), 1, generator=gen)[:, 0]
    wrapped = wrapcal.wrap(model, ["temperature", "conformal", ("abstain", {"risk": 0.05})])
    wrapped.fit(calibration=(x[:800], y[:800]), progress=False)
    ood = {"noise": 3 * torch.randn(300, 12, generator=gen), "near": 0.3 * x[:300]}
    return wrapcal.evaluate(
        {"baseline": model, MODEL: wrapped},
        test=(x[800:], y[800:]),
        ood=ood,
        progress=False,
        bootstrap=50,
    )


def stores(tmp_path, monkeypatch):
    """Tracking URIs of a SQLite store and of a file store in ``tmp_path``."""
    uris = []
    try:
        import sqlalchemy  # noqa: F401  (the SQL store needs it; mlflow-skinny lacks it)

        uris.append(f"sqlite:///{tmp_path / 'mlflow.db'}")
    except ImportError:
        pass
    # MLflow 3 keeps the file store behind a switch (maintenance mode); it still works.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uris.append((tmp_path / "mlruns").as_uri())
    return uris


def test_flat_names_are_mlflow_safe_and_cover_the_report(report):
    data = report.to_dict()
    metrics = flat_metrics(data)
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./")
    assert all(set(name) <= safe for name in metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    model = mlflow_name(MODEL)
    assert model == "temp_sets_v2"
    assert metrics[f"calibration/{model}/ece"] == data["calibration"][MODEL]["ece"]
    low, high = data["calibration"][MODEL]["ece_ci"]
    assert metrics[f"calibration/{model}/ece_ci_low"] == low
    assert metrics[f"calibration/{model}/ece_ci_high"] == high
    row = data["ood"]["baseline"]["near"]["energy"]
    assert metrics["ood/baseline/near/energy/fpr95"] == row["fpr95"]
    assert metrics["ood/baseline/near/energy/auroc_ci_high"] == row["auroc_ci"][1]
    cell = data["summary"]["models"][MODEL]["ood"]["noise"]
    assert metrics[f"summary/{model}/noise/threshold"] == cell["threshold"]
    coverage = data["plugin_metrics"][MODEL]["conformal"]["coverage"]
    assert metrics[f"plugin/{model}/conformal/coverage"] == coverage["value"]
    assert metrics[f"plugin/{model}/conformal/coverage_ci_low"] == coverage["ci"][0]
    # Every number of the calibration and OOD tables is there.
    n_cal = sum(len(r) + 1 for r in data["calibration"].values())  # ece_ci: low and high
    n_ood = sum(
        len(row) + 1
        for sets in data["ood"].values()
        for rows in sets.values()
        for row in rows.values()
    )
    assert sum(k.startswith(("calibration/", "ood/")) for k in metrics) == n_cal + n_ood


def test_log_report_to_a_local_store_reads_back(report, tmp_path, monkeypatch):
    data = report.to_dict()
    expected = flat_metrics(data)
    saved = report.save(tmp_path / "saved")
    for i, uri in enumerate(stores(tmp_path, monkeypatch)):
        # The first store gets the saved files, the last a fresh save (to a temporary folder).
        directory = saved if i == 0 and len(stores(tmp_path, monkeypatch)) > 1 else None
        run_id = log_report(
            report, tracking_uri=uri, experiment="wrapcal-test", run_name="r1", directory=directory
        )
        client = mlflow.MlflowClient(uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == "r1"
        assert client.get_experiment(run.info.experiment_id).name == "wrapcal-test"
        assert run.data.metrics == pytest.approx(expected, rel=1e-12)
        assert run.data.params["n_bins"] == "15" and run.data.params["bootstrap"] == "50"
        assert run.data.params["test_n"] == "800"
        assert json.loads(run.data.params["ood_sets"]) == {"noise": 300, "near": 300}
        assert run.data.params["model/temp_sets_v2"].endswith("abstain, conformal")
        best = data["summary"]["models"]["baseline"]["ood"]["near"]["score"]
        assert run.data.tags["wrapcal.best_score/baseline/near"] == best
        files = {a.path for a in client.list_artifacts(run_id, "wrapcal_report")}
        assert {f"wrapcal_report/report.{e}" for e in ("html", "md", "json")} <= files
        figures = {a.path for a in client.list_artifacts(run_id, "wrapcal_report/figures")}
        assert len(figures) == len(report.figures()) and any("risk_coverage" in f for f in figures)
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="wrapcal_report/report.json", tracking_uri=uri,
            dst_path=str(tmp_path / "download"),
        )  # fmt: skip
        with open(local, encoding="utf-8") as f:
            assert json.load(f)["summary"] == data["summary"]


def test_log_to_the_active_run_and_a_saved_directory(report, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    saved = report.save(tmp_path / "report")
    try:
        with mlflow.start_run() as active:
            mlflow.log_param("user_param", "kept")
            assert report.log_to(directory=saved) == active.info.run_id
            # nested=True: a new run under the active one, as mlflow.start_run(nested=True).
            child_id = report.log_to(directory=saved, nested=True, run_name="child")
        child = mlflow.MlflowClient(uri).get_run(child_id)
        assert child_id != active.info.run_id and child.info.run_name == "child"
        assert child.data.tags["mlflow.parentRunId"] == active.info.run_id
        assert child.info.experiment_id == active.info.experiment_id
        assert child.info.status == "FINISHED" and "user_param" not in child.data.params
        assert child.data.metrics == pytest.approx(flat_metrics(report.to_dict()), rel=1e-12)
        run = mlflow.MlflowClient(uri).get_run(active.info.run_id)
        assert run.data.params["user_param"] == "kept"  # logged beside the user's own
        assert run.data.metrics["calibration/baseline/accuracy"] == report.calibration[
            "baseline"]["accuracy"]  # fmt: skip
        # An explicit run id works outside the context too.
        assert report.log_to(active.info.run_id, artifact_path="again") == active.info.run_id
        paths = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id)}
        assert {"wrapcal_report", "again"} <= paths
    finally:
        mlflow.set_tracking_uri(None)
    with pytest.raises(FileNotFoundError, match=r"report.save\(\) wrote"):
        log_report(report, run.info.run_id, tracking_uri=uri, directory=tmp_path)
    with pytest.raises(ValueError, match="run must be"):
        log_report(report, 42, tracking_uri=uri)
    with pytest.raises(ValueError, match="nested=True logs into a new run under a parent"):
        log_report(report, tracking_uri=uri, nested=True)


def _sqlalchemy() -> None:
    pytest.importorskip("sqlalchemy", reason="the SQL store needs it (mlflow-skinny lacks it)")


def test_the_documented_cli_command_logs_to_mlflow(tmp_path, monkeypatch):
    """docs/report.md's command as written: --mlflow sqlite:///mlflow.db, MLflow 3's
    default store, in the current folder; no MLFLOW_ALLOW_FILE_STORE needed. A database
    in a folder that does not exist yet works too (MLflow creates the folder)."""
    from wrapcal.cli import main

    _sqlalchemy()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///mlflow.db"
    argv = ["evaluate", "timm:resnet10t", "--data", "digits", "--ood", "noise=gaussian"]
    argv += ["--plugins", "temperature", "--bootstrap", "0", "--no-progress", "--limit", "200"]
    assert main([*argv, "--out", "report", "--mlflow", uri, "--mlflow-experiment", "cli"]) == 0
    assert (tmp_path / "mlflow.db").is_file()
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert run.info.status == "FINISHED"
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    ece = saved["calibration"]["wrapped"]["ece"]
    logged = {k: v for k, v in run.data.metrics.items() if "wrapped" in k and k.endswith("ece")}
    assert any(v == pytest.approx(ece) for v in logged.values()), logged
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "wrapcal_report")]
    assert "wrapcal_report/report.html" in artifacts
    from wrapcal.cli.tracking import open_run

    deeper = open_run("sqlite:///runs/2026/mlflow.db", "cli")
    deeper.finish(ok=True)
    assert (tmp_path / "runs" / "2026" / "mlflow.db").is_file()


# --- every store failure: one line, exit 2, before any data is read (issue 30) --------------

CLI = ["evaluate", "timm:resnet10t", "--data", "digits", "--no-progress", "--bootstrap", "0"]


@pytest.fixture(scope="module")
def existing_db(tmp_path_factory):
    """An MLflow SQLite database with the experiment ``wrapcal`` (made once: MLflow's
    migrations take seconds)."""
    _sqlalchemy()
    folder = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").create_experiment("wrapcal")
    return folder / "mlflow.db"


def _store(kind: str, tmp_path, existing_db) -> tuple[str, str]:
    """A tracking URI that fails, and what the one line must say."""
    if kind == "file store":
        return (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE=true"
    if kind == "unreachable server":
        return "http://127.0.0.1:9", "cannot reach the tracking server"
    if kind == "under a file":
        (tmp_path / "runs").write_text("")
        return f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "is a file, so the database"
    if kind == "unwritable folder":
        return "sqlite:////proc/self/mlflow.db", "cannot write in /proc/self"
    if kind == "not a database":
        (tmp_path / "notes.db").write_text("my notes")
        return f"sqlite:///{tmp_path / 'notes.db'}", "is not an SQLite database"
    if kind == "database is a folder":
        (tmp_path / "dir.db").mkdir()
        return f"sqlite:///{tmp_path / 'dir.db'}", "is not a file"
    assert kind == "read-only database"
    return f"sqlite:///file:{existing_db}?mode=ro&uri=true", "the database is read-only"


@pytest.mark.parametrize(
    "kind",
    [
        "file store",
        "unreachable server",
        "under a file",
        "unwritable folder",
        "not a database",
        "database is a folder",
        "read-only database",
    ],
)
def test_a_store_mlflow_refuses_is_one_line_up_front(
    kind, tmp_path, capsys, monkeypatch, no_data, request
):
    """The probes: the file store (refused by MLflow 3's default), an unreachable server,
    a read-only SQLite database ended in a traceback after the whole evaluation."""
    from wrapcal.cli import main

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    db = request.getfixturevalue("existing_db") if kind == "read-only database" else None
    if kind in ("under a file", "unwritable folder", "not a database", "database is a folder"):
        _sqlalchemy()
    uri, message = _store(kind, tmp_path, db)
    capsys.readouterr()  # MLflow's notes while the fixture made the database
    started = time.monotonic()
    assert main([*CLI, "--out", str(tmp_path / "report"), "--mlflow", uri]) == 2
    assert time.monotonic() - started < 15  # no minutes of MLflow retries
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"wrapcal evaluate: error: --mlflow {uri}: "), err
    assert message in err, err
    assert not (tmp_path / "report").exists()


def test_a_failed_evaluation_ends_the_run_failed(tmp_path, capsys, monkeypatch):
    """The run is created before the evaluation (the write that proves the store takes
    one); when the evaluation then fails, the run says FAILED, not RUNNING."""
    from wrapcal.cli import main

    _sqlalchemy()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    argv = [*CLI[:2], "--data", str(bad), "--no-progress", "--out", str(tmp_path / "r")]
    assert main([*argv, "--mlflow", uri, "--mlflow-experiment", "failing"]) == 2
    assert "--data" in capsys.readouterr().err
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert run.info.status == "FAILED"
