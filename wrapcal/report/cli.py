"""``wrapcal evaluate``: a calibration and OOD report for a model, from the command line.

Examples::

    wrapcal evaluate timm:resnet10t --data digits --ood noise=gaussian --out report
    wrapcal evaluate wrapcal:cifar_resnet20 --weights cifar10_resnet20.safetensors \\
        --data cifar10_jpeg.npz --split test --ood mnist=t10k-images-idx3-ubyte.gz \\
        --plugins temperature --calibration cifar10_jpeg.npz --calibration-split train

The bare model is always evaluated (as ``baseline``); with ``--plugins`` it is also
wrapped, fitted and evaluated as ``wrapped``. A saved ``.wrapcal`` file is evaluated as
``wrapped``, beside its own backbone and head without plugins as ``baseline``.

Images from files are scaled to [0, 1], resized and normalised with ``--mean/--std``
(default: the ImageNet statistics, which timm, torchvision and ``wrapcal.models``
expect). OOD images are brought to the test images' channels and size first, then
normalised the same way. ``digits`` is normalised by ``wrapcal.data``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from wrapcal.errors import WrapcalError

__all__ = ["NoiseImages", "add_evaluate_arguments", "load_data", "model_builder", "run_evaluate"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NOISE_KINDS = ("gaussian", "uniform")
_IDX_NAME = re.compile(r"(idx\d|ubyte)", re.IGNORECASE)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``wrapcal evaluate`` to ``parser``."""
    parser.description = (
        "Evaluate a classifier's calibration and OOD detection (optionally wrapped with "
        "plugins) and write report.html, report.md, report.json and PNG figures."
    )
    parser.add_argument(
        "model",
        help="timm:NAME, torchvision:NAME, wrapcal:NAME (wrapcal.models, e.g. "
        "wrapcal:cifar_resnet20) or the path of a saved .wrapcal file",
    )
    parser.add_argument("--weights", help="safetensors state dict to load into the model")
    parser.add_argument(
        "--num-classes",
        type=int,
        help="number of classes of the model (default: the number in the test data)",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="labelled test data: 'digits' (scikit-learn's, test split), an ImageFolder "
        "directory or an .npz file with images and labels",
    )
    parser.add_argument(
        "--split", default="test", help="key prefix in the --data .npz (default: test)"
    )
    parser.add_argument(
        "--ood",
        action="append",
        default=[],
        metavar="[NAME=]SPEC",
        help="an OOD set (repeatable): 'gaussian' (pixels N(0.5, 1) clipped to [0, 1]) or "
        "'uniform' (pixels U[0, 1]) noise shaped like the test images, an .npz, an IDX "
        "images file (MNIST) or an ImageFolder directory; e.g. --ood noise=gaussian",
    )
    parser.add_argument(
        "--plugins",
        default="",
        help="comma-separated plugins to wrap the model with, e.g. temperature,mc_dropout",
    )
    parser.add_argument(
        "--calibration",
        help="calibration data to fit the plugins: 'digits' (calibration split), an "
        ".npz or an ImageFolder directory (default with --data digits: digits)",
    )
    parser.add_argument(
        "--calibration-split",
        default="calibration",
        help="key prefix in the --calibration .npz (default: calibration)",
    )
    parser.add_argument(
        "--train", help="training data for plugins that retrain (same forms as --calibration)"
    )
    parser.add_argument(
        "--train-split", default="train", help="key prefix in the --train .npz (default: train)"
    )
    parser.add_argument("--size", type=int, help="resize images to SIZE x SIZE")
    parser.add_argument(
        "--mean", type=float, nargs="+", help="per-channel mean (default: ImageNet's)"
    )
    parser.add_argument(
        "--std", type=float, nargs="+", help="per-channel std (default: ImageNet's)"
    )
    parser.add_argument("--out", default="wrapcal-report", help="report directory")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--bins", type=int, default=15, help="ECE bins (default: 15)")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples, 0 for none"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of noise, fit and bootstrap")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


# --- data --------------------------------------------------------------------------------


