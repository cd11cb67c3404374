"""Data set readers: local image files, the embedded digits, noise, named specs.

Nothing here downloads anything; every reader takes a path you already have.

- :mod:`~wrapcal.datasets.npz`: images and labels from NumPy ``.npz`` archives.
- :mod:`~wrapcal.datasets.idx`: the IDX format of MNIST (gzip or raw).
- :mod:`~wrapcal.datasets.pixels`: value ranges, layouts, channels, sizes,
  normalisation (``to_rgb32``: MNIST as a far-OOD set for a CIFAR model).
- :mod:`~wrapcal.datasets.digits`: scikit-learn's bundled digits, the default data.
- :mod:`~wrapcal.datasets.noise`: seeded Gaussian / uniform noise images.
- :mod:`~wrapcal.datasets.folder`: ImageFolder directories and their class order.
- :mod:`~wrapcal.datasets.hf`: Hugging Face ``datasets`` saved directories (optional).
- :mod:`~wrapcal.datasets.specs`: any of these named by a short text, as the command
  line names them.
- :mod:`~wrapcal.datasets.safety`: what every reader checks first: regular files only
  (no FIFO, device or socket), sizes from headers against the bytes present, decoded
  images capped (:data:`~wrapcal.datasets.safety.MAX_IMAGE_PIXELS`) and of one size
  unless resized. A saved Hugging Face directory is read from its own files only.

The generic input handling (DataLoader, Dataset, ``(X, y)``) is :mod:`wrapcal.data`.
"""

from wrapcal.datasets.digits import DIGITS_MEAN, DIGITS_STD, DigitsData, digits, digits_to_images
from wrapcal.datasets.folder import ClassOrder, ImageDirectory, check_class_order
from wrapcal.datasets.idx import load_idx, load_idx_images, load_idx_labels
from wrapcal.datasets.noise import NOISE_KINDS, NoiseImages
from wrapcal.datasets.npz import NpzKeyError, find_npz_keys, load_npz_images, npz_class_names
from wrapcal.datasets.pixels import IMAGENET_MEAN, IMAGENET_STD, Normaliser, to_rgb32
from wrapcal.datasets.specs import ImageSettings, Loaded, SpecError, read_spec

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NOISE_KINDS",
    "ClassOrder",
    "DigitsData",
    "ImageDirectory",
    "ImageSettings",
    "Loaded",
    "NoiseImages",
    "Normaliser",
    "NpzKeyError",
    "SpecError",
    "check_class_order",
    "digits",
    "digits_to_images",
    "find_npz_keys",
    "load_idx",
    "load_idx_images",
    "load_idx_labels",
    "load_npz_images",
    "npz_class_names",
    "read_spec",
    "to_rgb32",
]
