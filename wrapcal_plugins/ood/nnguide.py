"""Nearest-neighbour guidance (Park, Jung & Teoh, ICCV 2023): the detector score ``nnguide``.

"Nearest Neighbor Guidance for Out-of-Distribution Detection" multiplies the
classifier's confidence, the energy ``E(x) = logsumexp(logits(x))``, by a guidance
term that is large only near the training data: the mean of the ``k`` largest inner
products between the input's normalised feature ``z = f / ||f||`` and a bank of the
training features' normalised features each scaled by its own energy, ``E(x_i) z_i``.
The score is its negative (higher = more OOD)::

    nnguide(f) = -E(x) * mean_{top k over i} <z, E(x_i) z_i>

It follows the authors' code (roomo7time/nnguide) and pytorch-ood's ``NNGuide``:

* ``k = 10``: the authors' default (OpenOOD uses 100 with a 1% bank).
* The bank: the ``train`` (else ``calibration``) features, every row (pytorch-ood's
  choice); ``bank_size=`` keeps a seeded random subset, as the paper does (1% of
  ImageNet). A learned buffer of the saved file, float32 or float16.
* Exact search, by blocks of the bank, with the ``knn`` plugin's search
  (:func:`~wrapcal_plugins.ood.knn.top_similarities`): memory stays bounded whatever
  the bank size.
* Input: the model's features (:attr:`~wrapcal.OutputContext.backbone_features`) and
  the head's own logits of them (:attr:`~wrapcal.OutputContext.base_logits`; the bank's
  energies are the same head's, as ``fit`` finds it). Not sampled features, extra
  heads or calibrated logits. A single binary logit ``z`` counts as ``[0, z]``.
* The bank is one whole set on every rank under ``torch.distributed`` (each rank
  scales its shard's rows; they are then gathered).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from wrapcal.plugin import (
    DataError,
    FitData,
    Interval,
    ModelView,
    Options,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    hookimpl,
)
from wrapcal_plugins.ood._feature_stats import (
    FIT_SETS,
    base_logits,
    compute_dtype,
    energy,
    feature_chunks,
    fit_set,
)
from wrapcal_plugins.ood.knn import DTYPES, normalise, top_similarities

__all__ = ["NNGuide"]

_NAME = "nnguide"
_WHY = "the guidance bank of in-distribution features scaled by their energy"


class NNGuide(Plugin):
    """Minus the energy times the similarity to the nearest energy-scaled train features.

    Args:
        k: Neighbours averaged in the guidance (the authors: 10).
        bank_size: Keep at most this many training features (a seeded random subset);
            ``None`` keeps them all.
        dtype: ``"float32"`` or ``"float16"``, the bank's storage type.
        seed: Seed of the subset; ``None`` takes the ``seed`` given to ``wrapped.fit``.

    Attributes:
        bank_: ``[N, D]`` the normalised training features times their energy.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "k": [Interval(int, 1, None)],
        "bank_size": [None, Interval(int, 1, None)],
        "dtype": [Options(str, DTYPES)],
        "seed": [None, Interval(int, 0, 2**63 - 1)],
    }

    def __init__(
        self,
        k: int = 10,
        bank_size: int | None = None,
        dtype: str = "float32",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.k = k
        self.bank_size = bank_size
        self.dtype = dtype
        self.seed = seed
        self.register_learned_buffer("bank_", (None, "num_features"), tuple(DTYPES.values()))

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.fit_reads = FIT_SETS
        tags.fits_from_shards = True  # each rank scales its own rows; the bank is gathered
        tags.exportable = True  # blocks of matmul and topk, as knn
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def fit(self, model: ModelView, data: FitData) -> NNGuide:
        """The bank: normalised ``train`` (else ``calibration``) features times their
        energy under the model's head."""
        source = fit_set(data, _NAME, _WHY)
        total = source.total
        size = total if self.bank_size is None else min(self.bank_size, total)
        if size < self.k:
            raise DataError(
                f"plugin {_NAME}: k={self.k} neighbours, but the bank holds {size} features "
                f"(the {source.name!r} set has {total}); lower k or give more data"
            )
        keep = None  # every row; else a subset drawn over the whole set's rows
        if size < total:
            seed = data.seed if self.seed is None else int(self.seed)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            keep = torch.zeros(total, dtype=torch.bool)
            keep[torch.randperm(total, generator=generator)[:size]] = True
        parts = []
        start = source.offset
        for features, _ in feature_chunks(model, source):
            rows = features.shape[0]
            if keep is not None:
                features = features[keep[start : start + rows].to(features.device)]
            start += rows
            logits = base_logits(model, features)
            confidence = -energy(logits.to(compute_dtype(logits.dtype)))  # logsumexp
            unit = normalise(features.to(compute_dtype(features.dtype)))
            parts.append((unit * confidence[:, None]).to(DTYPES[self.dtype]))
        empty = torch.zeros(0, model.num_features, dtype=DTYPES[self.dtype], device=model.device)
        bank = torch.cat(parts) if parts else empty
        self.bank_ = source.cat_over_shards(bank)
        return self

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``nnguide``: minus the energy times the mean of the ``k`` largest similarities."""
        features = context.backbone_features
        dtype = compute_dtype(features.dtype)
        queries = normalise(features.to(dtype))
        top = top_similarities(queries, self.bank_, self.k)
        confidence = -energy(context.base_logits.to(dtype))
        return {_NAME: -(top.mean(dim=1) * confidence)}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, NNGuide)