@dataclass
class Normaliser:
    """Pixel values in [0, 1] -> what the model takes: ``(x - mean) / std`` per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-3]
        mean, std = self.mean, self.std
        if len(mean) == 1:
            mean, std = mean * c, std * c
        if len(mean) != c:
            raise ValueError(
                f"--mean/--std have {len(mean)} values but the images have {c} channels; "
                "give one value per channel"
            )
        shape = (c, 1, 1)
        m = torch.tensor(mean, dtype=x.dtype).view(shape)
        s = torch.tensor(std, dtype=x.dtype).view(shape)
        return (x - m) / s


@dataclass
class Loaded:
    """A data set read for evaluation: ``data`` is ``(X, y)``, ``X`` or a Dataset."""

    data: Any
    n: int
    shape: tuple[int, int, int]
    num_classes: int | None
    normalise: Normaliser


def _match(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Images in [0, 1] to the reference's channels and size (grey <-> RGB, bilinear)."""
    c, h, w = shape
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot turn {x.shape[1]}-channel images into {c}-channel ones")
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).contiguous()


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _npz_split(path: Path, split: str | None) -> str | None:
    """Use ``split`` when the archive has ``{split}_images``, else let the reader guess."""
    import numpy as np

    with np.load(path, allow_pickle=False) as archive:
        return split if split and f"{split}_images" in archive.files else None


def _npz_classes(path: Path) -> int | None:
    import numpy as np

    with np.load(path, allow_pickle=False) as archive:
        return len(archive["classes"]) if "classes" in archive.files else None


def _image_folder(path: Path, size: tuple[int, int] | None, normalise: Normaliser):
    from torchvision import datasets, transforms

    probe = datasets.ImageFolder(str(path))
    if size is None:
        width, height = probe.loader(probe.samples[0][0]).size
        size = (height, width)
    steps = [transforms.Resize(size), transforms.ToTensor(), transforms.Lambda(normalise)]
    return datasets.ImageFolder(str(path), transform=transforms.Compose(steps)), size


def _missing(spec: str, role: str) -> FileNotFoundError:
    kinds = "'digits', an ImageFolder directory or an .npz file"
    if role == "ood":
        kinds = "'gaussian', 'uniform', an .npz, an IDX images file or an ImageFolder directory"
    return FileNotFoundError(f"{role} data not found: {spec} (expected {kinds})")


def load_data(
    spec: str,
    role: str,
    args: argparse.Namespace,
    split: str | None = None,
    like: Loaded | None = None,
) -> Loaded:
    """Read a data set named on the command line.

    Args:
        spec: ``digits``, a path (.npz, IDX, ImageFolder directory) or, for OOD sets,
            ``gaussian`` / ``uniform``.
        role: ``test``, ``calibration``, ``train`` or ``ood``.
        args: The parsed arguments (size, mean, std, seed).
        split: Key prefix in an .npz.
        like: The test set: other sets are brought to its image shape and normalisation.
    """
    if spec == "digits":
        from wrapcal.data import DIGITS_MEAN, DIGITS_STD, digits

        size = like.shape[-1] if like is not None else (args.size or 32)
        d = digits(size=size)
        part = {"calibration": d.calibration, "train": d.train}.get(role, d.test)
        x, y = part
        return Loaded(
            (x, y) if role != "ood" else x,
            len(x),
            tuple(x.shape[1:]),
            10,
            Normaliser((DIGITS_MEAN,), (DIGITS_STD,)),
        )
    if like is None:
        normalise = Normaliser(tuple(args.mean or IMAGENET_MEAN), tuple(args.std or IMAGENET_STD))
        if len(normalise.mean) != len(normalise.std):
            raise ValueError("--mean and --std need the same number of values")
    else:
        normalise = like.normalise
    if spec in NOISE_KINDS:
        if role != "ood" or like is None:
            raise ValueError(f"{spec!r} noise is an OOD set: use it with --ood")
        noise = NoiseImages(spec, like.n, like.shape, normalise, seed=args.seed)
        return Loaded(noise, like.n, like.shape, None, normalise)

    path = Path(spec)
    if not path.exists():
        raise _missing(spec, role)
    target = like.shape[-2:] if like is not None else None
    if path.is_dir():
        size = target or ((args.size, args.size) if args.size else None)
        dataset, size = _image_folder(path, size, normalise)
        channels = like.shape[0] if like is not None else 3
        classes = len(dataset.classes)
        return Loaded(dataset, len(dataset), (channels, *size), classes, normalise)

    if path.suffix == ".npz":
        from wrapcal.imagefiles import load_npz_images

        x, y = load_npz_images(path, split=_npz_split(path, split))
        classes = _npz_classes(path) or (int(y.max()) + 1 if y is not None else None)
    elif _IDX_NAME.search(path.name):
        from wrapcal.imagefiles import load_idx_images

        raw = torch.from_numpy(load_idx_images(path))
        x = (raw.float() / 255 if not raw.is_floating_point() else raw.float()).unsqueeze(1)
        y, classes = None, None
    else:
        raise ValueError(
            f"cannot read {spec}: expected an .npz file, an IDX images file (MNIST's "
            "t10k-images-idx3-ubyte.gz) or an ImageFolder directory"
        )
    x = _match(x, like.shape) if like is not None else _resize(x, args.size)
    x = normalise(x)
    if role != "ood" and y is None:
        raise ValueError(f"{spec} has no labels; {role} data must be labelled")
    data = x if role == "ood" else (x, y)
    return Loaded(data, len(x), tuple(x.shape[1:]), classes, normalise)


