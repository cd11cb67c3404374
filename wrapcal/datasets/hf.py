"""Hugging Face ``datasets`` image data: saved directories and in-memory datasets.

A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` is read
from its own files only, with ``pyarrow`` (which ``datasets`` installs; ``datasets``
itself is not imported): ``state.json`` names the arrow files, ``dataset_info.json``
the features. What the directory says is checked before anything is read:

* a data file or split that resolves outside the directory (``../../x.arrow``, an
  absolute path, a link pointing out) is refused;
* only image bytes stored in the arrow files are decoded (by PIL, from memory, in the
  raster formats of :mod:`wrapcal.datasets.safety`). An image entry that is a path or
  URL (``http://``, ``hf://``, ``/etc/...``, ``../x.png``) is refused: ``datasets``
  would open it, reading credentials (``~/.netrc``, the Hugging Face token) and
  connecting out, or read a file outside the directory.

The image column is the first ``Image`` feature (else a column named ``image``,
``img``...), the label column the first ``ClassLabel`` feature (whose names are the
class names, in label order) or an integer column named ``label``, ``labels``...
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from wrapcal.datasets.safety import check_regular, decode_image, probe_image
from wrapcal.errors import DataError

__all__ = [
    "HFImages",
    "SavedDataset",
    "find_columns",
    "is_saved_hf_dataset",
    "load_hf_directory",
]

_IMAGE_NAMES = ("image", "img", "images", "pixel_values", "picture")
_LABEL_NAMES = ("label", "labels", "fine_label", "target", "targets", "y")
# state.json and dataset_info.json are a few kB; a larger one is not a saved data set's.
_MAX_JSON_BYTES = 16 * 2**20
_EMBED = (
    "wrapcal reads only image bytes stored in the data set's own files and never opens "
    "paths or downloads: save the data set with the images' bytes embedded, or give the "
    "image files as an ImageFolder directory"
)


def is_saved_hf_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``save_to_disk``."""
    p = Path(path)
    return p.is_dir() and (
        (p / "dataset_dict.json").is_file()
        or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())
    )


def find_columns(dataset: Any) -> tuple[str, str | None, list[str] | None]:
    """The image column, the label column (or ``None``) and the class names (or
    ``None``) of an in-memory Hugging Face ``Dataset``.

    Raises:
        ValueError: No image column; the message lists the columns.
    """
    import datasets

    features = dataset.features
    columns = list(features)
    image = next((c for c in columns if isinstance(features[c], datasets.Image)), None)
    image = image or next((c for c in _IMAGE_NAMES if c in columns), None)
    if image is None:
        raise ValueError(
            f"no image column among {', '.join(columns)}: expected a datasets.Image feature "
            f"or a column named {', '.join(_IMAGE_NAMES)}"
        )
    label = next((c for c in columns if isinstance(features[c], datasets.ClassLabel)), None)
    label = label or next((c for c in _LABEL_NAMES if c in columns), None)
    names = None
    if label is not None and isinstance(features[label], datasets.ClassLabel):
        names = list(features[label].names)
    return image, label, names


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def _inside(directory: Path, name: Any, what: str, owner: Path) -> Path:
    """``directory / name`` once it is known to stay inside ``directory`` (links
    resolved): ``name`` comes from a file of the data set, ``owner``, which may lie."""
    fix = "wrapcal reads a saved data set from its own directory only; re-save it with save_to_disk"
    if not isinstance(name, str) or not name or "\0" in name:
        raise DataError(f"{owner} names a {what} that is no file name ({name!r}): {fix}")
    path = directory / name
    real, top = os.path.realpath(path), os.path.realpath(directory)
    if os.path.isabs(name) or ".." in Path(name).parts or not _within(real, top):
        raise DataError(
            f"{owner} names a {what} outside the data set's directory ({name!r}, which "
            f"resolves to {real}): {fix}"
        )
    return path


def _read_json(path: Path) -> Any:
    real, top = os.path.realpath(path), os.path.realpath(path.parent)
    if not _within(real, top):
        raise DataError(
            f"{path} is a link to a file outside the data set's directory ({real}): wrapcal "
            "reads a saved data set from its own directory only; re-save it with save_to_disk"
        )
    status = check_regular(path, "re-save the data set with save_to_disk")
    if status.st_size > _MAX_JSON_BYTES:
        raise DataError(
            f"{path} holds {status.st_size} bytes, not the few kB save_to_disk writes: "
            "re-save the data set"
        )
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}): re-save the data set") from None


