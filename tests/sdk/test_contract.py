"""The plugin contract as a third-party author meets it: order, outputs, state, errors."""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SmallNet, sample_plugin_installed
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

import wrapcal
import wrapcal.datasets
from wrapcal import OutputKind, Plugin, Stage
from wrapcal.errors import DataError, SavedFileError
from wrapcal.model.assemble import find_split
from wrapcal.model.ordering import order_plugins

ROOT = Path(__file__).resolve().parents[2]


def make_data(n: int = 200, k: int = 10, seed: int = 0):
    """Inputs, and labels that a fixed SmallNet gets right two times in three."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    torch.manual_seed(seed)
    with torch.no_grad():
        y = SmallNet(num_classes=k).eval()(x).argmax(-1)
    y[::3] = torch.randint(0, k, y[::3].shape, generator=g)
    return x, y


def small_net(k: int = 10) -> SmallNet:
    """The SmallNet ``make_data`` labels by."""
    torch.manual_seed(0)
    return SmallNet(num_classes=k).eval()


class Shift(Plugin):
    """A calibrator that adds a fitted constant to one class's logit."""

    column = 0
    order_after: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift_", torch.zeros(()))

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.CALIBRATE
        tags.after = self.order_after
        tags.fit_requires = {"calibration": ""}
        return tags

    def fit(self, model, data):
        logits = model.head_logits(data.calibration.features)
        # Depends on the logits it is given, so two of these do not commute.
        self.shift_ = logits.std() - logits[:, self.column].mean()
        return self

    def transform_logits(self, logits):
        out = logits.clone()
        out[:, self.column] += self.shift_.to(logits.dtype)
        return out


class ShiftZ(Shift):
    column = 1


class ShiftA(Shift):
    column = 2
    order_after = ("ShiftZ",)  # by name it would come first; the declaration wins


class Sets(Plugin):
    """A decision plugin: the classes whose probability reaches a threshold."""

    def __init__(self, threshold: float = 0.15) -> None:
        super().__init__()
        self.threshold = threshold

    def __wrapcal_tags__(self):
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DECIDE
        tags.requires_fit = False
        tags.outputs = {"sets": OutputKind.SET, "set_size": OutputKind.UNCERTAINTY}
        return tags

    def outputs(self, context):
        self.seen = {"probs": context.probs, "outputs": dict(context.outputs)}
        sets = context.probs >= self.threshold
        return {"sets": sets, "set_size": sets.sum(-1).to(context.probs.dtype)}

    def report_metrics(self, prediction, labels):
        covered = prediction.sets.gather(1, labels[:, None]).squeeze(1).float()
        return {"coverage": {"value": float(covered.mean()), "percent": True}, "n": len(labels)}


def fitted_in_order(model, plugins, x, y):
    """A model with the plugins in exactly the given order (no ordering by the core)."""
    wrapped = wrapcal.WrappedModel(find_split(copy.deepcopy(model)), plugins)
    return wrapped.fit(calibration=(x, y), progress=False)


def test_two_third_party_calibrators_at_one_stage_give_one_model_in_any_order(tmp_path):
    x, y = make_data()
    model = small_net()
    with sample_plugin_installed(tmp_path):
        outs = []
        for names in (
            ["sample_vector_scaling", "temperature"],
            ["temperature", "sample_vector_scaling"],
        ):
            wrapped = wrapcal.wrap(model, names).fit(calibration=(x, y), progress=False)
            assert wrapped.plugin_names == ["sample_vector_scaling", "temperature"]  # by name
            outs.append(wrapped(x))
        assert torch.equal(outs[0], outs[1])
        # They do not commute: the other order is another model, so the tie-break matters.
        plugins = wrapcal.model.assemble.resolve_plugins(["sample_vector_scaling", "temperature"])[
            ::-1
        ]
        other = fitted_in_order(model, plugins, x, y)
        assert not torch.allclose(other(x), outs[0], atol=1e-4)


