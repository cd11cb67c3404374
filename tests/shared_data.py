"""Test helpers for the real data in ``../shared/data`` (see its README).

Import from tests as ``from shared_data import ...`` (``tests/`` is on the import path
through pyproject's ``pythonpath``; a script sets ``PYTHONPATH=tests``).

Where the data is:
    ``SHARED_DATA``: ``$WRAPCAL_SHARED_DATA`` if set, else ``shared/data`` beside the
    repository (``/work/shared/data`` for a repository at ``/work/main``; a CI clone
    has ``shared/`` beside the repository too). ``HAVE_SHARED_DATA`` says whether the
    files below are all there, and ``requires_shared_data`` is a ``skipif`` marker for
    tests that need them. Every loader also calls ``pytest.skip`` when they are absent.

What it holds (all loaders are cached in memory; do not modify the returned tensors
in place, except those of ``resnet20_outputs``, which are fresh copies):
    ``cifar10(split)``: ``(images, labels)`` of ``cifar10_jpeg.npz``; images float32
    [10000, 3, 32, 32] normalised with ``CIFAR_MEAN``/``CIFAR_STD``, labels int64.
    ``split="test"`` is the whole CIFAR-10 test set (JPEG copy, a real distribution
    shift), ``split="train"`` 1000 training images per class.

    ``mnist_ood(n=None)``: the first ``n`` (default all 10000) MNIST test digits as
    float32 [n, 3, 32, 32]: resized 28 -> 32 (bilinear, antialias), grey replicated to
    RGB, normalised with the CIFAR mean/std. A far-OOD set for CIFAR models.

    ``mnist_labels()``: int64 [10000] digit labels of the MNIST test set.

    ``pretrained_resnet20()``: a new ``wrapcal.files.cifar_resnets.cifar_resnet20`` in eval mode
    with the third-party CIFAR-10 weights loaded (``strict=True``) on each call.

    ``resnet20_outputs()``: the pretrained ResNet-20's penultimate features (float32,
    64-d: the input of ``linear``) and logits (float32, 10-d) on cifar train, cifar test
    and MNIST test, as a dict of torch tensors::

        train_features [10000, 64]  train_logits [10000, 10]  train_labels [10000]
        test_features  [10000, 64]  test_logits  [10000, 10]  test_labels  [10000]
        mnist_features [10000, 64]  mnist_logits [10000, 10]  mnist_labels [10000]
        weight [10, 64], bias [10]  (the model's ``linear`` head)
        compute_seconds []          (time the backbone passes took when computed)

    The pass runs once (``torch.no_grad``, batches of 500) and is cached on disk as an
    ``.npz`` under ``$WRAPCAL_TEST_CACHE`` (default ``~/.cache/wrapcal-tests``), keyed
    by a hash of the weights file, the data files' sizes and mtimes, and the source of
    ``wrapcal/models.py`` and the ``wrapcal.datasets`` readers. On 2 CPU cores computing it
    takes about 20 s; loading the cache well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from wrapcal import datasets
from wrapcal.datasets import idx, npz, pixels
from wrapcal.files import cifar_resnets as models
from wrapcal.files.cifar_resnets import CIFAR_MEAN, CIFAR_STD, cifar_resnet20

__all__ = [
    "CIFAR_NPZ",
    "HAVE_SHARED_DATA",
    "MNIST_IMAGES",
    "MNIST_LABELS",
    "RESNET20_WEIGHTS",
    "SHARED_DATA",
    "cache_dir",
    "cifar10",
    "mnist_labels",
    "mnist_ood",
    "pretrained_resnet20",
    "requires_shared_data",
    "resnet20_outputs",
]

#: Bump when the computation in ``resnet20_outputs`` changes, to invalidate old caches.
_CACHE_VERSION = "2"
_BATCH = 500

SHARED_DATA = Path(
    os.environ.get("WRAPCAL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
CIFAR_NPZ = SHARED_DATA / "cifar10_jpeg.npz"
RESNET20_WEIGHTS = SHARED_DATA / "models" / "cifar10_resnet20.safetensors"
MNIST_IMAGES = SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = SHARED_DATA / "mnist" / "t10k-labels-idx1-ubyte.gz"
_FILES = (CIFAR_NPZ, RESNET20_WEIGHTS, MNIST_IMAGES, MNIST_LABELS)

HAVE_SHARED_DATA = all(p.is_file() for p in _FILES)
#: CI sets ``WRAPCAL_REQUIRE_SHARED_DATA=1``: then a test that needs the data fails
#: instead of skipping, so a misconfigured CI cannot pass green without it.
REQUIRE_SHARED_DATA = os.environ.get("WRAPCAL_REQUIRE_SHARED_DATA", "") not in ("", "0")
_SKIP_REASON = (
    f"shared data not found at {SHARED_DATA} "
    "(set WRAPCAL_SHARED_DATA to the directory holding cifar10_jpeg.npz)"
)
requires_shared_data = pytest.mark.skipif(
    not HAVE_SHARED_DATA and not REQUIRE_SHARED_DATA, reason=_SKIP_REASON
)


def _require() -> None:
    if not HAVE_SHARED_DATA:
        if REQUIRE_SHARED_DATA:
            pytest.fail(f"WRAPCAL_REQUIRE_SHARED_DATA is set but {_SKIP_REASON}")
        pytest.skip(_SKIP_REASON)


def cache_dir() -> Path:
    """Directory of the on-disk test cache (``$WRAPCAL_TEST_CACHE`` or ~/.cache)."""
    env = os.environ.get("WRAPCAL_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "wrapcal-tests"


def cifar10(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised CIFAR-10 images [N, 3, 32, 32] and int64 labels of a split."""
    return _cifar10(split)


