"""Features on disk: reused across runs, bounded memory for the plugins, never stale or
half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SmallNet

import wrapcal
from wrapcal.features.disk_arrays import DiskFeatures, DiskWriter
from wrapcal.features.disk_store import DiskCache
from wrapcal.features.memory_store import CACHE

ROOT = Path(__file__).resolve().parents[2]


def entries(cache_dir: Path) -> list[Path]:
    """The folders in wrapcal's own folder of a cache directory (entries and partials)."""
    return [p for p in (cache_dir / "wrapcal-features-v2").iterdir() if p.is_dir()]


def labelled(n: int, seed: int, model: torch.nn.Module):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::3] = torch.randint(0, 10, y[::3].shape, generator=g)
    return x, y


def small_net() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet().eval()


class Counter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.images = 0
        module.register_forward_hook(lambda m, i, o: setattr(self, "images", self.images + len(o)))


def test_disk_features_read_the_rows_asked_for(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((1000, 7)).astype(np.float32)
    writer = DiskWriter(tmp_path / "entry", "float32")
    for start in range(0, 1000, 128):
        writer.append(torch.from_numpy(rows[start : start + 128]), None)
    meta = writer.finish({"probe": None})
    assert meta["rows"] == 1000 and meta["width"] == 7
    disk = DiskFeatures(tmp_path / "entry" / "features.bin", 1000, 7)
    assert disk.shape == (1000, 7) and len(disk) == 1000
    np.testing.assert_array_equal(disk[:].numpy(), rows)
    np.testing.assert_array_equal(disk[10:250:3].numpy(), rows[10:250:3])
    picks = torch.from_numpy(rng.integers(0, 1000, 300))
    np.testing.assert_array_equal(disk[picks].numpy(), rows[picks.numpy()])
    np.testing.assert_array_equal(disk[-1].numpy(), rows[-1])
    with pytest.raises(IndexError):
        disk[torch.tensor([1000])]
    half = DiskWriter(tmp_path / "half", "float16")
    half.append(torch.from_numpy(rows), None)
    half.finish({})
    low = DiskFeatures(tmp_path / "half" / "features.bin", 1000, 7, "float16")
    assert low[:].dtype == torch.float32
    np.testing.assert_allclose(low[:].numpy(), rows, rtol=1e-3, atol=1e-3)
    assert (tmp_path / "half" / "features.bin").stat().st_size == 1000 * 7 * 2


def test_a_cache_directory_skips_the_backbone_in_a_later_run(tmp_path):
    model = small_net()
    cal = labelled(300, 1, model)
    first = wrapcal.wrap(model, ["temperature"])
    counter = Counter(first.backbone)
    first.fit(calibration=cal, progress=False, cache_dir=tmp_path)
    assert counter.images == 300
    CACHE.clear()  # a new process has no memory cache: only the directory
    again = wrapcal.wrap(model, ["temperature"])
    counter = Counter(again.backbone)
    again.fit(calibration=cal, progress=False, cache_dir=tmp_path)
    assert counter.images == 0 and again.backbone_passes == 0
    assert again.plugins[0].temperature_ == first.plugins[0].temperature_
    # Changed data: a new entry, never the old one.
    other = (cal[0] + 0.5, cal[1])
    changed = wrapcal.wrap(model, ["temperature"]).fit(
        calibration=other, progress=False, cache_dir=tmp_path
    )
    assert changed.backbone_passes == 1
    assert len(entries(tmp_path)) == 2
    # wrapcal wrote only inside its own folder.
    assert [p.name for p in tmp_path.iterdir()] == ["wrapcal-features-v2"]


def test_every_built_in_plugin_fits_from_disk_as_from_memory(tmp_path):
    model = small_net()
    train, cal = labelled(400, 1, model), labelled(300, 2, model)
    unlabeled = torch.randn(200, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2
    # she stores a pattern per class from correctly classified training samples, and
    # this random net predicts 2 of its 10 classes: it refuses to fit (as it should).
    names = sorted(n for n in wrapcal.plugin_registry() if n not in ("auto_calibration", "she"))
    plugins = [(n, {"epochs_pretrain": 1, "epochs": 1}) if n == "discrepancy" else n for n in names]
    results = []
    for cache_dir in (None, tmp_path):
        CACHE.clear()
        for plugin in plugins:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wrapped = wrapcal.wrap(model, [plugin])
                reads, _ = wrapcal.model.fitting.read_sets(wrapped)
                sets = {"train": train, "calibration": cal, "unlabeled": unlabeled}
                wrapped.fit(
                    **{k: v for k, v in sets.items() if k in reads},
                    progress=False,
                    cache_dir=cache_dir,
                )
            results.append(wrapped.predict(cal[0][:64]))
    half = len(results) // 2
    for memory, disk, plugin in zip(results[:half], results[half:], plugins, strict=True):
        assert torch.equal(memory.logits, disk.logits), plugin
        for score in memory.scores:
            assert torch.equal(memory.scores[score], disk.scores[score]), (plugin, score)


def test_label_smoothing_switches_to_mini_batches_above_the_memory_budget(tmp_path, monkeypatch):
    import wrapcal_plugins.retrain.label_smoothing as ls

    model = small_net()
    train = labelled(600, 1, model)
    exact = wrapcal.wrap(model, [("label_smoothing", {"alpha": 0.05})])
    exact.fit(train=train, progress=False, cache_dir=tmp_path)
    in_memory = wrapcal.wrap(model, [("label_smoothing", {"alpha": 0.05})])
    in_memory.fit(train=train, progress=False, cache=False)
    x = train[0][:50]
    with torch.no_grad():
        assert torch.equal(exact(x), in_memory(x))  # the same exact solve
    monkeypatch.setattr(ls, "FULL_BATCH_BYTES", 1024)  # pretend it does not fit
    monkeypatch.setattr(ls, "LARGE_BATCH", 64)  # small data: more steps per epoch
    batched = wrapcal.wrap(model, [("label_smoothing", {"alpha": 0.05, "epochs": 30})])
    batched.fit(train=train, progress=False, cache_dir=tmp_path)
    with torch.no_grad():
        agree = (batched(x).argmax(-1) == exact(x).argmax(-1)).float().mean()
        gap = (batched(x).softmax(-1) - exact(x).softmax(-1)).abs().max()
    assert agree >= 0.9 and gap < 0.2  # the same objective, minimised by Adam instead


def test_half_written_entries_are_rebuilt_never_read(tmp_path):
    model = small_net()
    cal = labelled(200, 1, model)
    wrapcal.wrap(model, ["temperature"]).fit(calibration=cal, progress=False, cache_dir=tmp_path)
    (entry,) = entries(tmp_path)
    features = entry / "features.bin"
    features.write_bytes(features.read_bytes()[:-40])  # truncated by a crash
    CACHE.clear()
    rebuilt = wrapcal.wrap(model, ["temperature"])
    rebuilt.fit(calibration=cal, progress=False, cache_dir=tmp_path)
    assert rebuilt.backbone_passes == 1
    meta = json.loads((entry / "meta.json").read_text())
    assert features.stat().st_size == meta["rows"] * meta["width"] * 4
    # An entry without its meta.json (the process died before it) is rebuilt too.
    (entry / "meta.json").unlink()
    CACHE.clear()
    assert (
        wrapcal.wrap(model, ["temperature"])
        .fit(calibration=cal, progress=False, cache_dir=tmp_path)
        .backbone_passes
        == 1
    )


# The child process: a data set that, once a few batches have been written to the cache,
# says so on stdout and then blocks for good, so the parent kills it mid-write on a
# signal it waits for (no timing guesses). Written out whole: no imports from tests/.
KILLED_WRITER = """
import sys, threading, torch
from torch import nn
from torch.utils.data import Dataset
import wrapcal

class Blocking(Dataset):
    def __init__(self, n, block_at):
        self.x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(7))
        self.block_at = block_at

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.block_at:
            print("blocked", flush=True)
            threading.Event().wait()
        return self.x[i], i % 10

torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
wrapcal.wrap(model, ["temperature"]).fit(
    calibration=Blocking(100000, block_at=64 * 4), batch_size=64, progress=False,
    cache_dir=sys.argv[1])
"""


def test_a_run_killed_half_way_leaves_nothing_that_is_read(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        # Blocks until the child has written four batches and stopped inside the fifth.
        assert process.stdout.readline().strip() == "blocked"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    partial = list((tmp_path / "wrapcal-features-v2").glob("*.partial-*"))
    assert partial and (partial[0] / "features.bin").stat().st_size > 0
    assert not (partial[0] / "meta.json").exists()
    store = DiskCache(tmp_path)  # a new run: the dead writer's folder is removed
    assert not entries(tmp_path) and store.hits == 0


def test_evaluate_shares_a_cache_directory_with_fit(tmp_path):
    model = small_net()
    cal, test = labelled(200, 1, model), labelled(150, 2, model)
    wrapped = wrapcal.wrap(model, ["temperature"]).fit(
        calibration=cal, progress=False, cache_dir=tmp_path
    )
    report = wrapcal.evaluate(
        {"w": wrapped}, test=test, bootstrap=0, progress=False, cache_dir=tmp_path
    )
    CACHE.clear()
    counter = Counter(wrapped.backbone)
    again = wrapcal.evaluate(
        {"w": wrapped}, test=test, bootstrap=0, progress=False, cache_dir=tmp_path
    )
    assert counter.images == 0
    assert again.calibration["w"] == report.calibration["w"]


# --- the FeatureStore protocol and the wrapped model's feature pass ----------------------


def _protocol_methods(protocol: type) -> dict[str, list[str]]:
    import inspect

    return {
        name: list(inspect.signature(member).parameters)
        for name, member in vars(protocol).items()
        if callable(member) and not name.startswith("_")
    }


def test_memory_and_disk_stores_implement_the_feature_store_protocol(tmp_path):
    import inspect

    from wrapcal.features.extract import FeatureSink, MemorySink
    from wrapcal.features.memory_store import FeatureCache
    from wrapcal.features.store import FeatureStore

    wanted = _protocol_methods(FeatureStore)
    assert set(wanted) == {"lookup", "candidates", "forget", "new_sink", "store", "discard"}
    for store in (FeatureCache(), DiskCache(tmp_path / "store")):
        for name, params in wanted.items():
            got = list(inspect.signature(getattr(type(store), name)).parameters)
            assert got == params, (type(store).__name__, name)
        assert isinstance(store.enabled, bool) and store.hits == store.misses == 0
        sink = store.new_sink("model")
        for method in _protocol_methods(FeatureSink):
            assert callable(getattr(sink, method)), (type(sink).__name__, method)
        store.discard(sink)
    assert set(_protocol_methods(FeatureSink)) == {"append", "finish"}
    assert all(callable(getattr(MemorySink(), m)) for m in ("append", "finish"))
    # A disk store completes only the sinks it made: a foreign one is refused clearly.
    with pytest.raises(TypeError, match=r"only the sinks it made .*got MemorySink"):
        DiskCache(tmp_path / "other").discard(MemorySink())


def test_features_of_runs_the_backbone_once_per_store(tmp_path):
    model = small_net()
    wrapped = wrapcal.wrap(model)
    x, y = labelled(90, seed=4, model=model)
    with torch.no_grad():
        expected = wrapped.backbone(x)
    store = DiskCache(tmp_path / "features")
    first, ran = wrapped.features_of((x, y), "probe", batch_size=32, cache=store)
    assert ran and isinstance(first.features, DiskFeatures)
    torch.testing.assert_close(first.features[:], expected)
    assert torch.equal(first.labels, y) and first.input_shape == (3, 8, 8)
    again, ran_again = wrapped.features_of((x, y), "probe", batch_size=32, cache=store)
    assert not ran_again and (store.hits, store.misses) == (1, 1)
    torch.testing.assert_close(again.features[:], expected)
    # No store: the backbone runs every time, features in memory.
    plain, ran_plain = wrapped.features_of(x, cache=False)
    assert ran_plain and plain.labels is None
    torch.testing.assert_close(plain.features, expected)
    # Inputs are refused by the same check as predict's (prepare).
    with pytest.raises(wrapcal.DataError, match="dtype torch.int64"):
        wrapped.features_of(torch.zeros(4, 3, 8, 8, dtype=torch.long), cache=False)
    assert wrapped.stand_in(x[:5]).shape == (1, 3, 8, 8)
