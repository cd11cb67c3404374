"""Two heads that disagree off the data: Yu & Aizawa, ICCV 2019 (MCD OOD detection).

"Unsupervised Out-of-Distribution Detection by Maximum Classifier Discrepancy" trains
two classifiers on the same features. Both learn the labelled in-distribution (ID) data;
on unlabelled data (ID and OOD mixed, e.g. production traffic) they are then pushed
apart. Where both are confident and agree the input looks ID; where they disagree it
looks OOD. The score is the L1 distance between the two softmax outputs.

What this plugin does, and the choices it makes:

* Heads. Head 1 is the model's own head (``wrapped.head``, trained in place, so it
  includes any retraining by a label-smoothing plugin fitted before). Head 2 is a
  submodule of the plugin, a deep copy of the head's *structure* made in
  ``attach`` (so a saved model rebuilds it), re-initialised at random in
  ``fit`` with a seeded generator. The paper initialises the two classifiers
  differently at random; a perturbed copy of head 1 would start both heads in the
  same basin, and on frozen features a linear head's cross-entropy is convex, so
  pre-training would pull the copy back onto head 1 and leave the discrepancy to
  step B alone. A random start is the paper's and costs nothing here.
* Members. ``members`` returns ``[2, N, K]`` = (head 1, head 2): head 1 is what the
  plugins before it give (``inner``: the model's own head, retrained by label
  smoothing if it came first), head 2 its own. Training updates ``model.head`` itself,
  so ``fit`` warns when the plugins before it change the head's output, and refuses
  when they give more than one set of logits per feature sample (put such a plugin
  after the discrepancy heads, at a later stage, to wrap them instead).
* Prediction: the core's ``combine_members`` averages the two heads' softmax outputs
  (log of the mean, as logits); temperature scaling fits on that mean afterwards.
* Training (``fit``), on the cached features:

  1. pre-training: both heads, cross-entropy on ``data.train`` (``epochs_pretrain``);
  2. fine-tuning (``epochs``): per labelled mini-batch, paired with an unlabelled one,
     step A minimises ``CE(h1) + CE(h2)`` on the labelled batch, then step B minimises
     ``CE(h1) + CE(h2)`` on the labelled batch plus the discrepancy loss on the
     unlabelled batch (Algorithm 1 of the paper):
     ``max(0, m - mean_x [H(p1(x)) - H(p2(x))])`` with ``H`` the entropy of each
     sample's class distribution (sum over classes, then the mean over the batch, NOT
     the entropy of the batch axis as one public re-implementation computes it) and
     the margin ``m`` (the paper's 1.2; the default here is 2.0, see below). Minimising
     it maximises the entropy gap:
     head 1 becomes uncertain and head 2 confident on unlabelled inputs that the
     labelled loss does not pin down, i.e. OOD ones.

  The authors' code (YU1ut/UOOD-MCD) does the same, with ``m = 1.2``, batches of 128,
  10 fine-tuning epochs and learning rate 0.01 (SGD with momentum, for a whole
  DenseNet); the defaults here follow it, with Adam, which converges on frozen
  features within those 10 epochs (the discrepancy loss reaches ~0.06 on the
  ResNet-20 / CIFAR-10 + MNIST problem of the tests).
* ``train_backbone_block``: the paper fine-tunes the whole network. With the dotted
  name of a backbone submodule (e.g. ``"model.layer3"``), fine-tuning also trains that
  block, streaming ``data.train.data`` and ``data.unlabeled.data`` through the
  backbone (only that block trainable; the backbone stays in eval mode so batch-norm
  statistics are not shifted by the OOD inputs). ``changes_backbone`` is then True,
  so the core recomputes the cached features for the plugins fitted later.
* Score ``discrepancy``: ``sum_k |p1_k - p2_k|`` (in [0, 2], higher = more OOD). It
  reads the members (:attr:`~wrapcal.OutputContext.members`): its two heads, and the
  samples a sampler draws around them (MC dropout: members ``[T*2, N, K]``, head index
  fastest), computed per sample ``t`` and averaged over ``t``. So a plugin that retrains
  the head before it (label smoothing) or samples around it (MC dropout) changes it, by
  design; detectors, calibrators and decisions do not.
* The heads train on the ``fit`` data's features: the model's features, what they read
  at inference (through any ``FEATURES``-stage transform, which the core applies to the
  ``fit`` data before the heads are trained).

The setting of the paper is transductive: the OOD kind to detect is in the unlabelled
data. OOD kinds absent from it are not guaranteed to be caught.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from wrapcal.plugin import (
    Check,
    FitData,
    Interval,
    ModelView,
    OutputContext,
    OutputKind,
    Plugin,
    PluginTags,
    Stage,
    hookimpl,
    in_mode,
    preserved_modes,
    shuffled_batches,
    small_work_threads,
)

if TYPE_CHECKING:
    from wrapcal.plugin import DiskFeatures
from wrapcal_plugins.ood._discrepancy_training import (
    NAME,
    PairedBatches,
    backbone_block,
    cross_entropy,
    discrepancy_loss,
    embedder,
    l1_discrepancy,
    per_sample_entropy,
    seeded_reinit,
    unfreeze_only,
)

__all__ = [
    "DiscrepancyHeads",
    "discrepancy_loss",
    "l1_discrepancy",
    "per_sample_entropy",
]


def _is_history(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(x, float) for x in v)
        for k, v in value.items()
    )


_EPOCHS = [Interval(int, 0, 100_000)]
_POSITIVE = [Interval(float, 0, None, closed="neither")]


class DiscrepancyHeads(Plugin):
    """Two heads that disagree on OOD inputs (Yu & Aizawa 2019); score "discrepancy"."""

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "epochs_pretrain": _EPOCHS,
        "epochs": _EPOCHS,
        "lr": _POSITIVE,
        "margin": _POSITIVE,
        "batch_size": [Interval(int, 1, None)],
        "train_backbone_block": [None, str],
        "lr_backbone": _POSITIVE,
        "seed": [None, Interval(int, 0, 2**63 - 1)],
        "progress": [bool],
    }
    _state_constraints: ClassVar[dict[str, list[Any]]] = {
        "history_": [Check(_is_history, "a dict of lists of floats")]
    }

    def __init__(
        self,
        epochs_pretrain: int = 10,
        epochs: int = 10,
        lr: float = 1e-2,
        margin: float = 2.0,
        batch_size: int = 128,
        train_backbone_block: str | None = None,
        lr_backbone: float = 1e-4,
        seed: int | None = None,
        progress: bool = True,
    ) -> None:
        """Store the parameters (scikit-learn style).

        Args:
            epochs_pretrain: Epochs of supervised training of both heads.
            epochs: Epochs of fine-tuning (steps A and B alternating per mini-batch).
            lr: Adam learning rate of the heads, in both phases.
            margin: ``m`` of the discrepancy loss. The paper uses 1.2; on the shared
                ResNet-20 (``benchmarks/defaults_resnet20.py``, 4 seeds, MNIST in the
                traffic) 2.0 measured better on every seed: AUROC 99.41-99.50% vs
                99.28-99.50%, ECE of the heads' mean 2.1-3.1% vs 3.5-4.4%; 0.5 was worse
                (AUROC 98.45%, ECE 5.43%). Epochs (10 + 10) and lr (1e-2): 5 epochs and
                lr 1e-3 lost a point of accuracy, 20 epochs added nothing.
            batch_size: Mini-batch size, labelled and unlabelled alike.
            train_backbone_block: Dotted name of a backbone submodule to fine-tune too
                (streams the data through the backbone), or ``None`` for heads only.
            lr_backbone: Adam learning rate of that block. Pretrained weights need a far
                smaller step than the heads: at ``lr_backbone=1e-2`` ResNet-20's last
                block lost 8 points of CIFAR-10 accuracy in 3 epochs.
            seed: Seed of head 2's initialisation and of the shuffles; ``None`` takes
                the ``seed`` given to ``wrapped.fit``.
            progress: Show a progress bar (also needs ``wrapped.fit(progress=True)``).
        """
        super().__init__()
        self.epochs_pretrain = epochs_pretrain
        self.epochs = epochs
        self.lr = lr
        self.margin = margin
        self.batch_size = batch_size
        self.train_backbone_block = train_backbone_block
        self.lr_backbone = lr_backbone
        self.seed = seed
        self.progress = progress
        self.history_: dict[str, list[float]] = {}

    def __wrapcal_tags__(self) -> PluginTags:
        tags = super().__wrapcal_tags__()
        tags.stage = Stage.HEADS
        tags.fit_requires = {
            "train": "labelled in-distribution data for both heads",
            "unlabeled": "unlabelled data (in-distribution and OOD mixed, e.g. production "
            "traffic) on which the two heads learn to disagree",
        }
        tags.changes_head = True
        # Fine-tuning a backbone block changes the features: the core re-extracts them.
        tags.changes_backbone = self.train_backbone_block is not None
        tags.streams_data = self.train_backbone_block is not None
        tags.exportable = True
        tags.outputs = {"discrepancy": OutputKind.OOD_SCORE}
        return tags

    # --- the contract --------------------------------------------------------------------

    def attach(self, model: ModelView) -> None:
        # The same structure at wrap and at load time; values come from fit or the file.
        self.head2 = copy.deepcopy(model.head)

    def members(
        self, features: torch.Tensor, inner: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``[2 S, B, K]``: per feature sample, head 1 (the plugins before) and head 2."""
        head1 = inner(features)
        samples, batch, width = features.shape
        if head1.shape[0] != samples:
            raise ValueError(
                f"the plugins before the discrepancy heads give {head1.shape[0]} sets of "
                f"logits for {samples} feature samples; the heads need one per sample. Put "
                "the plugin that adds members after the discrepancy heads (a later stage) "
                "to wrap them instead"
            )
        head2 = self.head2(features.reshape(samples * batch, width)).reshape(samples, batch, -1)
        return torch.stack([head1, head2], dim=1).reshape(2 * samples, batch, -1)

    def outputs(self, context: OutputContext) -> dict[str, torch.Tensor]:
        return {"discrepancy": l1_discrepancy(context.members)}

    def fit(self, model: ModelView, data: FitData) -> DiscrepancyHeads:
        train = data.require("train", NAME, "labelled in-distribution data for both heads")
        labels = train.require_labels(NAME)
        unlabeled = data.require(
            "unlabeled",
            NAME,
            "unlabelled data (in-distribution and OOD mixed, e.g. production traffic) on "
            "which the two heads learn to disagree",
        )
        seed = data.seed if self.seed is None else int(self.seed)
        progress = bool(self.progress and data.progress)
        block = backbone_block(
            model.backbone, self.train_backbone_block, train.data, unlabeled.data
        )
        self._check_inner_members(model, train.features[:16])

        seeded_reinit(self.head2, seed)
        heads = [model.head, self.head2]
        params: list[torch.Tensor] = [p for h in heads for p in h.parameters()]
        frozen = {p: p.requires_grad for p in [*params, *model.backbone.parameters()]}
        self.history_ = {"pretrain": [], "loss_a": [], "loss_b": [], "discrepancy": []}
        bar = tqdm(
            total=self.epochs_pretrain + self.epochs,
            desc=NAME,
            unit="epoch",
            disable=not progress,
        )
        with preserved_modes(*heads, model.backbone):
            try:
                for p in params:
                    p.requires_grad_(True)
                for h in heads:
                    h.train()
                small = self.batch_size * model.num_features * max(model.num_classes, 2)
                with torch.enable_grad():
                    with small_work_threads(train.features.device, small):
                        self._pretrain(heads, params, train.features, labels, seed, bar)
                    if block is None:
                        batches = PairedBatches(
                            (train.features, labels), unlabeled.features, self.batch_size, seed + 1
                        )
                        with small_work_threads(train.features.device, small):
                            self._finetune(heads, [{"params": params}], batches, lambda x: x, bar)
                    else:
                        groups: list[dict[str, Any]] = [
                            {"params": params},
                            {
                                "params": unfreeze_only(model.backbone, block),
                                "lr": self.lr_backbone,
                            },
                        ]
                        model.backbone.eval()
                        batches = PairedBatches(
                            train.data, unlabeled.data, self.batch_size, seed + 1
                        )
                        self._finetune(heads, groups, batches, embedder(model.backbone), bar)
            finally:
                bar.close()
                for p, flag in frozen.items():
                    p.requires_grad_(flag)
        return self

    # --- training ----------------------------------------------------------------------

    def _pretrain(
        self,
        heads: list[nn.Module],
        params: list[torch.Tensor],
        features: torch.Tensor | DiskFeatures,
        labels: torch.Tensor,
        seed: int,
        bar: tqdm,
    ) -> None:
        optimizer = torch.optim.Adam(params, lr=self.lr)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        for _ in range(self.epochs_pretrain):
            total = torch.zeros((), device=features.device)
            for f, y in shuffled_batches((features, labels), self.batch_size, generator):
                # Summed as sum() would, starting from the first head's loss (not the int 0).
                loss = cross_entropy(heads[0](f), y)
                for h in heads[1:]:
                    loss = loss + cross_entropy(h(f), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * f.shape[0]
            self.history_["pretrain"].append(float(total / features.shape[0]))
            bar.set_postfix(ce=self.history_["pretrain"][-1])
            bar.update()

    def _finetune(
        self,
        heads: list[nn.Module],
        groups: list[dict[str, Any]],
        batches: PairedBatches,
        embed: Callable[[torch.Tensor], torch.Tensor],
        bar: tqdm,
    ) -> None:
        optimizer = torch.optim.Adam(groups, lr=self.lr)
        h1, h2 = heads
        device = groups[0]["params"][0].device

        def supervised(x: torch.Tensor, y: torch.Tensor, step_a: bool) -> torch.Tensor:
            f = embed(x)
            # As in the authors' code, head 2's loss in step A does not reach the backbone
            # block (a no-op on cached features, which carry no gradient).
            f2 = f.detach() if step_a else f
            return cross_entropy(h1(f), y) + cross_entropy(h2(f2), y)

        for _ in range(self.epochs):
            sums = {k: 0.0 for k in ("loss_a", "loss_b", "discrepancy")}
            steps = 0
            for x, y, xu in batches.epoch():
                y = y.to(device)
                # Step A: classify the labelled batch.
                loss_a = supervised(x, y, step_a=True)
                optimizer.zero_grad(set_to_none=True)
                loss_a.backward()
                optimizer.step()
                # Step B: keep classifying it while the heads move apart on unlabelled data
                # (features recomputed: a trained backbone block changed in step A).
                fu = embed(xu)
                disc = discrepancy_loss(h1(fu), h2(fu), self.margin)
                loss_b = supervised(x, y, step_a=False) + disc
                optimizer.zero_grad(set_to_none=True)
                loss_b.backward()
                optimizer.step()
                for k, v in (("loss_a", loss_a), ("loss_b", loss_b), ("discrepancy", disc)):
                    sums[k] += float(v.detach())
                steps += 1
            for k, summed in sums.items():
                self.history_[k].append(summed / max(steps, 1))
            bar.set_postfix(disc=self.history_["discrepancy"][-1])
            bar.update()

    def _check_inner_members(self, model: ModelView, features: torch.Tensor) -> None:
        with in_mode(model.head, False):  # head dropout would make the two calls differ
            inner = model.members(features)
            with torch.no_grad():
                own = model.head(features)
        if inner.shape[0] != 1:
            raise ValueError(
                f"the plugins before the discrepancy heads give {inner.shape[0]} sets of "
                "logits, the heads need one. Put the plugin that adds members after the "
                "discrepancy heads (a later stage) to wrap them instead"
            )
        if not torch.allclose(inner[0], own, atol=1e-5, rtol=1e-4):
            warnings.warn(
                f"plugin {NAME} trains the model's head, but the plugins before it change "
                "its output: head 1 serves their output, which training does not see; put "
                "that plugin after the discrepancy heads (a later stage) to wrap them "
                "instead",
                stacklevel=2,
            )


@hookimpl
def wrapcal_register_plugins(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register(NAME, DiscrepancyHeads)
