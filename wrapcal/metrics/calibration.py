"""Calibration metrics: ECE and its variants, NLL, Brier, accuracy and AURC.

Conventions (the ones users check first):

* ECE is top-label, L1, over ``n_bins = 15`` equal-width bins on (0, 1]: bin ``i`` holds
  the confidences in ``(i/n, (i+1)/n]`` (a confidence of exactly 0 goes to bin 0), and each
  bin's ``|accuracy - confidence|`` is weighted by the share of samples in it
  (Guo et al. 2017). Values are compared with ``i / n`` exactly (the edges are rounded
  down to the input dtype), so a value on an edge always lands in the lower bin.
* Adaptive ECE uses equal-mass bins, MCE the worst non-empty bin, class-wise ECE bins every
  class's probability of every sample (Kull et al. 2019; Nixon et al. 2019).
* Brier is the multiclass score ``mean_n sum_k (p_nk - onehot_nk)^2`` (range [0, 2]);
  NLL is ``mean_n -log p_{n,y_n}`` with ``p`` clamped at the dtype's smallest normal number.

Per-sample (and per-row) quantities are computed in the input precision (half precision
is upcast to float32, never to float64, which would copy ``[N, K]``); sums over samples
are accumulated in float64, so they add no error of their own even at 10^6 samples.
The functional forms return Python floats; the classes accumulate state over batches and
their ``compute()`` equals the functional forms on the concatenated data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from wrapcal.metrics.inputs import ArrayLike, check_probs
from wrapcal.metrics.state import SummableMetric, acc_dtype, row_chunks, scatter_sum

DEFAULT_BINS = 15

__all__ = [
    "ECE",
    "CalibrationMetrics",
    "accuracy",
    "adaptive_ece",
    "aurc",
    "brier",
    "classwise_ece",
    "ece",
    "mce",
    "nll",
    "reliability_bins",
]


def check_bins(n_bins: int) -> None:
    """Refuse a number of bins that is not a positive integer (``ValueError``)."""
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")


def _edges(n_bins: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Inner bin edges ``i / n`` rounded DOWN to ``dtype``.

    For ``x`` of that dtype, ``x <= edge`` holds exactly when ``x <= i / n`` in real
    numbers, so binning needs no float64 copy of ``x`` and no value changes bin.
    """
    exact = torch.arange(1, n_bins, device=device, dtype=acc_dtype(device)) / n_bins
    edges = exact.to(dtype)
    above = edges.to(exact.dtype) > exact
    return torch.where(above, torch.nextafter(edges, torch.full_like(edges, -math.inf)), edges)


def bin_index(x: Tensor, n_bins: int) -> Tensor:
    """Equal-width bin of each value: bin ``i`` holds ``(i/n, (i+1)/n]``, 0 goes to bin 0."""
    # right=False gives edges[i-1] < x <= edges[i], i.e. bins closed on the right.
    return torch.bucketize(x, _edges(n_bins, x.dtype, x.device))


