"""Last-layer Laplace (Daxberger et al. 2021, "Laplace Redux"): a Gaussian posterior over
the model's own head, fitted on the cached training features in one pass.

The head ``f(x) = W φ(x) + b`` (an ``nn.Linear``) trained to the MAP ``θ*`` gets the
posterior ``N(θ*, P^-1)`` with ``P = GGN + δ I``: the generalised Gauss-Newton matrix
of the cross-entropy on the training set (``Σ_n J_n^T Λ_n J_n``, ``Λ = diag(p) - p p^T``,
which for a linear head is also its exact Hessian) plus the prior precision ``δ``.

Hessian structures (``hessian=``), as laplace-torch computes them:

* ``"diag"``: the GGN's diagonal, ``[K, D + 1]``.
* ``"kron"`` (default): KFAC, ``(Σ_n Λ_n) ⊗ (1/N Σ_n φ_n φ_n^T)`` for the weights and
  ``Σ_n Λ_n`` for the bias (two blocks, as laplace-torch keeps weight and bias apart).
  Memory ``K^2 + D^2``: fine for ImageNet heads.
* ``"full"``: the dense GGN, ``[K (D + 1)]^2``; refused beyond
  :data:`MAX_FULL_PARAMETERS` parameters (use ``"kron"``).

Every structure is kept as an eigendecomposition (float64 buffers), so a new prior
precision costs nothing: the marginal likelihood and the predictive are sums over
eigenvalues.

Predictive (``predictive=``), on the logits' marginal variances
``v_k(φ) = J_k P^-1 J_k^T``:

* ``"probit"`` (default): the extended probit / MacKay approximation,
  ``softmax(f / sqrt(1 + π/8 v))``, laplace-torch's ``link_approx="probit"``. The
  member's logits become ``f / sqrt(1 + π/8 v)``: plain tensor operations (exports).
* ``"samples"``: ``samples`` heads drawn once from the posterior at ``fit`` (seeded,
  kept as a buffer like MC dropout's masks), members ``[S, B, K]`` averaged in
  probability space: the GLM predictive by Monte Carlo.

Prior precision (``prior_precision=``):

* ``"marglik"`` (default): maximises the Laplace log marginal likelihood of the training
  set (laplace-torch's formula). With a scalar prior its maximiser solves MacKay's
  fixed point ``Σ_i e_i / (e_i + δ) = δ ||θ*||^2`` (``e_i`` the GGN's eigenvalues), whose
  left side minus right side is strictly decreasing in ``δ``: bisection on ``log δ``
  finds the unique optimum to machine precision, where laplace-torch runs 100 Adam
  steps on ``log δ``.
* ``"calibration_nll"``: minimises the calibration set's NLL of the probit predictive:
  laplace-torch's grid (``10^-4 ... 10^4``, 100 points) and then a golden-section search
  between the best point's neighbours, so it is never worse than the grid's choice.
* a number: that precision.

Where it sits in the chain (``Stage.SAMPLE``, before ``mc_dropout``):

* ``members``: it widens the members of the plugins before it (the model's own head:
  ``f = W φ + b`` exactly) by the head's posterior at the same features: probit scaling
  or added posterior deviations ``ΔW φ + Δb``. A calibrator after it (temperature) is
  fitted on this predictive; conformal and the OOD decision read it. MC dropout
  (``scope="head"``) runs outside it, so Laplace sees each dropout mask's features.
* ``outputs``: ``laplace_variance``, the total variance of the predicted probabilities
  under the linearised posterior (the delta method: ``tr(Λ Σ_f Λ)``, ``Λ = diag(p) - p
  p^T`` at the head's softmax), and, with ``predictive="samples"``,
  ``laplace_mutual_information`` (the sampled heads' epistemic entropy term). Not the
  logits' variance ``tr Σ_f``: most of it lies along a shift of every logit, which the
  softmax ignores and the GGN has no curvature for, so it only measures the features'
  norm (on the shared ResNet-20 it ranks MNIST as *more* in-distribution than CIFAR-10:
  AUROC 1%, ``benchmarks/uncertainty_compare.py``). Both scores read only
  :attr:`~wrapcal.OutputContext.backbone_features` and
  :attr:`~wrapcal.OutputContext.base_logits` (the model's own head), as ``fit`` reads
  the head: they score the same beside samplers, extra heads and calibrators, and move
  only with a plugin that retrains the head. The detectors (KNN, energy...) still read
  the model's own head.
* ``fit`` reads the ``train`` features and the model's head (as any ``TRAIN``-stage
  plugin left it); ``"calibration_nll"`` also the calibration set through the plugins
  before it (``model.features``, ``model.members``), as ``members`` sees them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from wrapcal.plugin import (
    FeatureSet,
    FitData,
    Interval,
    ModelView,
    Options,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    entropy,
    hookimpl,
    in_mode,
    logits_to_log_probs,
    one_cpu_thread,
)

__all__ = ["MAX_FULL_PARAMETERS", "LastLayerLaplace"]

_NAME = "laplace"
HESSIANS = ("kron", "diag", "full")
PREDICTIVES = ("probit", "samples")
PRIOR_METHODS = ("marglik", "calibration_nll")
#: ``hessian="full"`` keeps a ``P x P`` float64 eigendecomposition: 8192 parameters are
#: 512 MB. Beyond it ``"kron"`` is the structure to use.
MAX_FULL_PARAMETERS = 8192
#: Elements per chunk of rows (``rows x K x (D + 1)``): 4M, 32 MB in float64.
_CHUNK_ELEMENTS = 1 << 22
#: At most this many values of the variances' basis are kept over the calibration set
#: while the prior is searched (256 MB: float32 for the full GGN's ``[N, K, P]``);
#: beyond, it is recomputed for each ``δ`` (each costs a pass of ``N K (D + 1) P``).
_KEPT_BASIS = 1 << 26
#: laplace-torch's gridsearch: ``logspace(-4, 4, 100)``.
GRID_LOG10 = (-4.0, 4.0, 100)
#: Bracket of the marginal-likelihood bisection on ``log10 δ``.
_MARGLIK_LOG10 = (-12.0, 12.0)
_GOLDEN = (math.sqrt(5) - 1) / 2
_SCORES = {"laplace_variance": OutputKind.OOD_SCORE}
_SAMPLE_SCORES = {"laplace_mutual_information": OutputKind.OOD_SCORE}
_WHY_TRAIN = "the posterior's curvature (GGN) is summed over the training features"
_WHY_CAL = "prior_precision='calibration_nll' minimises the calibration set's NLL"


class LastLayerLaplace(Plugin):
    """Last-layer Laplace on the model's own ``nn.Linear`` head (see the module docstring).

    Args:
        hessian: ``"kron"`` (KFAC), ``"diag"`` or ``"full"`` (dense GGN).
        predictive: ``"probit"`` (one member, exportable closed form) or ``"samples"``
            (``samples`` sampled heads as members).
        prior_precision: ``"marglik"``, ``"calibration_nll"`` or a fixed value > 0.
        samples: Number of sampled heads (``predictive="samples"``).
        seed: Seed of the sampled heads.

    Attributes:
        prior_precision_: The prior precision ``δ`` used (a float64 scalar buffer).
        train_loss_: The training set's summed cross-entropy at the MAP (``None``
            when fitted without training labels).
        map_norm_sq_: ``||θ*||^2``, the head's squared norm.
        num_train_: Training rows the curvature was summed over.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "hessian": [Options(str, HESSIANS)],
        "predictive": [Options(str, PREDICTIVES)],
        "prior_precision": [Options(str, PRIOR_METHODS), Interval(float, 0, None, "neither")],
        "samples": [Interval(int, 1, 100_000)],
        "seed": [Interval(int, 0, 2**63 - 1)],
    }
    _state_constraints: ClassVar[dict[str, list[Any]]] = {
        "train_loss_": [None, Interval(float, 0, None)],
        "map_norm_sq_": [None, Interval(float, 0, None)],
        "num_train_": [None, Interval(int, 1, None)],
    }

    def __init__(
        self,
        hessian: str = "kron",
        predictive: str = "probit",
        prior_precision: str | float = "marglik",
        samples: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.hessian = hessian
        self.predictive = predictive
        self.prior_precision = prior_precision
        self.samples = samples
        self.seed = seed
        self.train_loss_: float | None = None
        self.map_norm_sq_: float | None = None
        self.num_train_: int | None = None
        floats = (torch.float64, torch.float32)
        self.register_learned_buffer("prior_precision_", (), floats)
        # The GGN's eigendecomposition, in the head's layout [K, D (+ 1 for the bias)].
        if hessian == "diag":
            self.register_learned_buffer("ggn_diag_", ("num_classes", None), floats)
        elif hessian == "kron":
            self.register_learned_buffer("input_eigvals_", ("num_features",), floats)
            self.register_learned_buffer("input_eigvecs_", ("num_features", "num_features"), floats)
            self.register_learned_buffer("output_eigvals_", ("num_classes",), floats)
            self.register_learned_buffer("output_eigvecs_", ("num_classes", "num_classes"), floats)
        else:
            self.register_learned_buffer("ggn_eigvals_", (None,), floats)
            self.register_learned_buffer("ggn_eigvecs_", (None, None), floats)
        if predictive == "samples":
            self.register_learned_buffer("head_samples_", (None, "num_classes", None), floats)

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        # A sampler of the head: after the heads (TRAIN, HEADS) it is the posterior of,
        # before MC dropout so that dropout's masked features reach it.
        tags.stage = Stage.SAMPLE
        tags.before = ("mc_dropout",)
        tags.fit_requires = {"train": _WHY_TRAIN}
        if self.prior_precision == "calibration_nll":
            tags.fit_requires["calibration"] = _WHY_CAL
        tags.exportable = True
        tags.outputs = dict(_SCORES)
        if self.predictive == "samples":
            tags.outputs.update(_SAMPLE_SCORES)
        return tags

    # --- set-up --------------------------------------------------------------------------

    def attach(self, model: ModelView) -> None:
        """Check that the head is one ``nn.Linear`` with softmax logits (and, for
        ``hessian="full"``, small enough)."""
        head = model.head
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"laplace puts its posterior on the model's head, which must be one nn.Linear "
                f"(features -> logits); {model.name}'s head is {type(head).__name__}. Split "
                "the model so that its head is its last Linear layer (wrapcal.wrap(..., "
                "split=Split(backbone, head))), or use mc_dropout or an ensemble"
            )
        if head.out_features < 2:
            raise ValueError(
                "laplace needs softmax logits (K >= 2); this head has one binary logit. "
                "Give the model two logits [0, z], or use mc_dropout"
            )
        width = head.in_features + (head.bias is not None)
        if self.hessian == "full" and head.out_features * width > MAX_FULL_PARAMETERS:
            raise ValueError(
                f"hessian='full' on a head of {head.out_features * width} parameters needs "
                f"a dense {head.out_features * width}^2 matrix (more than "
                f"{MAX_FULL_PARAMETERS} parameters); use hessian='kron' (KFAC) or 'diag'"
            )
        self.has_bias_ = head.bias is not None
        self.num_classes_ = head.out_features

    # --- fitting -------------------------------------------------------------------------

    def fit(self, model: ModelView, data: FitData) -> LastLayerLaplace:
        """Sum the GGN over the training features (one chunked pass), decompose it, choose
        the prior precision, draw the sampled heads."""
        train = data.require("train", _NAME, _WHY_TRAIN)
        labels_needed = self.prior_precision == "marglik"
        if labels_needed:
            train.require_labels(_NAME)
        head = model.head
        if not isinstance(head, nn.Linear):  # attach refused any other head
            raise TypeError(f"laplace needs an nn.Linear head, got {type(head).__name__}")
        stats = _curvature_pass(head, train, self.hessian)
        self.num_train_ = int(stats["count"])
        self.train_loss_ = float(stats["loss"]) if train.labels is not None else None
        params = [p.detach().to(torch.float64) for p in head.parameters()]
        self.map_norm_sq_ = float(sum((p * p).sum() for p in params))
        # The decomposition and the prior's search are many small steps: one thread
        # (on a shared CPU, two threads made a 650 x 650 eigh 12x slower here).
        with one_cpu_thread(model.device):
            self._decompose(stats)
            if self.prior_precision == "marglik":
                prior = self._marglik_prior()
            elif self.prior_precision == "calibration_nll":
                calibration = data.require("calibration", _NAME, _WHY_CAL)
                prior = self._nll_prior(model, calibration)
            else:
                prior = float(self.prior_precision)
        device = self._spectrum()[0].device
        self.prior_precision_ = torch.tensor(prior, dtype=torch.float64, device=device)
        if self.predictive == "samples":
            self.head_samples_ = self.draw_heads(self.samples, self.seed)
        self.fitted_ = True
        return self

    def _decompose(self, stats: dict[str, Any]) -> None:
        if self.hessian == "diag":
            self.ggn_diag_ = stats["diag"].clamp_min(0)
        elif self.hessian == "kron":
            a_vals, a_vecs = torch.linalg.eigh(stats["inputs"] / stats["count"])
            b_vals, b_vecs = torch.linalg.eigh(stats["outputs"])
            # Both factors are PSD: eigh's rounding below zero is no curvature.
            # Contiguous, as a loaded file holds them: eigh returns column-major vectors,
            # and another memory layout sums the predictive's products in another order.
            self.input_eigvals_, self.input_eigvecs_ = a_vals.clamp_min(0), a_vecs.contiguous()
            self.output_eigvals_, self.output_eigvecs_ = b_vals.clamp_min(0), b_vecs.contiguous()
        else:
            values, vectors = torch.linalg.eigh(stats["full"])
            self.ggn_eigvals_, self.ggn_eigvecs_ = values.clamp_min(0), vectors.contiguous()

    def _spectrum(self) -> list[torch.Tensor]:
        """The GGN's eigenvalues, every one (the weights' and the bias's blocks)."""
        if self.hessian == "diag":
            return [self.ggn_diag_.reshape(-1)]
        if self.hessian == "full":
            return [self.ggn_eigvals_]
        kron = torch.outer(self.output_eigvals_, self.input_eigvals_).reshape(-1)
        return [kron, self.output_eigvals_] if self.has_bias_ else [kron]

    # --- the prior precision ---------------------------------------------------------------

    def log_marginal_likelihood(self, prior_precision: float | None = None) -> float:
        """laplace-torch's Laplace log marginal likelihood of the training set:
        ``-loss - (log det P - log det P0 + δ ||θ*||^2) / 2``.

        Args:
            prior_precision: ``δ``; the fitted one when ``None``.
        """
        self.check_is_fitted()
        if self.train_loss_ is None:
            raise ValueError(
                "the marginal likelihood needs the training labels: fit with labelled train data"
            )
        delta = float(self.prior_precision_) if prior_precision is None else prior_precision
        values = torch.cat(self._spectrum()).to(torch.float64)
        log_det_ratio = torch.log1p(values / delta).sum()
        assert self.map_norm_sq_ is not None  # set by fit (checked above)
        return float(-self.train_loss_ - 0.5 * (log_det_ratio + delta * self.map_norm_sq_))

    def _marglik_prior(self) -> float:
        """The maximiser of the marginal likelihood in ``δ``: the root of
        ``g(δ) = Σ e / (e + δ) - δ ||θ*||^2`` (its derivative in ``log δ`` times -2),
        strictly decreasing, found by bisection on ``log10 δ``."""
        values = torch.cat(self._spectrum()).to(torch.float64)
        norm = float(self.map_norm_sq_ or 0.0)

        def g(log10: float) -> float:
            delta = 10.0**log10
            return float((values / (values + delta)).sum()) - delta * norm

        low, high = _MARGLIK_LOG10
        if g(high) > 0:
            return 10.0**high  # no weights (θ* = 0): the prior wins
        if g(low) < 0:
            return 10.0**low
        for _ in range(100):
            mid = (low + high) / 2
            low, high = (mid, high) if g(mid) > 0 else (low, mid)
        return 10.0 ** ((low + high) / 2)

    def _nll_prior(self, model: ModelView, calibration: FeatureSet) -> float:
        """Grid over ``10^-4 ... 10^4`` (laplace-torch's), then golden section between
        the best point's neighbours, of the calibration NLL of the probit predictive of
        the members the plugins before give (what ``members`` receives)."""
        labels = calibration.require_labels(_NAME)
        rows = max(1, _CHUNK_ELEMENTS // max(model.num_classes * (model.num_features + 1), 1))
        # The variances' basis does not depend on δ: computed once per chunk, kept unless
        # it is large (the full GGN's is [N, K, P]), so each δ costs a matrix product.
        keep = len(calibration) * model.num_classes * self._basis_width() <= _KEPT_BASIS
        chunks = []
        with torch.no_grad():
            for start in range(0, len(calibration), rows):
                cached = calibration.features[start : start + rows]
                features = model.features(cached).to(torch.float64)
                basis = self._variance_basis(features) if keep else features
                if keep and self.hessian == "full":
                    basis = basis.float()  # [n, K, P]: half the memory; 1e-7 on an NLL
                members = model.members(cached).to(torch.float64)
                chunks.append((basis, members, labels[start : start + rows].to(cached.device)))

        def nll(log10: float) -> float:
            delta = torch.tensor(10.0**log10, dtype=torch.float64)
            total = 0.0
            for basis, members, y in chunks:
                basis = basis if keep else self._variance_basis(basis)
                variances = self._variances(basis, delta.to(basis.dtype)).to(torch.float64)
                kappa = torch.rsqrt(1 + (math.pi / 8) * variances)
                log_probs = _combined_log_probs(members * _per_member(kappa, members.shape[0]))
                total -= float(log_probs.gather(-1, y.view(-1, 1)).sum())
            return total / len(calibration)

        low, high, points = GRID_LOG10
        grid = torch.linspace(low, high, points, dtype=torch.float64).tolist()
        losses = [nll(x) for x in grid]
        best = min(range(points), key=lambda i: (losses[i], i))  # first minimum, as argmin
        a, b = grid[max(best - 1, 0)], grid[min(best + 1, points - 1)]
        c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
        fc, fd = nll(c), nll(d)
        for _ in range(40):
            if fc <= fd:
                b, d, fd = d, c, fc
                c = b - _GOLDEN * (b - a)
                fc = nll(c)
            else:
                a, c, fc = c, d, fd
                d = a + _GOLDEN * (b - a)
                fd = nll(d)
        candidates = [(losses[best], grid[best]), (fc, c), (fd, d)]
        return 10.0 ** min(candidates)[1]

    # --- the posterior predictive ----------------------------------------------------------

    def logit_variances(
        self, features: torch.Tensor, prior_precision: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The logits' posterior marginal variances ``v [..., K]`` of features ``[..., D]``.

        The diagonal of laplace-torch's ``f_var`` (``J P^-1 J^T``), in the features'
        dtype (float64 when a prior precision is given here, for the prior's search).
        """
        dtype = features.dtype if prior_precision is None else torch.float64
        return self._variances(self._variance_basis(features.to(dtype)), prior_precision)

    def _variance_basis(self, x: torch.Tensor) -> torch.Tensor:
        """What the variances need of features ``[..., D]`` that the prior does not change:
        the squared coordinates of the Jacobians in the GGN's eigenbasis."""
        if self.hessian == "kron":
            return (x @ self.input_eigvecs_.to(x)).square()  # [..., D]
        x = self._with_bias(x)
        if self.hessian == "diag":
            return x.square()  # [..., D + 1]
        vectors = self.ggn_eigvecs_.to(x).reshape(self.output_classes, x.shape[-1], -1)
        return torch.einsum("...d,kdp->...kp", x, vectors).square()  # [..., K, P]

    def _variances(self, basis: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """``v [..., K]`` from :meth:`_variance_basis` and the prior precision ``δ``:
        each squared coordinate over its eigenvalue plus ``δ``."""
        delta = (self.prior_precision_ if prior is None else prior).to(basis)
        if self.hessian == "kron":
            q_out_sq = self.output_eigvecs_.to(basis).square()
            l_in, l_out = self.input_eigvals_.to(basis), self.output_eigvals_.to(basis)
            inverse = 1 / (torch.outer(l_out, l_in) + delta)  # [K, D] in the eigenbases
            variances = (basis @ inverse.T) @ q_out_sq.T
            if self.has_bias_:
                variances = variances + q_out_sq @ (1 / (l_out + delta))
            return variances
        if self.hessian == "diag":
            return basis @ (1 / (self.ggn_diag_.to(basis) + delta)).T
        return basis @ (1 / (self.ggn_eigvals_.to(basis) + delta))

    def probability_variance(self, features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``tr Cov[p]`` ``[...]``: the total variance of the predicted probabilities under
        the linearised posterior (the delta method), ``tr(Λ Σ_f Λ)`` with
        ``Λ = diag(p) - p p^T`` at the head's probabilities ``p`` and ``Σ_f`` the logits'
        posterior covariance (laplace-torch's ``f_var``).

        ``Λ`` removes what the softmax ignores: a shift of every logit, the direction in
        which the logits' own variance is largest (the GGN has no curvature along it, so
        only the prior bounds it) and which grows with the features' norm only.
        """
        delta = self.prior_precision_.to(features)
        p2 = probs.square()
        if self.hessian == "diag":
            spread = p2 * (1 - 2 * probs + p2.sum(-1, keepdim=True))  # ||Λ e_k||^2
            return (self.logit_variances(features) * spread).sum(-1)
        if self.hessian == "full":
            x = self._with_bias(features)
            scaled = self.ggn_eigvecs_.to(x) * torch.rsqrt(self.ggn_eigvals_.to(x) + delta)
            roots = torch.einsum(
                "...d,kdp->...kp", x, scaled.reshape(probs.shape[-1], x.shape[-1], -1)
            )
            centred = roots - torch.einsum("...k,...kp->...p", probs, roots).unsqueeze(-2)
            return (probs.unsqueeze(-1) * centred).square().sum((-2, -1))  # ||Λ R||_F^2
        # Σ_f = Q_B diag(w) Q_B^T: tr(Λ Σ_f Λ) = Σ_i w_i ||Λ q_i||^2, with
        # ||Λ q||^2 = Σ_k p_k^2 (q_k - p.q)^2, from [..., K] x [K, K] products only.
        q_out = self.output_eigvecs_.to(features)
        l_in, l_out = self.input_eigvals_.to(features), self.output_eigvals_.to(features)
        weights = (features @ self.input_eigvecs_.to(features)).square() @ (
            1 / (torch.outer(l_out, l_in) + delta)
        ).T
        if self.has_bias_:
            weights = weights + 1 / (l_out + delta)
        along = probs @ q_out
        norms = (
            p2 @ q_out.square()
            - 2 * along * (p2 @ q_out)
            + along.square() * p2.sum(-1, keepdim=True)
        )
        return (weights * norms).sum(-1)

    @property
    def output_classes(self) -> int:
        """``K``, the head's number of logits."""
        return self.num_classes_

    def _with_bias(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_bias_:
            return x
        return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)

    def _basis_width(self) -> int:
        """Values per row and class of :meth:`_variance_basis` (for its memory)."""
        if self.hessian == "full":
            return self.ggn_eigvals_.shape[0]
        return 1 + (self.input_eigvals_.shape[0] if self.hessian == "kron" else 0)

    def _probit(self, features: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """Members ``[M, B, K]`` scaled by ``1 / sqrt(1 + π/8 v)`` of the features
        ``[S, B, D]`` each came from (the inner members vary fastest)."""
        variances = self.logit_variances(features)
        kappa = torch.rsqrt(1 + (math.pi / 8) * variances).to(members.dtype)
        return members * _per_member(kappa, members.shape[0])

    def draw_heads(self, count: int, seed: int) -> torch.Tensor:
        """``count`` head deviations ``θ - θ*`` ``[count, K, D (+ 1)]`` from the posterior
        ``N(0, P^-1)``, drawn from a CPU generator seeded with ``seed``."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        classes = self.output_classes
        device = self.prior_precision_.device
        delta = self.prior_precision_.to(torch.float64)
        if self.hessian == "diag":
            z = torch.randn(count, *self.ggn_diag_.shape, generator=generator, dtype=torch.float64)
            return z.to(device) * torch.rsqrt(self.ggn_diag_ + delta)
        if self.hessian == "full":
            size = self.ggn_eigvals_.shape[0]
            z = torch.randn(count, size, generator=generator, dtype=torch.float64).to(device)
            scale = self.ggn_eigvecs_ * torch.rsqrt(self.ggn_eigvals_ + delta)
            return (z @ scale.T).reshape(count, classes, -1)
        width = self.input_eigvals_.shape[0]
        z = torch.randn(count, classes, width, generator=generator, dtype=torch.float64)
        q_in, q_out = self.input_eigvecs_, self.output_eigvecs_
        inverse_sqrt = torch.rsqrt(torch.outer(self.output_eigvals_, self.input_eigvals_) + delta)
        # vec(Q_B Y Q_A^T) = (Q_B ⊗ Q_A) vec(Y): the symmetric square root of the weights'
        # posterior covariance (Q_B ⊗ Q_A) diag(1 / (λ_B λ_A + δ)) (Q_B ⊗ Q_A)^T.
        weights = q_out @ ((q_out.T @ z.to(device) @ q_in) * inverse_sqrt) @ q_in.T
        if not self.has_bias_:
            return weights
        zb = torch.randn(count, classes, generator=generator, dtype=torch.float64).to(device)
        bias = ((zb @ q_out) * torch.rsqrt(self.output_eigvals_ + delta)) @ q_out.T
        return torch.cat([weights, bias.unsqueeze(-1)], dim=-1)

    def _deviations(self, features: torch.Tensor) -> torch.Tensor:
        """Logit deviations ``[S, ..., K]`` of the sampled heads on features ``[..., D]``."""
        heads = self.head_samples_.to(features)
        out = torch.einsum("...d,skd->s...k", features, heads[..., : features.shape[-1]])
        if self.has_bias_:
            shape = (heads.shape[0],) + (1,) * (features.ndim - 1) + (heads.shape[1],)
            out = out + heads[..., -1].reshape(shape)
        return out

    def members(
        self, features: torch.Tensor, inner: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The inner members under the head's posterior: probit-scaled ``[M, B, K]`` or,
        with ``predictive="samples"``, each sampled head's deviation added:
        ``[S * M, B, K]`` (the inner members vary fastest)."""
        self.check_is_fitted()
        out = inner(features)
        if self.predictive == "probit":
            return self._probit(features, out)
        deviations = self._deviations(features).to(out.dtype)  # [S, S_f, B, K]
        per = _repeats(out.shape[0], features.shape[0])
        if per > 1:
            deviations = deviations.repeat_interleave(per, dim=1)
        return (out.unsqueeze(0) + deviations).reshape(-1, *out.shape[1:])

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """``laplace_variance`` (and ``laplace_mutual_information``) of the model's
        features and its own head's logits."""
        self.check_is_fitted()
        features = context.backbone_features
        work = torch.promote_types(features.dtype, torch.float32)
        x = features.to(work)
        base = context.base_logits.to(work)
        scores = {"laplace_variance": self.probability_variance(x, torch.softmax(base, dim=-1))}
        if self.predictive == "samples":
            logits = base.unsqueeze(0) + self._deviations(x)
            probs = torch.softmax(logits, dim=-1)
            total = entropy(probs.mean(dim=0))
            expected = entropy(probs).mean(dim=0)
            scores["laplace_mutual_information"] = (total - expected).clamp_min(0)
        return scores

    # --- learned state ---------------------------------------------------------------------

    def validate_state(self) -> None:
        """Loaded values must be what ``fit`` gives: finite, eigenvalues >= 0, a prior
        precision > 0, tensors of consistent sizes."""
        super().validate_state()
        if self.fitted_ and not float(self.prior_precision_) > 0:
            raise ValueError(
                f"the prior precision is {float(self.prior_precision_)}; it must be > 0"
            )
        for name in ("ggn_diag_", "input_eigvals_", "output_eigvals_", "ggn_eigvals_"):
            buffer = self._buffers.get(name)
            if buffer is not None and buffer.numel() and bool((buffer < 0).any()):
                raise ValueError(f"learned tensor {name} holds negative curvature")
        samples = self._buffers.get("head_samples_")
        if self.fitted_ and samples is not None and samples.shape[0] != self.samples:
            raise ValueError(
                f"head_samples_ holds {samples.shape[0]} heads; samples={self.samples}"
            )


def _repeats(members: int, samples: int) -> int:
    if members % samples:
        raise ValueError(
            f"the members before laplace ({members}) are not a whole number per feature "
            f"sample ({samples})"
        )
    return members // samples


def _per_member(values: torch.Tensor, members: int) -> torch.Tensor:
    """``[S, B, K]`` per feature sample -> ``[M, B, K]`` per member (inner fastest)."""
    per = _repeats(members, values.shape[0])
    return values if per == 1 else values.repeat_interleave(per, dim=0)


def _combined_log_probs(members: torch.Tensor) -> torch.Tensor:
    """``log mean_m softmax(members)`` ``[B, K]``: the core's combination of members."""
    log_probs = logits_to_log_probs(members)
    if members.shape[0] == 1:
        return log_probs[0]
    return torch.logsumexp(log_probs, dim=0) - math.log(members.shape[0])


def _curvature_pass(head: nn.Linear, train: FeatureSet, hessian: str) -> dict[str, Any]:
    """One pass over the training features: the GGN of the head's cross-entropy in the
    requested structure, the summed cross-entropy and the row count (float64 sums)."""
    classes, width = head.out_features, head.in_features
    bias = head.bias is not None
    wide = width + int(bias)
    device = head.weight.device
    f64 = torch.float64
    stats: dict[str, Any] = {"count": 0, "loss": 0.0}
    if hessian == "diag":
        stats["diag"] = torch.zeros(classes, wide, dtype=f64, device=device)
    elif hessian == "kron":
        stats["inputs"] = torch.zeros(width, width, dtype=f64, device=device)
        stats["outputs"] = torch.zeros(classes, classes, dtype=f64, device=device)
    else:
        stats["full"] = torch.zeros(classes * wide, classes * wide, dtype=f64, device=device)
    rows = max(1, _CHUNK_ELEMENTS // (classes * wide))
    with torch.no_grad(), in_mode(head, False):
        for chunk, labels in train.batches(rows):
            chunk = chunk.to(device)
            log_probs = torch.log_softmax(head(chunk).to(f64), dim=-1)
            p = log_probs.exp()
            x = chunk.to(f64)
            stats["count"] += x.shape[0]
            if labels is not None:
                picked = log_probs.gather(-1, labels.to(device).view(-1, 1).long())
                stats["loss"] -= float(picked.sum())
            if hessian == "kron":
                # KFAC: (Σ Λ_n) ⊗ (1/N Σ φ φ^T); Σ Λ_n = diag(Σ p) - Σ p p^T.
                stats["inputs"].addmm_(x.T, x)
                stats["outputs"] += torch.diag(p.sum(0)) - p.T @ p
                continue
            xb = torch.cat([x, torch.ones_like(x[:, :1])], dim=1) if bias else x
            if hessian == "diag":
                stats["diag"].addmm_((p * (1 - p)).T, xb.square())
                continue
            # Σ_n Λ_n ⊗ x x^T = Σ_n diag(p) ⊗ x x^T - (p ⊗ x)(p ⊗ x)^T
            full = stats["full"].view(classes, wide, classes, wide)
            weighted = (p.T.unsqueeze(-1) * xb).transpose(1, 2)  # [K, D + 1, n]
            outer = torch.bmm(weighted, xb.expand(classes, -1, -1))  # [K, D + 1, D + 1]
            index = torch.arange(classes, device=device)
            full[index, :, index, :] += outer
            joint = (p.unsqueeze(-1) * xb.unsqueeze(1)).reshape(x.shape[0], -1)
            stats["full"].addmm_(joint.T, joint, alpha=-1)
    if stats["count"] == 0:
        raise ValueError("laplace: the train features hold no rows")
    return stats


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register(_NAME, LastLayerLaplace)