def test_declared_after_overrides_the_name_order_inside_a_stage() -> None:
    x, y = make_data()
    model = small_net()
    for plugins in ([ShiftA(), ShiftZ()], [ShiftZ(), ShiftA()]):
        wrapped = wrapcal.wrap(model, plugins)
        assert wrapped.plugin_names == ["ShiftZ", "ShiftA"]
    first = type("First", (Shift,), {"order_after": ("Second",)})
    second = type("Second", (Shift,), {"order_after": ("First",)})
    with pytest.raises(ValueError, match="First, Second name each other.*cycle"):
        order_plugins([("First", first()), ("Second", second())])
    with pytest.raises(ValueError, match="ShiftZ is listed twice"):
        wrapcal.wrap(model, [ShiftZ(), ShiftZ()])
    # Stages order before names: a TRAIN plugin named "zzz" still comes first.
    ordered = order_plugins([("aaa", Sets()), ("zzz", Shift())])
    assert [n for n, _ in ordered] == ["zzz", "aaa"]
    del x, y


def test_a_stage_must_be_a_stage() -> None:
    class Magic(Plugin):
        def __wrapcal_tags__(self):
            tags = super().__wrapcal_tags__()
            tags.stage = Stage.CALIBRATE + 10  # the plain int the old contract needed
            return tags

    with pytest.raises(TypeError, match=r"Magic: stage 70 is not a wrapcal.Stage.*after="):
        wrapcal.wrap(SmallNet(), [Magic()])


def test_decision_outputs_see_the_calibrated_probabilities_and_reach_the_prediction():
    x, y = make_data(n=300)
    sets = Sets()
    wrapped = wrapcal.wrap(small_net(), [sets, "temperature"])
    wrapped.fit(calibration=(x, y), progress=False)
    assert wrapped.plugin_names == ["temperature", "Sets"]
    pred = wrapped.predict(x[:50])
    assert torch.equal(sets.seen["probs"], pred.probs)  # the calibrated ones, exactly
    bare = torch.softmax(wrapped.head(wrapped.backbone(x[:50])), -1)
    assert not torch.allclose(bare, pred.probs, atol=1e-3)  # temperature moved them
    assert {"msp", "entropy", "energy"} <= set(sets.seen["outputs"])
    assert pred.sets.dtype == torch.bool and pred.sets.shape == (50, 10)
    assert torch.equal(pred.sets, pred.probs >= 0.15)
    assert torch.equal(pred.set_size, pred.sets.sum(-1).float())
    assert "set_size" in pred.scores and "sets" not in pred.scores
    assert pred.kinds["sets"] is OutputKind.SET
    assert pred.kinds["set_size"] is OutputKind.UNCERTAINTY
    # Several batches: every output is concatenated along the batch.
    batched = wrapped.predict(x, batch_size=64)
    assert torch.equal(batched.sets[:50], pred.sets) and batched.sets.shape == (300, 10)
    with pytest.raises(AttributeError, match="no output 'abstain'.*sets"):
        _ = pred.abstain