def top_label(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The top-label confidence ``[N]`` of each row and whether its argmax is the label."""
    # amax + argmax, not max(dim=): the fused op is ~1000x slower on small CPU tensors in
    # some torch builds. argmax takes the first of tied maxima, as numpy does.
    return probs.amax(dim=1), probs.argmax(dim=1) == labels


def _top_label_sums(conf: Tensor, correct: Tensor, n_bins: int) -> Tensor:
    """Per-bin ``[count, confidence sum, correct sum]`` as a float64 ``[3, n_bins]`` tensor."""
    bins = bin_index(conf, n_bins)
    return torch.stack(
        [
            scatter_sum(bins, 1.0, n_bins),
            scatter_sum(bins, conf, n_bins),
            scatter_sum(bins, correct, n_bins),
        ]
    )


def _classwise_sums(probs: Tensor, labels: Tensor, n_bins: int) -> Tensor:
    """Per (class, bin) ``[count, p_k sum, label==k count]``, a float64 ``[3, K * n_bins]``.

    Most of the N x K probabilities fall in bin 0 (below 1/n_bins: at most n_bins - 1
    classes of a row can be above it), so only the others are binned; bin 0 gets what
    is left of each class's total count and probability sum.
    """
    n, k = probs.shape
    acc = acc_dtype(probs.device)
    sums = torch.zeros(3, k, n_bins, dtype=acc, device=probs.device)
    col_sums = torch.zeros(k, dtype=acc, device=probs.device)
    # p > 1 / n_bins, compared exactly as bin_index does (no edge when n_bins == 1).
    first_edge = _edges(n_bins, probs.dtype, probs.device)[0] if n_bins > 1 else math.inf
    # Row chunks bound the [rows, K] temporaries (the mask, the indices of the entries).
    for lo, hi in row_chunks(n, k):
        p = probs[lo:hi]
        # Summed in the input dtype: sum(dtype=float64) would copy the chunk to float64.
        col_sums += p.sum(dim=0).to(acc)
        rows, cols = (p > first_edge).nonzero(as_tuple=True)
        values = p[rows, cols]
        slot = cols * n_bins + bin_index(values, n_bins)
        sums[0].view(-1).add_(scatter_sum(slot, 1.0, k * n_bins))
        sums[1].view(-1).add_(scatter_sum(slot, values, k * n_bins))
    sums[0, :, 0] = n - sums[0, :, 1:].sum(dim=1)
    sums[1, :, 0] = col_sums - sums[1, :, 1:].sum(dim=1)
    # The one-hot target is 1 only at (n, y_n): bin p_{n, y_n}, no one-hot matrix.
    p_y = probs.gather(1, labels[:, None]).squeeze(1)
    hit = labels * n_bins + bin_index(p_y, n_bins)
    sums[2].view(-1).add_(scatter_sum(hit, 1.0, k * n_bins))
    return sums.view(3, k * n_bins)


def _nll_brier_sums(probs: Tensor, labels: Tensor) -> Tensor:
    """``[sum of -log p_y, sum of Brier terms]`` in float64."""
    acc = acc_dtype(probs.device)
    p_y = probs.gather(1, labels[:, None]).squeeze(1)
    sums = torch.zeros(2, dtype=acc, device=probs.device)
    sums[0] = -p_y.to(acc).clamp_min(torch.finfo(probs.dtype).tiny).log().sum()
    for lo, hi in row_chunks(probs.shape[0], probs.shape[1]):
        # sum_k (p_k - onehot_k)^2 = sum_{k != y} p_k^2 + (1 - p_y)^2: no one-hot matrix,
        # and no cancellation for confident, correct rows (unlike sum p^2 - 2 p_y + 1).
        others = probs[lo:hi].scatter(1, labels[lo:hi, None], 0)
        wrong = torch.linalg.vector_norm(others, dim=1).to(acc).square()
        sums[1] += (wrong + (1 - p_y[lo:hi].to(acc)).square()).sum()
    return sums


def _ece_from(sums: Tensor, n: int) -> float:
    # sum_b (n_b / N) |acc_b - conf_b| = sum_b |correct_sum_b - conf_sum_b| / N.
    return float((sums[2] - sums[1]).abs().sum() / n)


def _mce_from(sums: Tensor) -> float:
    gaps = (sums[2] - sums[1]).abs() / sums[0].clamp_min(1)
    return float(gaps[sums[0] > 0].amax())


def _classwise_from(sums: Tensor, n_classes: int, n: int) -> float:
    per_class = (sums[2] - sums[1]).abs().view(n_classes, -1).sum(dim=1) / n
    return float(per_class.mean())


def _adaptive_from(conf: Tensor, correct: Tensor, n_bins: int) -> float:
    """Equal-mass ECE: sorted confidences split like ``numpy.array_split(…, n_bins)``."""
    n = conf.numel()
    acc = acc_dtype(conf.device)
    # Sort by (confidence, correct): tied confidences put errors first, so the grouping and
    # the result do not depend on the order of the samples.
    by_correct = torch.sort(correct.to(torch.uint8), stable=True).indices
    order = by_correct[torch.sort(conf[by_correct], stable=True).indices]
    q, r = divmod(n, n_bins)
    rank = torch.arange(n, device=conf.device)
    big = r * (q + 1)  # the first r groups hold q + 1 samples, the others q
    group = torch.where(rank < big, rank // (q + 1), r + (rank - big) // max(q, 1))
    gap = correct[order].to(acc) - conf[order].to(acc)
    return float(scatter_sum(group, gap, n_bins).abs().sum() / n)


def _aurc_from(conf: Tensor, correct: Tensor) -> float:
    """Area under the risk-coverage curve, tie groups averaged over their orderings."""
    acc = acc_dtype(conf.device)
    order = torch.sort(conf, descending=True, stable=True).indices
    err = (~correct[order]).to(acc)
    _, group, counts = torch.unique_consecutive(
        conf[order], return_inverse=True, return_counts=True
    )
    ends = counts.cumsum(0)
    starts = ends - counts
    cum = torch.cat([err.new_zeros(1), err.cumsum(0)])
    rate = (cum[ends] - cum[starts]) / counts  # error rate inside each tie group
    covered = torch.arange(1, err.numel() + 1, device=conf.device, dtype=acc)
    # Expected errors among the top i when the ties are ordered at random.
    errors = cum[starts[group]] + (covered - starts[group]) * rate[group]
    return float((errors / covered).mean())


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy: the share of samples whose arg-max class is the label."""
    probs, labels = check_probs(probs, labels)
    return float(top_label(probs, labels)[1].to(acc_dtype(probs.device)).sum() / len(labels))


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood ``-log p_y``, ``p_y`` clamped at the dtype's tiny."""
    probs, labels = check_probs(probs, labels)
    return float(_nll_brier_sums(probs, labels)[0] / len(labels))


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multiclass Brier score ``mean_n sum_k (p_nk - onehot_nk)^2``, in [0, 2].

    For K = 2 it is twice scikit-learn's binary ``brier_score_loss`` on ``p_1``.
    """
    probs, labels = check_probs(probs, labels)
    return float(_nll_brier_sums(probs, labels)[1] / len(labels))


def reliability_bins(
    probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_BINS
) -> dict[str, Tensor]:
    """Per-bin statistics behind ECE and the reliability diagram.

    Returns:
        ``count``, ``confidence`` (mean), ``accuracy`` (mean; 0 in empty bins), each
        ``[n_bins]``, and ``edges`` ``[n_bins + 1]``, float64 on ``probs``' device.
    """
    check_bins(n_bins)
    probs, labels = check_probs(probs, labels)
    sums = _top_label_sums(*top_label(probs, labels), n_bins)
    count = sums[0]
    edges = torch.arange(n_bins + 1, device=count.device, dtype=count.dtype) / n_bins
    return {
        "count": count,
        "confidence": sums[1] / count.clamp_min(1),
        "accuracy": sums[2] / count.clamp_min(1),
        "edges": edges,
    }


def ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label expected calibration error, L1, equal-width bins on (0, 1] (Guo et al.)."""
    check_bins(n_bins)
    probs, labels = check_probs(probs, labels)
    return _ece_from(_top_label_sums(*top_label(probs, labels), n_bins), len(labels))


def mce(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_BINS) -> float:
    """Maximum calibration error: the largest ``|accuracy - confidence|`` of a non-empty bin."""
    check_bins(n_bins)
    probs, labels = check_probs(probs, labels)
    return _mce_from(_top_label_sums(*top_label(probs, labels), n_bins))


def adaptive_ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_BINS) -> float:
    """ECE over equal-mass bins.

    The confidences are sorted (ties broken by putting errors first, which makes the
    result independent of sample order) and split into ``n_bins`` groups whose sizes
    differ by at most one, the larger groups first, as ``numpy.array_split`` does.
    """
    check_bins(n_bins)
    probs, labels = check_probs(probs, labels)
    return _adaptive_from(*top_label(probs, labels), n_bins)


