"""Chunked statistics of cached features, shared by the feature-space OOD detectors.

Every function here reads a feature set in chunks of rows, so memory stays bounded by
the chunk and the ``D x D`` statistics, whatever the number of rows: a 1,000,000 x 2048
training set never becomes an ``N x D`` float64 copy.

What the detectors read, at ``fit`` as at inference: the model's features (the ``fit``
data's features, which are :attr:`~wrapcal.OutputContext.backbone_features` at
inference) and the model's own head applied to them (:func:`base_logits`, which is
:attr:`~wrapcal.OutputContext.base_logits`). Not the features a sampler draws, not
the members of extra heads, not calibrated logits: so a detector scores the same alone
and beside any plugin that leaves the model's features and head alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from wrapcal.plugin import DataError, FeatureSet, FitData, ModelView, exchange, in_mode

__all__ = [
    "FIT_SETS",
    "Moments",
    "base_logits",
    "chunked_quantile",
    "compute_dtype",
    "energy",
    "feature_chunks",
    "feature_mean",
    "feature_value_chunks",
    "fit_set",
    "linear_head",
    "pinv_factor",
    "residual_subspace",
]

#: The ``fit`` data sets the detectors learn from, in order of preference.
FIT_SETS = ("train", "calibration")
#: Values :func:`chunked_quantile` sorts at once, its last pass (32 MB in float64).
GATHER_VALUES = 1 << 22
#: Elements per chunk of features (``rows x D x S``): 4M, 32 MB in float64.
CHUNK_ELEMENTS = 1 << 22


def fit_set(data: FitData, plugin: str, why: str) -> FeatureSet:
    """``train=`` if given, else ``calibration=``; a :class:`DataError` naming both if
    neither is."""
    return data.first(FIT_SETS, plugin, why)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores are computed in: the features' own, at least float32 (half
    precision overflows squared distances)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_rows(model: ModelView) -> int:
    return max(1, CHUNK_ELEMENTS // max(model.num_features, 1))


def feature_chunks(
    model: ModelView, features: FeatureSet
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(features [n, D], labels [n] or None)`` chunk by chunk: the model's features, as
    the ``fit`` data holds them (``OutputContext.backbone_features`` at inference)."""
    yield from features.batches(_chunk_rows(model))


def feature_value_chunks(model: ModelView, features: FeatureSet) -> Iterator[torch.Tensor]:
    """Every value of the model's features (``[n, D]`` flattened), chunk by chunk."""
    for chunk, _ in feature_chunks(model, features):
        yield chunk.reshape(-1)


def base_logits(model: ModelView, features: torch.Tensor) -> torch.Tensor:
    """The model's own head on the model's features ``[n, D]``: what
    ``OutputContext.base_logits`` gives at inference (the head in eval mode, as in
    ``predict``)."""
    with torch.no_grad(), in_mode(model.head, False):
        return model.head(features)


