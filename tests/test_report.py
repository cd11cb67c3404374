"""``wrapcal.report.evaluate`` and ``Report``: the numbers equal the metrics recomputed
here from the models' own outputs, every model reads every data set once, the user's
models are untouched, and the files (HTML, JSON, Markdown, PNG) are what they claim."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import pyplot as plt
from references import ece_np
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import wrapcal
from wrapcal.datasets import digits
from wrapcal.errors import DataError
from wrapcal.metrics import (
    accuracy,
    adaptive_ece,
    aurc,
    auroc_bootstrap,
    brier,
    classwise_ece,
    ece_bootstrap,
    fpr_at_tpr,
    mce,
    nll,
)
from wrapcal.report import Report, evaluate
from wrapcal.report.evaluate import ood_row

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BOOT = 200
SCORES = {"msp", "max_logit", "entropy", "energy"}


def tiny_net() -> nn.Sequential:
    """Pooled pixels -> MLP with BatchNorm and dropout (so eval mode matters)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.AvgPool2d(4),
            nn.Flatten(),
            nn.Linear(3 * 8 * 8, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(32, 10),
        )


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture(scope="module")
def ood_sets(data):
    gen = torch.Generator().manual_seed(1)
    x = data.test[0]
    return {
        "noise": torch.randn((150, *x.shape[1:]), generator=gen),
        # Near OOD: the test digits upside down, with their labels (which must be ignored).
        "flipped": (x[:120].flip(-2), data.test[1][:120]),
    }


@pytest.fixture(scope="module")
def trained(data):
    model = tiny_net()
    x, y = data.train
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    # Dropout draws from the global generator: seed it here, or the model (and every
    # number below) would depend on which tests ran before this module.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(40):  # full batch: a few hundred ms
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model


@pytest.fixture(scope="module")
def run(trained, data, ood_sets):
    """evaluate() on a bare model left in a mixed train/eval state and a wrapped copy."""
    model = trained
    model.train()
    model[3].eval()  # the user froze BatchNorm: that mix must survive
    wrapped = wrapcal.wrap(model, ["temperature"]).fit(calibration=data.calibration, progress=False)
    modes = {name: m.training for name, m in model.named_modules()}
    wrapped_modes = {name: m.training for name, m in wrapped.named_modules()}
    state = copy.deepcopy(model.state_dict())
    seen = {"baseline": 0, "wrapped": 0}

    def counter(key):
        def hook(module, args, output):
            seen[key] += args[0].shape[0]

        return hook

    hooks = [
        model.register_forward_hook(counter("baseline")),
        wrapped.backbone.register_forward_hook(counter("wrapped")),
    ]
    try:
        report = evaluate(
            {"baseline": model, "wrapped": wrapped},
            data.test,
            ood_sets,
            batch_size=128,
            progress=False,
            bootstrap=BOOT,
            seed=3,
        )
    finally:
        for h in hooks:
            h.remove()
    return {
        "report": report,
        "model": model,
        "wrapped": wrapped,
        "modes": modes,
        "wrapped_modes": wrapped_modes,
        "state": state,
        "seen": seen,
    }