def _split_directory(root: Path, split: str | None, strict: bool) -> Path:
    """The directory of the data set to read: ``root``, or a ``DatasetDict``'s split."""
    listing = root / "dataset_dict.json"
    if not listing.is_file():
        return root
    listed = _read_json(listing)
    splits = listed.get("splits") if isinstance(listed, dict) else None
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise DataError(f"{listing} lists no splits: re-save the data set with save_to_disk")
    if split not in splits and not strict and len(splits) == 1:
        split = splits[0]
    if split not in splits:
        raise DataError(f"{root} has no split {split!r}; it has {', '.join(splits)}")
    return _inside(root, split, f"split {split!r}", listing)


@dataclass
class SavedDataset:
    """A saved data set's columns, read (memory-mapped) but not decoded.

    Attributes:
        directory: The directory the arrow files are in.
        images: The image bytes column (a ``pyarrow.ChunkedArray`` of binary).
        image_column: Its name.
        labels: Every label, or ``None`` without a label column.
        label_column: Its name, or ``None``.
        class_names: The ``ClassLabel`` names in label order, when there are any.
    """

    directory: Path
    images: Any
    image_column: str
    labels: list[Any] | None
    label_column: str | None
    class_names: list[str] | None

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        """How messages name row ``i``'s image."""
        return f"{self.directory}: row {i} of column {self.image_column!r}"

    def source(self, i: int) -> Any:
        """Row ``i``'s image bytes as a file object reading the mapped file in place."""
        import pyarrow as pa

        return pa.BufferReader(self.images[i].as_buffer())


def _features(info: Any, schema: Any) -> dict[str, Any]:
    features = info.get("features") if isinstance(info, dict) else None
    if not isinstance(features, dict) and schema.metadata and b"huggingface" in schema.metadata:
        try:
            meta = json.loads(schema.metadata[b"huggingface"])
            features = meta.get("info", {}).get("features")
        except (ValueError, AttributeError):
            features = None
    return features if isinstance(features, dict) else {}


def _type_of(features: dict[str, Any], column: str) -> str | None:
    feature = features.get(column)
    return feature.get("_type") if isinstance(feature, dict) else None


