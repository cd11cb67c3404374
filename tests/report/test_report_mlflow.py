"""Logging a report to MLflow: a real local tracking store (SQLite, MLflow's default
backend, and the file store) in a temporary folder, read back through MLflow's own
client: every metric equals the report's number, the params and tags are there, and the
report's files are the run's artifacts. Skipped when mlflow is not installed, unless
WRAPCAL_REQUIRE_MLFLOW=1 (CI), which makes that a failure."""

from __future__ import annotations

import json
import math
import os

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


def test_the_cli_logs_its_report_to_mlflow(tmp_path, monkeypatch):
    from wrapcal.cli import main

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path / 'mlruns'}"
    out = tmp_path / "report"
    argv = ["evaluate", "timm:resnet10t", "--data", "digits", "--ood", "noise=gaussian"]
    argv += ["--plugins", "temperature", "--bootstrap", "0", "--no-progress", "--limit", "200"]
    assert main([*argv, "--out", str(out), "--mlflow", uri, "--mlflow-experiment", "cli"]) == 0
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    saved = json.loads((out / "report.json").read_text())
    ece = saved["calibration"]["wrapped"]["ece"]
    logged = {k: v for k, v in run.data.metrics.items() if "wrapped" in k and k.endswith("ece")}
    assert any(v == pytest.approx(ece) for v in logged.values()), logged
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "wrapcal_report")]
    assert "wrapcal_report/report.html" in artifacts
