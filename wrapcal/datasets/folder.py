"""Image directories (torchvision's ImageFolder layout) and their class order.

An ImageFolder numbers its classes by the *alphabetical* order of the folder names:
``cat/ dog/`` gives cat = 0, dog = 1, and folders named ``0 ... 11`` give ``10`` the
index 2. A model numbers its classes however it was trained. :func:`check_class_order`
compares the folder names with the model's class names when they are known and says
what it found; :func:`relabel` renumbers a folder's labels by the model's names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from wrapcal.datasets.pixels import match_channels

__all__ = [
    "ClassOrder",
    "ImageDirectory",
    "check_class_order",
    "image_transform",
    "relabel",
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


class ImageDirectory(Dataset):
    """Images in class folders, ``root/<class>/<image>``, as ``(x, label)`` pairs.

    A thin layer over ``torchvision.datasets.ImageFolder`` (same files, same class
    indices: alphabetical folder order) that brings every image to one size, channel
    count and normalisation, and can renumber the classes (:func:`relabel`).

    Args:
        root: The directory.
        size: ``(height, width)``; ``None`` takes the first image's size.
        channels: Channels of the outputs (grey is replicated, RGB averaged).
        normalise: Pixels in [0, 1] -> model inputs.

    Attributes:
        classes: The class folder names, in label order.
        targets: The label of every image, in file order.
        size: The ``(height, width)`` of the outputs.

    Raises:
        ValueError: No class folder or no image file under ``root``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: tuple[int, int] | None,
        channels: int,
        normalise: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        from torchvision import datasets

        try:
            self.folder = datasets.ImageFolder(os.fspath(root))
        except FileNotFoundError as err:
            raise ValueError(
                f"{os.fspath(root)} is not an image directory ({err}); expected one folder "
                "per class holding the images (root/cat/1.png, root/dog/2.jpg)"
            ) from None
        if size is None:
            width, height = self.folder.loader(self.folder.samples[0][0]).size
            size = (height, width)
        self.size = (int(size[0]), int(size[1]))
        self.channels = channels
        self.classes: list[str] = list(self.folder.classes)
        self.targets: list[int] = list(self.folder.targets)
        self._transform = image_transform(self.size, channels, normalise)

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, _ = self.folder.samples[i]
        return self._transform(self.folder.loader(path)), self.targets[i]


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
    dataset.targets = [int(mapping[t]) for t in dataset.folder.targets]
    return dataset
