"""What :func:`wrapcal.monitor` returns: the windows' summaries, their alerts, and the
ways to keep them (a report folder, MLflow)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wrapcal._version import __version__
from wrapcal.monitoring.alerts import Alert, AlertRules
from wrapcal.monitoring.reference import Reference
from wrapcal.monitoring.summary import WindowSummary

__all__ = ["MonitorResult"]


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


@dataclass
class MonitorResult:
    """The summaries of a monitoring run and its alerts.

    Attributes:
        windows: One :class:`~wrapcal.monitoring.WindowSummary` per window, in order.
        reference: The reference each window was compared with.
        rules: The alert rules applied.
        settings: The model, its plugins, how OOD inputs were counted, the interval's
            level, the window size and the run's seconds.
        created: When the run ended (UTC, ISO 8601).
    """

    windows: list[WindowSummary]
    reference: Reference
    rules: AlertRules
    settings: dict[str, Any]
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )

    @property
    def alerts(self) -> list[Alert]:
        """Every alert of every window, in window order."""
        return [a for w in self.windows for a in w.alerts]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (``monitor.json``); the reference's score values are
        left out (save the reference itself with ``Reference.save``)."""
        ref = self.reference.to_dict()
        ref["scores"] = {k: len(v) for k, v in ref["scores"].items()}
        return {
            "wrapcal_version": __version__,
            "created": self.created,
            "settings": self.settings,
            "rules": self.rules.to_dict(),
            "reference": ref,
            "windows": [w.to_dict() for w in self.windows],
            "alerts": [a.to_dict() for a in self.alerts],
        }

    def table(self) -> tuple[list[str], list[list[str]]]:
        """The per-window table (values in %): header and rows."""
        header = ["window", "n", "estimate (%)", "95% CI", "truth (%)", "error (pts)"]
        header += ["OOD rate (%)", "expected (%)", "alerts"]
        rows = []
        for w in self.windows:
            low, high = w.estimated_accuracy_ci
            rows.append(
                [
                    w.name,
                    str(w.n),
                    _pct(w.estimated_accuracy),
                    f"{_pct(low)}-{_pct(high)}",
                    _pct(w.accuracy),
                    "-" if w.estimate_error is None else f"{100 * w.estimate_error:+.1f}",
                    _pct(w.ood["rate"]) if w.ood else "-",
                    _pct(w.ood["expected"]) if w.ood else "-",
                    ", ".join(a.rule for a in w.alerts) or "-",
                ]
            )
        return header, rows

    def __str__(self) -> str:
        header, rows = self.table()
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        head = "  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))
        return "\n".join([head, *lines])

    def save(self, directory: str | Path, *, figures: bool = True) -> Path:
        """Write ``monitor.html`` (self-contained), ``monitor.md``, ``monitor.json`` and
        ``figures/*.png`` into ``directory`` (created if missing)."""
        from wrapcal.monitoring.report import render_html, render_markdown, time_series_figures

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        figs = time_series_figures(self) if figures else []
        (out / "monitor.json").write_text(json.dumps(data, indent=2))
        (out / "monitor.html").write_text(render_html(data, figs))
        if figs:
            (out / "figures").mkdir(exist_ok=True)
            for f in figs:
                (out / "figures" / f.filename).write_bytes(f.png)
        (out / "monitor.md").write_text(render_markdown(data, figs, "figures" if figs else None))
        return out

    def log_to(
        self,
        run: Any = None,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        directory: str | Path | None = None,
        run_name: str | None = None,
        nested: bool = False,
    ) -> str:
        """Log to MLflow: each window's numbers as a step, the report as artifacts
        (see :func:`wrapcal.monitoring.tracking.log_monitor`, which takes the same
        options: ``nested=True`` logs into a child run of ``run`` or the active run)."""
        from wrapcal.monitoring.tracking import log_monitor

        return log_monitor(
            self,
            run,
            tracking_uri=tracking_uri,
            experiment=experiment,
            directory=directory,
            run_name=run_name,
            nested=nested,
        )