class NoiseImages(Dataset):
    """Seeded noise images, drawn in chunks so a large set never sits in memory at once.

    ``gaussian``: every pixel N(0.5, 1) clipped to [0, 1]; ``uniform``: every pixel
    U[0, 1] (Hendrycks et al. 2019, Outlier Exposure); then normalised like the test
    images. Item ``i`` is the same whatever order the items are read in.
    """

    def __init__(
        self,
        kind: str,
        n: int,
        shape: tuple[int, ...],
        normalise: Normaliser,
        seed: int = 0,
        chunk: int = 256,
    ) -> None:
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise {kind!r}; use one of {', '.join(NOISE_KINDS)}")
        self.kind, self.n, self.shape = kind, n, tuple(shape)
        self.normalise, self.seed, self.chunk = normalise, seed, chunk
        self._cached: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.n

    def block(self, index: int) -> torch.Tensor:
        """Chunk ``index`` (``chunk`` images, fewer at the end), drawn from its own seed."""
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        rows = min(self.chunk, self.n - index * self.chunk)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.kind == "gaussian":
            x = (0.5 + torch.randn((rows, *self.shape), generator=gen)).clamp(0, 1)
        else:
            x = torch.rand((rows, *self.shape), generator=gen)
        x = self.normalise(x)
        self._cached = (index, x)
        return x

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.block(i // self.chunk)[i % self.chunk]


# --- models ------------------------------------------------------------------------------


class _BackboneHead(nn.Module):
    """A saved model's own backbone and head without plugins: the baseline."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def model_builder(spec: str) -> Callable[[int | None], nn.Module]:
    """Check a ``timm:``, ``torchvision:`` or ``wrapcal:`` spec; return its builder, which
    takes the number of classes (``None``: the library's default) and makes the model
    with random weights."""
    prefix, _, name = spec.partition(":")

    def kwargs(num_classes: int | None) -> dict[str, int]:
        return {"num_classes": num_classes} if num_classes else {}

    if prefix == "timm" and name:
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
        return lambda k: timm.create_model(name, pretrained=False, **kwargs(k))
    if prefix == "torchvision" and name:
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(
                f"unknown torchvision model {name!r}; see torchvision.models.list_models()"
            )
        return lambda k: torchvision.models.get_model(name, weights=None, **kwargs(k))
    if prefix == "wrapcal" and name:
        from wrapcal import models

        builders = [n for n in models.__all__ if n[0].islower() and n != "cifar_resnet"]
        depth = re.fullmatch(r"cifar_resnet(\d+)", name)
        if name in builders:
            return lambda k: getattr(models, name)(**kwargs(k))
        if depth:
            return lambda k: models.cifar_resnet(int(depth.group(1)), **kwargs(k))
        raise ValueError(
            f"unknown wrapcal model {name!r}; wrapcal.models has {', '.join(builders)} "
            "(and cifar_resnetN for a depth N = 6n + 2)"
        )
    raise ValueError(
        f"unknown model {spec!r}: use timm:NAME, torchvision:NAME, wrapcal:NAME or the "
        "path of a saved .wrapcal file"
    )


def _load_weights(model: nn.Module, path: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {path} as safetensors: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ValueError(
            f"{path} does not fit the model ({detail}); check the model name and --num-classes"
        ) from err


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def _is_saved_file(spec: str) -> bool:
    return spec.endswith(".wrapcal") or (":" not in spec and Path(spec).exists())


def _plugins(text: str) -> list[Any]:
    from wrapcal.assemble import create_plugin

    names = [n.strip() for n in text.split(",") if n.strip()]
    # Created now, so an unknown name fails before any data is read.
    return [create_plugin(name) for name in names]


# --- the command -------------------------------------------------------------------------


def _evaluate(args: argparse.Namespace) -> Path:
    import wrapcal
    from wrapcal.report import evaluate

    progress = not args.no_progress
    plugins = _plugins(args.plugins)
    saved = _is_saved_file(args.model)
    if saved and not Path(args.model).is_file():
        raise FileNotFoundError(f"model file not found: {args.model}")
    if saved and (plugins or args.weights):
        raise ValueError(
            "a saved .wrapcal model already has its plugins and weights; --plugins and "
            "--weights apply to timm:, torchvision: and wrapcal: models"
        )
    builder = None if saved else model_builder(args.model)
    if args.weights and not Path(args.weights).is_file():
        raise FileNotFoundError(f"weights file not found: {args.weights}")
    device = _device(args.device)
    for opt in ("batch_size", "bins"):
        if getattr(args, opt) < 1:
            raise ValueError(f"--{opt.replace('_', '-')} must be at least 1")

    test = load_data(args.data, "test", args, split=args.split)
    ood = {}
    for item in args.ood:
        name, eq, spec = item.partition("=")
        if not eq:
            name, spec = Path(item).stem.split(".")[0] or item, item
        if not name or not spec:
            raise ValueError(f"--ood {item!r}: use NAME=SPEC, e.g. noise=gaussian")
        if name in ood:
            raise ValueError(f"--ood: two OOD sets are named {name!r}")
        ood[name] = load_data(spec, "ood", args, like=test).data

    if saved:
        wrapped = wrapcal.load(args.model).to(device)
        models = {
            "baseline": _BackboneHead(wrapped.backbone, wrapped.head),
            "wrapped": wrapped,
        }
    else:
        model = builder(args.num_classes or test.num_classes)
        if args.weights:
            _load_weights(model, args.weights)
        model = model.to(device).eval()
        models = {"baseline": model}
        if plugins:
            wrapped = wrapcal.wrap(model, plugins)
            fit_sets = {}
            for role, spec, split in (
                ("train", args.train, args.train_split),
                ("calibration", args.calibration, args.calibration_split),
            ):
                spec = spec or ("digits" if args.data == "digits" else None)
                if spec is not None:
                    fit_sets[role] = load_data(spec, role, args, split=split, like=test).data
            if fit_sets or any(p.requires_fit for p in plugins):
                wrapped.fit(
                    **fit_sets, batch_size=args.batch_size, progress=progress, seed=args.seed
                )
            models["wrapped"] = wrapped

    report = evaluate(
        models,
        test.data,
        ood,
        n_bins=args.bins,
        batch_size=args.batch_size,
        progress=progress,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    out = report.save(args.out)
    calibration = report.to_markdown().split("\n## Calibration", 1)[1].split("\n## ", 1)[0]
    print("Calibration" + calibration.rstrip())
    print(f"\nreport written to {out / 'report.html'} (also report.md, report.json, figures/)")
    return out


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    return " ".join(text.split())


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``wrapcal evaluate``; returns the exit code (2 on bad input, with one line on
    stderr naming the problem)."""
    try:
        _evaluate(args)
    except (WrapcalError, OSError, ValueError) as err:
        print(f"wrapcal evaluate: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wrapcal.report.cli``: the evaluate command on its own."""
    parser = argparse.ArgumentParser(prog="wrapcal evaluate")
    add_evaluate_arguments(parser)
    return run_evaluate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
