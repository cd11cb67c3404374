"""Report figures: types, axes, the ECE text, drawing into a given ax, PNG output, and
that pyplot's global state is left alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from wrapcal.metrics import auroc, ece, roc_curve
from wrapcal.report.plots import reliability_diagram, roc_curves, score_histograms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def classifier_output():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5, 0.3), size=2000)
    # Over-confident: labels drawn from flatter probabilities than the ones shown.
    flat = probs**0.5 / (probs**0.5).sum(axis=1, keepdims=True)
    labels = (rng.random((2000, 1)) > flat.cumsum(axis=1)).sum(axis=1).clip(max=4)
    return torch.from_numpy(probs), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def ood_scores():
    rng = np.random.default_rng(1)
    return rng.normal(size=1500), {
        "near": torch.from_numpy(rng.normal(0.7, 1, size=800)),
        "far": rng.normal(2.5, 1, size=600),
    }


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_reliability_diagram_standalone(classifier_output, tmp_path):
    probs, labels = classifier_output
    fig = reliability_diagram(probs, labels, title="test model")
    assert isinstance(fig, Figure)
    main, hist = fig.axes
    assert main.get_title() == "test model"
    assert main.get_shared_x_axes().joined(main, hist)
    expected = f"ECE = {100 * ece(probs, labels):.2f}%"
    assert any(expected in text for text in _texts(fig)), _texts(fig)
    assert ece(probs, labels) > 0.05  # the data is miscalibrated, so the text is not 0.00%
    # 15 bins: accuracy bars and gap bars for every non-empty bin, one histogram bar each.
    assert len(hist.patches) == 15
    assert len(main.patches) == 2 * int((hist_heights(hist) > 0).sum())
    path = tmp_path / "reliability.png"
    fig.savefig(path, dpi=60)
    assert path.read_bytes()[:8] == PNG_MAGIC


def hist_heights(ax) -> np.ndarray:
    return np.array([p.get_height() for p in ax.patches])


def test_reliability_diagram_histogram_shares(classifier_output):
    probs, labels = classifier_output
    hist = reliability_diagram(probs, labels).axes[1]
    assert hist_heights(hist).sum() == pytest.approx(1.0)


def test_reliability_diagram_into_given_ax(classifier_output):
    probs, labels = classifier_output
    fig = Figure()
    ax, other = fig.subplots(1, 2)
    returned = reliability_diagram(probs.numpy(), labels.numpy(), n_bins=10, ax=ax)
    assert returned is fig
    assert len(fig.axes) == 2  # no histogram axes added
    assert len(ax.patches) > 0 and len(other.patches) == 0
    assert any("ECE = " in t.get_text() for t in ax.texts)


def test_score_histograms(ood_scores, tmp_path):
    s_in, outs = ood_scores
    fig = score_histograms(s_in, outs, "energy")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    labels = _legend_texts(ax)
    assert len(labels) == 3
    assert labels[0].startswith("in-distribution") and "near" in labels[1] and "far" in labels[2]
    assert "energy" in ax.get_xlabel()
    fig.savefig(tmp_path / "hist.png", dpi=60)
    assert (tmp_path / "hist.png").read_bytes()[:8] == PNG_MAGIC
    target = Figure().add_subplot()
    assert score_histograms(s_in, outs, "energy", ax=target) is target.figure
    assert len(target.patches) > 0
    with pytest.raises(ValueError, match="scores_out is empty"):
        score_histograms(s_in, {}, "energy")


def test_roc_curves(ood_scores, tmp_path):
    s_in, outs = ood_scores
    fig = roc_curves(s_in, outs, "energy")
    ax = fig.axes[0]
    labels = _legend_texts(ax)
    assert labels[0] == f"near (AUROC {100 * auroc(s_in, outs['near']):.1f}%)"
    assert "chance" in labels[-1]
    fpr, tpr, _ = roc_curve(s_in, outs["far"])
    np.testing.assert_allclose(ax.lines[1].get_xdata(), fpr.numpy())
    np.testing.assert_allclose(ax.lines[1].get_ydata(), tpr.numpy())
    fig.savefig(tmp_path / "roc.png", dpi=60)
    assert (tmp_path / "roc.png").read_bytes()[:8] == PNG_MAGIC
    target = Figure().add_subplot()
    assert roc_curves(s_in, outs, "energy", ax=target) is target.figure
    assert len(target.lines) == 3


def test_no_pyplot_figures_are_created(classifier_output, ood_scores):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    reliability_diagram(*classifier_output)
    score_histograms(ood_scores[0], ood_scores[1], "s")
    roc_curves(ood_scores[0], ood_scores[1], "s")
    assert plt.get_fignums() == before
