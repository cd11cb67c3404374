"""Small reference classifiers: the CIFAR ResNets of He et al. (2016).

``cifar_resnet20`` is the architecture of the third-party CIFAR-10 ResNet-20 whose
weights the tests, examples and benchmarks use; its parameter names match that
checkpoint, so ``model.load_state_dict(safetensors.torch.load_file(path))`` works with
``strict=True``. The head is the plain attribute ``linear`` and ``forward`` ends with
``return self.linear(out)``, so the generic "last ``nn.Linear``" split applies.

Example:
    >>> from wrapcal.files.cifar_resnets import cifar_resnet20
    >>> model = cifar_resnet20()
    >>> sum(p.numel() for p in model.parameters())
    269722
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "CifarResNet", "cifar_resnet", "cifar_resnet20"]

#: Per-channel mean of the inputs the reference ResNet-20 expects (RGB in [0, 1]).
CIFAR_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: Per-channel standard deviation of the inputs the reference ResNet-20 expects.
CIFAR_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class _PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut.

    Subsamples the input spatially (``x[:, :, ::stride, ::stride]``) and zero-pads the
    channels, half of the new channels on each side.

    Args:
        in_planes: Channels of the input.
        planes: Channels of the output.
        stride: Spatial subsampling step.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsample and zero-pad ``x`` of shape [N, C, H, W]."""
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (
            _PadShortcut(in_planes, planes, stride)
            if stride != 1 or in_planes != planes
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape [N, in_planes, H, W]."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016, Section 4.2), option-A shortcuts.

    A 3x3 convolution to 16 channels, three stages of ``n`` basic blocks with 16, 32
    and 64 channels (stride 2 at the first block of stages 2 and 3), global average
    pooling and a linear head ``linear`` (64 -> ``num_classes``).

    Args:
        blocks_per_stage: Basic blocks per stage (``n``; depth is ``6 n + 2``).
        num_classes: Number of output classes.
    """

    # Set by cifar_resnet() on the models it builds: how wrapcal.load rebuilds the model
    # and what its inputs are (plain attributes, not submodules).
    wrapcal_source: dict[str, object]
    wrapcal_preprocess: dict[str, object]

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images [N, 3, H, W] (normalised) to logits [N, num_classes]."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Build a CIFAR ResNet of the given depth.

    Args:
        depth: Number of weighted layers, ``6 n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: Number of output classes.

    Returns:
        An untrained ``CifarResNet`` (in training mode, as ``nn.Module`` s start).

    Raises:
        ValueError: If ``depth`` is not of the form ``6 n + 2`` with ``n >= 1``.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
    model = CifarResNet((depth - 2) // 6, num_classes)
    # Lets wrapcal.load rebuild the model by name (only wrapcal.files.cifar_resnets names are used).
    model.wrapcal_source = {
        "name": "cifar_resnet",
        "kwargs": {"depth": depth, "num_classes": num_classes},
    }
    # What its inputs are (wrapcal.files.preprocess): wrap records it, save and export carry it.
    model.wrapcal_preprocess = {
        "mean": list(CIFAR_MEAN),
        "std": list(CIFAR_STD),
        "size": [32, 32],
        "channel_order": "RGB",
        "value_range": [0.0, 1.0],
        "interpolation": None,
    }
    return model


def cifar_resnet20(num_classes: int = 10) -> CifarResNet:
    """Build a CIFAR ResNet-20 (0.27M parameters with 10 classes).

    Its parameter names match the published checkpoint ``cifar10_resnet20.safetensors``
    (``conv1``, ``bn1``, ``layer{1,2,3}.{0,1,2}.{conv1,bn1,conv2,bn2}``, ``linear``).
    Inputs are RGB in [0, 1] normalised with ``CIFAR_MEAN`` and ``CIFAR_STD``.

    Args:
        num_classes: Number of output classes.

    Returns:
        An untrained ResNet-20; load weights with ``load_state_dict``.
    """
    return cifar_resnet(20, num_classes)