def test_the_harness_measures_scores_and_reports_the_plugins_metrics() -> None:
    x, y = make_data(n=300)
    wrapped = wrapcal.wrap(small_net(), [Sets()])
    noise = 3 * torch.randn(100, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    report = wrapcal.evaluate(
        {"sets": wrapped}, test=(x, y), ood={"noise": noise}, bootstrap=0, progress=False
    )
    data = report.to_dict()
    rows = data["ood"]["sets"]["noise"]
    assert "set_size" in rows and "sets" not in rows  # a set is not an OOD score
    assert data["models"]["sets"]["kinds"]["sets"] == "set"
    pred = wrapped.predict(x)
    covered = pred.sets[torch.arange(len(y)), y].float().mean().item()
    metrics = data["plugin_metrics"]["sets"]["Sets"]
    assert metrics["coverage"]["value"] == pytest.approx(covered)
    assert metrics["n"] == {"value": 300.0}
    markdown = report.to_markdown()
    assert "## Plugin metrics" in markdown
    assert f"| sets | Sets | coverage | {100 * covered:.2f} | — |" in markdown
    assert "<h2>Plugin metrics</h2>" in report.to_html()


def test_outputs_must_be_declared_and_shaped() -> None:
    class Undeclared(Plugin):
        def __wrapcal_tags__(self):
            tags = super().__wrapcal_tags__()
            tags.requires_fit = False
            return tags

        def outputs(self, context):
            return {"mystery": context.probs[:, 0]}

    class BadScore(Undeclared):
        def __wrapcal_tags__(self):
            tags = super().__wrapcal_tags__()
            tags.outputs = {"mystery": OutputKind.OOD_SCORE}
            return tags

        def outputs(self, context):
            return {"mystery": context.probs}  # [B, K], not [B]

    x, _ = make_data(n=8)
    with pytest.raises(ValueError, match=r"Undeclared: output 'mystery' is not declared"):
        wrapcal.wrap(small_net(), [Undeclared()]).predict(x)
    with pytest.raises(ValueError, match=r"BadScore: score 'mystery' must be a float tensor"):
        wrapcal.wrap(small_net(), [BadScore()]).predict(x)


def test_errors_a_plugin_raises_carry_its_name() -> None:
    class Fragile(Plugin):
        def __wrapcal_tags__(self):
            tags = super().__wrapcal_tags__()
            tags.fit_reads = ("train",)
            return tags

        def fit(self, model, data):
            raise FloatingPointError("the loss became NaN")

    x, y = make_data()
    with pytest.raises(FloatingPointError, match=r"^plugin Fragile: the loss became NaN$"):
        wrapcal.wrap(small_net(), [Fragile()]).fit(train=(x, y), progress=False)


def test_fit_reads_only_the_sets_plugins_declare_and_checks_them_first() -> None:
    x, y = make_data()
    wrapped = wrapcal.wrap(small_net(), ["temperature"])
    calls = []
    wrapped.backbone.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    with pytest.warns(UserWarning, match=r"no plugin reads train=, unlabeled=: they are ignored"):
        wrapped.fit(train=(x, y), calibration=(x[:50], y[:50]), unlabeled=x, progress=False)
    assert wrapped.backbone_passes == 1 and sum(calls) == 50  # calibration only
    calls.clear()
    fresh = wrapcal.wrap(small_net(), ["temperature", "discrepancy"])
    fresh.backbone.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    with pytest.raises(DataError, match=r"plugin discrepancy needs wrapped.fit\(unlabeled=...\)"):
        fresh.fit(train=(x, y), calibration=(x, y), progress=False)
    assert calls == []  # refused before any backbone pass


def test_state_of_any_shape_is_saved_and_restored_by_the_core(tmp_path) -> None:
    x, y = make_data(n=300, k=4)
    model = small_net(4)
    with sample_plugin_installed(tmp_path):
        wrapped = wrapcal.wrap(model, ["mahalanobis_sample"]).fit(train=(x, y), progress=False)
        plugin = wrapped.plugins[0]
        assert plugin.means_.shape == (4, 16) and plugin.means_.dtype == torch.float64
        path = wrapped.save(tmp_path / "m.wrapcal")
        loaded = wrapcal.load(path, model=model)
        assert torch.equal(loaded.plugins[0].means_, plugin.means_)
        assert torch.equal(
            loaded.predict(x).scores["mahalanobis"], wrapped.predict(x).scores["mahalanobis"]
        )
        # A tensor that breaks what the plugin declares (width != num_features) is refused,
        # at save already: save refuses what load would refuse, with load's words.
        plugin.means_ = torch.zeros(4, 3, dtype=torch.float64)
        with pytest.raises(SavedFileError, match=r"means_ is \(4, 3\).*declares \(None, 16\)"):
            wrapped.save(tmp_path / "bad.wrapcal")
        assert not (tmp_path / "bad.wrapcal").exists()


def test_sample_mahalanobis_equals_scipy_on_digits_features(tmp_path) -> None:
    data = wrapcal.datasets.digits()
    torch.manual_seed(0)
    model = small_net()
    with sample_plugin_installed(tmp_path):
        wrapped = wrapcal.wrap(model, ["mahalanobis_sample"]).fit(train=data.train, progress=False)
    with torch.no_grad():
        train = wrapped.backbone(data.train[0]).double().numpy()
        test = wrapped.backbone(data.test[0][:40]).double().numpy()
    labels = data.train[1].numpy()
    means = np.stack([train[labels == c].mean(0) for c in range(10)])
    centred = train - means[labels]
    # The plugin's cutoff: this small network's features leave near-null directions
    # (an eigenvalue 1.3e-13 of the largest), which only rounding noise fills.
    precision = np.linalg.pinv(centred.T @ centred / len(train), rtol=1e-10, hermitian=True)
    expected = [min(scipy_mahalanobis(f, m, precision) ** 2 for m in means) for f in test]
    got = wrapped.predict(data.test[0][:40]).scores["mahalanobis"].double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def readme_plugin_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Writing a plugin", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_plugin_example_runs_and_computes_what_it_says() -> None:
    namespace: dict = {}
    exec(compile(readme_plugin_example(), "README.md", "exec"), namespace)
    plugin = namespace["ClassMeanDistance"](power=1.0)
    data = wrapcal.datasets.digits()
    torch.manual_seed(0)
    wrapped = wrapcal.wrap(small_net(), [plugin]).fit(train=data.train, progress=False)
    with torch.no_grad():
        train = wrapped.backbone(data.train[0]).numpy()
        test = wrapped.backbone(data.test[0][:30]).numpy()
    labels = data.train[1].numpy()
    means = np.stack([train[labels == c].mean(0) for c in range(10)])
    expected = np.linalg.norm(test[:, None] - means[None], axis=-1).min(1)
    got = wrapped.predict(data.test[0][:30]).scores["class_distance"].numpy()
    # float32 distances of small features: cancellation in cdist's matrix form.
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=3e-5)


