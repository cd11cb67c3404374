"""What ``predict`` returns, for wrapped and bare models alike."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wrapcal.plugin.types import OutputKind

__all__ = ["Prediction"]


@dataclass
class Prediction:
    """Predictions for a batch of ``B`` inputs.

    Attributes:
        logits: ``[B, K]`` calibrated logits (what ``wrapped(x)`` returns).
        probs: ``[B, K']`` predictive probabilities (``K' = 2`` for a single-logit
            binary model), in the logits' dtype.
        label: ``[B]`` predicted class.
        confidence: ``[B]`` probability of the predicted class.
        scores: Named uncertainty / OOD scores ``[B]``, higher = more uncertain.
        outputs: Named per-sample outputs that are not scores (prediction sets
            ``[B, K]``, decisions ``[B]``...). Each is also an attribute:
            ``prediction.sets``.
        kinds: The :class:`~wrapcal.OutputKind` of every score and output.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    label: torch.Tensor
    confidence: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    kinds: dict[str, OutputKind] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.probs.shape[0]

    def __getattr__(self, name: str) -> torch.Tensor:
        # Only called for names that are not fields: a plugin's outputs and scores.
        if name.startswith("__"):
            raise AttributeError(name)
        for table in ("outputs", "scores"):
            found = self.__dict__.get(table, {})
            if name in found:
                return found[name]
        known = sorted([*self.__dict__.get("outputs", {}), *self.__dict__.get("scores", {})])
        raise AttributeError(
            f"this prediction has no output {name!r}; its outputs and scores are {known}"
        )

    @classmethod
    def build(
        cls,
        logits: torch.Tensor,
        probs: torch.Tensor,
        outputs: dict[str, torch.Tensor],
        kinds: dict[str, OutputKind],
    ) -> Prediction:
        """A prediction from the chain's logits, probabilities and per-sample outputs."""
        # amax + argmax, not max(dim=...): the latter is orders of magnitude slower on
        # some CPU builds of torch (milliseconds for a small batch).
        confidence, label = probs.amax(dim=-1), probs.argmax(dim=-1)
        scores = {k: v for k, v in outputs.items() if kinds[k].is_score}
        others = {k: v for k, v in outputs.items() if not kinds[k].is_score}
        return cls(logits, probs, label, confidence, scores, others, dict(kinds))

    @classmethod
    def from_probs(
        cls, logits: torch.Tensor, probs: torch.Tensor, scores: dict[str, torch.Tensor]
    ) -> Prediction:
        """A prediction whose per-sample outputs are all uncertainty scores."""
        kinds = dict.fromkeys(scores, OutputKind.UNCERTAINTY)
        return cls.build(logits, probs, dict(scores), kinds)

    @classmethod
    def cat(cls, parts: list[Prediction]) -> Prediction:
        """Concatenate the predictions of several batches."""
        if not parts:
            raise ValueError("no predictions to concatenate")
        first = parts[0]
        return cls(
            torch.cat([p.logits for p in parts]),
            torch.cat([p.probs for p in parts]),
            torch.cat([p.label for p in parts]),
            torch.cat([p.confidence for p in parts]),
            {k: torch.cat([p.scores[k] for p in parts]) for k in first.scores},
            {k: torch.cat([p.outputs[k] for p in parts]) for k in first.outputs},
            dict(first.kinds),
        )

    def select_rows(self, index: slice | torch.Tensor) -> Prediction:
        """The prediction of some of the rows (``slice(0, 0)``: none, every output keeping
        its shape past the batch and its dtype)."""
        return Prediction(
            self.logits[index],
            self.probs[index],
            self.label[index],
            self.confidence[index],
            {k: v[index] for k, v in self.scores.items()},
            {k: v[index] for k, v in self.outputs.items()},
            dict(self.kinds),
        )

    def to(self, device: torch.device | str) -> Prediction:
        """The same prediction with every tensor on ``device``."""
        return Prediction(
            self.logits.to(device),
            self.probs.to(device),
            self.label.to(device),
            self.confidence.to(device),
            {k: v.to(device) for k, v in self.scores.items()},
            {k: v.to(device) for k, v in self.outputs.items()},
            dict(self.kinds),
        )
