"""Image directories (torchvision's ImageFolder layout) and their class order.

An ImageFolder numbers its classes by the *alphabetical* order of the folder names:
``cat/ dog/`` gives cat = 0, dog = 1, and folders named ``0 ... 11`` give ``10`` the
index 2. A model numbers its classes however it was trained. :func:`check_class_order`
compares the folder names with the model's class names when they are known and says
what it found; :func:`relabel` renumbers a folder's labels by the model's names.

Every file is checked before it is read (:mod:`wrapcal.datasets.safety`): special files,
non-images, decompression bombs and mixed sizes are refused with a message naming the
file, and links are followed without reading a directory twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from wrapcal.datasets.pixels import match_channels
from wrapcal.datasets.safety import common_size, decode_image, open_regular, probe_image
from wrapcal.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassOrder",
    "ImageDirectory",
    "check_class_order",
    "image_transform",
    "read_image_file",
    "relabel",
    "scan_image_folder",
]


def image_transform(
    size: tuple[int, int], channels: int, normalise: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[Any], torch.Tensor]:
    """PIL image -> resized, ``channels``-channel, normalised ``[C, H, W]`` float32."""
    from torchvision.transforms import functional as TF

    def transform(image: Any) -> torch.Tensor:
        image = image.convert("RGB") if image.mode not in ("L", "RGB") else image
        x = TF.to_tensor(TF.resize(image, list(size), antialias=True))
        x = match_channels(x.unsqueeze(0), channels)[0].contiguous()
        return normalise(x)

    return transform


#: File names read as images (torchvision's ImageFolder's, compared in lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: How a user asks for images of different sizes to be resized, for messages.
RESIZE_HINT = (
    "give the size to resize them to (--size N on the command line, size=(height, width) in Python)"
)
_FOLDER_FIX = "remove it from the folder"


def _within(path: str, top: str) -> bool:
    """Whether the real path ``path`` is ``top`` or inside it."""
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def _walk_class(top: str, root: str, outside: set[str]) -> list[tuple[str, list[str]]]:
    """``(directory, file names)`` under a class folder, as ``os.walk(followlinks=True)``
    gives them, but each real directory once.

    A link to a directory inside the image folder (read at its own place) or to one that
    holds it (a loop) is skipped; a link out of it is followed once (``outside`` holds the
    real paths already read, across classes). Without this, one link back to the root
    made torchvision's ImageFolder read every image about 41 times.
    """
    found: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    stack = [top]
    while stack:
        directory = stack.pop()
        real = os.path.realpath(directory)
        if real in seen:
            continue
        seen.add(real)
        files: list[str] = []
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:  # a link loop on a file name: checked when probed
                    is_dir = False
                if not is_dir:
                    files.append(entry.name)
                    continue
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if _within(target, root) or _within(root, target) or target in outside:
                        continue
                    outside.add(target)
                stack.append(entry.path)
        found.append((directory, files))
    return sorted(found)


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """The classes (folder names, alphabetical) and the ``(path, class index)`` of every
    image file under them, in ImageFolder's order.

    Raises:
        DataError: No class folder, or a class folder without images.
    """
    name = os.fspath(root)
    layout = "expected one folder per class holding the images (root/cat/1.png, root/dog/2.jpg)"
    try:
        with os.scandir(name) as entries:
            classes = sorted(e.name for e in entries if e.is_dir())
    except OSError as err:
        raise DataError(f"{name} is not an image directory ({err.strerror}); {layout}") from None
    if not classes:
        raise DataError(f"{name} is not an image directory (no class folder in it); {layout}")
    real_root = os.path.realpath(name)
    outside: set[str] = set()
    samples: list[tuple[str, int]] = []
    for index, cls in enumerate(classes):
        top = os.path.join(name, cls)
        if _within(real_root, os.path.realpath(top)):
            raise DataError(
                f"{top} is a link to the image folder itself or a folder above it: remove it"
            )
        before = len(samples)
        for directory, files in _walk_class(top, real_root, outside):
            samples.extend(
                (os.path.join(directory, f), index)
                for f in sorted(files)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        if len(samples) == before:
            raise DataError(
                f"{name} is not an image directory (class folder {cls!r} holds no image file: "
                f"{', '.join(IMAGE_EXTENSIONS)}); {layout}"
            )
    return classes, samples


def read_image_file(path: str) -> Any:
    """A decoded image file (PIL), converted to RGB as torchvision's ImageFolder does.

    Raises:
        DataError: Not a regular file, not an image, over the pixel cap, or truncated.
    """
    with open_regular(path, _FOLDER_FIX) as f:
        return decode_image(f, path).convert("RGB")


class ImageDirectory(Dataset):
    """Images in class folders, ``root/<class>/<image>``, as ``(x, label)`` pairs.

    The files and class indices of torchvision's ``ImageFolder`` (alphabetical folder
    order), with every image brought to one size, channel count and normalisation; the
    classes can be renumbered (:func:`relabel`).

    Every file is checked when the folder is opened, from its header alone: a FIFO,
    device or socket named like an image, a file that is no image, an image over
    :data:`~wrapcal.datasets.safety.MAX_IMAGE_PIXELS` (a decompression bomb) and, when
    ``size`` is ``None``, an image whose size differs from the others are refused with
    a message naming the file. A directory reached twice through links is read once.

    Args:
        root: The directory.
        size: ``(height, width)`` to resize every image to; ``None``: the images' own
            size, which they must share.
        channels: Channels of the outputs (grey is replicated, RGB averaged).
        normalise: Pixels in [0, 1] -> model inputs.

    Attributes:
        classes: The class folder names, in label order.
        samples: ``(path, folder class index)`` of every image, in file order.
        targets: The label of every image, in file order.
        size: The ``(height, width)`` of the outputs.

    Raises:
        DataError: (a ``ValueError``) No class folder, a class without images, or a file
            refused as above.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: tuple[int, int] | None,
        channels: int,
        normalise: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.classes, self.samples = scan_image_folder(root)
        headers = []
        for path, _ in self.samples:
            with open_regular(path, _FOLDER_FIX) as f:
                headers.append(probe_image(f, path))
        if size is None:
            paths = [p for p, _ in self.samples]
            size = common_size([h.size for h in headers], paths, RESIZE_HINT)
        self.size = (int(size[0]), int(size[1]))
        self.channels = channels
        self.folder_targets: list[int] = [t for _, t in self.samples]
        self.targets: list[int] = list(self.folder_targets)
        self._transform = image_transform(self.size, channels, normalise)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, _ = self.samples[i]
        return self._transform(read_image_file(path)), self.targets[i]


