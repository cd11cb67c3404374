"""Every Python and shell example in the README and ``docs/*.md`` runs, so a page cannot
drift from the code (#28, #29).

Each fenced block whose language is ``python``, ``bash``, ``sh`` or ``console`` is one test,
with the id ``<page>:<number>`` (its number among the page's blocks in those languages,
excluded ones included). The
blocks of one page run in order in one namespace, like a doctest session, in this process
(paying the torch import once) and in a temporary working directory of their own. A line
of a shell block that calls ``wrapcal ...`` runs through ``wrapcal.cli.main`` and must
exit 0; any other command has no runner here, so its block must be excluded.

What a reader brings to an example (a trained ``model``, data, a file) comes from HTML
comments beside the block, which the site and GitHub do not show:

``<!-- example-setup`` ... ``-->``
    Python run just before the block, in the page's namespace.
``<!-- example-check`` ... ``-->``
    Python run just after it: assertions on what the block made or printed. It sees
    ``output`` (what the block printed, stdout and stderr) and ``shown`` (the text of the
    last non-runnable block between the example and the check, e.g. the printed output a
    page shows).
``<!-- example: skip (reason) -->``
    The block is not run (installing commands, a multi-node launch); counted, with its
    reason, by ``test_every_block_is_run_or_excluded``.
``<!-- example: slow -->``
    The block's test is marked ``slow``.

Setup and check code also see ``page_text`` (the page's Markdown) and may call
``fit_head(model, images, labels)`` (a network with a head fitted on its own features: a
stand-in for the reader's trained model), ``mlflow_database(path)`` (an empty MLflow
store) and ``register_example_plugins(hook)`` (registers an example's
``wrapcal_register_plugins`` hook as its package's entry point would, until the page's
last block has run). Keep setups small: every example here runs on a few hundred digits.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python": "python", "bash": "shell", "sh": "shell", "console": "shell"}
# Fewer than this would mean the parser lost blocks (43 when this test was written).
MIN_BLOCKS = 43
MAX_EXCLUDED = 10

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
_ONE_LINE_NOTE = re.compile(r"^\s*<!--\s*example:\s*(?P<what>skip|slow)\b\s*(?P<why>.*?)\s*-->\s*$")
_OPEN_CODE_NOTE = re.compile(r"^\s*<!--\s*example-(?P<kind>setup|check)\s*$")


@dataclass
class Block:
    """One runnable fenced block and the notes around it."""

    page: str
    number: int  # among the page's runnable blocks, from 1
    line: int  # of the opening fence, from 1
    kind: str  # "python" or "shell"
    code: str
    setup: tuple[int, str] | None = None  # (first line, code)
    check: tuple[int, str] | None = None
    shown: str | None = None  # the last non-runnable block before the check
    skip: str | None = None
    slow: bool = False

    @property
    def id(self) -> str:
        return f"{self.page}:{self.number}"


def _dedent(lines: list[str], indent: str) -> str:
    return "\n".join(ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines)


def parse_page(page: str) -> list[Block]:
    """The runnable blocks of a page, with their setup, check, skip and slow notes.

    A note must come right before its block (blank lines and other one-line comments
    between are fine), a check after its block; a note that belongs to no block fails.
    """
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    setup: tuple[int, str] | None = None
    skip: str | None = None
    slow = False
    last_text: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        note = _ONE_LINE_NOTE.match(line)
        opened = _OPEN_CODE_NOTE.match(line)
        fence = _FENCE.match(line)
        if note:
            why = note.group("why").strip()
            if note.group("what") == "skip":
                assert why.startswith("(") and why.endswith(")") and len(why) > 4, (
                    f"{page}:{i + 1}: a skip needs its reason: <!-- example: skip (why) -->"
                )
                skip = why[1:-1]
            else:
                slow = True
            i += 1
            continue
        if opened:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->")
            indent = re.match(r"[ \t]*", line).group(0)
            code = (i + 2, _dedent(lines[i + 1 : end], indent))
            if opened.group("kind") == "setup":
                assert setup is None, f"{page}:{i + 1}: two setups for one block"
                setup = code
            else:
                assert blocks, f"{page}:{i + 1}: an example-check before any example"
                assert blocks[-1].check is None, f"{page}:{i + 1}: two checks for one block"
                blocks[-1].check = code
                blocks[-1].shown = last_text
            i = end + 1
            continue
        if fence:
            indent, mark = fence.group("indent"), fence.group("fence")
            lang = fence.group("info").strip().split(" ")[0].lower()
            end = next(
                j
                for j in range(i + 1, len(lines))
                if lines[j].strip().startswith(mark) and not lines[j].strip().strip(mark[0])
            )
            body = _dedent(lines[i + 1 : end], indent)
            if lang in RUNNABLE:
                blocks.append(
                    Block(
                        page,
                        len(blocks) + 1,
                        i + 1,
                        RUNNABLE[lang],
                        body,
                        setup,
                        skip=skip,
                        slow=slow,
                    )
                )
                setup, skip, slow, last_text = None, None, False, None
            else:
                assert setup is None and skip is None and not slow, (
                    f"{page}:{i + 1}: an example note before a block that is not an example"
                )
                last_text = body
            i = end + 1
            continue
        if line.strip() and not re.fullmatch(r"\s*<!--.*-->\s*", line):
            assert setup is None and skip is None and not slow, (
                f"{page}:{i + 1}: an example note must come right before its block"
            )
        i += 1
    assert setup is None and skip is None and not slow, f"{page}: a note after the last block"
    return blocks


# Setups for pages whose owner has not yet put them in the Markdown: the same text goes
# into the page as an <!-- example-setup --> comment before the block, and out of here.
BLOCKS = [block for page in PAGES for block in parse_page(page)]
RUN = [block for block in BLOCKS if block.skip is None]


def fit_head(model: Any, images: Any, labels: Any) -> Any:
    """Fit ``model``'s last ``nn.Linear`` on its own features of ``images`` (L-BFGS, a
    few seconds at most), in place: an untrained network becomes a better-than-chance
    stand-in for the reader's trained model. Returns the model, in eval mode."""
    import torch
    from torch import nn

    model.eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[Any] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(images)
    hook.remove()
    features = seen[0].detach()
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> Any:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(features), labels)
        loss = loss + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


