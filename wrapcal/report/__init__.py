"""Evaluation reports: ``evaluate`` runs models over test and OOD data, ``Report`` holds
the results and writes them as HTML (self-contained), Markdown, JSON and PNG figures.

>>> report = evaluate({"baseline": model, "wrapped": wrapped}, test=(x, y),
...                   ood={"noise": noise})                      # doctest: +SKIP
>>> report.save("report/")                                        # doctest: +SKIP
>>> report.log_to(mlflow_run)                # MLflow, with wrapcal[mlflow]; doctest: +SKIP
"""

from wrapcal.report.evaluate import evaluate
from wrapcal.report.report import Report
from wrapcal.report.tracking import log_report

__all__ = ["Report", "evaluate", "log_report"]
