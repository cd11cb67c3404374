"""Evaluation reports: ``evaluate`` runs models over test and OOD data, ``Report`` holds
the results and writes them as HTML (self-contained), Markdown, JSON and PNG figures.

>>> report = evaluate({"baseline": model, "wrapped": wrapped}, test=(x, y),
...                   ood={"noise": noise})                      # doctest: +SKIP
>>> report.save("report/")                                        # doctest: +SKIP
"""

from wrapcal.report.evaluate import evaluate
from wrapcal.report.report import Report

__all__ = ["Report", "evaluate"]