@dataclass
class ClassOrder:
    """What :func:`check_class_order` found.

    Attributes:
        same: The folders are exactly the reference's classes in the reference's order.
        mapping: folder index -> reference index, when every folder name is one of the
            reference's names (``None`` otherwise).
        unknown: Folder names that are not among the reference's names.
        warnings: Sentences for the user, empty when nothing is wrong.
    """

    same: bool
    mapping: list[int] | None
    unknown: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _numeric_misorder(names: Sequence[str]) -> bool:
    return all(n.isdigit() for n in names) and list(names) != sorted(names, key=int)


def check_class_order(folders: Sequence[str], reference: Sequence[str] | None) -> ClassOrder:
    """Compare an ImageFolder's classes (alphabetical) with a model's class names.

    Args:
        folders: The folder names in label order (``ImageFolder.classes``).
        reference: The model's class names in its output order, or ``None`` when they
            are not known.

    Returns:
        A :class:`ClassOrder`; its ``warnings`` say what is wrong and how to fix it.
    """
    folders = [str(f) for f in folders]
    if reference is None:
        if _numeric_misorder(folders):
            order = ", ".join(f"{i}={n}" for i, n in enumerate(folders[:12]))
            return ClassOrder(
                False,
                None,
                warnings=[
                    "class folders are numbered but an ImageFolder orders them "
                    f"alphabetically ({order}...), so folder '10' is not class 10; name the "
                    "model's classes in order to map each folder to its class"
                ],
            )
        return ClassOrder(True, list(range(len(folders))))
    reference = [str(r) for r in reference]
    if folders == reference[: len(folders)] and len(folders) == len(reference):
        return ClassOrder(True, list(range(len(folders))))
    index = {name: i for i, name in enumerate(reference)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        return ClassOrder(
            False,
            None,
            unknown,
            [
                f"{len(unknown)} class folder(s) are not among the model's {len(reference)} "
                f"classes: {', '.join(unknown[:8])}{'...' if len(unknown) > 8 else ''}; the "
                "labels follow alphabetical folder order and may not match the model's "
                "outputs"
            ],
        )
    mapping = [index[f] for f in folders]
    notes = []
    if mapping != list(range(len(folders))):
        moved = [f"{f} {i}->{m}" for i, (f, m) in enumerate(zip(folders, mapping, strict=True))]
        more = "..." if len(moved) > 6 else ""
        notes.append(
            "the folders' class indices (alphabetical order) differ from the model's; "
            f"labels renumbered by class name ({', '.join(moved[:6])}{more})"
        )
    return ClassOrder(mapping == list(range(len(folders))), mapping, [], notes)


def relabel(dataset: ImageDirectory, mapping: Sequence[int]) -> ImageDirectory:
    """Renumber a folder's labels: folder class ``i`` becomes ``mapping[i]`` (in place)."""
    dataset.targets = [int(mapping[t]) for t in dataset.folder_targets]
    return dataset
