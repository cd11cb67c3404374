"""The disk and memory feature caches under hostile input (issue 30): the cache touches
only what it made, never serves a tampered, symlinked or stale entry, and never replaces
the user's labels."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import wrapcal
from wrapcal.features import disk_store
from wrapcal.features.disk_store import DiskCache
from wrapcal.features.fingerprint import backbone_fingerprint
from wrapcal.features.memory_store import CACHE


class Net(nn.Module):
    """A small classifier; ``Doubled`` below differs from it only in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.out(torch.relu(self.hidden(h)))


class Doubled(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.out(torch.relu(self.hidden(h * 2)))


# Same name, module and modules as Net: only the source of forward differs.
Doubled.__name__ = Doubled.__qualname__ = "Net"


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def labelled(n: int, seed: int, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::2] = torch.randint(0, 10, y[::2].shape, generator=g)  # a model worth calibrating
    return x, y


def fit(model: nn.Module, cal, cache_dir: Path | None, **kwargs) -> wrapcal.WrappedModel:
    return wrapcal.wrap(model, ["temperature"]).fit(
        calibration=cal, progress=False, cache_dir=cache_dir, **kwargs
    )


def temperature(wrapped) -> float:
    return float(wrapped.plugins[0].temperature_)


def entry_dirs(cache_dir: Path) -> list[Path]:
    """Complete entries, wherever the layout puts them under ``cache_dir``."""
    return sorted(p.parent for p in cache_dir.rglob("meta.json"))


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    CACHE.clear()
    yield
    CACHE.clear()


@pytest.fixture
def cached(tmp_path):
    """A cache directory holding the entry of one labelled set, the set, and the
    temperature a fit without any cache finds."""
    model = net()
    cal = labelled(120, 1, model)
    truth = temperature(fit(model, cal, None, cache=False))
    assert temperature(fit(model, cal, tmp_path)) == pytest.approx(truth)
    CACHE.clear()  # a later run: only the directory
    (entry,) = entry_dirs(tmp_path)
    return model, cal, truth, entry, tmp_path


def refit(model, cal, cache_dir) -> tuple[wrapcal.WrappedModel, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = fit(model, cal, cache_dir)
    return wrapped, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


# --- data loss: the cache touches only what it made --------------------------------------


def test_user_folders_named_partial_in_cache_dir_survive_a_fit(tmp_path):
    mine = {
        "thesis.partial-draft/chapter1.tex": b"\\chapter{One}",
        "photos.partial-2023/img001.jpg": b"\xff\xd8jpeg",
        "net.partial-999999999-deadbeef/features.bin": b"a user's, named as wrapcal v1's",
        "notes.txt": b"keep me",
    }
    for name, data in mine.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    model = net()
    fit(model, labelled(60, 1, model), tmp_path)
    DiskCache(tmp_path)  # a later run's clean-up too
    for name, data in mine.items():
        assert (tmp_path / name).read_bytes() == data, name


def test_a_folder_named_as_wrapcals_but_not_made_by_it_is_refused_untouched(tmp_path):
    theirs = tmp_path / "wrapcal-features-v2"
    theirs.mkdir()
    (theirs / "x.partial-1-deadbeef").mkdir()
    (theirs / "data.csv").write_text("1,2,3")
    with pytest.raises(FileExistsError, match=r"not wrapcal's .*pass another cache_dir"):
        DiskCache(tmp_path)
    assert (theirs / "data.csv").read_text() == "1,2,3"
    assert (theirs / "x.partial-1-deadbeef").is_dir()
    # A link in its place is refused too: wrapcal's folder is a real folder.
    other = tmp_path / "other"
    other.mkdir()
    (other / "theirs").mkdir()
    (other / "wrapcal-features-v2").symlink_to(theirs, target_is_directory=True)
    with pytest.raises(FileExistsError, match="not a folder"):
        DiskCache(other)


# A writer in another PID namespace (a container on the same scratch disk): the pid in
# its folder's name means nothing here (no such process). It holds its folder's lock,
# says so, waits for the parent's clean-up, then completes its entry.
FOREIGN_WRITER = """
import os, sys, torch
os.getpid = lambda: 999999999  # the pid it has in its own namespace
from wrapcal.features.disk_store import DiskCache
from wrapcal.features.extract import FeatureSet

cache = DiskCache(sys.argv[1])
sink = cache.new_sink("m" * 32)
sink.append(torch.ones(4, 3), torch.arange(4))
print(sink.writer.folder, flush=True)
sys.stdin.readline()  # the parent cleans meanwhile
sink.append(torch.ones(4, 3), torch.arange(4))
done = FeatureSet("x", sink.finish(), torch.arange(8).repeat(1), None, (3,))
stored = cache.store("m" * 32, "d" * 32, done, None, sink)
print("stored", len(stored.features), flush=True)
"""


def test_a_live_writer_from_another_pid_namespace_keeps_its_folder(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", FOREIGN_WRITER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        partial = Path(child.stdout.readline().strip())
        assert ".partial-999999999-" in partial.name and partial.is_dir()
        DiskCache(tmp_path)  # another process's clean-up: the writer is alive
        assert partial.is_dir() and (partial / "features.bin").is_file()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "stored 8"
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == 0 and not partial.exists()
    assert len(entry_dirs(tmp_path)) == 1


def test_a_partial_is_removed_only_once_its_lock_is_free(tmp_path):
    cache = DiskCache(tmp_path)
    sink = cache.new_sink("m" * 32)
    sink.append(torch.ones(2, 3), None)
    folder = sink.writer.folder
    DiskCache(tmp_path)  # this process holds the lock: a live writer
    assert folder.is_dir()
    sink.lease.release()  # as when its process dies
    DiskCache(tmp_path)
    assert not folder.exists()
    # A staging folder (a writer died while taking its lock) goes only once it is old.
    staging = cache.root / ".staging-5-0123abcd"
    staging.mkdir()
    DiskCache(tmp_path)
    assert staging.is_dir()
    old = time.time() - 2 * disk_store.STAGING_AGE
    os.utime(staging, (old, old))
    DiskCache(tmp_path)
    assert not staging.exists()


def test_without_fcntl_a_partial_is_removed_only_when_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_store, "fcntl", None)
    cache = DiskCache(tmp_path)
    sink = cache.new_sink("m" * 32)
    sink.append(torch.ones(2, 3), None)
    folder = sink.writer.folder
    owner = json.loads((folder / "owner.json").read_text())
    assert owner["pid"] == os.getpid() and owner["host"] and owner["started"] > 0
    DiskCache(tmp_path)
    assert folder.is_dir()  # fresh: kept, whoever wrote it
    old = time.time() - 2 * disk_store.STALE_AGE
    for path in [folder, *folder.iterdir()]:
        os.utime(path, (old, old), follow_symlinks=False)
    DiskCache(tmp_path)
    assert not folder.exists()


# --- silent wrong answers: tampered, symlinked and stale entries --------------------------


def _rewrite_features(entry: Path, change) -> None:
    path = entry / "features.bin"
    rows = np.fromfile(path, dtype=np.float32)
    change(rows)
    rows.tofile(path)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda r: r.__imul__(3), id="features-x3"),
        pytest.param(lambda r: r.view(np.uint32).__ixor__(np.uint32(1 << 31)), id="sign-bits"),
        pytest.param(lambda r: r.__setitem__(7, -r[7]), id="one-sign-bit"),
    ],
)
def test_tampered_features_are_rebuilt_never_served(cached, tamper):
    model, cal, truth, entry, cache_dir = cached
    _rewrite_features(entry, tamper)
    wrapped, warned = refit(model, cal, cache_dir)
    assert wrapped.backbone_passes == 1
    assert temperature(wrapped) == pytest.approx(truth)
    assert any("digest" in w for w in warned), warned
    again, _ = refit(model, cal, cache_dir)  # the rebuilt entry is sound
    assert again.backbone_passes == 0 and temperature(again) == pytest.approx(truth)


