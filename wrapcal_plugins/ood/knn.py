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
* Input: the model's features ``f`` (:attr:`~wrapcal.OutputContext.backbone_features`:
  the backbone's output through any ``FEATURES``-stage plugin, one deterministic row per
  input), nothing else: no logits, no sampler's samples. So ``knn`` scores the same
  alone and beside any plugin but one that changes the model's features or backbone.
* The bank: the normalised features of ``wrapped.fit(train=...)`` (else
  ``calibration=``), the same features it reads at inference. ``bank_size=`` keeps a
  seeded random subset (the paper
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
* Under ``torch.distributed`` the fit set's rows stay on their ranks (each rank
  normalises and subsamples its own shard; the subset is drawn over the whole set, so
  it is the one a single process keeps). By default the bank's rows are then gathered,
  so every rank holds the whole bank. ``shard_bank=True`` keeps each rank's part only
  (``1/N`` of the memory): a query is then searched on every rank's part and the
  ``k`` best similarities of each are merged, so inference is collective: every rank
  predicts together (``evaluate`` does), and ``wrapcal.distributed.unshard(wrapped)``
  gathers the bank before ``save``/``export`` (docs/scale.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from wrapcal.plugin import (
    DataError,
    DistributedError,
    FitData,
    Interval,
    ModelView,
    Options,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    active,
    gather_rows,
    hookimpl,
    rank,
    world,
)
from wrapcal_plugins.ood._feature_stats import FIT_SETS, compute_dtype, feature_chunks, fit_set

__all__ = ["KNN", "kth_nearest_distance", "normalise", "top_similarities"]

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


def top_similarities(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """The ``min(k, N)`` largest similarities ``q.b`` of each unit-norm query ``[B, D]``
    to the unit-norm bank rows ``[N, D]``, largest first, searched exactly block by block.

    The bank's blocks are cast to the queries' dtype (float16 banks are searched in
    float32 on every device).
    """
    if torch.compiler.is_exporting():
        block = max(k, EXPORT_BLOCK)
    else:
        block = max(k, SEARCH_ELEMENTS // max(queries.shape[0], 1))
    best = queries.new_zeros(queries.shape[0], 0)
    for start in range(0, bank.shape[0], block):
        similarity = queries @ bank[start : start + block].to(queries.dtype).T
        similarity = torch.cat([best, similarity], dim=1)
        best = similarity.topk(min(k, similarity.shape[1]), dim=1).values
    return best


def _distance(similarity: torch.Tensor) -> torch.Tensor:
    # For unit vectors ||z - b||^2 = 2 - 2 z.b.
    return (2 - 2 * similarity).clamp_min(0).sqrt()


def kth_nearest_distance(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean distance from each unit-norm query ``[B, D]`` to its ``k``-th nearest
    unit-norm bank row ``[N, D]``, searched exactly block by block."""
    best = top_similarities(queries, bank, k)
    if best.shape[1] < k:
        raise ValueError(f"the bank holds fewer than k={k} features")
    # topk is sorted, largest first: column k - 1 is the k-th nearest.
    return _distance(best[:, k - 1])


def sharded_kth_nearest_distance(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`kth_nearest_distance` of this rank's queries against the bank formed by
    every rank's part ``bank``; every rank calls it together (with its own queries).

    Each rank searches every rank's queries in its own part; the ``k`` best similarities
    of each part are gathered and merged: the same neighbours as one search of the whole
    bank.
    """
    sizes: list[int] = []
    everyone = gather_rows(queries, sizes=sizes)
    assert everyone is not None
    local = top_similarities(everyone, bank, k)
    if local.shape[1] < k:  # a part with fewer than k rows: pad with "never nearest"
        pad = local.new_full((local.shape[0], k - local.shape[1]), float("-inf"))
        local = torch.cat([local, pad], dim=1)
    merged = gather_rows(local)
    assert merged is not None
    start = sum(sizes[: rank()])
    mine = merged.reshape(len(sizes), everyone.shape[0], k)[:, start : start + queries.shape[0]]
    best = mine.permute(1, 0, 2).reshape(queries.shape[0], -1).topk(k, dim=1).values
    return _distance(best[:, k - 1])


class KNN(Plugin):
    """Distance to the ``k``-th nearest normalised training feature (Sun et al. 2022).

    Args:
        k: Which neighbour's distance is the score (the paper: 50 on CIFAR-10).
        bank_size: Keep at most this many training features (a seeded random subset);
            ``None`` keeps them all.
        dtype: ``"float32"`` or ``"float16"``, the bank's storage type.
        seed: Seed of the subset; ``None`` takes the ``seed`` given to ``wrapped.fit``.
        shard_bank: Under ``torch.distributed``, keep only this rank's part of the bank
            (inference then searches every part, with every rank predicting together);
            no effect in one process.

    Attributes:
        bank_: ``[N, D]`` the normalised features searched (a saved buffer).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "k": [Interval(int, 1, None)],
        "bank_size": [None, Interval(int, 1, None)],
        "dtype": [Options(str, DTYPES)],
        "seed": [None, Interval(int, 0, 2**63 - 1)],
        "shard_bank": [bool],
    }

    def __init__(
        self,
        k: int = 50,
        bank_size: int | None = None,
        dtype: str = "float32",
        seed: int | None = None,
        shard_bank: bool = False,
    ) -> None:
        super().__init__()
        self.k = k
        self.bank_size = bank_size
        self.dtype = dtype
        self.seed = seed
        self.shard_bank = shard_bank
        # Ranks whose parts form the bank (1: this rank holds all of it). Not saved: a
        # sharded bank is gathered (unshard) before it can be.
        self._bank_ranks = 1
        self.register_learned_buffer("bank_", (None, "num_features"), tuple(DTYPES.values()))

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.DETECT
        tags.fit_reads = FIT_SETS
        # A loop over blocks of the bank and topk: traceable (an export searches
        # blocks of a fixed size, so its batch size stays free).
        tags.exportable = True
        tags.outputs = {_NAME: OutputKind.OOD_SCORE}
        tags.fits_from_shards = True  # each rank normalises its own rows
        tags.collective_outputs = self._bank_ranks > 1
        return tags

    def fit(self, model: ModelView, data: FitData) -> KNN:
        """Store the normalised features of ``train`` (else ``calibration``)."""
        source = fit_set(data, _NAME, _WHY)
        total = source.total
        size = total if self.bank_size is None else min(self.bank_size, total)
        if size < self.k:
            raise DataError(
                f"plugin {_NAME}: k={self.k} neighbours, but the bank holds {size} features "
                f"(the {source.name!r} set has {total}); lower k or give more data"
            )
        # The subset is drawn over the whole set's row indices, so that every rank keeps
        # its rows of the one subset a single process would keep.
        keep = None  # every row
        if size < total:
            seed = data.seed if self.seed is None else int(self.seed)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            keep = torch.zeros(total, dtype=torch.bool)
            keep[torch.randperm(total, generator=generator)[:size]] = True
        sharded = self.shard_bank and active()
        if sharded and not source.sharded:  # a whole set: this rank keeps its block
            me, ranks = rank(), world()
            keep = torch.ones(total, dtype=torch.bool) if keep is None else keep
            keep[: me * total // ranks] = False
            keep[(me + 1) * total // ranks :] = False
        parts = []
        start = source.offset  # the whole set's index of this rank's first row
        for features, _ in feature_chunks(model, source):
            rows = features.shape[0]
            if keep is not None:
                features = features[keep[start : start + rows].to(features.device)]
            start += rows
            unit = normalise(features.to(compute_dtype(features.dtype)))
            parts.append(unit.to(DTYPES[self.dtype]))
        empty = torch.zeros(0, model.num_features, dtype=DTYPES[self.dtype], device=model.device)
        bank = torch.cat(parts) if parts else empty
        self._bank_ranks = world() if sharded else 1
        self.bank_ = bank if sharded else source.cat_over_shards(bank)
        return self

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``knn``: distance of the normalised model feature to its ``k``-th nearest bank
        feature."""
        features = context.backbone_features
        queries = normalise(features.to(compute_dtype(features.dtype)))
        if self._bank_ranks == 1:
            return {_NAME: kth_nearest_distance(queries, self.bank_, self.k)}
        self._check_ranks(
            "predict on every rank together inside the process group, or call "
            "wrapcal.distributed.unshard(wrapped) on every rank first"
        )
        return {_NAME: sharded_kth_nearest_distance(queries, self.bank_, self.k)}

    def _check_ranks(self, fix: str) -> None:
        """Refuse a sharded bank outside the process group it was fitted in."""
        if world() != self._bank_ranks:
            raise DistributedError(
                f"this knn bank is split over {self._bank_ranks} ranks (shard_bank=True) "
                f"and this process sees {world()}: {fix}"
            )

    def unshard(self) -> None:
        """Gather every rank's part of the bank, in rank order, onto every rank (call on
        every rank): the bank a single process would hold."""
        if self._bank_ranks > 1:
            self._check_ranks("unshard inside the process group it was fitted in, on every rank")
            bank = gather_rows(self.bank_)
            assert bank is not None
            self.bank_ = bank
            self._bank_ranks = 1


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, KNN)