@dataclass
class Moments:
    """Per-class sums and one outer-product sum, accumulated in float64.

    Rows are shifted by ``shift`` (the first chunk's mean unless given) before they are
    summed: the covariances are differences of these sums, and a shift close to the
    mean keeps that difference from cancelling digits when the features sit far from
    the origin.

    Attributes:
        classes: Number of label values (1 for unlabelled statistics).
        count: ``[C]`` rows per class.
        sums: ``[C, D]`` sum of the shifted rows per class.
        scatter: ``[D, D]`` sum of the outer products of the shifted rows.
        shift: ``[D]`` the shift, or ``None`` before the first update.
    """

    classes: int
    count: torch.Tensor | None = None
    sums: torch.Tensor | None = None
    scatter: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    def update(self, rows: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add a chunk ``[n, D]`` (with its labels ``[n]``, or all of class 0)."""
        x = rows.to(torch.float64)  # a chunk-sized copy, never the whole set
        if self.shift is None:
            self.shift = x.mean(dim=0)
        if self.count is None or self.sums is None or self.scatter is None:  # set together
            width = x.shape[1]
            self.count = x.new_zeros(self.classes)
            self.sums = x.new_zeros(self.classes, width)
            self.scatter = x.new_zeros(width, width)
        x = x - self.shift.to(x.device)
        self.scatter.addmm_(x.T, x)
        labels = (
            torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            if labels is None
            else labels.to(x.device)
        )
        self.sums.index_add_(0, labels, x)
        self.count += torch.bincount(labels, minlength=self.classes).to(x.dtype)

    def combine_shards(self, source: FeatureSet, width: int, device: torch.device) -> None:
        """Sum the statistics of every rank's shard of ``source`` into every rank (a
        no-op for a whole set). Each rank's sums are first moved to one shift, the
        first non-empty rank's, so the sums add up exactly as one process's would."""
        if not source.sharded:
            return
        if self.count is None or self.sums is None or self.scatter is None:  # an empty shard
            self.count = torch.zeros(self.classes, dtype=torch.float64, device=device)
            self.sums = torch.zeros(self.classes, width, dtype=torch.float64, device=device)
            self.scatter = torch.zeros(width, width, dtype=torch.float64, device=device)
        shifts = exchange(None if self.shift is None or not self.total else self.shift.cpu())
        common = next((s for s in shifts if s is not None), None)
        if common is None:
            return  # no rank has rows
        common = common.to(self.sums.device)
        if self.shift is not None and self.total:
            # sum (y + d)(y + d)^T = sum y y^T + d a^T + a d^T + n d d^T, a = sum y
            delta = self.shift.to(self.sums.device) - common
            along = self.sums.sum(dim=0)
            self.scatter += torch.outer(delta, along) + torch.outer(along, delta)
            self.scatter += self.count.sum() * torch.outer(delta, delta)
            self.sums += self.count[:, None] * delta
        self.shift = common
        self.count = source.sum_over_shards(self.count)
        self.sums = source.sum_over_shards(self.sums)
        self.scatter = source.sum_over_shards(self.scatter)

    @property
    def total(self) -> int:
        return int(self.count.sum()) if self.count is not None else 0

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(count, sums, scatter)``; a clear error before the first update."""
        if self.count is None or self.sums is None or self.scatter is None:
            raise ValueError("these statistics hold no rows yet: update() them with data first")
        return self.count, self.sums, self.scatter

    def _shift(self) -> torch.Tensor:
        if self.shift is None:
            raise ValueError("these statistics hold no rows yet: update() them with data first")
        return self.shift

    def class_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(means [C', D], present [C] bool)`` of the classes that have rows."""
        (count, sums, _), shift = self._sums(), self._shift()
        present = count > 0
        return sums[present] / count[present, None] + shift, present

    def mean(self) -> torch.Tensor:
        """The mean of all rows ``[D]``."""
        (_, sums, _), shift = self._sums(), self._shift()
        return sums.sum(dim=0) / self.total + shift

    def covariance(self) -> torch.Tensor:
        """Maximum-likelihood covariance of all rows (divided by ``N``), ``[D, D]``."""
        _, sums, scatter = self._sums()
        centre = sums.sum(dim=0) / self.total
        return _symmetric(scatter / self.total - torch.outer(centre, centre))

    def within_class_covariance(self) -> torch.Tensor:
        """The covariance shared by the classes (Lee et al. 2018):
        ``1/N sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T``."""
        count, sums, scatter = self._sums()
        present = count > 0
        centres = sums[present] / count[present, None]
        between = (centres.T * count[present]) @ centres
        return _symmetric((scatter - between) / self.total)

    def second_moment(self) -> torch.Tensor:
        """``1/N sum_i (x_i - shift)(x_i - shift)^T``: the covariance about ``shift``."""
        _, _, scatter = self._sums()
        return _symmetric(scatter / self.total)


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.T) / 2


def pinv_factor(covariance: torch.Tensor) -> torch.Tensor:
    """``W [D, r]`` with ``W W^T = pinv(covariance)``, from a float64 eigendecomposition.

    Eigenvalues up to ``D * eps * max`` are dropped (``scipy.linalg.pinvh``'s default,
    as scikit-learn's ``EmpiricalCovariance.precision_``): directions the training
    features never vary in (dead units) add nothing to a distance.
    """
    values, vectors = torch.linalg.eigh(covariance)
    cutoff = covariance.shape[0] * torch.finfo(values.dtype).eps * values.abs().max()
    keep = values > cutoff
    return vectors[:, keep] / values[keep].sqrt()


def energy(logits: torch.Tensor) -> torch.Tensor:
    """``-logsumexp(logits)`` per row; one binary logit ``z`` counts as ``[0, z]`` (the
    two-class logits with the same softmax)."""
    if logits.shape[-1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
    return -torch.logsumexp(logits, dim=-1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """The largest logit per row, with the same single-logit rule as :func:`energy`."""
    if logits.shape[-1] == 1:
        return logits[..., 0].clamp_min(0)
    return logits.amax(dim=-1)


def linear_head(head: nn.Module, plugin: str) -> nn.Linear:
    """The head's one ``nn.Linear``: the head itself, or the only layer with weights in
    an ``nn.Sequential`` of it and dropout / identity / flatten layers.

    Raises:
        ValueError: Another kind of head (an MLP, a normalisation with weights).
    """
    if isinstance(head, nn.Linear):
        return head
    passive = (nn.Dropout, nn.Identity, nn.Flatten)
    if isinstance(head, nn.Sequential):
        linears = [m for m in head if isinstance(m, nn.Linear)]
        if len(linears) == 1 and all(isinstance(m, (nn.Linear, *passive)) for m in head):
            return linears[0]
    raise ValueError(
        f"{plugin} needs the model's head to be one nn.Linear (logits = W f + b): its "
        f"origin is u = -pinv(W) b. This model's head is {type(head).__name__}: "
        f"{head!r}. Split the model at its last linear layer (wrapcal.wrap(model, "
        "head='name.of.last.linear')) or use the knn or mahalanobis plugin, which need "
        "no head"
    )


def chunked_quantile(
    chunks: Callable[[], Iterable[torch.Tensor]],
    q: float,
    *,
    bins: int = 4096,
    gather_limit: int | None = None,
    shards: FeatureSet | None = None,
) -> float:
    """The exact ``q``-quantile of every value ``chunks()`` yields, in bounded memory.

    Matches ``numpy.quantile(values, q)`` (linear interpolation between the order
    statistics at ``floor((n - 1) q)`` and the next). Rather than holding the values,
    it narrows down the range that holds the wanted rank: a pass of ``chunks()``
    counts the values in ``bins`` equal-width bins of the range, the next pass keeps
    the bin that holds the rank, until at most ``gather_limit`` values (default
    :data:`GATHER_VALUES`) are left, which
    are gathered and sorted. Deterministic; typically three passes (min/max, one
    histogram, gather); ``chunks`` must give the same values every call.

    With ``shards`` (a feature set kept sharded under torch.distributed, whose values
    ``chunks()`` yields on this rank) every count, bound and gathered value is combined
    over the ranks: the quantile of all ranks' values, the same on every rank.

    Raises:
        DataError: No values, or NaN/inf among them.
    """
    gather_limit = GATHER_VALUES if gather_limit is None else gather_limit
    n, low, high = 0, float("inf"), float("-inf")
    for values in chunks():
        if values.numel() == 0:
            continue
        if not torch.isfinite(values).all():
            raise DataError("the features hold NaN or inf values: no percentile of them")
        n += values.numel()
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    if shards is not None and shards.sharded:
        n = int(shards.sum_over_shards(torch.tensor([n], dtype=torch.float64)))
        # max(high) = -min(-high): both bounds in one collective.
        bounds = shards.min_over_shards(torch.tensor([low, -high], dtype=torch.float64))
        low, high = float(bounds[0]), -float(bounds[1])
    if n == 0:
        raise DataError("no feature values to take a percentile of")
    position = (n - 1) * q
    rank = min(int(position), n - 1)
    fraction = position - rank
    first, second = _select(chunks, rank, low, high, n, bins, gather_limit, shards)
    if fraction == 0 or rank + 1 >= n:
        return first
    if second is None:
        second = _select(chunks, rank + 1, low, high, n, bins, gather_limit, shards)[0]
    # numpy's lerp, exact at both ends.
    diff = second - first
    return first + diff * fraction if fraction < 0.5 else second - diff * (1 - fraction)


def _select(
    chunks: Callable[[], Iterable[torch.Tensor]],
    rank: int,
    low: float,
    high: float,
    n: int,
    bins: int,
    gather_limit: int,
    shards: FeatureSet | None = None,
) -> tuple[float, float | None]:
    """The value of rank ``rank`` (0-based, ascending), and that of ``rank + 1`` when
    the same pass finds it."""
    sharded = shards if shards is not None and shards.sharded else None
    below, inside = 0, n  # values < low, values in [low, high]
    for _ in range(64):  # each pass narrows [low, high] to one of ``bins`` bins
        if low == high:
            return low, low if rank + 1 < below + inside else None
        if inside <= gather_limit:
            kept = [v[(v >= low) & (v <= high)].double().reshape(-1) for v in chunks()]
            values = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.float64)
            if sharded is not None:
                values = sharded.cat_over_shards(values)
            ordered = torch.sort(values).values
            i = rank - below
            return float(ordered[i]), float(ordered[i + 1]) if i + 1 < len(ordered) else None
        counts: torch.Tensor | None = None
        mins: torch.Tensor | None = None
        maxs: torch.Tensor | None = None
        for values in chunks():
            v = values[(values >= low) & (values <= high)].double()
            if counts is None or mins is None or maxs is None:  # on the values' device
                counts = v.new_zeros(bins)
                mins, maxs = v.new_full((bins,), float("inf")), v.new_full((bins,), -float("inf"))
            # floor((v - low) / width) is monotone in v, so each bin's values are
            # exactly those within its observed [min, max].
            index = ((v - low) * (bins / (high - low))).long().clamp_(0, bins - 1)
            counts += torch.bincount(index, minlength=bins).double()
            mins.scatter_reduce_(0, index, v, "amin")
            maxs.scatter_reduce_(0, index, v, "amax")
        if counts is None or mins is None or maxs is None:  # this rank's shard is empty
            counts = torch.zeros(bins, dtype=torch.float64)
            mins = torch.full((bins,), float("inf"), dtype=torch.float64)
            maxs = -mins
        if sharded is not None:
            counts = sharded.sum_over_shards(counts)
            bounds = sharded.min_over_shards(torch.cat([mins, -maxs]))
            mins, maxs = bounds[:bins], -bounds[bins:]
        counts, mins, maxs = counts.cpu(), mins.cpu(), maxs.cpu()
        cumulative = below + torch.cumsum(counts, 0)
        target = torch.tensor(float(rank), dtype=torch.float64)
        j = int(torch.searchsorted(cumulative, target, right=True))
        below = int(cumulative[j - 1]) if j > 0 else below
        inside = int(counts[j])
        low, high = float(mins[j]), float(maxs[j])
    raise RuntimeError("chunked_quantile did not converge; the chunks changed between passes")


def residual_subspace(
    model: ModelView, source: FeatureSet, dim: int, plugin: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """ViM's origin ``u = -pinv(W) b`` ``[D]`` and residual basis ``R`` ``[D, D - dim]``
    of the features of ``source``, in float64.

    What ``vim`` and ``residual`` share: one chunked pass for the second moment about
    ``u``, summed over the ranks; ``eigh``.
    """
    head = linear_head(model.head, plugin)
    weight = head.weight.detach().to(torch.float64)
    origin = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    if head.bias is not None:
        origin = -(torch.linalg.pinv(weight) @ head.bias.detach().to(torch.float64))
    moments = Moments(classes=1, shift=origin)
    for features, _ in feature_chunks(model, source):
        moments.update(features)
    moments.combine_shards(source, model.num_features, weight.device)
    # eigh sorts eigenvalues in ascending order: the first columns span the directions
    # the training features vary least in.
    _, vectors = torch.linalg.eigh(moments.second_moment())
    return origin, vectors[:, : vectors.shape[1] - dim].contiguous()


def feature_mean(model: ModelView, data: FitData, plugin: str, why: str) -> torch.Tensor:
    """The mean ``[D]`` (float64) of the ``train`` (else ``calibration``) features,
    summed in chunks and over the ranks of a sharded set."""
    source = fit_set(data, plugin, why)
    total = torch.zeros(model.num_features, dtype=torch.float64, device=model.device)
    for features, _ in feature_chunks(model, source):
        total += features.to(device=total.device, dtype=torch.float64).sum(dim=0)
    total = source.sum_over_shards(total)
    if not bool(torch.isfinite(total).all()):
        raise DataError(
            f"plugin {plugin}: the {source.name!r} features hold NaN or inf values; "
            "check the backbone's outputs on that data"
        )
    return total / source.total
