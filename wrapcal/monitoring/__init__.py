"""Watch a calibrated model on production traffic, window by window.

>>> result = wrapcal.monitor(wrapped, windows, reference=calibration_data)
>>> result.alerts                      # the rules that fired, as data
>>> result.save("monitor-report/")     # monitor.html (figures inside), monitor.md, monitor.json

Per window, with one backbone pass: the estimated accuracy (mean calibrated confidence,
NannyML's CBPE) with an interval, the OOD rate against its expected rate, set sizes and
decision rates, each score's drift against the calibration set, and with labels the
realised accuracy, ECE and the estimate's error; alert rules on each. Only per-window
summaries are kept. See docs/monitoring.md.
"""

from __future__ import annotations

from wrapcal.monitoring.alerts import Alert, AlertRules, check_rules
from wrapcal.monitoring.reference import Reference
from wrapcal.monitoring.result import MonitorResult
from wrapcal.monitoring.run import monitor, stream
from wrapcal.monitoring.summary import WindowSummary
from wrapcal.monitoring.windows import Window

__all__ = [
    "Alert",
    "AlertRules",
    "MonitorResult",
    "Reference",
    "Window",
    "WindowSummary",
    "check_rules",
    "monitor",
    "stream",
]
