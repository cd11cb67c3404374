"""Report figures: what is drawn equals what numpy and scikit-learn compute from the same
data (bar heights, histogram densities, ROC points), the in-distribution curve is the
in-distribution data, legends sit outside the data, text is legible, and pyplot's global
state is left alone. Swapping accuracy and confidence, ID and OOD, or the ROC's axes
fails here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.patches import StepPatch
from references import ece_np
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from wrapcal.report.plots import (
    curve_plot,
    histogram_bins,
    reliability_diagram,
    roc_curves,
    roc_pairs,
    score_histograms,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def classifier_output():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5, 0.3), size=2000)
    # Over-confident: labels drawn from flatter probabilities than the ones shown.
    flat = probs**0.5 / (probs**0.5).sum(axis=1, keepdims=True)
    labels = (rng.random((2000, 1)) > flat.cumsum(axis=1)).sum(axis=1).clip(max=4)
    return probs, labels


@pytest.fixture(scope="module")
def ood_scores():
    rng = np.random.default_rng(1)
    return rng.normal(size=1500), {
        "near": rng.normal(0.7, 1, size=800),
        "far": rng.normal(2.5, 1, size=600),
    }


def numpy_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int):
    """Per-bin count, accuracy and mean confidence over (b/n, (b+1)/n], written out."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    index = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    acc = np.bincount(index, weights=correct, minlength=n_bins) / np.maximum(count, 1)
    mean_conf = np.bincount(index, weights=conf, minlength=n_bins) / np.maximum(count, 1)
    return count, acc, mean_conf


def container(ax, label: str) -> BarContainer:
    return next(c for c in ax.containers if c.get_label() == label)


def stairs(ax) -> dict[str, StepPatch]:
    return {p.get_label(): p for p in ax.patches if isinstance(p, StepPatch)}


@pytest.mark.parametrize("n_bins", [15, 10])
def test_reliability_bars_are_numpys_per_bin_accuracy_and_confidence(classifier_output, n_bins):
    probs, labels = classifier_output
    fig = reliability_diagram(torch.from_numpy(probs), torch.from_numpy(labels), n_bins=n_bins)
    main, hist = fig.axes
    count, acc, conf = numpy_bins(probs, labels, n_bins)
    filled = count > 0
    assert (np.abs(acc - conf)[filled] > 0.02).any()  # a swap would show
    bars = container(main, "accuracy")
    np.testing.assert_allclose([b.get_height() for b in bars], acc[filled], atol=1e-12)
    np.testing.assert_allclose([b.get_x() for b in bars], np.flatnonzero(filled) / n_bins)
    gaps = container(main, "gap to confidence")
    np.testing.assert_allclose([b.get_y() for b in gaps], acc[filled], atol=1e-12)
    np.testing.assert_allclose([b.get_y() + b.get_height() for b in gaps], conf[filled], atol=1e-12)
    shares = [b.get_height() for b in container(hist, "share of samples")]
    np.testing.assert_allclose(shares, count / len(labels), atol=1e-12)
    assert f"ECE {100 * ece_np(probs, labels, n_bins):.2f}%" in main.get_title()
    assert main.get_shared_x_axes().joined(main, hist)


def test_reliability_legend_sits_above_the_bars(classifier_output, tmp_path):
    fig = reliability_diagram(*classifier_output, title="model")
    main = fig.axes[0]
    fig.canvas.draw()
    legend, axes = main.get_legend().get_window_extent(), main.get_window_extent()
    assert legend.y0 >= axes.y1 - 1  # entirely above the diagram: no bar is covered
    assert legend.x0 >= 0 and legend.x1 <= fig.bbox.width
    assert min(t.get_fontsize() for t in main.get_legend().get_texts()) >= 9
    fig.savefig(tmp_path / "r.png", dpi=60)
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


def test_reliability_diagram_into_given_ax(classifier_output):
    probs, labels = classifier_output
    fig = Figure()
    ax, other = fig.subplots(1, 2)
    assert reliability_diagram(probs, labels, n_bins=10, ax=ax) is fig
    assert len(fig.axes) == 2 and len(other.patches) == 0
    _, acc, _ = numpy_bins(probs, labels, 10)
    heights = [b.get_height() for b in container(ax, "accuracy")]
    np.testing.assert_allclose(heights, acc[acc > 0], atol=1e-12)