@pytest.mark.parametrize("digest_too", [False, True], ids=["labels", "labels-and-digest"])
def test_edited_labels_never_replace_the_users(cached, digest_too):
    import hashlib

    model, cal, truth, entry, cache_dir = cached
    with torch.no_grad():
        confident = model(cal[0]).argmax(-1).numpy().astype(np.int64)  # T well below 1
    (entry / "labels.bin").write_bytes(confident.tobytes())
    if digest_too:  # an attacker who also fixes the digest in meta.json
        meta = json.loads((entry / "meta.json").read_text())
        meta["labels_digest"] = hashlib.sha256(confident.tobytes()).hexdigest()
        (entry / "meta.json").write_text(json.dumps(meta))
    wrapped, warned = refit(model, cal, cache_dir)
    assert wrapped.backbone_passes == 1 and warned
    assert temperature(wrapped) == pytest.approx(truth)
    assert np.array_equal(np.fromfile(entry / "labels.bin", dtype=np.int64), cal[1].numpy())


def two_entries(cache_dir: Path):
    """A model and two data sets cached in ``cache_dir``: ``(model, a, a's temperature
    fitted without any cache, a's entry, b's entry)``, the memory cache emptied."""
    model = net()
    a, b = labelled(100, 1, model), labelled(100, 2, model)
    truth_a = temperature(fit(model, a, None, cache=False))
    fit(model, a, cache_dir)
    fit(model, b, cache_dir)
    CACHE.clear()
    entry_a, entry_b = entry_dirs(cache_dir)
    if (entry_a / "labels.bin").read_bytes() != a[1].numpy().tobytes():
        entry_a, entry_b = entry_b, entry_a
    return model, a, truth_a, entry_a, entry_b


