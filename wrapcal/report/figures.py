"""The report's figures, rendered to PNG: few, grouped, legible at any width.

Per model: a reliability diagram; a histogram of its primary OOD score (the highest
mean AUROC over the OOD sets) on the test set and every OOD set, with the threshold
accepting 95% of the test set; the ROC curve of its best score on each OOD set (the
summary's row, drawn); behind a ``details`` element on the page, per OOD set, the ROC
curves of every score. Per plugin curve (e.g. risk against coverage):
the curve with its operating point. Each figure is a separate PNG so the page can lay
them side by side on a wide screen and one under the other on a phone.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure
from matplotlib.text import Text

from wrapcal.report.plots import curve_plot, reliability_diagram, roc_pairs, score_histograms
from wrapcal.report.plugin_metrics import as_curve
from wrapcal.report.summary import TPR, threshold_at_tpr

if TYPE_CHECKING:
    from wrapcal.report.outputs import ModelOutputs

__all__ = ["DPI", "FigureFile", "primary_score", "report_figures"]

#: Resolution of the PNG files: a 4.6 inch figure is 460 px wide.
DPI = 100


@dataclass
class FigureFile:
    """A figure of the report, rendered to PNG.

    Attributes:
        kind: ``"reliability"``, ``"histogram"``, ``"roc"`` (one score, every OOD set),
            ``"roc_scores"`` (one OOD set, every score) or ``"curve"`` (a plugin's).
        model: The model's name.
        score: The OOD score (or, for a curve, the plugin's metric); else ``None``.
        title: A caption.
        filename: Its file name under ``figures/``.
        png: The PNG bytes.
        width: Width of the PNG in pixels.
        height: Height in pixels.
        min_font_px: The smallest text in the PNG, in pixels: shown ``w`` px wide, it
            reads ``min_font_px * w / width`` px tall.
        primary: Shown on the page; ``False``: behind a ``details`` element.
        group: What it belongs to: an OOD set (``"roc_scores"``) or a plugin (``"curve"``).
    """

    kind: str
    model: str
    score: str | None
    title: str
    filename: str
    png: bytes
    width: int = 0
    height: int = 0
    min_font_px: float = 0.0
    primary: bool = True
    group: str | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def _render(fig: Figure) -> tuple[bytes, int, int, float]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    sizes = (t.get_fontproperties().get_size_in_points() for t in texts)
    smallest = min(sizes, default=0.0) * DPI / 72
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    # Figures are built without pyplot (nothing to plt.close); clearing frees the artists.
    fig.clear()
    return buf.getvalue(), width, height, float(smallest)


def primary_score(data: dict[str, Any], model: str) -> str | None:
    """The model's score with the highest mean AUROC over the OOD sets (the first one on
    ties; scores not measured on every set are left out)."""
    sets = data["ood"].get(model, {})
    if not sets:
        return None
    means = {}
    for score in data["models"][model]["scores"]:
        values = [rows.get(score, {}).get("auroc") for rows in sets.values()]
        if values and all(v is not None for v in values):
            means[score] = sum(values) / len(values)
    return max(means, key=means.__getitem__) if means else None


def _best_per_set(data: dict[str, Any], model: str) -> dict[str, str]:
    """OOD set -> the summary's best score of the model on it."""
    cells = data.get("summary", {}).get("models", {}).get(model, {}).get("ood", {})
    return {ood_set: c["score"] for ood_set, c in cells.items() if c}


class _Files:
    """Collects the figures, with unique file names (names that differ only in symbols
    would collide once slugged)."""

    def __init__(self) -> None:
        self.figures: list[FigureFile] = []
        self._used: set[str] = set()

    def add(
        self,
        fig: Figure,
        kind: str,
        model: str,
        score: str | None,
        title: str,
        stem: str,
        primary: bool = True,
        group: str | None = None,
    ) -> None:
        name, i = f"{_slug(stem)}.png", 2
        while name in self._used:
            name, i = f"{_slug(stem)}-{i}.png", i + 1
        self._used.add(name)
        png, width, height, smallest = _render(fig)
        self.figures.append(
            FigureFile(
                kind, model, score, title, name, png, width, height, smallest, primary, group
            )
        )


def _ood_figures(files: _Files, data: dict[str, Any], name: str, out: ModelOutputs) -> None:
    tpr = data.get("summary", {}).get("tpr", TPR)
    score = primary_score(data, name)
    if score is not None:
        s_in = out.test.scores[score]
        s_out = {k: o.scores[score] for k, o in out.ood.items()}
        threshold = threshold_at_tpr(s_in, tpr)[0]
        fig = score_histograms(
            s_in, s_out, score, threshold=threshold, tpr=tpr, title=f"{name}: {score}"
        )
        files.add(
            fig,
            "histogram",
            name,
            score,
            f"{name}: {score}, in-distribution vs OOD",
            f"ood_{name}_{score}_hist",
        )
    best = _best_per_set(data, name)
    if best:
        pairs = {f"{k}: {s}": (out.test.scores[s], out.ood[k].scores[s]) for k, s in best.items()}
        fig = roc_pairs(pairs, f"{name}: best score per OOD set")
        files.add(
            fig,
            "roc",
            name,
            None,
            f"{name}: ROC of the best score on each OOD set",
            f"ood_{name}_best_roc",
        )
    for ood_set, o in out.ood.items():
        # A curve per score on one OOD set: which score separates it (lines: cheap).
        rows = data["ood"].get(name, {}).get(ood_set, {})
        scores = [s for s in out.test.scores if rows.get(s, {}).get("auroc") is not None]
        if len(scores) < 2:
            continue
        pairs = {s: (out.test.scores[s], o.scores[s]) for s in scores}
        fig = roc_pairs(pairs, f"{name}: every score on {ood_set}")
        files.add(
            fig,
            "roc_scores",
            name,
            None,
            f"{name}: ROC of every score on {ood_set}",
            f"roc_{name}_{ood_set}",
            primary=False,
            group=ood_set,
        )


def report_figures(data: dict[str, Any], outputs: dict[str, ModelOutputs]) -> list[FigureFile]:
    """Render the figures of a report's data from the models' outputs."""
    files = _Files()
    n_bins = data["settings"]["n_bins"]
    for name, out in outputs.items():
        if out.test.labels is None:  # evaluate() requires labels: a report rebuilt by hand
            continue
        fig = reliability_diagram(out.test.probs, out.test.labels, n_bins=n_bins, title=name)
        files.add(
            fig, "reliability", name, None, f"Reliability diagram: {name}", f"reliability_{name}"
        )
    for name, out in outputs.items():
        if out.ood:
            _ood_figures(files, data, name, out)
    for name, plugins in data.get("plugin_metrics", {}).items():
        for plugin, metrics in plugins.items():
            for metric, entry in metrics.items():
                curve = as_curve(entry)
                if curve is None:
                    continue
                title = f"{name}: {plugin} {metric.replace('_', ' ')}"
                fig = curve_plot(
                    curve.x,
                    curve.y,
                    x_label=curve.x_label,
                    y_label=curve.y_label,
                    title=title,
                    point=curve.point,
                    percent=curve.percent,
                )
                files.add(
                    fig,
                    "curve",
                    name,
                    metric,
                    title,
                    f"curve_{name}_{plugin}_{metric}",
                    group=plugin,
                )
    return files.figures
