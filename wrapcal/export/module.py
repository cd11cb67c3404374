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
    from wrapcal.model.wrapped import WrappedModel

__all__ = ["CORE_OUTPUTS", "InferenceModule", "OutputSpec", "output_specs"]

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


class InferenceModule(nn.Module):
    """``forward(x)`` -> the wrapped model's named outputs, as a tuple (module docstring).

    Args:
        wrapped: A fitted :class:`~wrapcal.WrappedModel`; held as a submodule, so its
            weights and every plugin's learned buffers become the graph's constants.
        names: The output names, in order (from :func:`output_specs`).
        cached: Take backbone features ``[B, D]`` instead of inputs (no backbone): the
            plugin part of the graph alone, used to find which plugin stops an export.
        upto: Only the first ``upto`` plugins (all by default), for the same search.
    """

    def __init__(
        self, wrapped: WrappedModel, names: list[str], cached: bool = False, upto: int | None = None
    ) -> None:
        super().__init__()
        self.model: WrappedModel = wrapped
        self.names = list(names)
        self.cached = cached
        self.upto = upto

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
    wrapped: WrappedModel, example: torch.Tensor, cached: bool = False, upto: int | None = None
) -> list[OutputSpec]:
    """The outputs of ``wrapped``'s chain on ``example``: names, kinds, dtypes, shapes."""
    chain = wrapped.chain(upto)
    with torch.no_grad():
        prediction = chain.predict(None, example) if cached else chain.predict(example)
    specs = []
    for name, value in prediction_outputs(prediction).items():
        kind = CORE_OUTPUTS.get(name) or prediction.kinds[name].value
        dtype = str(value.dtype).removeprefix("torch.")
        specs.append(OutputSpec(name, kind, dtype, ("batch", *value.shape[1:])))
    return specs