def _wrapcal_modules() -> dict[str, Path]:
    """Every module under ``wrapcal/`` by dotted name (a package by its own name)."""
    modules = {}
    for path in (ROOT / "wrapcal").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _import_nodes(tree: ast.Module, *, at_import_time: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module: all of them, or only those that run while the
    module is imported (not inside a function, not under ``if TYPE_CHECKING:``)."""
    if not at_import_time:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue  # runs when called, after the imports are done
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            else:  # class bodies, try/except, if/else, with: they run at import time
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit([n for n in getattr(node, field, []) if isinstance(n, ast.AST)])

    visit(tree.body)
    return found


def _import_graph(*, at_import_time: bool) -> dict[str, set[str]]:
    """Module -> the wrapcal modules it imports (``wrapcal/__init__`` left out: it runs
    before anything else, and no module below it imports it, see
    :func:`test_no_module_below_the_public_api_imports_it`).

    With ``at_import_time``, the imports that run while the module is imported, and for
    each the packages they run first: importing ``a.b.c`` runs ``a/b/__init__`` too,
    unless that package is the importer's own (it started before the importer did).
    """
    modules = _wrapcal_modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in _import_nodes(ast.parse(path.read_text()), at_import_time=at_import_time):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if not target or target in (name, "wrapcal"):
                    continue
                edges[name].add(target)
                if at_import_time:
                    dotted = target.split(".")
                    for package in (".".join(dotted[:i]) for i in range(2, len(dotted))):
                        if package != name and not name.startswith(package + "."):
                            edges[name].add(package)
    return edges


def _modules_on_cycles(edges: dict[str, set[str]]) -> list[str]:
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges[start]:
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False

    return sorted(m for m in edges if reaches(m, m, set()))


def test_no_import_cycles_inside_wrapcal() -> None:
    """Every import counts: under TYPE_CHECKING and inside functions too (the layers)."""
    edges = _import_graph(at_import_time=False)
    cycles = _modules_on_cycles(edges)
    assert len(edges) > 20 and not cycles, f"modules on an import cycle: {cycles}"


def test_no_import_cycles_through_package_inits() -> None:
    """What runs while a module is imported, whichever module a program imports first:
    importing ``wrapcal.plugin.validation`` runs ``wrapcal/plugin/__init__`` first, so a
    module that package's ``__init__`` imports must not import ``wrapcal.plugin.*`` back
    (it would find the package half-built: ``wrapcal.data`` once did, and
    ``import wrapcal.features.extract`` failed with "cannot import name 'iter_batches'
    from partially initialized module 'wrapcal.data'" when nothing had imported the SDK
    before it). A package importing its own modules is fine: they run inside its
    ``__init__``, after it started."""
    edges = _import_graph(at_import_time=True)
    assert "wrapcal.plugin" in edges["wrapcal.data"]  # the package edges are there
    cycles = _modules_on_cycles(edges)
    assert not cycles, f"modules on an import cycle through a package's __init__: {cycles}"


# Imports every module named in argv[2] first, each in a child forked from a process that
# holds no wrapcal module yet (third-party modules preloaded, so each child is quick), with
# ``wrapcal/__init__`` replaced by an empty package: it would otherwise import half the
# core first and hide an order dependence between the modules below it.
_IMPORT_FIRST = """
import importlib, json, os, sys, types

root, names = sys.argv[1], json.loads(sys.argv[2])


def in_child(job):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            out = job()
        except BaseException as err:
            out = f"{type(err).__name__}: {err}"
        os.write(write, out.encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def third_party():
    for name in names:
        importlib.import_module(name)
    own = {"wrapcal", "wrapcal_plugins", "__main__"}
    return json.dumps(sorted({m.split(".")[0] for m in sys.modules} - own))


for module in json.loads(in_child(third_party)):
    try:
        importlib.import_module(module)
    except Exception:
        pass  # the child imports it itself


def first(name):
    def job():
        bare = types.ModuleType("wrapcal")
        bare.__path__ = [os.path.join(root, "wrapcal")]
        sys.modules["wrapcal"] = bare
        importlib.import_module(name)
        return ""

    return job


print(json.dumps({name: out for name in names if (out := in_child(first(name)))}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="imports each module in a forked child")
def test_every_module_imports_first_in_a_fresh_process() -> None:
    """The order-independence the graph above claims, checked: every module of
    ``wrapcal`` imported first, in a process that has imported no other."""
    names = sorted(n for n in _wrapcal_modules() if n != "wrapcal" and "__main__" not in n)
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_FIRST, str(ROOT), json.dumps(names)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, "modules that fail when imported first:\n" + "\n".join(
        f"{name}: {error}" for name, error in failed.items()
    )


def _imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every absolute import in a file, in functions and
    ``TYPE_CHECKING`` blocks too (``import a.b`` gives ``("a.b", [])``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_built_in_plugins_import_only_wrapcal_and_the_plugin_sdk() -> None:
    """The built-ins prove the SDK: what they need, a third party finds in ``wrapcal``
    (its public names) and ``wrapcal.plugin``; nothing deeper that a refactor may move."""
    public = set(wrapcal.__all__)
    files = sorted((ROOT / "wrapcal_plugins").rglob("*.py"))
    assert len(files) > 20
    wrong = []
    for path in files:
        for module, names in _imports_of(path):
            if module in ("wrapcal.plugin", "wrapcal_plugins") or module.startswith(
                "wrapcal_plugins."
            ):
                continue
            if module == "wrapcal":
                wrong += [f"{path.name}: from wrapcal import {n}" for n in names if n not in public]
            elif module.startswith("wrapcal."):
                wrong.append(f"{path.relative_to(ROOT)}: {module}")
    assert not wrong, "built-in plugins reach into the core:\n" + "\n".join(wrong)


def test_the_sdk_exports_every_name_it_lists() -> None:
    import wrapcal.plugin as sdk

    missing = [name for name in sdk.__all__ if not hasattr(sdk, name)]
    assert not missing and len(set(sdk.__all__)) == len(sdk.__all__), missing
    for name in ("Plugin", "Calibrator", "Stage", "OutputKind", "PluginTags", "OutputContext"):
        assert getattr(sdk, name) is getattr(wrapcal, name)


def test_the_sdk_offers_the_shard_helpers_and_imports_nothing_above_it() -> None:
    """A shard-aware plugin finds the failure-aware collectives in the SDK; the SDK's
    package imports only its own modules and the errors at first (the rest on use)."""
    import wrapcal.distributed
    import wrapcal.errors
    import wrapcal.plugin as sdk

    for name in ("active", "rank", "world", "gather_rows", "exchange"):
        assert getattr(sdk, name) is getattr(wrapcal.distributed, name), name
    assert sdk.DistributedError is wrapcal.errors.DistributedError
    assert wrapcal.distributed.DistributedError is wrapcal.errors.DistributedError
    assert issubclass(sdk.DistributedError, (wrapcal.WrapcalError, RuntimeError))
    eager = {
        module
        for node in _import_nodes(
            ast.parse((ROOT / "wrapcal/plugin/__init__.py").read_text()), at_import_time=True
        )
        if isinstance(node, ast.ImportFrom)
        for module in [node.module or ""]
    }
    above = sorted(
        m
        for m in eager
        if m.startswith("wrapcal.") and not m.startswith(("wrapcal.plugin.", "wrapcal.errors"))
    )
    assert not above, f"wrapcal/plugin/__init__.py imports layers above the SDK: {above}"


def test_the_floor_plan_keeps_at_most_eight_modules_at_the_top() -> None:
    top = sorted(
        p.name
        for p in (ROOT / "wrapcal").glob("*.py")
        if p.name not in ("__init__.py", "__main__.py", "_version.py")
    )
    assert len(top) <= 8, top
    for room in ("plugin", "features", "model", "files", "logits", "metrics", "report"):
        assert (ROOT / "wrapcal" / room / "__init__.py").is_file(), room


def test_no_module_below_the_public_api_imports_it() -> None:
    """Only the command line (the top layer) may use ``wrapcal``'s public names; every
    other module imports the module that holds what it needs (``from wrapcal import
    distributed`` names a submodule, which is fine)."""
    package = ROOT / "wrapcal"
    submodules = {p.stem for p in package.glob("*.py")} | {
        p.name for p in package.iterdir() if p.is_dir()
    }
    wrong = []
    for path in package.rglob("*.py"):
        rel = path.relative_to(package)
        if rel.parts[0] in ("cli", "__init__.py"):
            continue
        for module, names in _imports_of(path):
            if module == "wrapcal" and not names:
                wrong.append(f"{rel}: import wrapcal")
            elif module == "wrapcal":
                wrong += [f"{rel}: from wrapcal import {n}" for n in names if n not in submodules]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("wrapcal.params", "wrapcal.plugin.constraints", "Interval"),
        ("wrapcal.cache", "wrapcal.features.extract", "FitData"),
        ("wrapcal.calibrator", "wrapcal.logits.calibrators", "fit_calibrator"),
        ("wrapcal.calibrator", "wrapcal.plugin.calibrator", "Calibrator"),
        ("wrapcal.manager", "wrapcal.model.discovery", "plugin_registry"),
        ("wrapcal_plugins.knn", "wrapcal_plugins.ood.knn", "KNN"),
    ],
)
def test_the_import_paths_of_0_2_0_still_work_and_warn(old: str, new: str, name: str) -> None:
    """A package written against 0.2.0's paths keeps working for this release, with the
    very same objects, and is told where they moved."""
    code = (
        "import warnings, importlib\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        f"assert getattr(old, {name!r}) is getattr(new, {name!r})\n"
        "assert any(issubclass(w.category, DeprecationWarning) and "
        f"{new!r} in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_0_2_0_names_that_moved_between_modules_still_resolve() -> None:
    """``wrapcal_plugins.conformal`` listed ``interval`` and ``bootstrap_means`` (the
    report's bootstrap, the SDK's now); an old module that became several lists the
    names of all (``from old import *``); the real ``wrapcal.plugin`` package is never
    shadowed by an old path."""
    from wrapcal import _compat

    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import wrapcal_plugins.conformal as old\n"
        "    import wrapcal.calibrator as merged\n"
        "import wrapcal.plugin as sdk\n"
        "import wrapcal_plugins.decide.conformal as new\n"
        "assert old.interval is sdk.percentile_interval\n"
        "assert old.bootstrap_means is sdk.bootstrap_means\n"
        "assert old.ConformalSets is new.ConformalSets\n"
        "assert set(old.__all__) == {'ConformalSets', 'bootstrap_means', 'interval', "
        "'set_metrics'}, old.__all__\n"
        "assert {'Calibrator', 'fit_calibrator'} <= set(merged.__all__), merged.__all__\n"
        "assert all(hasattr(merged, n) for n in merged.__all__)\n"
        "namespace = {}\n"
        "exec('from wrapcal_plugins.conformal import *', namespace)\n"
        "assert namespace['interval'] is sdk.percentile_interval\n"
        "assert any('its interval is wrapcal.plugin.percentile_interval' in str(w.message) "
        "for w in caught), [str(w.message) for w in caught]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrapcal.plugin" not in _compat.MOVED  # the package itself is always found first
