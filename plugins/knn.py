"""Deep nearest neighbours (Sun, Ming, Zhu & Li, ICML 2022): score ``knn``.

"Out-of-Distribution Detection with Deep Nearest Neighbors" keeps the L2-normalised
penultimate features of the in-distribution training set and scores an input by the
Euclidean distance from its normalised feature ``z = f / ||f||`` to the ``k``-th nearest
of them (higher = more OOD). No class labels, no density assumption.

What this plugin does, and the choices it makes:

* ``k = 50`` by default: the paper's value for CIFAR-10 (it uses 200 for CIFAR-100 and
  1000 for ImageNet, with a 1% sample of the training set as the bank; OpenOOD sweeps
  50..1000). The distance is the plain Euclidean one; the authors' and OpenOOD's code
  read the *squared* distance from faiss, which ranks inputs identically.
* The bank: the normalised features of ``wrapped.fit(train=...)`` (else
  ``calibration=``), as the plugins before it give them (averaged over MC-dropout
  samples, clipped by ReAct). ``bank_size=`` keeps a seeded random subset (the paper
  shows a 1% sample loses little on ImageNet); ``dtype="float16"`` halves its memory
  (distances then carry ~1e-3 of rounding). It is a learned buffer of the saved
  safetensors file, not JSON.
* Search is exact, by blocks of the bank: one matmul of normalised vectors per block,
  a running top-``k`` of the similarities, so memory stays at ``B x block`` floats
  (``block`` = 16M / B rows) whatever the bank size. For unit vectors
  ``||z - b||^2 = 2 - 2 z.b``. Cost per input: ``bank_size x D`` multiply-adds
  (a 50,000 x 512 bank: 25.6 MFLOP x 2, a few percent of one ResNet-18 pass; see
  ``benchmarks/bench_feature_ood.py``) and ``bank_size x D x 4`` bytes of memory
  (2 bytes in float16).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from wrapcal_plugins._feature_stats import FIT_SETS, compute_dtype, fit_set, mean_feature_chunks

from wrapcal import (
    FitData,
    ModelView,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    hookimpl,
)
from wrapcal.errors import DataError
from wrapcal.params import Interval, Options

__all__ = ["KNN", "kth_nearest_distance", "normalise"]

_NAME = "knn"
_WHY = "the bank of normalised in-distribution features"
DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: Similarities held at once during a search (``B x block``): 16M floats, 64 MB.
SEARCH_ELEMENTS = 1 << 24
#: Bank rows per block in an exported graph, which takes any batch size: there the block
#: cannot follow the batch (``B x 65536`` floats: 16 MB at batch 64).
EXPORT_BLOCK = 1 << 16


def normalise(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def kth_nearest_distance(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean distance from each unit-norm query ``[B, D]`` to its ``k``-th nearest
    unit-norm bank row ``[N, D]``, searched exactly block by block.

    The bank's blocks are cast to the queries' dtype (float16 banks are searched in
    float32 on every device).
    """
    if torch.compiler.is_exporting():
        block = max(k, EXPORT_BLOCK)
    else:
        block = max(k, SEARCH_ELEMENTS // max(queries.shape[0], 1))
    best: torch.Tensor | None = None
    for start in range(0, bank.shape[0], block):
        similarity = queries @ bank[start : start + block].to(queries.dtype).T
        if best is not None:
            similarity = torch.cat([best, similarity], dim=1)
        best = similarity.topk(min(k, similarity.shape[1]), dim=1).values
    if best is None or best.shape[1] < k:
        raise ValueError(f"the bank holds fewer than k={k} features")
    # topk is sorted, largest first: column k - 1 is the k-th nearest.
    return (2 - 2 * best[:, k - 1]).clamp_min(0).sqrt()


class KNN(Plugin):
    """Distance to the ``k``-th nearest normalised training feature (Sun et al. 2022).

    Args:
        k: Which neighbour's distance is the score (the paper: 50 on CIFAR-10).
        bank_size: Keep at most this many training features (a seeded random subset);
            ``None`` keeps them all.
        dtype: ``"float32"`` or ``"float16"``, the bank's storage type.
        seed: Seed of the subset; ``None`` takes the ``seed`` given to ``wrapped.fit``.

    Attributes:
        bank_: ``[N, D]`` the normalised features searched (a saved buffer).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "k": [Interval(int, 1, None)],
        "bank_size": [None, Interval(int, 1, None)],
        "dtype": [Options(str, DTYPES)],
        "seed": [None, Interval(int, 0, 2**63 - 1)],
    }

    def __init__(
        self,
        k: int = 50,
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
        # A loop over blocks of the bank and topk: traceable (an export searches
        # blocks of a fixed size, so its batch size stays free).
        tags.exportable = True
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        return tags

    def fit(self, model: ModelView, data: FitData) -> KNN:
        """Store the normalised features of ``train`` (else ``calibration``)."""
        source = fit_set(data, _NAME, _WHY)
        total = len(source)
        size = total if self.bank_size is None else min(self.bank_size, total)
        if size < self.k:
            raise DataError(
                f"plugin {_NAME}: k={self.k} neighbours, but the bank holds {size} features "
                f"(the {source.name!r} set has {total}); lower k or give more data"
            )
        keep = None
        if size < total:
            seed = data.seed if self.seed is None else int(self.seed)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            keep = torch.zeros(total, dtype=torch.bool)
            keep[torch.randperm(total, generator=generator)[:size]] = True
        parts, start = [], 0
        for features, _ in mean_feature_chunks(model, source):
            rows = features.shape[0]
            if keep is not None:
                features = features[keep[start : start + rows].to(features.device)]
            start += rows
            unit = normalise(features.to(compute_dtype(features.dtype)))
            parts.append(unit.to(DTYPES[self.dtype]))
        self.bank_ = torch.cat(parts)
        return self

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``knn``: distance of the (sample-averaged) normalised feature to its ``k``-th
        nearest bank feature."""
        features = context.features.mean(dim=0)
        queries = normalise(features.to(compute_dtype(features.dtype)))
        return {_NAME: kth_nearest_distance(queries, self.bank_, self.k)}


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, KNN)
