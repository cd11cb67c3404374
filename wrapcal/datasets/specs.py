"""Data sets named by a short text (a *spec*), as the command line names them.

A spec is one of:

* ``digits``: scikit-learn's bundled digits (:mod:`wrapcal.datasets.digits`);
* ``gaussian`` / ``uniform``: seeded noise shaped like a reference set (OOD and
  unlabelled sets only);
* an ``.npz`` archive (:mod:`wrapcal.datasets.npz`);
* an IDX images file (MNIST's ``t10k-images-idx3-ubyte.gz``), labelled by the IDX
  labels file beside it when there is one;
* a directory saved by Hugging Face ``datasets`` (``save_to_disk``), read from its own
  files only (image bytes stored in it; paths and URLs are refused);
* any other directory: an ImageFolder (``root/<class>/<image>``).

Files must be regular files (a FIFO or device is refused, never opened for a blocking
read). Images of different sizes are read only with a size to resize them to
(``ImageSettings.size``, ``--size``); otherwise the odd file is named.

:func:`read_spec` turns one into a :class:`Loaded` set: tensors for files read at
once, a ``Dataset`` for directories and noise. Sets read after the test set (``like``)
take its channels, image size and normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from wrapcal.datasets.digits import DIGITS_MEAN, DIGITS_STD, digits
from wrapcal.datasets.folder import RESIZE_HINT, ImageDirectory, image_transform
from wrapcal.datasets.hf import HFImages, is_saved_hf_dataset, load_hf_directory, probe_rows
from wrapcal.datasets.idx import (
    is_idx_name,
    labels_file_for,
    labels_name,
    load_idx_images,
    load_idx_labels,
)
from wrapcal.datasets.loaded import InputsOnly, Loaded, concat_inputs
from wrapcal.datasets.noise import NOISE_KINDS, NoiseImages
from wrapcal.datasets.npz import (
    IMAGE_KEYS,
    LABEL_KEYS,
    NpzKeyError,
    find_npz_keys,
    load_npz_images,
    npz_class_names,
    npz_shapes,
    split_image_keys,
    split_label_keys,
)
from wrapcal.datasets.pixels import Normaliser, match_channels, match_images, resize_images
from wrapcal.datasets.safety import check_regular, common_size

__all__ = [
    "LABELLED_ROLES",
    "UNLABELLED_ROLES",
    "ImageSettings",
    "Loaded",
    "SpecError",
    "concat_inputs",
    "read_spec",
]

#: Roles whose data must be labelled.
LABELLED_ROLES = ("test", "calibration", "train")
#: Roles whose labels are dropped. Any other role (a named ``fit`` set such as
#: ``conformal``) keeps its labels when the source has them.
UNLABELLED_ROLES = ("unlabeled", "ood")
# The digits split each role reads: named fit sets (``conformal``...) read the
# calibration split, as ``unlabeled`` does (without its labels).
_DIGITS_PART = {"train": "train", "test": "test", "ood": "test"}


class SpecError(ValueError):
    """A spec names data that cannot be read as asked; the message says why and how."""


@dataclass(frozen=True)
class ImageSettings:
    """How images are brought to the model.

    Attributes:
        normaliser: Pixels in [0, 1] -> model inputs (not used for ``digits``, which
            has its own).
        size: ``(height, width)`` to resize to; ``None`` keeps each set's own size.
        channels: Channels to convert to; ``None`` keeps each set's own.
        seed: Seed of noise sets and of ``limit``'s draw.
        limit: At most this many images per set, drawn at random (seeded), kept in
            file order; ``None`` for all.
    """

    normaliser: Normaliser
    size: tuple[int, int] | None = None
    channels: int | None = None
    seed: int = 0
    limit: int | None = None


def _kinds(role: str) -> str:
    if role in ("ood", "unlabeled"):
        return (
            "'digits', 'gaussian', 'uniform', an .npz, an IDX images file, an ImageFolder "
            "directory or a saved Hugging Face dataset"
        )
    return (
        "'digits', an .npz, an IDX images file with its labels file beside it, an "
        "ImageFolder directory or a saved Hugging Face dataset"
    )


def _subset_rows(n: int, settings: ImageSettings) -> np.ndarray | None:
    if settings.limit is None or settings.limit >= n:
        return None
    rng = np.random.default_rng(settings.seed)
    return np.sort(rng.choice(n, settings.limit, replace=False))


def _finish_tensors(
    x: torch.Tensor,
    y: torch.Tensor | None,
    role: str,
    names: list[str] | None,
    kind: str,
    normaliser: Normaliser,
    settings: ImageSettings,
    like: Loaded | None,
    normalised: bool = False,
) -> Loaded:
    """Pixels ``[N, C, H, W]`` in [0, 1] (or already normalised digits) -> a Loaded set."""
    rows = _subset_rows(len(x), settings)
    if rows is not None:
        index = torch.from_numpy(rows)
        x = x[index]
        y = None if y is None else y[index]
    if not normalised:
        if like is not None:
            x = match_images(x, like.shape)
        else:
            if settings.channels is not None:
                x = match_channels(x, settings.channels)
            x = resize_images(x, settings.size).contiguous()
        x = normaliser(x)
    if role in UNLABELLED_ROLES:
        y = None
    data = x if y is None else (x, y)
    shape = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))  # images [N, C, H, W]
    return Loaded(data, len(x), shape, y, names, kind, normaliser)


def _digits(role: str, settings: ImageSettings, like: Loaded | None) -> Loaded:
    size = like.shape[-1] if like is not None else (settings.size or (32, 32))[0]
    d = digits(seed=0, size=size)
    x, y = getattr(d, _DIGITS_PART.get(role, "calibration"))
    channels = like.shape[0] if like is not None else settings.channels
    if channels is not None:
        x = match_channels(x, channels).contiguous()
    normaliser = Normaliser((DIGITS_MEAN,), (DIGITS_STD,))
    return _finish_tensors(x, y, role, d.classes, "digits", normaliser, settings, None, True)


def _npz(
    path: Path, role: str, splits: tuple[str | None, bool], split_option: str, where: str
) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    split, strict = splits
    try:
        shapes = npz_shapes(path)
    except ValueError as err:
        raise SpecError(f"{where}: {err}") from None
    labelled = role in LABELLED_ROLES
    present = split is not None and any(k in shapes for k in split_image_keys(split))
    use_split = split if present or strict else None
    accepted_images = [*(split_image_keys(split) if split else ()), *IMAGE_KEYS]
    accepted_labels = [*(split_label_keys(split) if split else ()), *LABEL_KEYS]
    if use_split is not None:
        accepted_images = list(split_image_keys(use_split))
        accepted_labels = list(split_label_keys(use_split))
    found = f"keys found: {', '.join(f'{k} {list(v)}' for k, v in shapes.items()) or 'none'}"
    try:
        keys = find_npz_keys(shapes, split=use_split)
    except NpzKeyError as err:
        present_splits = f"; splits present: {', '.join(err.splits)}" if err.splits else ""
        single = "" if use_split is not None else ", or a single 3-D/4-D array"
        raise SpecError(
            f"{where}: cannot find the images ({found}); accepted names: "
            f"{', '.join(accepted_images)}{single}{present_splits}"
            f"{f'; choose the split with {split_option} NAME' if split_option else ''}"
        ) from None
    if labelled and keys.labels is None:
        raise SpecError(
            f"{where}: {role} data must be labelled but no labels were found for "
            f"{keys.images!r} ({found}); accepted names: {', '.join(accepted_labels)} "
            "(a 1-D integer array with one label per image)"
        )
    keep = role not in UNLABELLED_ROLES
    x, y = load_npz_images(path, keys.images, keys.labels if keep else None)
    return x, y, npz_class_names(path)


def _idx(path: Path, role: str, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    raw = torch.from_numpy(load_idx_images(path))
    x = (raw.float() / 255 if not raw.is_floating_point() else raw.float()).unsqueeze(1)
    y = None
    labels = labels_file_for(path) if role not in UNLABELLED_ROLES else None
    if role in LABELLED_ROLES or labels is not None:
        if labels is None:
            raise SpecError(
                f"{where}: {role} data must be labelled, but no IDX labels file was found "
                f"beside {path.name} (expected {labels_name(path)})"
            )
        y = torch.from_numpy(load_idx_labels(labels))
        if len(y) != len(x):
            raise SpecError(f"{where}: {len(x)} images but {len(y)} labels in {labels.name}")
    return x, y


def _dataset(
    dataset: Any,
    role: str,
    names: list[str] | None,
    kind: str,
    shape: tuple[int, int, int],
    labels: list[int] | None,
    normaliser: Normaliser,
    settings: ImageSettings,
) -> Loaded:
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    rows = _subset_rows(len(dataset), settings)
    if rows is not None:
        dataset = Subset(dataset, rows.tolist())
        y = None if y is None else y[torch.from_numpy(rows)]
    if role in UNLABELLED_ROLES or (labels is None and role not in LABELLED_ROLES):
        dataset, y = InputsOnly(dataset), None
    return Loaded(dataset, len(dataset), shape, y, names, kind, normaliser)


def _target(settings: ImageSettings, like: Loaded | None) -> tuple[tuple[int, int] | None, Any]:
    if like is not None:
        return (like.shape[1], like.shape[2]), like.shape[0]
    return settings.size, settings.channels


def read_spec(
    spec: str,
    role: str,
    settings: ImageSettings,
    *,
    split: str | None = None,
    strict_split: bool = False,
    like: Loaded | None = None,
    where: str = "",
    split_option: str = "",
) -> Loaded:
    """Read the data set a spec names.

    Args:
        spec: See the module docstring.
        role: ``test``, ``calibration``, ``train`` (labels required), ``unlabeled`` or
            ``ood`` (labels dropped).
        settings: Size, channels, normalisation, seed and limit.
        split: Key prefix in an ``.npz`` (``test`` for ``test_images``), split of a
            saved Hugging Face ``DatasetDict``.
        strict_split: The split was asked for explicitly: it must exist. Otherwise a
            file without it is read by its conventional names (``images``/``labels``)
            or its only split.
        like: The test set: other sets take its channels, size and normalisation.
        where: How the caller names this input, to begin messages (``--calibration
            cal.npz``).
        split_option: How the caller sets ``split``, for messages (``--split``).

    Raises:
        SpecError: The data cannot be read as asked (the message starts with ``where``).
        FileNotFoundError: No such file or directory.
    """
    where = where or spec
    try:
        return _read(spec, role, settings, (split, strict_split), like, where, split_option)
    except (SpecError, FileNotFoundError):
        raise
    except ValueError as err:  # a reader's own message: say which input it is about
        raise SpecError(f"{where}: {err}") from None


def _read(
    spec: str,
    role: str,
    settings: ImageSettings,
    splits: tuple[str | None, bool],
    like: Loaded | None,
    where: str,
    split_option: str,
) -> Loaded:
    split, strict = splits
    normaliser = like.normalise if like is not None else settings.normaliser
    if spec == "digits":
        return _digits(role, settings, like)
    if spec in NOISE_KINDS:
        if role not in ("ood", "unlabeled") or like is None:
            raise SpecError(
                f"{where}: {spec!r} noise is an OOD set or unlabelled data, not {role} data"
            )
        noise = NoiseImages(spec, like.n, like.shape, normaliser, seed=settings.seed)
        return Loaded(noise, like.n, like.shape, None, None, "noise", normaliser)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{where}: {role} data not found: {spec} (expected {_kinds(role)})")
    size, channels = _target(settings, like)
    if is_saved_hf_dataset(path):
        saved = load_hf_directory(path, split, strict)
        if role in LABELLED_ROLES and saved.label_column is None:
            raise SpecError(f"{where}: {role} data must be labelled; it has no label column")
        if not len(saved):
            raise SpecError(f"{where}: the data set is empty")
        headers = probe_rows(saved)  # up front: every row an image, within the pixel cap
        if size is None:
            rows = [saved.name(i) for i in range(len(saved))]
            size = common_size([h.size for h in headers], rows, RESIZE_HINT)
        channels = channels or (1 if headers[0].mode == "L" else 3)
        hf = HFImages(saved, image_transform(size, channels, normaliser))
        labels = hf.targets if role not in UNLABELLED_ROLES else None
        return _dataset(
            hf, role, saved.class_names, "hf", (channels, *size), labels, normaliser, settings
        )
    if path.is_dir():
        folder = ImageDirectory(path, size, channels or 3, normaliser)
        shape = (folder.channels, *folder.size)
        return _dataset(
            folder, role, folder.classes, "folder", shape, folder.targets, normaliser, settings
        )
    # A FIFO named data.npz would block the read for ever; a device would never end.
    check_regular(path, f"give {_kinds(role)}")
    if path.suffix == ".npz":
        x, y, names = _npz(path, role, (split, strict), split_option, where)
        kind = "npz"
    elif is_idx_name(path):
        x, y = _idx(path, role, where)
        names, kind = None, "idx"
    else:
        raise SpecError(f"{where}: cannot read {path.name}: expected {_kinds(role)}")
    if len(x) == 0:
        raise SpecError(f"{where}: holds no images (an empty {kind} set)")
    return _finish_tensors(x, y, role, names, kind, normaliser, settings, like)
