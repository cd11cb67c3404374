"""``wrapcal.report.evaluate`` and ``Report``: the numbers equal the metrics recomputed
here from the models' own outputs, every model reads every data set once, the user's
models are untouched, and the files (HTML, JSON, Markdown, PNG) are what they claim."""

from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import pyplot as plt
from matplotlib.patches import StepPatch
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
from wrapcal.report.columns import CALIBRATION_COLUMNS, OOD_COLUMNS, best_rows
from wrapcal.report.evaluate import ood_row
from wrapcal.report.plugin_metrics import as_curve, as_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BOOT = 200
SCORES = {"msp", "max_logit", "entropy", "energy"}
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


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
        # Brighter test digits: the model is more confident on them than on the test set,
        # so every score ranks them as more in-distribution (an inverted score).
        "bright": x[:100] * 2,
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
                # Float32 scores tie where float64 ones do not (saturated msp on the
                # bright digits): the areas differ by the ties' share.
                tol = 2e-3 if ood_name != "bright" else 1e-2
                assert row["auroc"] == pytest.approx(roc_auc_score(is_id, -both), abs=tol / 2)
                assert row["aupr_in"] == pytest.approx(
                    average_precision_score(is_id, -both), abs=tol
                )
                assert row["aupr_out"] == pytest.approx(
                    average_precision_score(1 - is_id, both), abs=tol
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
    assert report["data"]["ood"] == {
        "noise": {"n": 150},
        "flipped": {"n": 120},
        "bright": {"n": 100},
    }


def test_the_models_share_one_backbone_pass_per_data_set(run, data, ood_sets):
    """The baseline and its wrapped copy have the same backbone: one pass per data set
    between them (the baseline's, split like the wrapped copy; the copy reuses it)."""
    total = len(data.test[1]) + 150 + 120 + 100
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
    # (X, y) tensors and models without names: classes are numbered.
    assert d["data"]["test"] == {"n": len(data.test[1]), "num_classes": 10, "class_names": None}
    assert d["settings"] == {"n_bins": 15, "bootstrap": BOOT, "seed": 3, "level": 0.95}
    models = d["models"]
    assert models["wrapped"]["plugins"] == ["temperature"]
    assert models["wrapped"]["wrapped"] == "Sequential"
    assert "plugins" not in models["baseline"]
    for info in models.values():
        sec = info["seconds"]
        assert set(sec["ood"]) == {"noise", "flipped", "bright"}
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
    # Per model: a reliability diagram, the primary score's histogram, the best scores'
    # ROC; per model and OOD set the ROC of every score (behind a details element).
    assert len(pngs) == 2 * (1 + 1 + 1 + 3)
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    assert json.loads((saved / "report.json").read_text()) == run["report"].to_dict()

    html = (saved / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert html.count("data:image/png;base64,") == len(pngs)
    for anchor in re.findall(r'href="#([^"]+)"', html):  # the table of contents
        assert f'id="{anchor}"' in html
    assert "top-label, L1, 15 equal-width bins over (0, 1], weighted by bin mass" in html
    assert "in-distribution is the positive class; FPR@95TPR is the share of OOD" in html
    assert "basic (reverse percentile) interval" in html
    assert f"B = {BOOT}" in html and "seed 3" in html
    cal = html.split('<section id="calibration">', 1)[1].split("</table>", 1)[0]
    assert cal.count("<tr>") == 1 + 2  # every row of the calibration table is a model
    for figure in run["report"].figures():  # 9 pt at 100 dpi, whatever the figure
        assert figure.min_font_px >= 12.5 and figure.width <= 460

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
    rows = [
        {"accuracy": 0.9, "nll": 0.30, "ece": 0.05},
        {"accuracy": 0.9, "nll": 0.20, "ece": 0.05},
        {"accuracy": 0.9, "nll": 0.25, "ece": 0.020001},
    ]
    best = best_rows(CALIBRATION_COLUMNS, rows)
    assert "accuracy" not in best  # all equal
    assert best["nll"] == {1}  # lower is better
    assert best["ece"] == {2}
    assert best_rows(CALIBRATION_COLUMNS, rows[:1]) == {}
    fpr = best_rows(OOD_COLUMNS, [{"fpr95": 0.3, "auroc": 0.7}, {"fpr95": 0.1, "auroc": 0.6}])
    assert fpr == {"fpr95": {1}, "auroc": {0}}  # FPR@95: lower is better


# --- the summary, the matrix, the marks on the page --------------------------------------


class Tables(HTMLParser):
    """Every table of a page: its section, header texts, and rows of (text, bold, classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.section, self.cell, self.bold = "", None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs.get("id", "")
        elif tag == "table":
            self.tables.append({"section": self.section, "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th") and self.tables:
            self.cell = {"text": "", "bold": False, "class": attrs.get("class") or "", "th": tag}
        elif tag == "strong":
            self.bold = True

    def handle_endtag(self, tag):
        if tag == "strong":
            self.bold = False
        elif tag in ("td", "th") and self.cell is not None:
            self.cell["text"] = " ".join(self.cell["text"].split())
            self.tables[-1]["rows"][-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"] += data
            self.cell["bold"] |= self.bold and bool(data.strip())


def page_tables(html: str) -> list[dict]:
    parser = Tables()
    parser.feed(html)
    return parser.tables


#: Header (without its arrow) -> max or min is best, stated here and not read off the page.
BETTER = {
    "Accuracy (%)": max, "NLL": min, "Brier": min, "ECE (%)": min, "Adaptive ECE (%)": min,
    "MCE (%)": min, "Class-wise ECE (%)": min, "AURC (%)": min, "AUROC (%)": max,
    "AUPR-In (%)": max, "AUPR-Out (%)": max, "FPR@95TPR (%)": min,
}  # fmt: skip


def check_bold_column(table: dict, column: int, better) -> int:
    rows = [r for r in table["rows"] if r and r[0]["th"] == "td" and len(r) > column]
    cells = [r[column] for r in rows if r[column]["text"] not in ("—", "")]
    numbers = [float(re.findall(r"-?\d+\.\d+", c["text"])[0]) for c in cells]
    target = better(numbers)
    expected = [n == target for n in numbers] if len(set(numbers)) > 1 else [False] * len(cells)
    assert [c["bold"] for c in cells] == expected, (table["section"], column, numbers)
    return sum(expected)


def test_every_column_bolds_its_best_value_in_the_stated_direction(saved):
    tables = page_tables((saved / "report.html").read_text(encoding="utf-8"))
    checked, bolded = set(), 0
    for table in tables:
        if table["section"] not in ("calibration", "ood"):
            continue
        header = [c["text"].replace("↑", "").replace("↓", "").strip() for c in table["rows"][0]]
        for i, name in enumerate(header):
            if name in BETTER:
                bolded += check_bold_column(table, i, BETTER[name])
                checked.add(name)
    assert checked == set(BETTER) and bolded > 10
    # The best-score matrix: the highest AUROC of each OOD set (column) in bold.
    matrix = next(t for t in tables if t["section"] == "ood")
    for column in range(1, 4):
        check_bold_column(matrix, column, max)


def test_summary_numbers_equal_the_metrics(run, data, ood_sets):
    from scipy import stats

    report = run["report"]
    summary = report.to_dict()["summary"]
    expected_in = outputs(run, data.test[0])
    assert summary["baseline"] == "baseline" and summary["tpr"] == 0.95
    for model, entry in summary["models"].items():
        cal = report.calibration[model]
        assert (entry["accuracy"], entry["ece"], entry["ece_ci"]) == (
            cal["accuracy"], cal["ece"], cal["ece_ci"],
        )  # fmt: skip
        before = None if model == "baseline" else report.calibration["baseline"]["ece"]
        assert entry["baseline_ece"] == before
        for ood_name, ood_data in ood_sets.items():
            x_out = ood_data[0] if isinstance(ood_data, tuple) else ood_data
            expected_out = outputs(run, x_out)[model]["scores"]
            cell = entry["ood"][ood_name]
            aurocs = {}
            for score, s_in in expected_in[model]["scores"].items():
                s_out = expected_out[score].numpy()
                is_id = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
                aurocs[score] = roc_auc_score(is_id, -np.r_[s_in.numpy(), s_out])
            assert cell["score"] == max(aurocs, key=aurocs.get)
            assert cell["auroc"] == pytest.approx(aurocs[cell["score"]], abs=1e-3)  # ties
            assert cell["auroc"] == report.ood[model][ood_name][cell["score"]]["auroc"]
            s_in = expected_in[model]["scores"][cell["score"]].numpy()
            n, k = len(s_in), int(np.ceil(0.95 * len(s_in)))
            threshold = np.sort(s_in)[k - 1]  # accepts 95% of the ID test scores
            assert cell["threshold"] == pytest.approx(threshold, rel=1e-5, abs=1e-6)
            assert cell["accepted"] == pytest.approx((s_in <= threshold).mean(), abs=1 / n)
            s_out = expected_out[cell["score"]].numpy()
            assert cell["fpr95"] == pytest.approx((s_out <= threshold).mean(), abs=1.5 / len(s_out))
            # The share of new ID data accepted by the k-th of n scores is Beta(k, n+1-k):
            # P(Binomial(n, p) >= k) is 2.5% at the low end and 97.5% at the high end.
            low, high = cell["accepted_ci"]
            assert stats.binom.sf(k - 1, n, low) == pytest.approx(0.025, abs=1e-6)
            assert stats.binom.sf(k - 1, n, high) == pytest.approx(0.975, abs=1e-6)
            assert cell["inverted"] == (cell["auroc"] < 0.5)


def test_the_summary_is_on_the_page_and_in_the_markdown(run, saved):
    report, html = run["report"], (saved / "report.html").read_text(encoding="utf-8")
    summary = report.to_dict()["summary"]
    table = next(t for t in page_tables(html) if t["section"] == "summary")
    rows = {r[0]["text"]: r for r in table["rows"] if r[0]["th"] == "td"}
    md = report.to_markdown().split("## Summary", 1)[1].split("\n## ", 1)[0]
    md_rows = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    for model, entry in summary["models"].items():
        cells = [c["text"] for c in rows[model][1:]]
        assert cells[0] == f"{100 * entry['accuracy']:.2f}"
        assert cells[2].startswith(f"{100 * entry['ece']:.2f}")
        low, high = entry["ece_ci"]
        assert cells[2].endswith(f"{100 * low:.2f} – {100 * high:.2f}")
        for j, ood_name in enumerate(("noise", "flipped", "bright")):
            cell = entry["ood"][ood_name]
            shown = cells[3 + 2 * j]
            assert shown.startswith(f"{cell['score']} {100 * cell['auroc']:.2f}")
            assert cells[4 + 2 * j].startswith(f"≤ {cell['threshold']:.4g}")
            for text in (
                f"{cell['score']} {100 * cell['auroc']:.2f}",
                f"≤ {cell['threshold']:.4g}",
            ):
                assert text in md_rows[model].replace("**", "")
    notes = html.split('<ul class="notes">', 1)[1].split("</ul>", 1)[0]
    assert "Measured on the test set (n = 400, 10 classes)" in notes
    assert "chosen on the same test and OOD samples it is measured on" in notes
    assert f"B = {BOOT} resamples, seed 3" in notes


def test_inverted_scores_are_flagged_and_explained(run, saved):
    report = run["report"]
    summary = report.to_dict()["summary"]
    flagged = {(i["model"], i["ood_set"], i["score"]) for i in summary["inverted"]}
    below = {
        (m, s, score)
        for m, sets in report.ood.items()
        for s, rows in sets.items()
        for score, row in rows.items()
        if row["auroc"] < 0.5
    }
    assert flagged == below and {s for _, s, _ in below} == {"bright"}
    html = (saved / "report.html").read_text(encoding="utf-8")
    tables = page_tables(html)
    summary_rows = [r for r in tables[0]["rows"] if r[0]["th"] == "td"]
    for row in summary_rows:  # bright is the third OOD set: cell 1 + 3 + 2 * 2
        assert "flag-inverted" in row[8]["class"] and "⚠ inverted" in row[8]["text"]
        assert "inverted" not in row[4]["text"] + row[6]["text"]
    explanation = "the score ranks this OOD set as more in-distribution than the test set"
    callout = html.split('<div class="callout"', 1)[1].split("</div>", 1)[0]
    assert explanation in callout and callout.count("<li>") == len(flagged)
    ood_tables = [t for t in tables if t["section"] == "ood"][1:]  # after the matrix
    ood_rows = [r for t in ood_tables for r in t["rows"][1:]]
    flagged_rows = [r for r in ood_rows if any("flag-inverted" in c["class"] for c in r)]
    assert len(flagged_rows) == len(flagged)
    md = report.to_markdown()
    assert explanation in md and md.count("⚠ inverted") >= len(flagged) + 2


def test_the_demo_table_names_the_reports_best_scores(run):
    """The demo's table printed from this report (a baseline and its temperature-scaled
    copy, one inverted OOD set): each cell is the summary's best score, which is the
    argmax of the report's own AUROCs; drops are explained, inverted scores flagged."""
    from helpers import assert_table_names_the_summarys_scores, table_rows

    from wrapcal.cli.demo import summary_lines

    report = run["report"]
    data = report.to_dict()
    text = "\n".join(summary_lines(report, {}))
    assert_table_names_the_summarys_scores(text, data)
    rows = table_rows(text)
    for model, sets in data["ood"].items():
        for i, scores in enumerate(sets.values()):
            best = max(scores, key=lambda s: scores[s]["auroc"])  # independent of summary
            cell = rows[model].split("|")[i].split()[-3:]
            assert cell[0] == best and float(cell[1].rstrip("!")) == pytest.approx(
                100 * scores[best]["auroc"], abs=0.05)  # fmt: skip
    assert "bright" in data["ood"]["wrapped"] and "! AUROC below 50%" in text


def test_a_report_read_back_from_json_summarizes_without_thresholds(run):
    data = run["report"].to_dict()
    del data["summary"]
    data["ood"]["wrapped"]["noise"]["msp"]["auroc"] = 0.25  # now inverted
    summary = Report(data).to_dict()["summary"]
    assert ("wrapped", "noise", "msp") in {
        (i["model"], i["ood_set"], i["score"]) for i in summary["inverted"]
    }
    cell = summary["models"]["baseline"]["ood"]["noise"]
    assert cell["threshold"] is None and cell["auroc"] == data["ood"]["baseline"]["noise"][
        cell["score"]]["auroc"]  # fmt: skip
    assert "<h2>Summary</h2>" in Report(data).to_html()


def test_plugin_tables_and_curves_are_recognised_and_drawn(run):
    data = run["report"].to_dict()
    curve = {"coverage": [0.2, 0.6, 1.0], "risk": [0.0, 0.02, 0.1],
             "operating_point": {"coverage": 0.6, "risk": 0.02}}  # fmt: skip
    by_class = {"class": [0, 1], "n": [10, 12], "coverage": [0.9, 0.75]}
    data["plugin_metrics"] = {"wrapped": {"p": {
        "coverage": {"value": 0.91, "ci": [0.9, 0.92], "percent": True},
        "worst": {"value": 0.75, "class": 1, "percent": True},
        "by_class": by_class, "curve": curve, "blob": {"a": "b"},
    }}}  # fmt: skip
    assert as_curve(curve).point == (0.6, 0.02) and as_curve(by_class) is None
    assert as_table(by_class).percent == [False, False, True]
    report = Report(data)
    figures = [f for f in report.figures() if f.kind == "curve"]
    assert [(f.model, f.score, f.group) for f in figures] == [("wrapped", "curve", "p")]
    html = report.to_html()
    section = html.split('<section id="plugin-metrics">', 1)[1].split("</section>", 1)[0]
    assert "coverage (%)" in section and "75.00" in section and "worst (class 1)" in section
    assert section.count("data:image/png;base64,") == 1 and "blob" not in section
    md = report.to_markdown()
    assert "| wrapped | p | coverage | 91.00 | 90.00 – 92.00 |" in md
    assert "| 1 | 12 | 75.00 |" in md
    # With the class names known, the classes are shown by name (the JSON keeps numbers).
    data["data"]["test"]["class_names"] = NAMES
    named = Report(data)
    md = named.to_markdown()
    assert "| one | 12 | 75.00 |" in md and "| zero | 10 | 90.00 |" in md
    assert "worst (class one)" in md and "| 1 | 12 |" not in md
    assert f"10 classes ({', '.join(NAMES)})." in named.to_html()
    assert named.to_dict()["plugin_metrics"]["wrapped"]["p"]["by_class"]["class"] == [0, 1]


def drawn(fig) -> dict:
    """What a figure shows, read from its artists before the report clears it."""
    out = {}
    for ax in fig.axes:
        for patch in ax.patches:
            if isinstance(patch, StepPatch):
                values, edges, _ = patch.get_data()
                out[patch.get_label()] = (values.copy(), edges.copy(), ax.get_xscale())
        for bars in ax.containers:
            out[bars.get_label()] = np.array([b.get_height() for b in bars])
    return out


def test_the_report_draws_each_models_own_data(run, data, ood_sets, monkeypatch):
    """The figures the report renders hold the model's own test and OOD data: a report
    that drew the OOD scores as in-distribution, or another model's, fails here."""
    import wrapcal.report.figures as figures_module

    seen, render = [], figures_module._render
    monkeypatch.setattr(
        figures_module, "_render", lambda fig: (seen.append(drawn(fig)), render(fig))[1]
    )
    files = run["report"].figures()
    assert len(seen) == len(files)
    x_noise = ood_sets["noise"]
    for file, got in zip(files, seen, strict=True):
        ours = outputs(run, data.test[0])[file.model]
        if file.kind == "reliability":
            p, y = ours["probs"].numpy(), data.test[1].numpy()
            conf, correct = p.max(1), p.argmax(1) == y
            index = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
            count = np.bincount(index, minlength=15)
            acc = np.bincount(index, weights=correct, minlength=15)[count > 0] / count[count > 0]
            np.testing.assert_allclose(got["accuracy"], acc, atol=1e-9)
        elif file.kind == "histogram":
            for label, scores in (
                ("in-distribution test (n=400)", ours["scores"][file.score]),
                ("noise (n=150)", outputs(run, x_noise)[file.model]["scores"][file.score]),
            ):
                values, edges, scale = got[label]
                x = np.clip(scores.numpy(), edges[0], edges[-1])
                bins = np.log10(edges) if scale == "log" else edges
                counts = np.histogram(np.log10(x) if scale == "log" else x, bins=bins)[0]
                # float32 outputs against float64 here: a sample may sit across an edge.
                assert np.abs(values * np.diff(bins) * len(x) - counts).max() <= 1.01


# --- the ood decision and the operating points in the report ------------------------------


def test_ood_decision_rates_and_operating_points_are_reported(trained, data, ood_sets, tmp_path):
    """With the ``ood`` plugin: its false-alarm rate on the test set beside alpha, and
    each OOD set's share flagged; with ``accept_rates``: each rate's thresholds and the
    share of the test set they accept. Each number recomputed from ``predict``."""
    x, y = data.calibration
    half = len(y) // 2
    wrapped = wrapcal.wrap(trained.eval(), ["mahalanobis", ("ood", {"alpha": 0.1})])
    wrapped.fit(
        train=data.train, calibration=(x[half:], y[half:]), progress=False, accept_rates=(0.95, 0.8)
    )
    sets = {"noise": ood_sets["noise"], "bright": ood_sets["bright"]}
    report = evaluate({"wrapped": wrapped}, data.test, sets, progress=False, bootstrap=0)
    metrics = report.to_dict()["plugin_metrics"]["wrapped"]
    ood = metrics["ood"]
    flagged = wrapped.predict(data.test[0]).outputs["is_ood"].double()
    assert ood["false_alarm_rate"]["value"] == pytest.approx(float(flagged.mean()))
    low, high = ood["false_alarm_rate"]["ci"]
    assert low <= ood["false_alarm_rate"]["value"] <= high
    assert ood["alpha"]["value"] == 0.1
    for name, images in sets.items():
        share = wrapped.predict(images).outputs["is_ood"].double().mean()
        assert ood[f"is_ood on {name}"]["value"] == pytest.approx(float(share)), name
    assert ood["is_ood on noise"]["value"] > 0.5  # noise is flagged, test images are not
    table = metrics["operating_points"]["thresholds"]
    scores = wrapped.predict(data.test[0]).scores
    assert sorted(set(table["accept_rate"])) == [0.8, 0.95]
    for score, rate, threshold, accepted in zip(*table.values(), strict=True):
        points = wrapped.operating_points["thresholds_at"][repr(rate)]
        assert points[score] == threshold
        assert accepted == pytest.approx(
            float((scores[score].double() <= threshold).double().mean())
        )
    html = (report.save(tmp_path) / "report.html").read_text()
    assert "is_ood on noise" in html and "false_alarm_rate" in html and "test_accepted" in html


def test_class_names_come_from_the_data_the_model_or_the_caller(trained, data):
    """A torchvision-style data set's ``classes`` (an ImageFolder's folders) and a model's
    own ``class_names`` label the conformal plugin's per-class table and its worst class;
    names given to ``evaluate`` win, and must be one per class."""
    x, y = data.test[0][:100], data.test[1][:100]
    model = copy.deepcopy(trained).eval()
    wrapped = wrapcal.wrap(model, ["conformal"]).fit(calibration=data.calibration, progress=False)

    class Named(TensorDataset):
        classes = NAMES

    report = evaluate({"wrapped": wrapped}, Named(x, y), progress=False, bootstrap=0)
    assert report.to_dict()["data"]["test"]["class_names"] == NAMES
    metrics = report.to_dict()["plugin_metrics"]["wrapped"]["conformal"]
    by_class, md = metrics["coverage_by_class"], report.to_markdown()
    for k, n, coverage in zip(*by_class.values(), strict=True):
        assert f"| {NAMES[k]} | {n} | {100 * coverage:.2f} |" in md
    assert sorted(by_class["class"]) == sorted(set(y.tolist()))  # numbers in the JSON
    worst = metrics["worst_class_coverage"]["class"]
    assert f"worst_class_coverage (class {NAMES[worst]})" in md

    upper = [n.upper() for n in NAMES]
    model.class_names = upper  # the model's own names, found on the wrapped copy too
    named = wrapcal.wrap(model, ["conformal"]).fit(calibration=data.calibration, progress=False)
    report = evaluate({"wrapped": named}, (x, y), progress=False, bootstrap=0)
    assert report.to_dict()["data"]["test"]["class_names"] == upper
    report = evaluate(named, (x, y), progress=False, bootstrap=0, class_names=NAMES[::-1])
    assert report.to_dict()["data"]["test"]["class_names"] == NAMES[::-1]
    with pytest.raises(ValueError, match="holds 3 names but the models have 10 classes"):
        evaluate(named, (x, y), progress=False, bootstrap=0, class_names=NAMES[:3])


def test_the_mlflow_run_handling_is_shared_and_report_does_not_import_monitoring():
    """The report and the monitor log through one run handler (wrapcal.report.mlflow_run);
    the monitor imports the report, never the reverse (no import cycle)."""
    import ast
    from pathlib import Path

    import wrapcal.monitoring.tracking as monitor_tracking
    import wrapcal.report.mlflow_run as shared
    import wrapcal.report.tracking as report_tracking

    for name in ("logging_run", "log_batches", "log_files"):
        assert getattr(monitor_tracking, name) is getattr(shared, name)
        assert getattr(report_tracking, name) is getattr(shared, name)
    for path in Path(shared.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("wrapcal.monitoring") for n in names), path
