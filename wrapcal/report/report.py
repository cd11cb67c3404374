"""``Report``: the results of :func:`wrapcal.report.evaluate`, as data, JSON, Markdown, HTML.

A report is a plain dict of numbers and words (``to_dict``), so it serialises to JSON
as it is; it also keeps the models' outputs (probabilities, labels and scores on the
CPU) to draw the figures when it is saved. ``save(dir)`` writes ``report.html`` (one
self-contained file, figures embedded), ``report.md``, ``report.json`` and the figures
as PNG files under ``figures/``.
"""

from __future__ import annotations

import copy
import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import wrapcal.report.render as render
from wrapcal.report.figures import FigureFile, report_figures
from wrapcal.report.summary import summarize

if TYPE_CHECKING:
    from wrapcal.report.outputs import ModelOutputs

__all__ = ["FigureFile", "Report", "conventions"]


def conventions(n_bins: int, bootstrap: int, seed: int, level: float) -> dict[str, str]:
    """The conventions of the metrics, in words, as the report states them."""
    pct = f"{100 * level:g}%"
    if bootstrap:
        boot = (
            f"{pct} bootstrap intervals from B = {bootstrap} resamples drawn with seed "
            f"{seed}. ECE resamples the test set and uses the basic (reverse percentile) "
            "interval, (2 ECE - upper quantile, 2 ECE - lower quantile) clipped at 0: the "
            "binned ECE is biased upwards and this corrects it, so for a well-calibrated "
            "model the interval can lie below the point estimate. AUROC resamples the "
            "in-distribution and the OOD samples separately, keeping both set sizes, and "
            "uses the percentile interval."
        )
    else:
        boot = "No bootstrap intervals were computed (bootstrap = 0)."
    return {
        "ece": (
            f"ECE is top-label, L1, {n_bins} equal-width bins over (0, 1], weighted by bin "
            f"mass; adaptive ECE uses equal-mass bins ({n_bins} of them); MCE is the largest "
            "gap of a non-empty bin; class-wise ECE is the binned ECE of each class's "
            "probability, averaged over the classes (Guo et al. 2017; Kull et al. 2019)."
        ),
        "ood": (
            "in-distribution is the positive class; FPR@95TPR is the share "
            "of OOD samples accepted when 95% of in-distribution samples are accepted; "
            "scores are higher = more OOD. AUPR-In ranks by -score with in-distribution "
            "positive, AUPR-Out by score with OOD positive. An AUROC below 50% marks an "
            "inverted score: it ranks the OOD set as more in-distribution than the test set."
        ),
        "summary": (
            "the summary's best score on an OOD set is the one with the highest AUROC there, "
            "chosen on the same test and OOD samples it is measured on (optimistic for new "
            "data). Its threshold is FPR@95TPR's: the ceil(0.95 n)-th smallest of the n "
            "in-distribution test scores; a sample is accepted as in-distribution when its "
            "score is <= the threshold. The share of new in-distribution data it accepts "
            "follows Beta(k, n + 1 - k) for a continuous score, whose central interval the "
            "summary gives. ECE before is the ECE of the model named 'baseline' (else the "
            "first model that is not wrapped)."
        ),
        "scores": (
            "msp = 1 - max probability; max_logit = -max logit; entropy of the "
            "predictive distribution (nats); energy = -logsumexp(logits). Wrapped models add "
            "the scores of their plugins."
        ),
        "other": (
            "NLL is the mean -log p(true class); Brier is the multiclass Brier score "
            "sum_k (p_k - onehot_k)^2 averaged over samples (range 0 to 2); AURC is the area "
            "under the risk-coverage curve ranked by confidence (lower is better)."
        ),
        "bootstrap": boot,
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("wrapcal")
    except Exception:  # not installed: the source tree's version
        from wrapcal._version import __version__

        return __version__


def _finite(value: Any) -> Any:
    """NaN and inf are not JSON: they become ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class Report:
    """Results of :func:`~wrapcal.report.evaluate`: calibration and OOD tables, metadata.

    Create it with ``evaluate``; ``Report(data)`` rebuilds one from ``to_dict()`` (no
    figures then: those need the models' outputs).
    """

    def __init__(self, data: dict[str, Any], outputs: dict[str, ModelOutputs] | None = None):
        if "summary" not in data:  # a report saved before the summary existed
            data = {**data, "summary": _finite(summarize(data))}
        self._data = data
        self._outputs = outputs or {}

    @classmethod
    def build(
        cls,
        outputs: dict[str, ModelOutputs],
        calibration: dict[str, dict[str, Any]],
        ood: dict[str, dict[str, dict[str, dict[str, Any]]]],
        settings: dict[str, Any],
        plugin_metrics: dict[str, dict[str, dict[str, Any]]] | None = None,
        class_names: list[str] | None = None,
    ) -> Report:
        """Assemble a report from ``evaluate``'s outputs and metrics; ``class_names``
        (one per class, in output order) label the classes wherever the report shows
        one."""
        first = next(iter(outputs.values()))
        models = {}
        for name, out in outputs.items():
            ood_seconds = {k: o.seconds for k, o in out.ood.items()}
            models[name] = {
                **out.info,
                "num_classes": int(out.test.probs.shape[1]),
                "scores": list(out.test.scores),
                "kinds": {k: v.value for k, v in out.test.prediction.kinds.items()},
                "seconds": {
                    "test": out.test.seconds,
                    "ood": ood_seconds,
                    "total": out.test.seconds + sum(ood_seconds.values()),
                },
            }
        data = {
            "title": "wrapcal evaluation report",
            "wrapcal_version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(terse=True),
            },
            "settings": dict(settings),
            "conventions": conventions(
                settings["n_bins"], settings["bootstrap"], settings["seed"], settings["level"]
            ),
            "data": {
                "test": {
                    "n": len(first.test.probs),
                    "num_classes": int(first.test.probs.shape[1]),
                    "class_names": None if class_names is None else list(class_names),
                },
                "ood": {name: {"n": len(o.probs)} for name, o in first.ood.items()},
            },
            "models": models,
            "calibration": calibration,
            "ood": ood,
            "plugin_metrics": plugin_metrics or {},
        }
        data = _finite(data)
        data["summary"] = _finite(summarize(data, outputs))
        return cls(data, outputs)

    # --- data --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as plain Python values (a deep copy)."""
        return copy.deepcopy(self._data)

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (``json.loads(report.to_json()) == report.to_dict()``)."""
        return json.dumps(self._data, indent=indent, allow_nan=False)

    def to_markdown(self) -> str:
        """The report as Markdown: metadata, conventions and the tables."""
        return render.markdown(self._data)

    def to_html(self) -> str:
        """The report as one self-contained HTML page, figures embedded."""
        return render.html(self._data, self.figures())

    def _repr_html_(self) -> str:  # Jupyter shows the tables without the figures
        return render.html(self._data, [], standalone=False)

    def log_to(self, run: Any = None, **options: Any) -> str:
        """Log the metrics, the figures and the report files to an MLflow run.

        Needs ``pip install wrapcal[mlflow]``. The names and the options
        (``tracking_uri``, ``experiment``, ``run_name``, ``artifact_path``,
        ``directory``) are those of :func:`wrapcal.report.tracking.log_report`.

        Args:
            run: An ``mlflow.ActiveRun``, an ``mlflow.entities.Run`` or a run id; ``None``
                logs to the active run, or to a new run when none is active.
            **options: Passed to ``log_report``.

        Returns:
            The run's id.
        """
        from wrapcal.report.tracking import log_report

        return log_report(self, run, **options)

    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(self._data[key])

    @property
    def calibration(self) -> dict[str, dict[str, Any]]:
        """Model name -> calibration metrics (fractions, not percentages)."""
        return self["calibration"]

    @property
    def ood(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        """Model name -> OOD set -> score -> OOD metrics (fractions)."""
        return self["ood"]

    # --- figures and files -------------------------------------------------------------

    def figures(self) -> list[FigureFile]:
        """Render the figures (see :mod:`wrapcal.report.figures`): per model a
        reliability diagram, the histogram and ROC curves of its best OOD scores, the ROC
        curves of every score per OOD set; each plugin's curve."""
        return report_figures(self._data, self._outputs)

    def save(self, directory: str | Path) -> Path:
        """Write ``report.html``, ``report.md``, ``report.json`` and ``figures/*.png``.

        Args:
            directory: Where to write; created if missing. Existing report files there
                are replaced.

        Returns:
            The directory.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        figures = self.figures()
        if figures:
            (out / "figures").mkdir(exist_ok=True)
        for figure in figures:
            (out / "figures" / figure.filename).write_bytes(figure.png)
        (out / "report.json").write_text(self.to_json() + "\n", encoding="utf-8")
        (out / "report.md").write_text(
            render.markdown(self._data, figures, figure_dir="figures"), encoding="utf-8"
        )
        (out / "report.html").write_text(render.html(self._data, figures), encoding="utf-8")
        return out

    def __repr__(self) -> str:
        models = ", ".join(self._data["models"])
        sets = ", ".join(self._data["data"]["ood"]) or "none"
        return f"Report(models: {models}; test n={self._data['data']['test']['n']}; OOD: {sets})"