def _image_bytes(table: Any, column: str, where: Path) -> Any:
    """The column's image bytes; every row must have them (no path or URL instead)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    data = table.column(column)
    kind = data.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        chunks = [pc.struct_field(c, "bytes") for c in data.chunks]
        missing = [pc.or_kleene(pc.is_null(c), pc.is_null(b)) for c, b in
                   zip(data.chunks, chunks, strict=True)]  # fmt: skip
        has_path = kind.get_field_index("path") >= 0
        paths = [pc.struct_field(c, "path") for c in data.chunks] if has_path else None
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        chunks, missing, paths = list(data.chunks), [c.is_null() for c in data.chunks], None
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        first = next(iter(data.slice(0, 1).to_pylist()), None)
        raise DataError(
            f"{where}: column {column!r} holds text (file paths or URLs such as "
            f"{str(first)[:100]!r}), not images: {_EMBED}"
        )
    else:
        raise DataError(
            f"{where}: column {column!r} has arrow type {kind}, not images: expected a "
            "datasets.Image column holding each image's bytes"
        )
    offset = 0
    for i, (gone, chunk) in enumerate(zip(missing, chunks, strict=True)):
        if gone.true_count:
            row = pc.index(gone, True).as_py()
            path = paths[i][row].as_py() if paths is not None else None
            what = f"a path or URL ({str(path)[:100]!r})" if path else "empty"
            raise DataError(
                f"{where}: row {offset + row} of column {column!r} is {what}, not image bytes "
                f"stored in the data set: {_EMBED}"
            )
        offset += len(chunk)
    return pa.chunked_array(chunks, type=chunks[0].type if chunks else pa.binary())


def _columns(
    schema: Any, features: dict[str, Any], where: Path
) -> tuple[str, str | None, list[str] | None]:
    import pyarrow as pa

    columns = list(schema.names)
    image = next((c for c in columns if _type_of(features, c) == "Image"), None)
    image = image or next((c for c in _IMAGE_NAMES if c in columns), None)
    if image is None:
        raise DataError(
            f"{where}: no image column among {', '.join(columns)}: expected a datasets.Image "
            f"feature or a column named {', '.join(_IMAGE_NAMES)}"
        )
    label = next((c for c in columns if _type_of(features, c) == "ClassLabel"), None)
    label = label or next((c for c in _LABEL_NAMES if c in columns), None)
    if label is not None and not pa.types.is_integer(schema.field(label).type):
        label = None  # a column named "label" that holds no class indices
    names = None
    if label is not None and _type_of(features, label) == "ClassLabel":
        raw = features[label].get("names")
        names = [str(n) for n in raw] if isinstance(raw, list) else None
    return image, label, names


def load_hf_directory(
    path: str | os.PathLike, split: str | None, strict: bool = True
) -> SavedDataset:
    """The data set saved at ``path``; for a ``DatasetDict``, its ``split`` (or, unless
    ``strict``, its only split when it has no ``split``).

    Reads the directory's own files only (see the module docstring); images are not
    decoded here.

    Raises:
        DataError: (a ``ValueError``) ``pyarrow`` is not installed, the split is missing
            (the message lists the splits), a file named by the data set lies outside its
            directory, an arrow file is truncated or corrupt, or an image entry is a path
            or URL.
    """
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(
            f"{os.fspath(path)} is a Hugging Face dataset directory: install the "
            "'datasets' package (or just 'pyarrow') to read it (pip install datasets)"
        ) from None
    directory = _split_directory(Path(path), split, strict)
    state_file = directory / "state.json"
    state = _read_json(state_file)
    info = _read_json(directory / "dataset_info.json")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files:
        raise DataError(f"{state_file} names no data file: re-save the data set with save_to_disk")
    if state.get("_indices_data_files"):
        raise DataError(
            f"{state_file} reads its rows through an indices file: re-save the data set "
            "after dataset.flatten_indices()"
        )
    tables = []
    for entry in files:
        name = entry.get("filename") if isinstance(entry, dict) else entry
        data_file = _inside(directory, name, "data file", state_file)
        check_regular(data_file, "re-save the data set with save_to_disk")
        try:
            # Memory-mapped and zero-copy: buffer lengths are checked against the file.
            with pa.ipc.open_stream(pa.memory_map(str(data_file), "r")) as reader:
                table = reader.read_all()
            table.validate()
        except (pa.ArrowException, OSError, EOFError) as err:
            raise DataError(
                f"{data_file} is not a readable arrow stream ({err}): the file is truncated "
                "or corrupt; re-save the data set"
            ) from None
        tables.append(table)
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowException as err:
        raise DataError(f"{directory}: its data files disagree ({err}); re-save it") from None
    image, label, names = _columns(table.schema, _features(info, table.schema), directory)
    images = _image_bytes(table, image, directory)
    labels = table.column(label).to_pylist() if label is not None else None
    return SavedDataset(directory, images, image, labels, label, names)


def probe_rows(saved: SavedDataset) -> list[Any]:
    """Every row's image header (size, mode), checked as an image file's would be.

    Raises:
        DataError: A row that is not an image or is over the pixel cap.
    """
    return [probe_image(saved.source(i), saved.name(i)) for i in range(len(saved))]


class HFImages(Dataset):
    """A saved Hugging Face data set's images as a torch ``Dataset`` of ``(x, label)``
    (or ``x`` without labels), each decoded from its stored bytes.

    Args:
        saved: The data set (:func:`load_hf_directory`).
        transform: One decoded image (PIL) -> a ``[C, H, W]`` tensor.
    """

    def __init__(self, saved: SavedDataset, transform: Callable[[Any], torch.Tensor]) -> None:
        self.saved, self.transform = saved, transform
        self.image_column, self.label_column = saved.image_column, saved.label_column
        self.classes = saved.class_names

    def __len__(self) -> int:
        return len(self.saved)

    @property
    def targets(self) -> list[int] | None:
        """Every label, read from the label column alone (no image is decoded).

        Raises:
            DataError: A row has no label (null, or ``-1`` as ``datasets`` marks one).
        """
        if self.saved.labels is None:
            return None
        bad = next((i for i, v in enumerate(self.saved.labels) if v is None or v < 0), None)
        if bad is not None:
            raise DataError(
                f"{self.saved.directory}: row {bad} has no label "
                f"({self.saved.labels[bad]!r} in column {self.label_column!r}): drop the "
                "unlabelled rows, or give the set as unlabelled data"
            )
        return [int(v) for v in self.saved.labels]

    def __getitem__(self, i: int) -> Any:
        i = int(i)
        x = self.transform(decode_image(self.saved.source(i), self.saved.name(i)))
        if self.saved.labels is None:
            return x
        return x, int(self.saved.labels[i])
