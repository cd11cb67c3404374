"""The monitor's traffic forms, streaming and memory, references, plugin outputs,
reports and MLflow."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

import wrapcal
from wrapcal.errors import DataError, NotFittedError
from wrapcal.monitoring import Reference, Window, WindowSummary
from wrapcal.monitoring.stats import PSI_FLOOR, ks_test, psi


def test_window_size_cuts_one_stream_like_a_list_of_windows(world, wrapped, calibration):
    x, y = world.sample(500, seed=3)
    ref = Reference.from_data(wrapped, calibration)
    cut = wrapcal.monitor(wrapped, (x, y), window_size=200, reference=ref, batch_size=64)
    listed = wrapcal.monitor(
        wrapped, [(x[:200], y[:200]), (x[200:400], y[200:400]), (x[400:], y[400:])], reference=ref
    )
    assert [w.n for w in cut.windows] == [200, 200, 100]
    for a, b in zip(cut.windows, listed.windows, strict=True):
        assert a.estimated_accuracy == pytest.approx(b.estimated_accuracy, abs=1e-6)
        assert a.accuracy == b.accuracy and a.ood["flagged"] == b.ood["flagged"]
        assert a.drift.keys() == b.drift.keys() == set(ref.scores)
        for k in a.drift:
            assert a.drift[k]["pvalue"] == pytest.approx(b.drift[k]["pvalue"], rel=1e-4)
    # A DataLoader of (x, y) batches is one stream too.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=70)
    via_loader = wrapcal.monitor(wrapped, loader, window_size=200, reference=ref)
    assert [w.accuracy for w in via_loader.windows] == [w.accuracy for w in cut.windows]


def plain(value) -> bool:
    """Only JSON-ready values: no tensor, array or other object kept per window."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def test_windows_stream_and_only_summaries_are_kept(world, wrapped):
    pulled: list[int] = []

    def traffic():
        for i in range(4):
            pulled.append(i)
            yield Window(world.sample(100, seed=40 + i)[0], name=f"hour {i}", timestamp=f"T{i}")

    seen = []
    for summary in wrapcal.monitoring.stream(wrapped, traffic()):
        seen.append(summary.index)
        # The next window is read only after this one's summary is out.
        assert pulled == list(range(summary.index + 1))
        assert isinstance(summary, WindowSummary) and plain(summary.to_dict())
        assert json.loads(json.dumps(summary.to_dict())) == summary.to_dict()
    assert seen == [0, 1, 2, 3]
    result = wrapcal.monitor(wrapped, traffic())
    assert [(w.name, w.timestamp) for w in result.windows][1] == ("hour 1", "T1")
    assert plain(result.to_dict())


def test_bad_traffic_and_settings_are_named(world, wrapped, calibrated):
    x, y = world.sample(50, seed=0)
    with pytest.raises(ValueError, match="window_size=N"):
        wrapcal.monitor(wrapped, (x, y))
    with pytest.raises(ValueError, match="window_size=N"):
        wrapcal.monitor(wrapped, x)
    assert len(wrapcal.monitor(wrapped, (x, x[:20])).windows) == 2  # two windows, not (X, y)
    with pytest.raises(ValueError, match="window_size must be a positive integer"):
        wrapcal.monitor(wrapped, x, window_size=0)
    with pytest.raises(DataError, match="window 1.*has no inputs"):
        wrapcal.monitor(wrapped, [x, x[:0]])
    with pytest.raises(ValueError, match="not a score of this model"):
        wrapcal.monitor(wrapped, [x], ood_score="mahalanobis")
    with pytest.raises(ValueError, match="needs the 'ood' decision plugin"):
        wrapcal.monitor(wrapped, [x], ood_score="is_ood")
    with pytest.raises(ValueError, match="level"):
        wrapcal.monitor(wrapped, [x], level=1.5)
    unfitted = wrapcal.wrap(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)), ["temperature"]
    )
    with pytest.raises(NotFittedError, match="temperature"):
        wrapcal.monitor(unfitted, [x])


def test_reference_round_trip_and_the_operating_points_alone(tmp_path, wrapped, calibration):
    ref = Reference.from_data(wrapped, calibration, max_points=500)
    assert ref.n == 2000 and ref.source == "data"
    assert all(len(v) == 500 and v == sorted(v) for v in ref.scores.values())
    # The summary keeps the calibration distribution's quantiles.
    msp = wrapped.predict(calibration[0]).scores["msp"].double().numpy()
    assert np.median(ref.scores["msp"]) == pytest.approx(np.median(msp), abs=0.01)
    assert ref.accuracy == pytest.approx(
        float((wrapped.predict(calibration[0]).label == calibration[1]).double().mean())
    )
    assert ref.thresholds == pytest.approx(wrapped.operating_points["thresholds"])
    path = ref.save(tmp_path / "ref.json")
    assert path.stat().st_size < 100_000 and Reference.load(path) == ref
    with pytest.raises(ValueError, match="not a monitor reference"):
        Reference.from_dict({"n": 3})
    bad = ref.to_dict() | {"accuracy": float("nan")}
    with pytest.raises(ValueError, match="finite"):
        Reference.from_dict(bad)
    # Without reference data: the operating points (accuracy at fit), no drift test.
    alone = wrapcal.monitor(wrapped, [calibration[0][:300]])
    assert alone.reference.source == "operating_points" and alone.windows[0].drift == {}
    assert alone.windows[0].baseline_accuracy == wrapped.operating_points["metrics"]["accuracy"]
    assert alone.windows[0].ood["threshold"] == wrapped.operating_points["thresholds"]["knn"]
    # From a prediction at hand (no backbone pass): the same reference.
    pred = wrapped.predict_features(calibration[0])
    again = Reference.from_prediction(wrapped, pred, calibration[1], max_points=500)
    assert again.scores.keys() == ref.scores.keys() and again.accuracy == ref.accuracy
    for name, values in ref.scores.items():
        assert again.scores[name] == pytest.approx(values, abs=1e-5)


