"""MC dropout: uncertainty from any classifier at about the cost of one forward pass.

Monte Carlo dropout (Gal & Ghahramani 2016) keeps dropout stochastic at inference and
averages the softmax outputs of ``T`` sampled networks; the spread of the samples
separates total uncertainty into its aleatoric and epistemic parts (Kendall & Gal
2017). Only dropout is sampled: BatchNorm and every other module stay in eval mode.

Two scopes:

* ``scope="head"`` (default): dropout on the head's input features only. The backbone
  runs once; the ``T`` samples of the head are drawn in one batched call on the
  features, so the cost is one forward pass plus ``T`` cheap head evaluations. Most
  classifiers already have dropout there (timm's ``drop_rate``, torchvision's
  ``classifier = Sequential(Dropout, Linear)``), and then this is exactly the model's own
  dropout, sampled. Models without it (torchvision's ResNet, timm models created with
  ``drop_rate=0``) get a dropout they were not trained with, which the plugin warns
  about; ``finetune=True`` retrains the head with it on the cached training features.
* ``scope="all"``: every dropout module in the network is sampled, ``T`` full passes
  (batched: the input is repeated ``T`` times, in chunks of at most ``max_batch`` rows).

The ``T`` head masks are *consistent* (Kirsch et al. 2019, BatchBALD): sample ``t`` uses
one mask for every input, i.e. ``T`` fixed thinned networks, drawn from a generator
seeded with ``seed`` at every call. So a given input gets the same output whatever
batch it is in, and saved and loaded models agree exactly. ``scope="all"`` draws fresh
masks for every row of every chunk, also from a generator reseeded at every call, so
its outputs are reproducible for the same batch and ``max_batch``.

What it changes for the other plugins: the members (``[T * M, B, K]``), so the combined
and final logits that calibrators and decisions read. Not the model's features
(``OutputContext.backbone_features``: with ``scope="all"`` the core computes them with a
plain, unsampled backbone pass) nor the head's own logits (``base_logits``) that the
detectors read: they score the same beside it. With ``finetune=True`` it retrains the
head (``changes_head``), which does change ``base_logits``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from wrapcal.plugin import (
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
    logits_to_log_probs,
    logits_to_probs,
)

if TYPE_CHECKING:
    from wrapcal.plugin import DiskFeatures

from ._dropout import (
    DEFAULT_P,
    DROPOUT_TYPES,
    dropout_modules,
    find_head_dropout,
    seeded_dropout,
)

__all__ = ["DEFAULT_P", "MCDropout", "finetune_head", "mc_scores", "seeded_dropout"]

#: At most this many feature elements per batched head call (``T * rows * D``), so that
#: a whole data set's logits do not allocate ``T`` copies of its features at once.
_HEAD_CHUNK_ELEMENTS = 1 << 25
#: Mini-batch size of the head fine-tuning.
_FINETUNE_BATCH = 256
SCOPES = ("head", "all")
_RATE = [Interval(float, 0, 1, closed="left")]
SCORES = {
    "predictive_entropy": OutputKind.UNCERTAINTY,
    "expected_entropy": OutputKind.UNCERTAINTY,
    "mutual_information": OutputKind.OOD_SCORE,
    "variation_ratio": OutputKind.UNCERTAINTY,
    "std_top_prob": OutputKind.UNCERTAINTY,
}


class MCDropout(Plugin):
    """MC dropout: T dropout samples of the head (one backbone pass) or of the whole net.

    Scores (higher = more uncertain): ``predictive_entropy`` (total), ``expected_entropy``
    (aleatoric), ``mutual_information`` (epistemic = total - aleatoric), ``variation_ratio``
    (1 - share of samples voting for the modal class) and ``std_top_prob`` (standard
    deviation over samples of the probability of the predicted class). They are computed
    on the members' softmax outputs, before any logit transform (temperature); with
    other head-members plugins inside (discrepancy heads) every member counts as a sample.

    Args:
        samples: Number of dropout samples ``T``.
        p: Dropout rate on the head's input features. ``None``: the model's own head
            dropout if it has one, else :data:`DEFAULT_P` (with a warning). With
            ``scope="all"`` the default adds only a functional head dropout (timm's
            ``drop_rate``), since dropout modules are sampled where they are.
        scope: ``"head"`` (one backbone pass) or ``"all"`` (``T`` full passes).
        finetune: Retrain the head with the dropout, on ``wrapped.fit(train=...)``'s
            cached features (cross-entropy, Adam, mini-batches of 256), so a head that
            never saw dropout learns to work with it. Only the model's own head
            (``wrapped.head``) is trained. ``scope="head"`` only.
        epochs: Epochs of the fine-tuning.
        lr: Adam's learning rate for the fine-tuning.
        seed: Seed of the dropout masks at inference (the fine-tuning uses ``fit``'s).
        max_batch: ``scope="all"``: at most this many input rows per backbone call.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "samples": [Interval(int, 1, 10_000)],
        "p": [None, *_RATE],
        "scope": [Options(str, SCOPES)],
        "finetune": [bool],
        "epochs": [Interval(int, 1, 100_000)],
        "lr": [Interval(float, 0, None, closed="neither")],
        "seed": [Interval(int, 0, 2**63 - 1)],
        "max_batch": [Interval(int, 1, None)],
    }
    _state_constraints: ClassVar[dict[str, list[Any]]] = {"p_": _RATE, "pass_p_": _RATE}

    def __init__(
        self,
        samples: int = 30,
        p: float | None = None,
        scope: str = "head",
        finetune: bool = False,
        epochs: int = 5,
        lr: float = 1e-3,
        seed: int = 0,
        max_batch: int = 256,
    ) -> None:
        super().__init__()
        self.samples = samples
        self.p = p
        self.scope = scope
        self.finetune = finetune
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.max_batch = max_batch

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.SAMPLE
        # Only fine-tuning learns anything; plain MC dropout works right after ``wrap``.
        tags.requires_fit = bool(self.finetune)
        if self.finetune:
            tags.fit_requires = {"train": "finetune=True retrains the head with dropout on it"}
        tags.changes_head = bool(self.finetune)
        tags.needs_inputs = self.scope == "all"
        tags.exportable = self.scope == "head"
        tags.outputs = dict(SCORES)
        return tags

    # --- set-up ------------------------------------------------------------------------

    def attach(self, model: ModelView) -> None:
        """Resolve the dropout rates from the model; check that ``scope`` can work."""
        if self.finetune and self.scope != "head":
            raise ValueError(
                "finetune=True retrains the head from cached features, which cannot "
                "sample the backbone's dropout; use scope='head' with finetune=True, or "
                "scope='all' with finetune=False"
            )
        head_rate, head_module = find_head_dropout(model)
        self.head_module_ = head_module
        if self.scope == "head":
            self.p_ = float(self.p) if self.p is not None else (head_rate or DEFAULT_P)
            self.pass_p_ = 0.0
            if head_rate == 0 and self.p_ > 0 and not self.finetune:
                warnings.warn(
                    f"mc_dropout: {model.name} has no dropout before its head; "
                    f"inserting dropout (p={self.p_}) on the head's input features, which "
                    "the model was not trained with: predictions stay close to the model's "
                    "own, but the spread of the samples is not calibrated. Pass "
                    "finetune=True and call wrapped.fit(train=...) to retrain the head "
                    "with it",
                    UserWarning,
                    stacklevel=2,
                )
            self._draw_masks(model.num_features)
            return
        self.dropout_modules_ = dropout_modules(model.backbone)
        # Forward hooks on each dropout module replace its (eval-mode, identity) output
        # while ``features`` samples: the same as switching only those modules to train
        # mode, but with the plugin's generator instead of the global RNG. BatchNorm and
        # the rest never leave eval mode.
        for name in self.dropout_modules_:
            model.backbone.get_submodule(name).register_forward_hook(self._sample_dropout)
        # The head's dropout, applied after every sampled pass, is only needed when it is
        # not a module (modules are sampled in place) or when the user asked for it.
        functional = head_rate if head_module is None else 0.0
        self.pass_p_ = float(self.p) if self.p is not None else functional
        # Cached features (a later plugin's fit) cannot rerun the backbone: there only
        # the head's dropout is sampled.
        self.p_ = float(self.p) if self.p is not None else head_rate
        self._draw_masks(model.num_features)
        if not self.dropout_modules_ and self.pass_p_ == 0:
            raise ValueError(
                f"scope='all' samples the network's dropout, but {model.name} has none (no "
                "dropout module with p > 0 and no head dropout rate). Use scope='head', "
                "which inserts dropout before the head (finetune=True retrains the head "
                "with it), or pass p to drop features"
            )
        if set(self.dropout_modules_) <= {head_module}:
            warnings.warn(
                f"mc_dropout: {model.name}'s only dropout is at its head, so "
                "scope='all' draws the same samples as scope='head' at T times the cost",
                UserWarning,
                stacklevel=2,
            )

    # --- fitting -----------------------------------------------------------------------

    def fit(self, model: ModelView, data: FitData) -> MCDropout:
        """With ``finetune=True``: train ``model.head`` under dropout on the train features."""
        if not self.finetune:
            return self
        train = data.require(
            "train", "mc_dropout", "finetune=True retrains the head with dropout on it"
        )
        labels = train.require_labels("mc_dropout")
        finetune_head(
            model.head,
            train.features,
            labels,
            p=self.p_,
            epochs=self.epochs,
            lr=self.lr,
            seed=data.seed,
            progress=data.progress,
        )
        return self

    # --- sampling ----------------------------------------------------------------------

    def _generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    def _draw_masks(self, width: int) -> None:
        """Draw the ``T`` head masks once, on the CPU from ``seed``, and keep them.

        They are a buffer, saved with the model: predict, a reloaded model and an
        exported one use the very same masks, on any device.
        """
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        keep = torch.rand(self.samples, width, generator=generator) >= self.p_
        self.register_buffer("keep_", keep)

    def feature_masks(
        self, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The ``T`` head-dropout masks ``[T, width]``, already scaled by ``1 / (1 - p)``.

        Drawn once from ``seed`` (see ``keep_``), so every input sees the same ``T``
        thinned heads.
        """
        keep = self._buffers.get("keep_")
        if keep is None or keep.shape != (self.samples, width):
            self._draw_masks(width)  # used on its own, without a model (attach draws them)
        return self.keep_.to(device=device, dtype=dtype) / (1 - self.p_)

    def _masked(self, features: torch.Tensor) -> torch.Tensor:
        """``[S, n, D]`` -> ``[T * S, n, D]``: the ``T`` head masks on every sample."""
        masks = self.feature_masks(features.shape[-1], features.device, features.dtype)
        out = features.unsqueeze(0) * masks[:, None, None, :]
        return out.reshape(-1, *features.shape[1:])

    def features(
        self,
        inputs: torch.Tensor | None,
        inner: Callable[[torch.Tensor | None], torch.Tensor],
    ) -> torch.Tensor:
        """``scope="all"``: ``T`` passes with the backbone's dropout sampled, ``[T, B, D]``.

        From cached features (``inputs`` is ``None``) only the head's dropout can be
        sampled: the ``T`` head masks.
        """
        if self.scope != "all":
            return inner(inputs)
        if inputs is None:
            cached = inner(None)
            return cached if self.p_ == 0 else self._masked(cached)
        generator = self._generator(inputs.device)
        batch, total = inputs.shape[0], self.samples
        per_chunk = max(1, self.max_batch // max(batch, 1))
        parts = []
        self._sampling: torch.Generator | None = (
            generator  # read by the dropout modules' hooks, this call only
        )
        try:
            for start in range(0, total, per_chunk):
                n = min(per_chunk, total - start)
                repeated = inputs.repeat(n, *([1] * (inputs.ndim - 1)))
                features = inner(repeated)  # [S, n * B, D]
                parts.append(features.reshape(-1, batch, features.shape[-1]))
        finally:
            self._sampling = None
        return seeded_dropout(torch.cat(parts), self.pass_p_, generator)

    def _sample_dropout(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Forward hook of each dropout module (``scope="all"``): while ``features``
        samples, replace the module's eval-mode identity by dropout drawn from the
        plugin's generator; otherwise, or when the module is in train mode (the user is
        training: it already drops), leave its output alone."""
        generator = self.__dict__.get("_sampling")
        if generator is None or module.training or not isinstance(module, DROPOUT_TYPES):
            return None  # (the hooks are registered on dropout modules only)
        return seeded_dropout(args[0], module.p, generator, type(module))

    def members(
        self, features: torch.Tensor, inner: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``scope="head"``: ``[T * M, B, K]``, the inner members of ``T`` dropout samples
        of the features (with ``scope="all"`` the features were sampled already)."""
        if self.scope == "all":
            return inner(features)
        total = self.samples
        if self.p_ == 0:
            # No dropout: T identical samples, computed once.
            return inner(features).repeat(total, 1, 1)
        if torch.compiler.is_exporting():
            # An exported graph takes any batch size: no loop over chunks of its rows.
            return inner(self._masked(features))
        rows, width = features.shape[1], features.shape[2]
        chunk = max(1, _HEAD_CHUNK_ELEMENTS // (total * features.shape[0] * width))
        parts = [
            inner(self._masked(features[:, start : start + chunk]))
            for start in range(0, rows, chunk)
        ]
        return torch.cat(parts, dim=1)

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        """Entropy decomposition and vote statistics over the members."""
        return mc_scores(context.members, context.probs.argmax(dim=-1))


def mc_scores(members: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
    """Uncertainty scores ``[B]`` from member logits ``[M, B, K]``.

    Args:
        members: Logits of the ``M`` sampled members.
        label: The final predicted class of each input (for ``std_top_prob``).
    """
    member_probs = logits_to_probs(members)
    m, batch, classes = member_probs.shape
    predictive = entropy(member_probs.mean(dim=0))
    expected = entropy(member_probs).mean(dim=0)
    votes = member_probs.argmax(dim=-1).T  # [B, M]
    counts = torch.zeros(batch, classes, device=votes.device, dtype=member_probs.dtype)
    counts.scatter_add_(1, votes, torch.ones_like(votes, dtype=member_probs.dtype))
    top = member_probs.gather(-1, label.view(1, batch, 1).expand(m, batch, 1)).squeeze(-1)
    return {
        "predictive_entropy": predictive,
        "expected_entropy": expected,
        # Jensen: >= 0; the clamp only removes rounding below zero.
        "mutual_information": (predictive - expected).clamp_min(0),
        "variation_ratio": 1 - counts.max(dim=-1).values / m,
        "std_top_prob": top.std(dim=0, correction=0),
    }


def finetune_head(
    head: nn.Module,
    features: torch.Tensor | DiskFeatures,
    labels: torch.Tensor,
    *,
    p: float,
    epochs: int,
    lr: float,
    seed: int,
    progress: bool = True,
) -> None:
    """Train ``head`` in place with dropout ``p`` on its input, cross-entropy, Adam.

    Starts from the head's current weights. Mini-batches, their order and the masks come
    from a generator seeded with ``seed``.
    """
    device = features.device
    generator = torch.Generator(device=device).manual_seed(seed)
    params = list(head.parameters())
    flags = [q.requires_grad for q in params]
    for q in params:
        q.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    n = features.shape[0]
    try:
        with torch.enable_grad():
            for _ in tqdm(range(epochs), desc="mc_dropout finetune", disable=not progress):
                order = torch.randperm(n, generator=generator, device=device)
                for start in range(0, n, _FINETUNE_BATCH):
                    idx = order[start : start + _FINETUNE_BATCH]
                    logits = head(seeded_dropout(features[idx], p, generator))
                    loss = F.nll_loss(logits_to_log_probs(logits), labels[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
    finally:
        for q, flag in zip(params, flags, strict=True):
            q.requires_grad_(flag)


@hookimpl
def wrapcal_register_plugins(register: Any) -> None:
    register("mc_dropout", MCDropout)
