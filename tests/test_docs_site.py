"""The documentation site builds with ``mkdocs build --strict`` and documents every public name.

Strict mode turns every warning into a failure: a link to a page or an anchor that does
not exist, a ``::: module`` directive naming nothing, a cross-reference with no target, a
docstring griffe cannot parse. The second check reads the built API pages back and
looks for an entry for every name in each documented module's ``__all__``, so a name
added to the API without a docstring page fails here.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="the docs extra (mkdocs) is not installed")
pytest.importorskip("mkdocstrings", reason="the docs extra (mkdocstrings) is not installed")
pytest.importorskip("material", reason="the docs extra (mkdocs-material) is not installed")

ROOT = Path(__file__).resolve().parents[1]

# Each public module and the API page that documents it (docs/api/<page>.md).
API_PAGES = {
    "wrapcal": "wrapcal",
    "wrapcal.plugin": "plugin",
    "wrapcal.testing": "testing",
    "wrapcal.metrics": "metrics",
    "wrapcal.datasets": "datasets",
    "wrapcal.export": "export",
    "wrapcal.monitoring": "monitoring",
    "wrapcal.integrations.lightning": "lightning",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    # NO_MKDOCS_2_WARNING silences Material's banner, which is not a build warning.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # No --quiet: it raises the log level above WARNING, and --strict then counts nothing.
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    problems = [line for line in done.stderr.splitlines() if not line.startswith("INFO")]
    assert done.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems)
    return out


def _public_names(module: str) -> list[str]:
    """The module's ``__all__``, read from its source (importing it would pull in torch)."""
    path = ROOT.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                return list(ast.literal_eval(node.value))
    raise AssertionError(f"{path} has no literal __all__")


def _anchors(page: Path) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")))


def test_strict_build_writes_every_page(site: Path) -> None:
    # Every Markdown page under docs/ is in the nav and becomes a page (mkdocs' strict
    # omitted_files validation already fails on one left out of the nav).
    pages = sorted(p.relative_to(ROOT / "docs") for p in (ROOT / "docs").rglob("*.md"))
    assert len(pages) >= 25
    for page in pages:
        built = (
            site / page.parent / "index.html"
            if page.stem == "index"
            else site / page.parent / page.stem / "index.html"
        )
        assert built.is_file(), f"docs/{page} was not built ({built})"
    # The getting-started page carries the README's two commands, word for word.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for marker in ("<!-- demo-command -->", "<!-- test-command -->"):
        block = readme.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
        assert block.strip() in index, f"docs/index.md lacks the README's command: {block}"


@pytest.mark.parametrize("module", sorted(API_PAGES))
def test_api_reference_has_every_public_name(site: Path, module: str) -> None:
    anchors = _anchors(site / "api" / API_PAGES[module] / "index.html")
    names = _public_names(module)
    assert names, module
    # A name re-exported from elsewhere may be documented under its home module on the
    # same page (the names ``wrapcal`` resolves lazily: evaluate, Report, monitor...);
    # module aliases (wrapcal.metrics, wrapcal.conformal...) have pages of their own.
    modules = {"conformal", "distributed", "export", "metrics", "selective", "__version__"}
    missing = [
        name
        for name in names
        if f"{module}.{name}" not in anchors
        and not any(a.endswith(f".{name}") for a in anchors)
        and not (module == "wrapcal" and name in modules)
    ]
    assert not missing, f"docs/api/{API_PAGES[module]}.md documents none of {missing}"


def test_every_builtin_plugin_module_is_documented(site: Path) -> None:
    # The entry points are the list of built-in plugin modules (pyproject.toml).
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    modules = set(project["project"]["entry-points"]["wrapcal"].values())
    anchors = set()
    for page in (site / "api" / "plugins").rglob("index.html"):
        anchors |= _anchors(page)
    missing = sorted(m for m in modules if m not in anchors)
    assert not missing, f"no API page documents {missing} (docs/api/plugins/*.md)"
