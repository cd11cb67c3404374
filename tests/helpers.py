"""Small real models and a real entry-point registration shared by the core tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wrapcal.model import discovery as manager

SAMPLE_PLUGIN_DIR = Path(__file__).parent / "sample_plugin"


class SmallNet(nn.Module):
    """A hand-written classifier: conv features, then a final ``nn.Linear`` named ``out``."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(dropout)
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.out(self.drop(torch.relu(self.hidden(h))))


class SoftmaxNet(SmallNet):
    """Returns probabilities: its last Linear's output is changed before it is returned."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(super().forward(x), dim=-1)


@contextmanager
def installed_distribution(
    tmp_path: Path,
    name: str,
    version: str,
    entry_points: dict[str, str],
    modules: dict[str, str] | None = None,
    extra_paths: tuple[Path, ...] = (),
) -> Iterator[Path]:
    """Make a package look installed: real ``.dist-info`` metadata on ``sys.path``.

    A ``.dist-info`` directory on ``sys.path`` is what pip writes for an installed
    package; ``importlib.metadata`` (and so wrapcal's discovery) finds it the same way.
    The plugin manager is rebuilt on entry and on exit, when everything is removed again.

    Args:
        tmp_path: A fresh directory for the metadata (and the modules).
        name: The distribution's name (``"wrapcal-vector-scaling"``).
        version: Its version.
        entry_points: Entry-point name -> module, in the ``wrapcal`` group.
        modules: Module name -> source, written beside the metadata.
        extra_paths: Further directories the modules live in (put on ``sys.path``).

    Yields:
        The directory on ``sys.path`` that holds the metadata.
    """
    dist = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        "Summary: A test package for wrapcal plugin discovery\n"
    )
    lines = "".join(f"{ep} = {module}\n" for ep, module in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[wrapcal]\n{lines}")
    for module, source in (modules or {}).items():
        (tmp_path / f"{module}.py").write_text(source)
    paths = [str(tmp_path), *map(str, extra_paths)]
    sys.path[:0] = paths
    manager.reset()
    try:
        yield tmp_path
    finally:
        for path in paths:
            sys.path.remove(path)
        for module in [*(modules or {}), *entry_points.values()]:
            sys.modules.pop(module, None)
        manager.reset()


@contextmanager
def sample_plugin_installed(tmp_path: Path) -> Iterator[None]:
    """Make the sample plugin package (``tests/sample_plugin``) visible through real
    entry-point metadata, as ``wrapcal-vector-scaling`` 0.3.1."""
    with installed_distribution(
        tmp_path,
        "wrapcal-vector-scaling",
        "0.3.1",
        {"vector_scaling": "wrapcal_vector_scaling"},
        extra_paths=(SAMPLE_PLUGIN_DIR,),
    ):
        yield


def table_rows(text: str) -> dict[str, str]:
    """The demo table's rows by their first word (its lines are the ones with ``|``)."""
    return {line.split()[0]: line for line in text.splitlines() if "|" in line}


def assert_table_names_the_summarys_scores(text: str, data: dict[str, Any]) -> None:
    """The demo's table (``text``) shows, per model and OOD set, the report summary's
    cell (``data["summary"]``): the same best score, its AUROC and FPR95 to the printed
    0.1 point, ``!`` exactly where the summary says inverted; and every drop of the
    baseline's best score in another model, found here from ``data["ood"]``, has a note."""
    summary = data["summary"]
    sets = list(data["data"]["ood"])
    rows = table_rows(text)
    for model, entry in summary["models"].items():
        parts = rows[model].split("|")
        assert len(parts) == len(sets) + 1, rows[model]
        for part, ood_set in zip(parts[:-1], sets, strict=True):
            cell = entry["ood"][ood_set]
            score, auroc, fpr = part.split()[-3:]
            assert score == cell["score"], (model, ood_set, part)
            assert auroc.endswith("!") == cell["inverted"], (model, ood_set, part)
            assert abs(float(auroc.rstrip("!")) - 100 * cell["auroc"]) <= 0.05 + 1e-9
            assert abs(float(fpr) - 100 * cell["fpr95"]) <= 0.05 + 1e-9
    base = summary["baseline"]
    flat = " ".join(text.split())  # the notes are wrapped
    for model in summary["models"]:
        for i, ood_set in enumerate(sets):
            theirs = summary["models"][base]["ood"][ood_set]
            mine = summary["models"][model]["ood"][ood_set]
            same = data["ood"][model][ood_set].get(theirs["score"], {}).get("auroc")
            drop = mine["auroc"] < theirs["auroc"] - 0.01
            reordered = same is not None and same < theirs["auroc"] - 0.01
            noted = f"{model} on ({i + 1}):" in flat
            assert noted == (model != base and (drop or reordered)), (model, ood_set)
            if noted and not drop:  # the score fell, the best held: says both numbers
                assert f"to {100 * same:.1f}%" in flat
                assert f"{mine['score']}, reaches {100 * mine['auroc']:.1f}%" in flat


def assert_demo_is_honest(text: str, data: dict[str, Any], out: Path) -> None:
    """What ``wrapcal demo`` must print and write: the table in the report's units, naming
    the report summary's best scores, the retraining plugins without an accuracy jump,
    drops and inverted scores flagged and explained, conformal coverage near its target.
    ``text`` is its output, ``data`` its ``report.json``, ``out`` the report directory."""
    from wrapcal.cli.demo import SETUPS

    for name in ("report.html", "report.md", "report.json"):
        assert (out / name).stat().st_size > 1000
    assert "acc %" in text and "ECE %" in text and "AUROC%" in text  # the report's units
    assert "none sees new labelled data" in text
    rows = table_rows(text)
    baseline = data["calibration"]["baseline"]
    assert baseline["accuracy"] > 0.97  # a properly trained baseline
    for name in SETUPS:
        assert name in rows, name
        cal = data["calibration"][name]
        # The retraining plugins see no new data: no accuracy jump from more training.
        assert abs(cal["accuracy"] - baseline["accuracy"]) < 0.02, name
        assert f"{100 * cal['accuracy']:6.1f} {100 * cal['ece']:6.2f}" in rows[name]
    # The table and the report's summary name the same score, and drops are explained.
    assert_table_names_the_summarys_scores(text, data)
    # Every inverted score the report lists is named below the table.
    flat = " ".join(text.split())
    assert ("inverted score" in flat) == bool(data["summary"]["inverted"])
    for item in data["summary"]["inverted"]:
        assert item["model"] in flat and item["score"] in flat
    conformal = data["plugin_metrics"]["all"]["conformal"]
    assert 0.85 <= conformal["coverage"]["value"] <= 1.0