def test_ks_and_psi_are_the_textbook_formulas():
    g = np.random.default_rng(0)
    a, b = g.normal(size=300), g.normal(0.2, 1.0, size=1000)
    ks, p = ks_test(a, b)
    ref = stats.ks_2samp(a, b, method="asymp")
    assert ks == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue, rel=1e-6)
    # PSI over the reference's deciles: sum (w - r) ln(w / r).
    edges = np.quantile(b, np.linspace(0, 1, 11)[1:-1])
    r = np.bincount(np.searchsorted(edges, b, side="right"), minlength=10) / b.size
    w = np.bincount(np.searchsorted(edges, a, side="right"), minlength=10) / a.size
    r, w = np.maximum(r, PSI_FLOOR), np.maximum(w, PSI_FLOOR)
    assert psi(a, b) == pytest.approx(float(np.sum((w - r) * np.log(w / r))))
    assert psi(b, b) == pytest.approx(0.0, abs=1e-12)


def test_set_sizes_and_decision_rates_where_the_plugins_are(world, make_wrapped):
    model = make_wrapped(["temperature", "conformal", ("abstain", {"risk": 0.05})])
    windows = [world.sample(300, seed=s)[0] for s in (60, 61)]
    result = wrapcal.monitor(model, windows)
    for x, w in zip(windows, result.windows, strict=True):
        pred = model.predict(x)
        assert w.sets == {"sets": pytest.approx(float(pred.sets.sum(1).double().mean()))}
        assert w.decisions == {"abstain": pytest.approx(float(pred.abstain.double().mean()))}
        assert 0.5 <= w.sets["sets"] <= 4 and 0 < w.decisions["abstain"] < 1
    assert result.settings["ood"]["output"] == "msp"  # no detector plugin: msp's threshold


@pytest.fixture(scope="module")
def result(world, wrapped, calibration):
    windows = [world.sample(200, seed=80 + s) for s in range(3)]
    far = world.sample(200, seed=90)[0]
    far[:60] = world.far(60, seed=1)
    ref = Reference.from_data(wrapped, calibration)
    return wrapcal.monitor(
        wrapped,
        [*windows, far],
        reference=ref,
        names=["mon", "tue", "wed", "thu <b>"],
        rules=wrapcal.monitoring.AlertRules(min_accuracy=0.5),
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory, result):
    return result.save(tmp_path_factory.mktemp("monitor") / "rep")


def test_report_files_are_self_contained(saved, result):
    out = saved
    page = (out / "monitor.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # accuracy, OOD rate, drift
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "thu &lt;b&gt;" in page and "thu <b>" not in page  # names are text
    assert "ood_rate" in page and "drift" in page
    data = json.loads((out / "monitor.json").read_text())
    assert [w["name"] for w in data["windows"]] == ["mon", "tue", "wed", "thu <b>"]
    assert data["alerts"] and all(a["window"] == 3 for a in data["alerts"])
    assert data["reference"]["scores"] == {k: 2000 for k in result.reference.scores}
    md = (out / "monitor.md").read_text()
    assert "| thu <b> |" in md and "![Estimated accuracy per window](figures/accuracy.png)" in md
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "accuracy.png",
        "drift.png",
        "ood_rate.png",
    ]
    _, rows = result.table()
    assert len(rows) == 4 and rows[3][-1] == "ood_rate, drift"
    assert str(result).splitlines()[0].startswith("window")


def test_mlflow_logs_each_window_as_a_step(tmp_path, monkeypatch, result, saved):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    run_id = result.log_to(tracking_uri=uri, experiment="monitor-test", directory=saved)
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(run_id, "monitor/estimated_accuracy")
    assert sorted((m.step, m.value) for m in history) == [
        (w.index, pytest.approx(w.estimated_accuracy)) for w in result.windows
    ]
    ood = client.get_metric_history(run_id, "monitor/ood_rate")
    assert [m.value for m in sorted(ood, key=lambda m: m.step)] == [
        pytest.approx(w.ood["rate"]) for w in result.windows
    ]
    alerts = {m.step: m.value for m in client.get_metric_history(run_id, "monitor/alerts")}
    assert alerts == {0: 0, 1: 0, 2: 0, 3: len(result.windows[3].alerts)}
    assert client.get_run(run_id).data.params["rule/ood_alpha"] == "0.01"
    names = {f.path for f in client.list_artifacts(run_id, "wrapcal_monitor")}
    assert "wrapcal_monitor/monitor.html" in names
    assert math.isfinite(float(client.get_run(run_id).data.metrics["monitor/drift/knn/pvalue"]))
    # The run handling the report's logging shares: a run nested under this one.
    from wrapcal.monitoring.tracking import log_monitor

    child = log_monitor(result, run_id, tracking_uri=uri, directory=saved, nested=True)
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == run_id
    assert client.get_run(child).info.status == "FINISHED"
    nested = client.get_metric_history(child, "monitor/estimated_accuracy")
    assert sorted((m.step, m.value) for m in nested) == sorted((m.step, m.value) for m in history)
    with pytest.raises(FileNotFoundError, match=r"result.save\(\) wrote"):
        log_monitor(result, run_id, tracking_uri=uri, directory=tmp_path)