def densities(x: np.ndarray, edges: np.ndarray, log: bool) -> np.ndarray:
    x = np.clip(x, edges[0], edges[-1])
    if log:
        return np.histogram(np.log10(x), bins=np.log10(edges), density=True)[0]
    return np.histogram(x, bins=edges, density=True)[0]


def test_histogram_densities_are_numpys_and_id_is_the_id_data(ood_scores):
    s_in, outs = ood_scores
    fig = score_histograms(torch.from_numpy(s_in), outs, "energy", threshold=1.3)
    ax = fig.axes[0]
    drawn = stairs(ax)
    assert set(drawn) == {"in-distribution test (n=1500)", "near (n=800)", "far (n=600)"}
    for label, data in (
        ("in-distribution test (n=1500)", s_in),
        ("near (n=800)", outs["near"]),
        ("far (n=600)", outs["far"]),
    ):
        values, edges, _ = drawn[label].get_data()
        np.testing.assert_allclose(values, densities(data, edges, False), rtol=1e-12)
        assert np.sum(values * np.diff(edges)) == pytest.approx(1.0)
    # The filled histogram is the ID one, and it is not the OOD data's.
    assert drawn["in-distribution test (n=1500)"].get_fill()
    assert not drawn["far (n=600)"].get_fill()
    id_values = drawn["in-distribution test (n=1500)"].get_data()[0]
    assert not np.allclose(id_values, drawn["far (n=600)"].get_data()[0])
    # Shared bins from the pooled 0.5-99.5 percentiles.
    pooled = np.concatenate([s_in, outs["near"], outs["far"]])
    edges = drawn["near (n=800)"].get_data()[1]
    assert edges[0] == pytest.approx(np.quantile(pooled, 0.005))
    assert edges[-1] == pytest.approx(np.quantile(pooled, 0.995))
    threshold = [line for line in ax.lines if line.get_label().startswith("accepts 95%")]
    assert threshold and threshold[0].get_xdata()[0] == pytest.approx(1.3)


def test_scores_piled_at_zero_get_log_bins_not_one_bin():
    """msp of a confident model: most ID scores within 1e-3 of zero, OOD spread out."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2000, 10)) + 12 * np.eye(10)[rng.integers(0, 10, 2000)]
    p = np.exp(logits - logits.max(1, keepdims=True))
    msp_in = 1 - (p / p.sum(1, keepdims=True)).max(1)
    msp_out = rng.uniform(0.0, 0.8, size=500)
    # Equal-width bins over the range would put nearly all the ID mass in one bin.
    linear = np.histogram(msp_in, bins=np.linspace(0, msp_out.max(), 41))[0]
    assert linear.max() / len(msp_in) > 0.95
    fig = score_histograms(msp_in, {"noise": msp_out}, "msp")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "per decade" in ax.get_ylabel()
    values, edges, _ = stairs(ax)["in-distribution test (n=2000)"].get_data()
    np.testing.assert_allclose(values, densities(msp_in, edges, True), rtol=1e-12)
    shares = values * np.diff(np.log10(edges))
    assert shares.max() < 0.5 and (shares > 0.01).sum() >= 5  # spread over many bins
    out_values, out_edges, _ = stairs(ax)["noise (n=500)"].get_data()
    np.testing.assert_allclose(out_values, densities(msp_out, out_edges, True), rtol=1e-12)


def test_histogram_bins_rules():
    edges, scale = histogram_bins([np.array([1.0, 2, 2, 5]), np.array([3.0, 9])])
    np.testing.assert_array_equal(edges, np.arange(0.5, 10.0))  # one bin per integer
    assert scale == "linear"
    edges, scale = histogram_bins([np.full(5, 2.0)])
    assert scale == "linear" and len(edges) == 2 and edges[0] < 2 < edges[1]
    signed = np.linspace(-3, 3, 1000)
    assert histogram_bins([signed, signed + 1])[1] == "linear"  # negative values: never log


def test_histogram_legend_is_outside_the_bars(ood_scores):
    s_in, outs = ood_scores
    fig = score_histograms(s_in, outs, "energy", threshold=0.5)
    ax = fig.axes[0]
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.y1 <= axes.y0  # below the axes: the tallest bin is never covered
    assert legend.y0 >= 0 and legend.x0 >= 0 and legend.x1 <= fig.bbox.width
    labels = ax.xaxis.get_label().get_window_extent()
    assert legend.y1 <= labels.y0 + 1  # and below the x label


def test_roc_points_are_sklearns_with_id_positive(ood_scores, tmp_path):
    s_in, outs = ood_scores
    fig = roc_curves(s_in, outs, "energy")
    ax = fig.axes[0]
    lines = {line.get_label().split(" (")[0]: line for line in ax.lines}
    for name, s_out in outs.items():
        is_id = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
        scores = -np.r_[s_in, s_out]
        fpr, tpr, _ = sk_roc_curve(is_id, scores, drop_intermediate=False)
        np.testing.assert_allclose(lines[name].get_xdata(), fpr, atol=1e-12)
        np.testing.assert_allclose(lines[name].get_ydata(), tpr, atol=1e-12)
        auc = 100 * roc_auc_score(is_id, scores)
        assert lines[name].get_label() == f"{name} (AUROC {auc:.2f}%)"
    assert ax.get_xlabel().startswith("OOD accepted") and ax.get_ylabel().startswith("ID")
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0
    fig.savefig(tmp_path / "roc.png", dpi=60)
    assert (tmp_path / "roc.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="scores_out is empty"):
        roc_curves(s_in, {}, "energy")


def test_an_inverted_score_is_flagged_in_the_roc_legend(ood_scores):
    s_in, outs = ood_scores
    fig = roc_pairs({"flipped": (s_in, -outs["far"]), "right": (s_in, outs["far"])}, "t")
    labels = [line.get_label() for line in fig.axes[0].lines]
    auc = roc_auc_score(np.r_[np.ones(1500), np.zeros(600)], -np.r_[s_in, -outs["far"]])
    assert auc < 0.5
    assert labels[0] == f"flipped (AUROC {100 * auc:.2f}%, inverted)"
    assert "inverted" not in labels[1]


def _styles(lines) -> list[tuple]:
    """Each line's colour (RGBA) and dash pattern, as drawn."""
    return [(to_rgba(line.get_color()), line.get_linestyle(), str(line._unscaled_dash_pattern))
            for line in lines]  # fmt: skip


