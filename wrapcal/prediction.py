"""What ``predict`` returns, for wrapped and bare models alike."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Prediction:
    """Predictions for a batch of ``B`` inputs.

    Attributes:
        logits: ``[B, K]`` calibrated logits (what ``wrapped(x)`` returns).
        probs: ``[B, K']`` predictive probabilities (``K' = 2`` for a single-logit
            binary model).
        label: ``[B]`` predicted class.
        confidence: ``[B]`` probability of the predicted class.
        scores: Named uncertainty / OOD scores ``[B]``, higher = more uncertain.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    label: torch.Tensor
    confidence: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.probs.shape[0]

    @classmethod
    def from_probs(
        cls, logits: torch.Tensor, probs: torch.Tensor, scores: dict[str, torch.Tensor]
    ) -> Prediction:
        # amax + argmax, not max(dim=...): the latter is orders of magnitude slower on
        # some CPU builds of torch (milliseconds for a small batch).
        confidence, label = probs.amax(dim=-1), probs.argmax(dim=-1)
        return cls(logits, probs, label, confidence, scores)

    @classmethod
    def cat(cls, parts: list[Prediction]) -> Prediction:
        """Concatenate the predictions of several batches."""
        if not parts:
            raise ValueError("no predictions to concatenate")
        return cls(
            torch.cat([p.logits for p in parts]),
            torch.cat([p.probs for p in parts]),
            torch.cat([p.label for p in parts]),
            torch.cat([p.confidence for p in parts]),
            {k: torch.cat([p.scores[k] for p in parts]) for k in parts[0].scores},
        )

    def to(self, device: torch.device | str) -> Prediction:
        """The same prediction with every tensor on ``device``."""
        return Prediction(
            self.logits.to(device),
            self.probs.to(device),
            self.label.to(device),
            self.confidence.to(device),
            {k: v.to(device) for k, v in self.scores.items()},
        )