_MLFLOW_TEMPLATE: list[Path] = []


def mlflow_database(path: str) -> None:
    """Copy an empty MLflow SQLite store to ``path``: MLflow creates its tables once per
    session (seconds), not once per page."""
    import shutil
    import tempfile

    if not _MLFLOW_TEMPLATE:
        mlflow = pytest.importorskip("mlflow")
        template = Path(tempfile.mkdtemp()) / "mlflow.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        _MLFLOW_TEMPLATE.append(template)
    shutil.copy(_MLFLOW_TEMPLATE[0], path)


# --- running a page's blocks ---------------------------------------------------------------


@dataclass
class PageSession:
    """One page's namespace, working directory and progress."""

    page: str
    workdir: Path
    namespace: dict[str, Any] = field(default_factory=dict)
    done: int = 0  # blocks run so far (by number)
    failed: str | None = None
    skipped: str | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        while self.cleanups:
            self.cleanups.pop()()


def _register_example_plugins(session: PageSession) -> Callable[[Callable[..., Any]], None]:
    def register(hook: Callable[..., Any]) -> None:
        from wrapcal.model import discovery

        package = types.SimpleNamespace(wrapcal_register_plugins=hook)
        manager = discovery.get_plugin_manager()
        manager.register(package, name=f"docs-example-{session.page}")
        session.cleanups.append(lambda: manager.unregister(package))

    return register


@contextlib.contextmanager
def _captured() -> Iterator[io.StringIO]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        yield out


def _run_python(code: str, first_line: int, where: str, namespace: dict[str, Any]) -> str:
    # Padding with blank lines makes a traceback give the line number in the Markdown.
    compiled = compile("\n" * (first_line - 1) + code, where, "exec")
    with _captured() as out:
        try:
            exec(compiled, namespace)
        except BaseException:
            namespace["output"] = out.getvalue()
            raise
    return out.getvalue()


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def _run_shell(code: str, where: str) -> str:
    from wrapcal.cli import main

    printed = []
    for argv in shell_commands(code):
        if argv[0] != "wrapcal":
            raise AssertionError(
                f"{where}: no runner for `{shlex.join(argv)}`: only `wrapcal ...` commands "
                "run here; exclude the block with <!-- example: skip (reason) -->"
            )
        with _captured() as out:
            status = main(argv[1:])
        printed.append(out.getvalue())
        assert status == 0, f"{where}: `{shlex.join(argv)}` exited {status}:\n{out.getvalue()}"
    return "".join(printed)


def _run_block(block: Block, session: PageSession) -> None:
    ns = session.namespace
    if block.setup:
        _run_python(block.setup[1], block.setup[0], f"{block.page} (setup)", ns)
    where = f"{block.page}"
    if block.kind == "python":
        output = _run_python(block.code, block.line + 1, where, ns)
    else:
        output = _run_shell(block.code, f"{block.id} (line {block.line})")
    ns["output"], ns["shown"] = output, block.shown
    if block.check:
        _run_python(block.check[1], block.check[0], f"{block.page} (check)", ns)