@pytest.mark.parametrize("n", [12, 40])
def test_every_roc_curve_of_a_figure_has_its_own_colour(n):
    """Ten scores reused seven colours (#28): with 12 curves every colour differs (and
    every pair of colours is at least 0.15 apart in RGB, the figure's ID blue and grey
    chance line included); with 40, every colour and line-style pair differs. The
    histograms of many OOD sets follow the same rule."""
    rng = np.random.default_rng(0)
    pairs = {f"score {i}": (rng.normal(size=60), rng.normal(1, size=40)) for i in range(n)}
    ax = roc_pairs(pairs, "every score").axes[0]
    curves = [line for line in ax.lines if line.get_label().startswith("score ")]
    assert len(curves) == n
    styles = _styles(curves)
    assert len(set(styles)) == n
    if n <= 17:
        colors = [c for c, _, _ in styles]
        assert len(set(colors)) == n
        others = [to_rgba(c) for c in ("#1f77b4", "0.4")]  # ID blue, chance line
        for i, a in enumerate(colors):
            for b in colors[i + 1 :] + others:
                assert np.linalg.norm(np.subtract(a, b)[:3]) > 0.15, (a, b)
    outs = {f"set {i}": rng.normal(1, size=40) for i in range(n)}
    hist = score_histograms(rng.normal(size=60), outs, "s").axes[0]
    patches = [p for p in hist.patches if p.get_label().startswith("set ")]
    drawn = {(to_rgba(p.get_edgecolor()), p.get_linestyle()) for p in patches}
    assert len(patches) == len(drawn) == n


def test_curve_plot_draws_the_points_in_percent():
    coverage, risk = np.linspace(0.01, 1, 50), np.linspace(0, 0.2, 50) ** 1.5
    fig = curve_plot(
        coverage, risk, x_label="coverage", y_label="risk", title="t", point=(0.6, 0.05)
    )
    line, point = fig.axes[0].lines
    np.testing.assert_allclose(line.get_xdata(), 100 * coverage)
    np.testing.assert_allclose(line.get_ydata(), 100 * risk)
    assert list(point.get_xdata()) == [60.0] and list(point.get_ydata()) == [5.0]
    assert point.get_label() == "operating point: coverage 60.00%, risk 5.00%"
    assert fig.axes[0].get_xlabel() == "coverage (%)"


def test_no_pyplot_figures_are_created(classifier_output, ood_scores):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    reliability_diagram(*classifier_output)
    score_histograms(ood_scores[0], ood_scores[1], "s")
    roc_curves(ood_scores[0], ood_scores[1], "s")
    assert plt.get_fignums() == before
