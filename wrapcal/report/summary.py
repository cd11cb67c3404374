"""The report's summary: per model, accuracy, ECE before/after, and per OOD set the best
score with its AUROC and the threshold that accepts 95% of in-distribution data.

The summary is data (it goes into ``report.json`` under ``"summary"``); the templates
only lay it out. Its choices are stated with the data they were made on:

* The *best* score of a model on an OOD set is the one with the highest AUROC on the
  test set and that OOD set: chosen and measured on the same data, so its AUROC is
  optimistic for new data (the report says so beside it).
* The *threshold* follows FPR@95TPR's convention (:func:`wrapcal.metrics.fpr_at_tpr`):
  the ``ceil(0.95 n)``-th smallest score of the ``n`` in-distribution test samples;
  a sample is accepted as in-distribution when its score is ``<=`` the threshold. It
  accepts at least 95% of the test set; the share of *new* in-distribution samples it
  accepts is ``F(X_(k))``, which follows ``Beta(k, n + 1 - k)`` for a continuous score
  (the order statistic's distribution), so its interval is exact and needs no bootstrap.
* A score whose AUROC is below 50% is *inverted*: it ranks that OOD set as more
  in-distribution than the test set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from wrapcal.metrics.ood import acceptance_rank, acceptance_threshold

if TYPE_CHECKING:
    from wrapcal.report.outputs import ModelOutputs

__all__ = ["TPR", "acceptance_interval", "baseline_model", "summarize", "threshold_at_tpr"]

#: Share of in-distribution data the summary's thresholds accept.
TPR = 0.95

INVERTED_NOTE = "the score ranks this OOD set as more in-distribution than the test set"


def threshold_at_tpr(scores_in: torch.Tensor, tpr: float = TPR) -> tuple[float, int]:
    """The threshold accepting ``tpr`` of the in-distribution scores, and its rank ``k``.

    The ``k = ceil(tpr * n)``-th smallest score (1-based), exactly the threshold of
    :func:`wrapcal.metrics.fpr_at_tpr`: accept a sample when ``score <= threshold``.
    """
    return acceptance_threshold(scores_in, tpr), acceptance_rank(scores_in.numel(), tpr)


def acceptance_interval(k: int, n: int, level: float = 0.95) -> list[float]:
    """Central ``level`` interval of the share of new in-distribution samples accepted by
    the ``k``-th smallest of ``n`` scores: the quantiles of ``Beta(k, n + 1 - k)``."""
    from scipy.stats import beta  # scikit-learn's own dependency: always installed

    tail = (1 - level) / 2
    return [float(beta.ppf(tail, k, n + 1 - k)), float(beta.ppf(1 - tail, k, n + 1 - k))]


def baseline_model(models: dict[str, dict[str, Any]]) -> str | None:
    """The model whose ECE is the "before": the one named ``baseline``, else the first
    model that is not wrapped, else none."""
    if "baseline" in models:
        return "baseline"
    return next((name for name, info in models.items() if "plugins" not in info), None)


def _best_score(rows: dict[str, dict[str, Any]]) -> str | None:
    """The score with the highest AUROC (the first one on ties); ``None`` if none measured."""
    measured = [(s, r["auroc"]) for s, r in rows.items() if r.get("auroc") is not None]
    if not measured:
        return None
    return max(measured, key=lambda item: item[1])[0]


def _inverted(auroc: float | None) -> bool:
    return auroc is not None and auroc < 0.5


def summarize(
    data: dict[str, Any], outputs: dict[str, ModelOutputs] | None = None
) -> dict[str, Any]:
    """The summary of a report's data (``Report.to_dict()`` without ``"summary"``).

    Args:
        data: The report's tables: ``models``, ``calibration``, ``ood``, ``settings``.
        outputs: The models' outputs, for the thresholds (which need the test set's
            scores); without them the thresholds are ``None``.

    Returns:
        ``{"baseline", "tpr", "models": {model: {"accuracy", "ece", "ece_ci",
        "baseline_ece", "baseline_ece_ci", "ood": {set: {"score", "auroc", "auroc_ci",
        "fpr95", "threshold", "accepted", "accepted_ci", "inverted"}}}}, "inverted":
        [{"model", "ood_set", "score", "auroc", "auroc_ci"}], "best_ece"}``; fractions.
    """
    outputs = outputs or {}
    level = data["settings"].get("level", 0.95)
    base = baseline_model(data["models"])
    base_cal = data["calibration"].get(base, {}) if base is not None else {}
    models: dict[str, Any] = {}
    inverted = []
    for name, cal in data["calibration"].items():
        entry: dict[str, Any] = {
            "accuracy": cal.get("accuracy"),
            "ece": cal.get("ece"),
            "ece_ci": cal.get("ece_ci"),
            "baseline_ece": None if name == base else base_cal.get("ece"),
            "baseline_ece_ci": None if name == base else base_cal.get("ece_ci"),
            "ood": {},
        }
        for ood_set, rows in data["ood"].get(name, {}).items():
            for score, row in rows.items():
                if _inverted(row.get("auroc")):
                    inverted.append(
                        {
                            "model": name,
                            "ood_set": ood_set,
                            "score": score,
                            "auroc": row["auroc"],
                            "auroc_ci": row.get("auroc_ci"),
                        }
                    )
            best = _best_score(rows)
            if best is None:
                entry["ood"][ood_set] = None
                continue
            row = rows[best]
            cell = {
                "score": best,
                "auroc": row["auroc"],
                "auroc_ci": row.get("auroc_ci"),
                "fpr95": row.get("fpr95"),
                "threshold": None,
                "accepted": None,
                "accepted_ci": None,
                "inverted": _inverted(row["auroc"]),
            }
            out = outputs.get(name)
            if out is not None and best in out.test.scores:
                scores = out.test.scores[best]
                threshold, k = threshold_at_tpr(scores)
                cell["threshold"] = threshold
                cell["accepted"] = float((scores.double() <= threshold).double().mean())
                cell["accepted_ci"] = acceptance_interval(k, scores.numel(), level)
            entry["ood"][ood_set] = cell
        models[name] = entry
    eces = {m: e["ece"] for m, e in models.items() if e["ece"] is not None}
    return {
        "baseline": base,
        "tpr": TPR,
        "best_ece": min(eces, key=eces.__getitem__) if eces else None,
        "models": models,
        "inverted": inverted,
    }