@pytest.fixture(scope="module")
def saved(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    returned = run["report"].save(out / "nested" / "dir")
    return returned


def outputs(run, x):
    """Probabilities and scores recomputed here, without wrapcal's evaluation code."""
    model, wrapped = run["model"], run["wrapped"]
    temperature = wrapped.get_plugin("temperature").temperature_
    modes = {m: m.training for m in model.modules()}
    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    for m, mode in modes.items():
        m.training = mode
    out = {}
    for name, z in (("baseline", logits), ("wrapped", logits / temperature)):
        p = torch.softmax(z, dim=1)
        out[name] = {
            "probs": p,
            "scores": {
                "msp": 1 - p.max(dim=1).values,
                "entropy": -(p * p.clamp_min(1e-300).log()).sum(dim=1),
                # The wrapped model's logit scores are those of its (untempered) head.
                "max_logit": -logits.max(dim=1).values,
                "energy": -torch.logsumexp(logits, dim=1),
            },
        }
    return out


def test_calibration_numbers_equal_metrics_on_the_models_outputs(run, data):
    report = run["report"]
    x, y = data.test
    expected = outputs(run, x)
    assert list(report.calibration) == ["baseline", "wrapped"]
    for name, out in expected.items():
        row = report.calibration[name]
        p = out["probs"]
        assert row["accuracy"] == pytest.approx(accuracy(p, y), abs=1e-9)
        assert row["accuracy"] == pytest.approx((p.argmax(1) == y).double().mean().item())
        assert row["nll"] == pytest.approx(nll(p, y), rel=1e-5)
        assert row["nll"] == pytest.approx(-p[torch.arange(len(y)), y].log().mean().item(), 1e-5)
        assert row["brier"] == pytest.approx(brier(p, y), rel=1e-5)
        assert row["ece"] == pytest.approx(ece_np(p.numpy(), y.numpy()), abs=1e-6)
        assert row["adaptive_ece"] == pytest.approx(adaptive_ece(p, y), abs=1e-6)
        assert row["mce"] == pytest.approx(mce(p, y), abs=1e-6)
        assert row["classwise_ece"] == pytest.approx(classwise_ece(p, y), abs=1e-6)
        assert row["aurc"] == pytest.approx(aurc(p, y), abs=1e-6)
        low, high = ece_bootstrap(p.float(), y, n_bins=15, n_resamples=BOOT, seed=3)
        assert row["ece_ci"] == pytest.approx([low, high], abs=1e-5)
        # The basic interval corrects the binned ECE's upward bias; it need not contain
        # the estimate, but it is ordered and inside [0, 1].
        assert 0 <= low <= high <= 1
    # Temperature scaling keeps the arg-max and changes the calibration.
    cal = report.calibration
    assert cal["wrapped"]["accuracy"] == cal["baseline"]["accuracy"]
    assert cal["wrapped"]["nll"] != pytest.approx(cal["baseline"]["nll"], rel=1e-4)


def test_ood_numbers_equal_metrics_on_the_models_outputs(run, data, ood_sets):
    report = run["report"]
    expected_in = outputs(run, data.test[0])
    for ood_name, ood_data in ood_sets.items():
        x_out = ood_data[0] if isinstance(ood_data, tuple) else ood_data
        expected_out = outputs(run, x_out)
        for model in ("baseline", "wrapped"):
            rows = report.ood[model][ood_name]
            assert set(rows) == SCORES
            for score, row in rows.items():
                s_in = expected_in[model]["scores"][score].numpy()
                s_out = expected_out[model]["scores"][score].numpy()
                is_id = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
                both = np.r_[s_in, s_out]
                assert row["auroc"] == pytest.approx(roc_auc_score(is_id, -both), abs=1e-4)
                assert row["aupr_in"] == pytest.approx(
                    average_precision_score(is_id, -both), abs=2e-3
                )
                assert row["aupr_out"] == pytest.approx(
                    average_precision_score(1 - is_id, both), abs=2e-3
                )
                threshold = np.sort(s_in)[int(np.ceil(0.95 * len(s_in))) - 1]
                assert row["fpr95"] == pytest.approx(fpr_at_tpr(s_in, s_out), abs=1.5 / len(s_out))
                assert row["fpr95"] == pytest.approx(
                    (s_out <= threshold).mean(), abs=1.5 / len(s_out)
                )
                low, high = auroc_bootstrap(
                    torch.from_numpy(s_in).float(),
                    torch.from_numpy(s_out).float(),
                    n_resamples=BOOT,
                    seed=3,
                )
                assert row["auroc_ci"] == pytest.approx([low, high], abs=2e-3)
    assert report["data"]["ood"] == {"noise": {"n": 150}, "flipped": {"n": 120}}


def test_the_models_share_one_backbone_pass_per_data_set(run, data, ood_sets):
    """The baseline and its wrapped copy have the same backbone: one pass per data set
    between them (the baseline's, split like the wrapped copy; the copy reuses it)."""
    total = len(data.test[1]) + 150 + 120
    assert run["seen"]["baseline"] + run["seen"]["wrapped"] == total


def test_user_models_keep_mode_and_weights(run):
    model, wrapped = run["model"], run["wrapped"]
    assert {n: m.training for n, m in model.named_modules()} == run["modes"]
    assert model.training and not model[3].training
    assert {n: m.training for n, m in wrapped.named_modules()} == run["wrapped_modes"]
    after = model.state_dict()
    # BatchNorm's running statistics are part of the state: a train-mode pass would move them.
    assert after.keys() == run["state"].keys()
    for key, value in run["state"].items():
        assert torch.equal(after[key], value), key


def test_metadata_and_json_round_trip(run, data):
    report = run["report"]
    d = report.to_dict()
    assert json.loads(report.to_json()) == d
    assert Report(json.loads(report.to_json())).to_markdown() == report.to_markdown()
    assert d["wrapcal_version"] == wrapcal.__version__
    assert re.match(r"\d{4}-\d\d-\d\dT", d["created"])
    assert d["data"]["test"] == {"n": len(data.test[1]), "num_classes": 10}
    assert d["settings"] == {"n_bins": 15, "bootstrap": BOOT, "seed": 3, "level": 0.95}
    models = d["models"]
    assert models["wrapped"]["plugins"] == ["temperature"]
    assert models["wrapped"]["wrapped"] == "Sequential"
    assert "plugins" not in models["baseline"]
    for info in models.values():
        sec = info["seconds"]
        assert set(sec["ood"]) == {"noise", "flipped"}
        assert sec["total"] == pytest.approx(sec["test"] + sum(sec["ood"].values()))
        assert all(v > 0 for v in (sec["test"], *sec["ood"].values()))
    d["models"]["baseline"]["device"] = "changed"
    assert report.to_dict()["models"]["baseline"]["device"] == "cpu"  # a copy


def test_markdown_has_one_row_per_model_and_the_conventions(run):
    md = run["report"].to_markdown()
    section = md.split("## Calibration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["Model", "baseline", "wrapped"]
    assert all(r.count("|") == rows[0].count("|") for r in rows)
    # ECE cell shows the percentage of the JSON's fraction.
    ece_pct = 100 * run["report"].calibration["wrapped"]["ece"]
    assert f"{ece_pct:.2f}" in rows[2]
    assert "top-label, L1, 15 equal-width bins over (0, 1], weighted by bin mass" in md
    assert "in-distribution is the positive class" in md
    for ood_name in ("noise", "flipped"):
        part = md.split(f"### {ood_name} ", 1)[1].split("\n#", 1)[0]
        body = [ln for ln in part.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
        assert len(body) == 8  # 2 models x 4 scores


def test_save_writes_self_contained_html_json_markdown_and_pngs(run, saved):
    assert saved.is_dir() and saved.name == "dir"
    names = {p.name for p in saved.iterdir()}
    assert {"report.html", "report.json", "report.md", "figures"} <= names
    pngs = sorted((saved / "figures").glob("*.png"))
    # A reliability diagram per model, one OOD figure per model and score.
    assert len(pngs) == 2 + 2 * len(SCORES)
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    assert json.loads((saved / "report.json").read_text()) == run["report"].to_dict()

    html = (saved / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "top-label, L1, 15 equal-width bins over (0, 1], weighted by bin mass" in html
    assert "adaptive ECE uses equal-mass bins" in html
    assert (
        "in-distribution is the positive class; FPR@95TPR is the share of OOD samples "
        "accepted when 95% of in-distribution samples are accepted; scores are higher = "
        "more OOD" in html
    )
    assert "basic (reverse percentile) interval" in html
    assert f"B = {BOOT}" in html and "seed 3" in html
    # Every table row of the calibration table is a model.
    cal = html.split("<h2>Calibration", 1)[1].split("<h2>", 1)[0]
    assert cal.count("<tr>") == 1 + 2

    md = (saved / "report.md").read_text(encoding="utf-8")
    linked = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", md)
    assert sorted(linked) == sorted(f"figures/{p.name}" for p in pngs)
    assert plt.get_fignums() == []  # nothing left open in pyplot


def test_shuffled_loader_single_model_and_no_bootstrap(trained, data):
    x, y = data.test
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=gen)
    report = evaluate(trained, loader, bootstrap=0, progress=False)
    plain = evaluate(trained, (x, y), bootstrap=0, progress=False)
    assert list(report.calibration) == ["model"]
    # The labels travel with their inputs, so the order of the batches does not matter.
    for key in ("accuracy", "nll", "ece", "aurc"):
        assert report.calibration["model"][key] == pytest.approx(
            plain.calibration["model"][key], abs=1e-6
        )
    assert report.calibration["model"]["ece_ci"] is None
    assert json.loads(report.to_json())["ood"] == {"model": {}}
    assert "No bootstrap intervals" in report.to_markdown()


def test_bad_inputs(trained, data):
    x, y = data.test
    with pytest.raises(DataError, match="no labels"):
        evaluate(trained, x[:10], progress=False)
    with pytest.raises(ValueError, match="non-empty dict"):
        evaluate({}, (x, y), progress=False)
    with pytest.raises(ValueError, match="not an nn.Module"):
        evaluate({"m": "resnet"}, (x, y), progress=False)
    with pytest.raises(ValueError, match="dict name -> data"):
        evaluate(trained, (x, y), ood=[x], progress=False)
    with pytest.raises(ValueError, match="n_bins"):
        evaluate(trained, (x, y), n_bins=0, progress=False)
    with pytest.raises(DataError, match="labels must be in"):
        evaluate(trained, (x[:10], torch.full((10,), 12)), progress=False)


def test_a_broken_score_is_reported_not_raised():
    row = ood_row(torch.tensor([0.1, float("nan")]), torch.tensor([0.5, 0.7]), bootstrap=10)
    assert set(row) == {"error"} and "NaN" in row["error"]
    ok = ood_row(torch.tensor([0.0, 0.1]), torch.tensor([0.5, 0.7]), bootstrap=10)
    assert ok["auroc"] == 1.0 and ok["fpr95"] == 0.0 and ok["auroc_ci"] == [1.0, 1.0]


def test_best_values_are_bold_unless_all_equal():
    from wrapcal.report.render import CALIBRATION_COLUMNS, _best

    rows = [
        {"accuracy": 0.9, "nll": 0.30, "ece": 0.05},
        {"accuracy": 0.9, "nll": 0.20, "ece": 0.05},
        {"accuracy": 0.9, "nll": 0.25, "ece": 0.020001},
    ]
    best = _best(CALIBRATION_COLUMNS, rows)
    assert "accuracy" not in best  # all equal
    assert best["nll"] == {1}  # lower is better
    assert best["ece"] == {2}
    assert _best(CALIBRATION_COLUMNS, rows[:1]) == {}
