"""Hostile data given to the readers of wrapcal.datasets (issue 30, item 3): each reader
stays inside what it was given, checks sizes from headers against the bytes present
before allocating, refuses special files and symlink loops, caps decoded images and
answers with wrapcal's own one-line error naming the file and the fix.

Every hostile input is built here in ``tmp_path``, small."""

from __future__ import annotations

import builtins
import contextlib
import functools
import gzip
import io
import json
import os
import socket
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from wrapcal.datasets import (
    ImageDirectory,
    ImageSettings,
    Normaliser,
    SpecError,
    load_idx,
    load_npz_images,
    read_spec,
)
from wrapcal.errors import DataError

PLAIN = ImageSettings(Normaliser((0.0,), (1.0,)))
IDENTITY = Normaliser((0.0,), (1.0,))


@dataclass
class Peak:
    bytes: int = 0


@contextlib.contextmanager
def peak_memory() -> Iterator[Peak]:
    """The peak of Python-traced allocations inside the block (``peak.bytes``), also when
    the block raises."""
    peak = Peak()
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def _png(size: tuple[int, int] = (16, 16), seed: int = 0, mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


@functools.cache
def _huge_png() -> bytes:
    """A real 6000x6000 grey PNG (one grey level, so a few kB)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (6000, 6000), 7).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG signature and header claiming width x height pixels, with one tiny
    compressed row of data: PIL learns the size from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    data = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def _folder(root: Path, per_class: int = 2, classes: tuple[str, ...] = ("a", "b")) -> Path:
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i:02d}.png").write_bytes(_png(seed=10 * k + i))
    return root


# --- image folders ---------------------------------------------------------------------


def test_fifo_named_png_is_refused_at_once(tmp_path):
    root = _folder(tmp_path / "data")
    os.mkfifo(root / "a" / "x.png")  # nobody ever writes to it: opening it would block
    with pytest.raises(DataError, match=r"x\.png.* is a FIFO, not a regular file.*remove it"):
        ImageDirectory(root, None, 3, IDENTITY)
    with pytest.raises(SpecError, match=r"^--data .*x\.png.* is a FIFO"):
        read_spec(str(root), "test", PLAIN, where=f"--data {root}")


def test_device_linked_as_an_image_is_refused(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "b" / "zero.png").symlink_to("/dev/zero")  # reading it never ends
    with pytest.raises(DataError, match=r"zero\.png.* is a character device"):
        ImageDirectory(root, None, 3, IDENTITY)


def test_symlink_loop_reads_each_image_once(tmp_path):
    root = tmp_path / "data"
    for k in range(3):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(10):
            (root / f"c{k}" / f"{i}.png").write_bytes(_png(seed=10 * k + i))
        (root / f"c{k}" / "loop").symlink_to(root / f"c{k}", target_is_directory=True)
    (root / "c0" / "up").symlink_to(root, target_is_directory=True)
    folder = ImageDirectory(root, None, 3, IDENTITY)
    assert len(folder) == 30 and folder.classes == ["c0", "c1", "c2"]
    assert folder.targets == [0] * 10 + [1] * 10 + [2] * 10
    loaded = read_spec(str(root), "test", PLAIN)
    assert loaded.n == 30


def test_decompression_bomb_png_is_refused_from_its_header(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "a" / "bomb.png").write_bytes(_bomb_png())
    with pytest.raises(DataError, match=r"bomb\.png.* 10000000000 pixels, more than"):
        ImageDirectory(root, (16, 16), 3, IDENTITY)
    # Just over the cap, where PIL only warns: refused all the same.
    (root / "a" / "bomb.png").write_bytes(_bomb_png(10_000, 9_000))
    with pytest.raises(DataError, match=r"bomb\.png.* 10000x9000 "):
        ImageDirectory(root, (16, 16), 3, IDENTITY)


def test_text_file_named_png_is_one_clear_error(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "b" / "notes.png").write_text("not an image\n")
    with pytest.raises(
        DataError, match=r"notes\.png: not an image wrapcal reads .*; remove or replace it$"
    ):
        ImageDirectory(root, None, 3, IDENTITY)


def test_truncated_image_is_one_clear_error_naming_the_file(tmp_path):
    root = _folder(tmp_path / "data")
    whole = _png(seed=99)
    (root / "b" / "cut.png").write_bytes(whole[: len(whole) // 2])
    folder = ImageDirectory(root, None, 3, IDENTITY)  # the header is whole
    index = [os.path.basename(p) for p, _ in folder.samples].index("cut.png")
    folder[0]  # the others decode
    with pytest.raises(DataError, match=r"cut\.png: cannot decode the image .*truncated"):
        folder[index]


@pytest.mark.parametrize("big_first", [False, True])
def test_one_huge_image_among_small_ones(tmp_path, big_first):
    root = _folder(tmp_path / "data", per_class=3)
    name = "00.png" if big_first else "zz.png"  # the first file in order, or the last
    (root / "a" / name).write_bytes(_huge_png())
    with pytest.raises(DataError, match=rf"{name}.* is 6000x6000 but .* 16x16.*--size"):
        ImageDirectory(root, None, 3, IDENTITY)
    # Asked to resize, every image (the large one too) comes out 16x16.
    folder = ImageDirectory(root, (16, 16), 3, IDENTITY)
    loaded = read_spec(str(root), "test", ImageSettings(IDENTITY, size=(16, 16)))
    assert loaded.shape == (3, 16, 16)
    assert all(folder[i][0].shape == (3, 16, 16) for i in range(len(folder)))


def test_fifo_and_devices_as_npz_or_idx_files(tmp_path):
    os.mkfifo(tmp_path / "x.npz")
    os.mkfifo(tmp_path / "t10k-images-idx3-ubyte")
    for name in ("x.npz", "t10k-images-idx3-ubyte"):
        with pytest.raises(SpecError, match=rf"{name} is a FIFO, not a regular file"):
            read_spec(str(tmp_path / name), "ood", PLAIN)
    with pytest.raises(DataError, match="FIFO"):
        load_idx(tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(DataError, match="FIFO"):
        load_npz_images(tmp_path / "x.npz")


# --- npz -------------------------------------------------------------------------------


def _npz_with_header(
    path: Path, shape: tuple[int, ...], payload: bytes, compression: int = zipfile.ZIP_STORED
) -> int:
    """An npz whose ``images.npy`` header claims ``shape`` (uint8) but holds ``payload``;
    returns the header's length."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", buf.getvalue() + payload, compress_type=compression)
        labels = io.BytesIO()
        np.lib.format.write_array(labels, np.zeros(30, np.int64))
        z.writestr("labels.npy", labels.getvalue())
    return len(buf.getvalue())


def test_npz_header_claiming_a_trillion_images_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.npz"
    _npz_with_header(path, (10**12, 28, 28), bytes(30 * 28 * 28))
    with peak_memory() as peak:
        with pytest.raises(
            DataError, match=r"images\.npy.*claims .* bytes\) but holds 23648 bytes"
        ):
            load_npz_images(path)
        with pytest.raises(SpecError, match=r"huge\.npz.*claims"):
            read_spec(str(path), "test", PLAIN)
    assert peak.bytes < 32 * 2**20


def test_npz_deflate_member_claiming_more_than_it_can_inflate_to(tmp_path):
    # The header and the zip's directory agree on 4 GB, from a member of a few bytes:
    # no deflate stream that short inflates to that much, so nothing is allocated.
    path = tmp_path / "liar.npz"
    claimed = 4 * 10**9
    header = _npz_with_header(path, (claimed,), b"", zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    central = raw.find(b"PK\x01\x02")  # images.npy's entry, the first
    struct.pack_into("<I", raw, central + 24, header + claimed)  # its uncompressed size
    path.write_bytes(bytes(raw))
    with zipfile.ZipFile(path) as z:
        assert z.getinfo("images.npy").file_size == header + claimed
    with pytest.raises(DataError, match=r"images\.npy.* inflate"), peak_memory() as peak:
        load_npz_images(path)
    assert peak.bytes < 32 * 2**20


def test_npz_object_arrays_are_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, images=np.array([{"a": 1}] * 4, dtype=object))
    with pytest.raises(DataError, match=r"object array.*unpickling.*numeric arrays only"):
        load_npz_images(path)
    with pytest.raises(SpecError, match=r"obj\.npz"):
        read_spec(str(path), "ood", PLAIN)


def test_npz_truncated_member_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.npz"
    _npz_with_header(path, (30, 28, 28), bytes(29 * 28 * 28))
    with pytest.raises(DataError, match=r"cut\.npz.*images\.npy.*claims"):
        load_npz_images(path)


# --- IDX -------------------------------------------------------------------------------


def _gzip_members(payload_header: bytes, zeros: int, chunk: int = 16 * 2**20) -> bytes:
    """A gzip file of ``payload_header`` then ``zeros`` zero bytes, made of repeated small
    members (gzip allows concatenation), so it is built without inflating anything."""
    member = gzip.compress(bytes(chunk), compresslevel=9)
    count, rest = divmod(zeros, chunk)
    return (
        gzip.compress(payload_header)
        + member * count
        + (gzip.compress(bytes(rest)) if rest else b"")
    )


def _idx_header(shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


@pytest.mark.parametrize(
    ("shape", "zeros"),
    [
        ((10, 28, 28), 1536 * 2**20),  # small header, 1.5 GiB of trailing data
        ((2_000_000, 28, 28), 2_000_000 * 784),  # a header honest about 1.5 GiB of zeros
        ((10**9, 1000, 1000), 10 * 784),  # a header claiming 10^15 bytes
    ],
)
def test_gzip_idx_is_inflated_bounded(tmp_path, shape, zeros):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(_gzip_members(_idx_header(shape), zeros))
    assert path.stat().st_size < 2 * 2**20
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"), peak_memory() as peak:
        load_idx(path)
    assert peak.bytes < 64 * 2**20


def test_raw_idx_header_checked_against_the_file_size(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(_idx_header((10**9, 28, 28)) + bytes(784 * 3))
    with pytest.raises(DataError, match=r"header says shape \(1000000000, 28, 28\).*holds"):
        load_idx(path)


def test_honest_gzip_idx_still_reads(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (7, 5, 4), dtype=np.uint8)
    path = tmp_path / "a-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_header(images.shape) + images.tobytes()))
    np.testing.assert_array_equal(load_idx(path), images)
    # Two gzip members (allowed by the format) read as one stream.
    data = _idx_header(images.shape) + images.tobytes()
    path.write_bytes(gzip.compress(data[:50]) + gzip.compress(data[50:]))
    np.testing.assert_array_equal(load_idx(path), images)


# --- Hugging Face saved directories ----------------------------------------------------


def _hf_dir(
    root: Path,
    images: list[dict],
    labels: list[int] | None = None,
    data_file: str = "data-00000-of-00001.arrow",
    write_data: bool = True,
) -> Path:
    """A ``save_to_disk`` directory built with pyarrow alone: one arrow stream file,
    ``state.json`` and ``dataset_info.json``."""
    pa = pytest.importorskip("pyarrow")
    root.mkdir(parents=True, exist_ok=True)
    columns = {
        "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    }
    features: dict = {"image": {"_type": "Image"}}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
        features["label"] = {"names": ["x", "y"], "_type": "ClassLabel"}
    table = pa.table(columns)
    if write_data:
        with (
            pa.OSFile(str(root / data_file), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as writer,
        ):
            writer.write_table(table)
    state = {
        "_data_files": [{"filename": data_file}],
        "_fingerprint": "0",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (root / "state.json").write_text(json.dumps(state))
    (root / "dataset_info.json").write_text(json.dumps({"features": features}))
    return root


@pytest.fixture
def no_way_out(tmp_path, monkeypatch):
    """No network (every connection attempt is recorded and fails), a home with a
    ``.netrc`` and a Hugging Face token, and a record of every file opened."""
    home = tmp_path / "home"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".netrc").write_text("machine example.com login me password secret\n")
    (home / ".cache" / "huggingface" / "token").write_text("hf_secret\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    record: dict[str, list] = {"connect": [], "open": []}

    def refuse(*args, **kwargs):
        record["connect"].append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    real_open, real_os_open = builtins.open, os.open

    def opened(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            record["open"].append(os.path.realpath(os.fsdecode(file)))
        return real_open(file, *args, **kwargs)

    def os_opened(file, *args, **kwargs):
        record["open"].append(os.path.realpath(os.fsdecode(file)))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opened)
    monkeypatch.setattr(io, "open", opened)
    monkeypatch.setattr(os, "open", os_opened)
    record["home"] = [str(home.resolve())]
    return record


def _assert_stayed_inside(record: dict, data: Path, outside: list[Path] = ()) -> None:
    assert record["connect"] == []
    home = record["home"][0]
    assert not [p for p in record["open"] if p.startswith(home)]
    for path in outside:
        assert os.path.realpath(path) not in record["open"]


@pytest.mark.parametrize(
    "where",
    [
        "http://example.com/cat.png",
        "https://example.com/cat.png",
        "hf://datasets/someone/private/cat.png",
        "OUTSIDE",  # an absolute path to a PNG outside the directory
        "../outside.png",
        "/etc/hostname",
    ],
)
def test_hf_image_entries_that_are_paths_or_urls_are_refused(tmp_path, no_way_out, where):
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(seed=3))
    where = str(outside) if where == "OUTSIDE" else where
    rows = [{"bytes": _png(seed=1), "path": None}, {"bytes": None, "path": where}]
    data = _hf_dir(tmp_path / "ds", rows, [0, 1])
    no_way_out["open"].clear()  # what building the inputs opened
    with pytest.raises(SpecError, match=r"row 1 .*'image' .*path or URL.*embed"):
        read_spec(str(data), "test", PLAIN, where="--data ds")
    _assert_stayed_inside(no_way_out, data, [outside])


def test_hf_image_column_of_urls_as_text_is_refused(tmp_path, no_way_out):
    pa = pytest.importorskip("pyarrow")
    data = _hf_dir(tmp_path / "ds", [{"bytes": _png(seed=1), "path": None}], [0])
    table = pa.table({"image": ["https://example.com/a.png"], "label": [0]})
    with (
        pa.OSFile(str(data / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        writer.write_table(table)
    (data / "dataset_info.json").write_text(json.dumps({"features": {}}))
    no_way_out["open"].clear()
    with pytest.raises(SpecError, match=r"column 'image' holds text .*https://example"):
        read_spec(str(data), "test", PLAIN)
    _assert_stayed_inside(no_way_out, data)


def test_hf_embedded_bytes_are_decoded_and_paths_beside_them_ignored(tmp_path, no_way_out):
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(seed=3))
    rows = [{"bytes": _png(seed=i), "path": str(outside) if i else "http://x/y.png"}
            for i in range(4)]  # fmt: skip
    data = _hf_dir(tmp_path / "ds", rows, [0, 1, 0, 1])
    no_way_out["open"].clear()
    loaded = read_spec(str(data), "test", PLAIN)
    assert loaded.kind == "hf" and loaded.n == 4 and loaded.labels.tolist() == [0, 1, 0, 1]
    from PIL import Image

    expected = np.asarray(Image.open(io.BytesIO(_png(seed=2)))).transpose(2, 0, 1) / 255
    x, label = loaded.data[2]
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
    assert label == 0 and loaded.class_names == ["x", "y"]
    _assert_stayed_inside(no_way_out, data, [outside])


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_hf_data_files_outside_the_directory_are_refused(tmp_path, no_way_out, kind):
    other = _hf_dir(tmp_path / "other", [{"bytes": _png(seed=5), "path": None}], [1])
    target = other / "data-00000-of-00001.arrow"
    rows = [{"bytes": _png(seed=1), "path": None}]
    if kind == "dotdot":
        data = _hf_dir(tmp_path / "a" / "ds", rows, [0], data_file="../../other/"
                       "data-00000-of-00001.arrow", write_data=False)  # fmt: skip
    elif kind == "absolute":
        data = _hf_dir(tmp_path / "ds", rows, [0], data_file=str(target), write_data=False)
    else:
        data = _hf_dir(tmp_path / "ds", rows, [0], data_file="linked.arrow", write_data=False)
        (data / "linked.arrow").symlink_to(target)
    no_way_out["open"].clear()
    with pytest.raises(SpecError, match=r"state\.json names a data file outside"):
        read_spec(str(data), "test", PLAIN)
    _assert_stayed_inside(no_way_out, data, [target])


@pytest.mark.parametrize("name", ["state.json", "dataset_info.json"])
def test_hf_json_linked_outside_the_directory_is_refused(tmp_path, no_way_out, name):
    other = _hf_dir(tmp_path / "other", [{"bytes": _png(seed=5), "path": None}], [1])
    data = _hf_dir(tmp_path / "ds", [{"bytes": _png(seed=1), "path": None}], [0])
    (data / name).unlink()
    (data / name).symlink_to(other / name)
    no_way_out["open"].clear()
    with pytest.raises(SpecError, match=rf"{name} is a link to a file outside"):
        read_spec(str(data), "test", PLAIN)
    _assert_stayed_inside(no_way_out, data, [other / name])


def test_hf_dataset_dict_split_outside_the_directory_is_refused(tmp_path, no_way_out):
    _hf_dir(tmp_path / "elsewhere", [{"bytes": _png(seed=5), "path": None}], [1])
    root = tmp_path / "dd"
    root.mkdir()
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["../elsewhere"]}))
    no_way_out["open"].clear()
    with pytest.raises(SpecError, match=r"split '\.\./elsewhere'.*outside"):
        read_spec(str(root), "test", PLAIN)
    _assert_stayed_inside(no_way_out, root, [tmp_path / "elsewhere" / "state.json"])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    (root / "test").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    no_way_out["open"].clear()
    with pytest.raises(SpecError, match=r"split 'test'.*outside"):
        read_spec(str(root), "test", PLAIN)
    _assert_stayed_inside(no_way_out, root, [tmp_path / "elsewhere" / "state.json"])


def test_hf_hostile_image_bytes(tmp_path):
    good = {"bytes": _png(seed=1), "path": None}
    data = _hf_dir(tmp_path / "text", [good, {"bytes": b"hello, not an image", "path": None}])
    with pytest.raises(SpecError, match=r"row 1 of column 'image'.* not an image"):
        read_spec(str(data), "ood", PLAIN)
    data = _hf_dir(tmp_path / "bomb", [good, {"bytes": _bomb_png(), "path": None}])
    with pytest.raises(SpecError, match=r"row 1 .*10000000000 pixels"):
        read_spec(str(data), "ood", PLAIN)
    big = {"bytes": _huge_png(), "path": None}
    data = _hf_dir(tmp_path / "mixed", [good, big])
    with pytest.raises(SpecError, match=r"row 1 .*6000x6000 but .*16x16.*--size"):
        read_spec(str(data), "ood", PLAIN)
    loaded = read_spec(str(data), "ood", ImageSettings(IDENTITY, size=(16, 16)))
    assert loaded.data[1].shape == (3, 16, 16)


def test_hf_truncated_arrow_file_is_a_clear_error(tmp_path):
    data = _hf_dir(tmp_path / "ds", [{"bytes": _png(seed=1), "path": None}] * 3, [0, 1, 0])
    arrow = data / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[:-200])
    with pytest.raises(SpecError, match=r"data-00000-of-00001\.arrow.*(truncated|corrupt)"):
        read_spec(str(data), "test", PLAIN)


def test_hf_directory_without_datasets_installed(tmp_path, monkeypatch):
    # The reader needs pyarrow, not the datasets package: reading never imports it.
    data = _hf_dir(tmp_path / "ds", [{"bytes": _png(seed=1), "path": None}] * 2, [0, 1])
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    loaded = read_spec(str(data), "test", PLAIN)
    assert loaded.n == 2 and torch.is_tensor(loaded.data[0][0])