class _Sessions:
    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp = tmp
        self.by_page: dict[str, PageSession] = {}

    def get(self, page: str) -> PageSession:
        if page not in self.by_page:
            name = re.sub(r"\W", "_", page)
            session = PageSession(page, self.tmp.mktemp(name))
            session.namespace.update(
                __name__="__docs_example__",
                register_example_plugins=_register_example_plugins(session),
                fit_head=fit_head,
                mlflow_database=mlflow_database,
                page_text=(ROOT / page).read_text(encoding="utf-8"),
            )
            self.by_page[page] = session
        return self.by_page[page]

    def close(self) -> None:
        for session in self.by_page.values():
            session.close()


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Sessions]:
    made = _Sessions(tmp_path_factory)
    yield made
    made.close()


def _params() -> list[Any]:
    return [
        pytest.param(block, id=block.id, marks=[pytest.mark.slow] if block.slow else [])
        for block in RUN
    ]


@pytest.mark.parametrize("block", _params())
def test_example_runs(block: Block, sessions: _Sessions, monkeypatch: pytest.MonkeyPatch) -> None:
    session = sessions.get(block.page)
    monkeypatch.chdir(session.workdir)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    page_blocks = [b for b in RUN if b.page == block.page]
    # Run the page's earlier blocks first when this one is run alone (-k, -m "not slow").
    for earlier in page_blocks:
        if earlier.number <= session.done:
            continue
        if earlier.number >= block.number or session.failed or session.skipped:
            break
        _run_or_record(earlier, session)
    if session.failed:
        pytest.fail(f"an earlier block of {block.page} failed ({session.failed})")
    try:
        _run_or_record(block, session)
    finally:
        if block is page_blocks[-1]:
            session.close()


def _run_or_record(block: Block, session: PageSession) -> None:
    try:
        _run_block(block, session)
    except pytest.skip.Exception as skipped:
        session.skipped = f"{block.id}: {skipped}"
        raise
    except BaseException:
        if session.skipped:
            pytest.skip(f"an earlier block was skipped ({session.skipped})")
        session.failed = block.id
        raise
    finally:
        session.done = max(session.done, block.number)


# --- the count and the README's commands -------------------------------------------------


def test_every_block_is_run_or_excluded() -> None:
    # An independent count: every fence line opening a block in a runnable language.
    found = 0
    for page in PAGES:
        inside = False
        for line in (ROOT / page).read_text(encoding="utf-8").splitlines():
            fence = _FENCE.match(line)
            if fence:
                if not inside and fence.group("info").strip().split(" ")[0].lower() in RUNNABLE:
                    found += 1
                inside = not inside
    excluded = [block for block in BLOCKS if block.skip is not None]
    assert found >= MIN_BLOCKS
    assert found == len(RUN) + len(excluded), (found, len(RUN), len(excluded))
    assert len(excluded) <= MAX_EXCLUDED, [(b.id, b.skip) for b in excluded]
    assert all(len(b.skip) >= 10 for b in excluded), "each exclusion says why"


def test_every_fenced_block_names_its_language() -> None:
    # An unlabelled block could hide a command from the runner: label it (text for output).
    for page in PAGES:
        inside = False
        for number, line in enumerate((ROOT / page).read_text(encoding="utf-8").splitlines(), 1):
            fence = _FENCE.match(line)
            if fence:
                if not inside:
                    assert fence.group("info").strip(), f"{page}:{number}: a block with no language"
                inside = not inside


def test_readme_carries_its_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = {}
    for marker in ("demo-command", "test-command"):
        after = readme.split(f"<!-- {marker} -->", 1)[1]
        commands[marker] = after.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    setup = "python3 -m venv --clear .venv && .venv/bin/pip install -c constraints.txt -e "
    assert commands["demo-command"] == setup + ". && .venv/bin/wrapcal demo"
    assert commands["test-command"] == setup + '".[test]" && .venv/bin/python -m pytest'
    # What they name exists: the constraints file, the extra, the console script.
    assert (ROOT / "constraints.txt").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"^test = \[", pyproject, re.M)
    assert re.search(r'^wrapcal = "wrapcal\.cli:main"', pyproject, re.M)
    # Both are excluded from the runner (CI runs the test command; installing is not a test).
    skipped = {b.code.strip() for b in BLOCKS if b.page == "README.md" and b.skip}
    assert set(commands.values()) <= skipped


def test_index_quickstart_is_the_readmes() -> None:
    # docs/index.md's quickstart is excluded as a copy: it must stay one, word for word.
    def quickstart(page: str) -> str:
        text = (ROOT / page).read_text(encoding="utf-8").split("## Quickstart", 1)[1]
        return text.split("```python\n", 1)[1].split("```", 1)[0]

    assert quickstart("docs/index.md") == quickstart("README.md")
    readme = next(
        b
        for b in BLOCKS
        if b.page == "README.md" and b.code == quickstart("README.md").rstrip("\n")
    )
    assert readme.skip is None and readme.setup is not None