def test_a_symlinked_entry_is_refused_and_its_target_kept(tmp_path):
    model, a, truth_a, entry_a, entry_b = two_entries(tmp_path)
    before = {p.name: p.read_bytes() for p in entry_b.iterdir()}
    shutil.rmtree(entry_a)
    entry_a.symlink_to(entry_b, target_is_directory=True)  # a's entry serves b's data?
    wrapped, warned = refit(model, a, tmp_path)
    assert wrapped.backbone_passes == 1 and warned
    assert temperature(wrapped) == pytest.approx(truth_a)
    assert {p.name: p.read_bytes() for p in entry_b.iterdir()} == before  # not followed
    assert not entry_a.is_symlink()  # rebuilt as a real entry


def test_an_entry_copied_under_another_key_is_refused(tmp_path):
    """A real copy, not a link: its meta.json names the key it was written for."""
    model, a, truth_a, entry_a, entry_b = two_entries(tmp_path)
    shutil.rmtree(entry_a)
    shutil.copytree(entry_b, entry_a)
    wrapped, warned = refit(model, a, tmp_path)
    assert wrapped.backbone_passes == 1 and warned
    assert temperature(wrapped) == pytest.approx(truth_a)
    assert (entry_b / "meta.json").is_file()


@pytest.mark.parametrize("name", ["features.bin", "labels.bin", "meta.json"])
def test_an_entry_whose_files_are_symlinks_is_refused(tmp_path, name):
    model, a, truth_a, entry_a, entry_b = two_entries(tmp_path)
    target = entry_b / name
    kept = target.read_bytes()
    (entry_a / name).unlink()
    (entry_a / name).symlink_to(target)
    wrapped, warned = refit(model, a, tmp_path)
    assert wrapped.backbone_passes == 1 and warned
    assert temperature(wrapped) == pytest.approx(truth_a)
    assert target.read_bytes() == kept and not (entry_a / name).is_symlink()


def test_a_changed_forward_gets_fresh_features_on_disk(tmp_path):
    plain = net()
    cal = labelled(120, 1, plain)
    doubled = Doubled().eval()
    doubled.load_state_dict(plain.state_dict())
    truth = temperature(fit(doubled, cal, None, cache=False))
    assert truth != pytest.approx(temperature(fit(plain, cal, None, cache=False)))
    fit(plain, cal, tmp_path)
    CACHE.clear()
    wrapped = fit(doubled, cal, tmp_path)
    assert wrapped.backbone_passes == 1 and temperature(wrapped) == pytest.approx(truth)


def test_a_changed_forward_gets_fresh_features_in_memory():
    plain = net()
    cal = labelled(120, 1, plain)
    doubled = Doubled().eval()
    doubled.load_state_dict(plain.state_dict())
    truth = temperature(fit(doubled, cal, None, cache=False))
    CACHE.clear()
    fit(plain, cal, None)  # the default: the process-wide memory cache
    wrapped = fit(doubled, cal, None)
    assert wrapped.backbone_passes == 1 and temperature(wrapped) == pytest.approx(truth)


def test_the_fingerprint_covers_code_buffers_and_the_users_extension():
    model = net()
    base = backbone_fingerprint(model)
    assert backbone_fingerprint(model) == base  # stable
    # A forward without source (made by exec) is told apart by its code object.
    made: dict = {}
    exec("def forward(self, x):\n    return Net.forward(self, x) * 3\n", {"Net": Net}, made)
    model.forward = made["forward"].__get__(model)
    patched = backbone_fingerprint(model)
    assert patched != base
    del model.forward
    assert backbone_fingerprint(model) == base
    # A buffer the state dict leaves out still counts.
    model.register_buffer("scale", torch.ones(1), persistent=False)
    with_buffer = backbone_fingerprint(model)
    model.scale.fill_(2.0)
    assert backbone_fingerprint(model) != with_buffer
    # What the features depend on beyond these: the user's wrapcal_fingerprint().
    version = ["v1"]
    model.wrapcal_fingerprint = lambda: version[0]
    first = backbone_fingerprint(model)
    version[0] = "v2"
    assert backbone_fingerprint(model) != first
    model.wrapcal_fingerprint = lambda: 3
    with pytest.raises(TypeError, match="must return str or bytes"):
        backbone_fingerprint(model)