def classwise_ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_BINS) -> float:
    """Class-wise ECE: per class k, the binned ECE of ``p_k`` against ``y == k`` over all
    samples, averaged over the K classes (Kull et al. 2019; Nixon et al. 2019)."""
    check_bins(n_bins)
    probs, labels = check_probs(probs, labels)
    return _classwise_from(_classwise_sums(probs, labels, n_bins), probs.shape[1], len(labels))


def aurc(probs: ArrayLike, labels: ArrayLike) -> float:
    """Area under the risk-coverage curve, confidence = max probability (lower is better).

    Samples are sorted by confidence, highest first; the risk at coverage ``i / N`` is the
    error rate among the top ``i`` and AURC is the mean of these N risks. Samples with tied
    confidence cannot be told apart by the model, so for an ``i`` that cuts a tie group the
    risk uses the group's mean error rate: the expected risk under a random order of the
    ties. The result never depends on the order of the samples.
    """
    probs, labels = check_probs(probs, labels)
    return _aurc_from(*top_label(probs, labels))


class ECE(SummableMetric):
    """Top-label ECE accumulated over batches (see :func:`ece`).

    State: three float64 ``[n_bins]`` tensors (``count``, ``conf_sum``, ``correct_sum``).

    Distributed evaluation:
        The state is sums, so reducing it across processes gives the global metric::

            for t in metric.state_tensors().values():
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
            value = metric.compute()

        ``metric.sync()`` does exactly this (every rank must have called ``update``).
    """

    def __init__(self, n_bins: int = DEFAULT_BINS) -> None:
        check_bins(n_bins)
        self.n_bins = n_bins
        super().__init__()

    def update(self, probs: ArrayLike, labels: ArrayLike) -> None:
        """Adds a batch of probabilities ``[B, K]`` and labels ``[B]``."""
        probs, labels = check_probs(probs, labels)
        sums = _top_label_sums(*top_label(probs, labels), self.n_bins)
        self._add_sums(count=sums[0], conf_sum=sums[1], correct_sum=sums[2])

    def compute(self) -> float:
        """The ECE of everything seen since the last ``reset``."""
        s = self._require_state()
        sums = torch.stack([s["count"], s["conf_sum"], s["correct_sum"]])
        return _ece_from(sums, int(s["count"].sum()))


