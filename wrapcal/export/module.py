"""The traceable inference module an export is made of.

:class:`InferenceModule` runs a wrapped model's whole chain (``wrapped.chain()``:
features -> members -> finish -> probs -> outputs, exactly what ``predict`` runs, minus
the input checks) and returns its named outputs as a tuple in a fixed order:

    ``logits``, ``probs``, ``label``, ``confidence``, then every score
    (``Prediction.scores``: the core's, then each plugin's, in chain order), then every
    other per-sample output (``Prediction.outputs``: sets, decisions...).

:func:`output_specs` says what each output is (name, kind, dtype, shape) by running the
chain once on an example batch; the export's metadata carries the list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wrapcal.plugin.prediction import Prediction

if TYPE_CHECKING:
    from wrapcal.files.preprocess import Preprocess
    from wrapcal.model.wrapped import WrappedModel

__all__ = ["CORE_OUTPUTS", "InferenceModule", "OutputSpec", "PixelInput", "output_specs"]

#: The four outputs every export starts with, and what each is.
CORE_OUTPUTS = {
    "logits": "logits",
    "probs": "probabilities",
    "label": "label",
    "confidence": "confidence",
}


@dataclass(frozen=True)
class OutputSpec:
    """One named output of an export.

    Attributes:
        name: The output's name (an ONNX output name; a ``Prediction`` field or key).
        kind: ``"logits"``, ``"probabilities"``, ``"label"``, ``"confidence"``, or the
            :class:`~wrapcal.OutputKind` value of a score or plugin output.
        dtype: Its dtype (``"float32"``, ``"int64"``, ``"bool"``...).
        shape: Its shape, ``"batch"`` first.
    """

    name: str
    kind: str
    dtype: str
    shape: tuple[int | str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "dtype": self.dtype, "shape": [*self.shape]}


def prediction_outputs(prediction: Prediction) -> dict[str, torch.Tensor]:
    """A prediction's tensors by output name, in the export's order."""
    named = {
        "logits": prediction.logits,
        "probs": prediction.probs,
        "label": prediction.label,
        "confidence": prediction.confidence,
    }
    for table in (prediction.scores, prediction.outputs):
        for name, value in table.items():
            if name in named:
                raise ValueError(
                    f"a plugin output is named {name!r}, like one of the export's core outputs "
                    f"({', '.join(CORE_OUTPUTS)}); rename it to export the model"
                )
            named[name] = value
    return named


class PixelInput(nn.Module):
    """``uint8`` images ``[N, H, W, C]`` (RGB, or L) -> the model's input ``[N, C, H, W]``.

    What :class:`~wrapcal.Preprocess` says, in float32 and in the order a data loader
    computes it (``u / 255``, the value range, ``(x - mean) / std``), then the model's
    dtype. It never resizes: a resize that equals the one the model was trained with
    (PIL's antialiased filters) is not an ONNX operator, so the graph takes the recorded
    size and the server resizes.

    Args:
        preprocess: The record.
        dtype: The model's floating dtype.
    """

    # Registered buffers, [1, C, 1, 1].
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, preprocess: Preprocess, dtype: torch.dtype) -> None:
        super().__init__()
        c = preprocess.channels
        self.dtype = dtype
        low, high = preprocess.value_range
        self.rescale = (low, high) != (0.0, 1.0)
        self.low, self.span = low, high - low
        # The model's channel order from RGB input: BGR reverses the channel axis.
        self.reverse = preprocess.channel_order == "BGR"
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, c, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 255.0
        if self.rescale:
            x = x * self.span + self.low
        x = x.permute(0, 3, 1, 2)
        if self.reverse:
            x = x.flip(1)
        return ((x - self.mean) / self.std).to(self.dtype)


class InferenceModule(nn.Module):
    """``forward(x)`` -> the wrapped model's named outputs, as a tuple (module docstring).

    Args:
        wrapped: A fitted :class:`~wrapcal.WrappedModel`; held as a submodule, so its
            weights and every plugin's learned buffers become the graph's constants.
        names: The output names, in order (from :func:`output_specs`).
        cached: Take backbone features ``[B, D]`` instead of inputs (no backbone): the
            plugin part of the graph alone, used to find which plugin stops an export.
        upto: Only the first ``upto`` plugins (all by default), for the same search.
        pixels: A :class:`PixelInput`: the graph then takes ``uint8`` images
            ``[N, H, W, C]`` and preprocesses them first.
    """

    def __init__(
        self,
        wrapped: WrappedModel,
        names: list[str],
        cached: bool = False,
        upto: int | None = None,
        pixels: PixelInput | None = None,
    ) -> None:
        super().__init__()
        self.model: WrappedModel = wrapped
        self.names = list(names)
        self.cached = cached
        self.upto = upto
        self.pixels = pixels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.pixels is not None:
            x = self.pixels(x)
        chain = self.model.chain(self.upto)
        prediction = chain.predict(None, x) if self.cached else chain.predict(x)
        named = prediction_outputs(prediction)
        if list(named) != self.names:
            raise ValueError(
                f"the model's outputs changed between two calls: {list(named)} then "
                f"{self.names}; an exported graph needs the same outputs for every batch"
            )
        return tuple(named.values())


def output_specs(
    wrapped: WrappedModel,
    example: torch.Tensor,
    cached: bool = False,
    upto: int | None = None,
    pixels: PixelInput | None = None,
) -> list[OutputSpec]:
    """The outputs of ``wrapped``'s chain on ``example`` (images through ``pixels``
    first, when given): names, kinds, dtypes, shapes."""
    chain = wrapped.chain(upto)
    if pixels is not None:
        example = pixels(example)
    with torch.no_grad():
        prediction = chain.predict(None, example) if cached else chain.predict(example)
    specs = []
    for name, value in prediction_outputs(prediction).items():
        kind = CORE_OUTPUTS.get(name) or prediction.kinds[name].value
        dtype = str(value.dtype).removeprefix("torch.")
        specs.append(OutputSpec(name, kind, dtype, ("batch", *value.shape[1:])))
    return specs