@functools.cache
def _cifar10(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    _require()
    images, labels = datasets.load_npz_images(
        CIFAR_NPZ, split=split, mean=CIFAR_MEAN, std=CIFAR_STD
    )
    assert labels is not None
    return images, labels


@functools.cache
def _mnist_all() -> torch.Tensor:
    _require()
    raw = datasets.load_idx_images(MNIST_IMAGES)
    return datasets.to_rgb32(raw, size=32, mean=CIFAR_MEAN, std=CIFAR_STD)


def mnist_ood(n: int | None = None) -> torch.Tensor:
    """The first ``n`` MNIST test digits as normalised [n, 3, 32, 32] (all if None)."""
    images = _mnist_all()
    return images if n is None else images[:n]


@functools.cache
def mnist_labels() -> torch.Tensor:
    """Digit labels (int64 [10000]) of the MNIST test set."""
    _require()
    return torch.from_numpy(datasets.load_idx_labels(MNIST_LABELS))


@functools.cache
def _resnet20_state() -> dict[str, torch.Tensor]:
    _require()
    from safetensors.torch import load_file

    return load_file(RESNET20_WEIGHTS)


def pretrained_resnet20() -> nn.Module:
    """A new ResNet-20 in eval mode with the third-party weights (strict load)."""
    model = cifar_resnet20(num_classes=10)
    model.load_state_dict(_resnet20_state(), strict=True)
    return model.eval()


def _cache_key() -> str:
    h = hashlib.sha256(f"wrapcal-tests resnet20_outputs v{_CACHE_VERSION}".encode())
    h.update(RESNET20_WEIGHTS.read_bytes())
    for p in (CIFAR_NPZ, MNIST_IMAGES, MNIST_LABELS):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for module in (models, npz, idx, pixels):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def _features_and_logits(model: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, ...]:
    # channels_last runs about 1.8x faster on CPU here (oneDNN); logits agree to ~1e-5.
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    captured: list[torch.Tensor] = []
    hook = model.linear.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        logits = [model(images[i : i + _BATCH]) for i in range(0, len(images), _BATCH)]
    finally:
        hook.remove()
    return torch.cat(captured).numpy(), torch.cat(logits).numpy()


def resnet20_features(images: torch.Tensor) -> np.ndarray:
    """The pretrained ResNet-20's penultimate features of normalised images (float32
    ``[N, 64]``), in batches: the pass ``resnet20_outputs`` caches, for other images."""
    return _features_and_logits(pretrained_resnet20(), images)[0]


def _compute_outputs() -> dict[str, np.ndarray]:
    model = pretrained_resnet20()
    start = time.perf_counter()
    out: dict[str, np.ndarray] = {}
    for name, (images, labels) in {
        "train": cifar10("train"),
        "test": cifar10("test"),
        "mnist": (mnist_ood(), mnist_labels()),
    }.items():
        out[f"{name}_features"], out[f"{name}_logits"] = _features_and_logits(model, images)
        out[f"{name}_labels"] = labels.numpy()
    out["weight"] = model.linear.weight.detach().numpy().copy()
    out["bias"] = model.linear.bias.detach().numpy().copy()
    out["compute_seconds"] = np.float64(time.perf_counter() - start)
    return out


@functools.cache
def _outputs_arrays() -> dict[str, np.ndarray]:
    _require()
    path = cache_dir() / f"resnet20_outputs-{_cache_key()}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:  # corrupt cache: recompute
            warnings.warn(f"ignoring unreadable test cache {path}: {e}", stacklevel=2)
    out = _compute_outputs()
    try:  # atomic write: parallel test runs never see a half-written file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **out)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as e:
        warnings.warn(f"could not write test cache {path}: {e}", stacklevel=2)
    return out


def resnet20_outputs() -> dict[str, torch.Tensor]:
    """Features, logits, labels and head of the pretrained ResNet-20 (fresh tensors).

    See the module docstring for the keys. Computed once and cached on disk.
    """
    return {k: torch.from_numpy(np.array(v)) for k, v in _outputs_arrays().items()}


def resnet20_head(dtype: torch.dtype = torch.float32) -> nn.Linear:
    """The pretrained ResNet-20's classifier (64 features -> 10 logits), in eval mode."""
    out = resnet20_outputs()
    head = nn.Linear(64, 10).to(dtype)
    with torch.no_grad():
        head.weight.copy_(out["weight"])
        head.bias.copy_(out["bias"])
    return head.eval()


def resnet20_on_features(plugins: list) -> Any:
    """The ResNet-20's head wrapped on an identity backbone: its inputs are the cached
    features (``resnet20_outputs``), so fitting and predicting need no backbone pass."""
    import wrapcal
    from wrapcal.model.split import Split

    return wrapcal.wrap(None, split=Split(nn.Identity(), resnet20_head()), plugins=plugins)


# --- the public logit sets (../shared/data/logits) -----------------------------------

LOGITS_DIR = SHARED_DATA / "logits"
LOGIT_SETS = ["cifar10_resnet20", "cifar10_resnet32", "cifar100_resnet20", "cifar100_resnet32"]
requires_logits = pytest.mark.skipif(
    not all((LOGITS_DIR / f"{name}.npz").is_file() for name in LOGIT_SETS),
    reason=f"logits files not found in {LOGITS_DIR}",
)


def load_logits(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "resnet20_jpeg":
        out = resnet20_outputs()
        return out["test_logits"], out["test_labels"]
    with np.load(LOGITS_DIR / f"{name}.npz", allow_pickle=False) as f:
        return torch.from_numpy(f["logits"]), torch.from_numpy(f["labels"])


def splits(n_total: int, n_splits: int = 200, seed: int = 0) -> torch.Tensor:
    """``[n_splits, n_total]`` random permutations; a test calibrates on the first rows."""
    gen = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand(n_splits, n_total, generator=gen), dim=1)