class CalibrationMetrics(SummableMetric):
    """All calibration metrics in one pass: accuracy, NLL, Brier, ECE, adaptive ECE, MCE,
    class-wise ECE and AURC. ``compute()`` returns a dict keyed by the functions' names,
    plus ``n``, and equals the functional forms on the same data.

    State: summable float64 tensors (top-label bin sums ``[3, n_bins]``, class-wise sums
    ``[3, K * n_bins]``, ``[nll_sum, brier_sum]`` and the count) and, because adaptive ECE
    and AURC need every sample, the per-sample confidences and correctness (lists of
    tensors, one entry per batch: 5 bytes a sample for float32 input).

    Distributed evaluation:
        ``all_reduce`` the sums and ``all_gather`` the per-sample tensors::

            metric.sync()  # every rank, once: all_reduce(SUM) sums, all_gather samples
            result = metric.compute()

        By hand, the sums are ``metric.state_tensors()`` (``dist.all_reduce`` with
        ``ReduceOp.SUM``) and the per-sample tensors ``metric.sample_tensors()``
        (``dist.all_gather``; lengths differ per rank, so pad to the longest).
    """

    def __init__(self, n_bins: int = DEFAULT_BINS) -> None:
        check_bins(n_bins)
        self.n_bins = n_bins
        super().__init__()

    def update(self, probs: ArrayLike, labels: ArrayLike) -> None:
        """Adds a batch of probabilities ``[B, K]`` and labels ``[B]``."""
        probs, labels = check_probs(probs, labels)
        classes = self._sums.get("classwise")
        if classes is not None and classes.shape[1] != probs.shape[1] * self.n_bins:
            k_seen = classes.shape[1] // self.n_bins
            raise ValueError(
                f"probs has {probs.shape[1]} classes but earlier batches had {k_seen} — "
                "call reset() before evaluating a different model"
            )
        conf, correct = top_label(probs, labels)
        self._add_sums(
            top=_top_label_sums(conf, correct, self.n_bins),
            classwise=_classwise_sums(probs, labels, self.n_bins),
            nll_brier=_nll_brier_sums(probs, labels),
        )
        self._add_samples(confidence=conf, correct=correct)

    def compute(self) -> dict[str, float]:
        """All metrics of everything seen since the last ``reset``."""
        s = self._require_state()
        samples = self.sample_tensors()
        conf, correct = samples["confidence"], samples["correct"]
        n = conf.numel()
        top = s["top"]
        n_classes = s["classwise"].shape[1] // self.n_bins
        return {
            "n": n,
            "accuracy": float(top[2].sum() / n),
            "nll": float(s["nll_brier"][0] / n),
            "brier": float(s["nll_brier"][1] / n),
            "ece": _ece_from(top, n),
            "adaptive_ece": _adaptive_from(conf, correct, self.n_bins),
            "mce": _mce_from(top),
            "classwise_ece": _classwise_from(s["classwise"], n_classes, n),
            "aurc": _aurc_from(conf, correct),
        }
